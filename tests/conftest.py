"""Shared fixtures: tiny official-layout checkpoints, a tiny text encoder, synthetic images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for official_reference

from helpers import TINY_TAGS, make_tiny_model  # noqa: E402
from official_reference import TINY_GEOMETRY, make_official_state_dict  # noqa: E402



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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our own checkpoint format: what `ramplus serve` loads in tests."""
    from ramplus_core import save_pretrained

    return save_pretrained(make_tiny_model(), tmp_path_factory.mktemp("model") / "tiny")
