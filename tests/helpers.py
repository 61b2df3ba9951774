"""Test helpers shared by unit and integration tests (images, tiny models)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

TINY_TAGS = 7


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
