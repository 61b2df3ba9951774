"""Our RAM++ against the official math (tests/official_reference.py) on official-layout checkpoints."""

from __future__ import annotations

import pytest
import torch

import ramplus_core
from helpers import TINY_TAGS, random_images
from official_reference import (
    OFFICIAL_VARIANTS,
    TINY_GEOMETRY,
    make_official_state_dict,
    official_tag_logits,
    official_transform,
)


def test_tiny_checkpoint_logits_match_official(tiny_official_checkpoint, tiny_official_state_dict):
    model = ramplus_core.load_checkpoint(tiny_official_checkpoint)
    x = ramplus_core.preprocess(random_images(3, size=(90, 70)), image_size=64)
    ours = model.tag_logits(x)
    ref = official_tag_logits(tiny_official_state_dict, x, **TINY_GEOMETRY)
    assert ours.shape == (3, TINY_TAGS)
    assert ref.std() > 1e-3, "reference logits are degenerate: the comparison would prove nothing"
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_preprocess_matches_official_transform():
    images = random_images(2, size=(123, 77)) + [random_images(1, size=(40, 300))[0].convert("L")]
    rgba = random_images(1, size=(50, 50))[0].convert("RGBA")
    images.append(rgba)
    for size in (64, 224, 384):
        torch.testing.assert_close(ramplus_core.preprocess(images, image_size=size), official_transform(images, size), atol=1e-5, rtol=0)


def test_variant_and_size_are_inferred_from_the_checkpoint(tiny_official_checkpoint):
    model = ramplus_core.load_checkpoint(tiny_official_checkpoint)
    assert model.config.key == "tiny@64"
    assert model.config.window_size == 4
    assert len(model.vocabulary) == TINY_TAGS


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(OFFICIAL_VARIANTS))
def test_official_variant_logits_match(variant, tmp_path):
    geometry = OFFICIAL_VARIANTS[variant]
    name, size = variant.split("@")
    sd = make_official_state_dict(**geometry, num_tags=5, seed=3)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, path)
    del sd
    model = ramplus_core.load_checkpoint(path, variant=name, image_size=int(size))
    assert model.config.key == variant
    images = random_images(2, seed=5, size=(300, 200))
    x = ramplus_core.preprocess(images, image_size=int(size))
    torch.testing.assert_close(x, official_transform(images, int(size)), atol=1e-5, rtol=0)
    with torch.inference_mode():
        ours = model.tag_logits(x)
    sd = torch.load(path, weights_only=True)["model"]
    with torch.inference_mode():
        ref = official_tag_logits(sd, x, **geometry)
    assert ref.std() > 1e-3
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    # inferred without hints too
    assert ramplus_core.load_checkpoint(path).config.key == variant
