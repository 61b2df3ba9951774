"""The CLIP text encoder wrapper: normalised 512-d output, truncation, clear errors without weights."""

from __future__ import annotations

import pytest
import torch

from ramplus_core import WeightsUnavailableError
from ramplus_core.text_encoder import TextEncoder


def test_embeddings_are_unit_length_and_512_d(tiny_text_encoder):
    out = tiny_text_encoder.encode(["a photo of a cat.", "a photo of a dog."])
    assert out.shape == (2, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(out[0], out[1])


def test_long_descriptions_are_truncated_not_refused(tiny_text_encoder):
    long = "A small domesticated carnivorous mammal with soft fur. " * 40
    out = tiny_text_encoder.encode([long, long + "extra words past the limit"])
    torch.testing.assert_close(out[0], out[1])  # only the first 77 tokens count, as clip.tokenize(truncate=True)


def test_random_weights_are_visible_in_the_id(tiny_text_encoder):
    assert tiny_text_encoder.id == "open_clip:ramplus-tiny-text/random-seed0"


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="weights file not found"):
        TextEncoder("ViT-B-16", pretrained=str(tmp_path / "open_clip_pytorch_model.bin"))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(WeightsUnavailableError, match="unknown open_clip model"):
        TextEncoder("ViT-Q-99", pretrained=None)


def test_random_weights_come_from_the_seed_so_every_process_embeds_alike():
    from ramplus_core.text_encoder import TextEncoder

    texts = ["a red circle", "a blue star on a black background"]
    torch.manual_seed(123)  # the global RNG plays no part, and is left as it was
    state = torch.random.get_rng_state()
    a = TextEncoder("ramplus-tiny-text", None).encode(texts)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = TextEncoder("ramplus-tiny-text", None).encode(texts)
    c = TextEncoder("ramplus-tiny-text", None, seed=1).encode(texts)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_random_weights_are_reported_once(caplog, capsys):
    import logging

    from ramplus_core.text_encoder import TextEncoder

    with caplog.at_level(logging.WARNING):
        TextEncoder(pretrained=None, seed=1)
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]  # open_clip's own line is dropped
    out = capsys.readouterr()
    assert "text_encoder.random_weights" in out.out + out.err  # ours remains, with the seed
