"""Shared fixtures: tiny official-layout checkpoints, a tiny text encoder, synthetic images."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # for official_reference

from official_reference import TINY_GEOMETRY, make_official_state_dict  # noqa: E402

TINY_TAGS = 7


@pytest.fixture(scope="session")
def tiny_official_state_dict() -> dict[str, torch.Tensor]:
    return make_official_state_dict(**TINY_GEOMETRY, num_tags=TINY_TAGS, seed=1)


@pytest.fixture(scope="session")
def tiny_official_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_official_state_dict) -> Path:
    """The official save object: {"model": sd, "optimizer": ..., "config": ..., "epoch": ...}."""
    path = tmp_path_factory.mktemp("ckpt") / "ram_plus_tiny.pth"
    torch.save(
        {
            "model": tiny_official_state_dict,
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-6, "betas": (0.9, 0.999), "weight_decay": 0.05}]},
            "config": {"vit": "swin_l", "image_size": 64, "batch_size_train": 26},
            "epoch": 1,
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def tiny_text_encoder():
    from ramplus_core.text_encoder import TextEncoder

    torch.manual_seed(0)
    return TextEncoder("ramplus-tiny-text", pretrained=None)


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (96, 80)) -> list[Image.Image]:
    """Smooth random images (a blurred field plus gradients), different sizes and modes are made by callers."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = size
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
        out.append(img)
    return out


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_tiny_model(num_tags: int = 12, seed: int = 0, name: str = "tiny-vocab", version: str = "1"):
    """A randomly initialised tiny@64 RAM++ with a random vocabulary (thresholds low enough to fire)."""
    from ramplus_core import Vocabulary, create_model

    torch.manual_seed(seed)
    embeddings = torch.nn.functional.normalize(torch.randn(num_tags, 3, 512), dim=-1)
    vocab = Vocabulary.from_embeddings(
        [f"tag{i}" for i in range(num_tags)], embeddings, thresholds=0.3, name=name, version=version
    )
    return create_model("tiny@64", vocabulary=vocab, seed=seed)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our own checkpoint format: what `ramplus serve` loads in tests."""
    from ramplus_core import save_pretrained

    return save_pretrained(make_tiny_model(), tmp_path_factory.mktemp("model") / "tiny")
