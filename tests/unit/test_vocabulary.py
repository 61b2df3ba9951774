"""Vocabularies: building, open-set use without rebuilding the model, validation, files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import ramplus_core
from helpers import random_images
from ramplus_core import Vocabulary, VocabularyError
from ramplus_core.model import reweight_descriptions


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.fixture(scope="module")
def model():
    return ramplus_core.create_model("tiny@64", seed=0)


@pytest.fixture(scope="module")
def images():
    return ramplus_core.preprocess(random_images(3, seed=2), 64)


def test_descriptions_format_builds_a_ragged_vocabulary(tiny_text_encoder):
    items = [
        {"cat": ["a photo of a cat.", "A small furry animal with whiskers.", "pointy ears"]},
        {"rocket": ["a photo of a rocket."]},
    ]
    vocab = Vocabulary.from_descriptions(items, tiny_text_encoder.encode, text_encoder=tiny_text_encoder.id, name="animals")
    assert vocab.tags == ["cat", "rocket"]
    assert vocab.embeddings.shape == (2, 3, 512)
    assert vocab.counts.tolist() == [3, 1]
    assert vocab.embeddings[1, 1:].abs().sum() == 0  # padding
    torch.testing.assert_close(vocab.embeddings[0].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(vocab.embeddings[1, 0], tiny_text_encoder.encode(["a photo of a rocket."])[0])
    assert vocab.metadata.text_encoder == "open_clip:ramplus-tiny-text/random-seed0"
    assert vocab.thresholds.eq(0.5).all()


def test_bare_tags_use_the_template(tiny_text_encoder):
    vocab = Vocabulary.from_tags(["dog", "tree"], tiny_text_encoder.encode, text_encoder=tiny_text_encoder.id)
    assert vocab.embeddings.shape == (2, 1, 512)
    torch.testing.assert_close(vocab.embeddings[1, 0], tiny_text_encoder.encode(["a photo of a tree."])[0])


def test_a_new_vocabulary_needs_no_new_model(model, images):
    first = Vocabulary.from_embeddings(["a", "b"], _unit(2, 4, 512))
    second = Vocabulary.from_embeddings(["x", "y", "z"], _unit(3, 2, 512, seed=1))
    with torch.inference_mode():
        assert model.tag_logits(images, first).shape == (3, 2)
        model.set_vocabulary(second)
        assert model.tag_logits(images).shape == (3, 3)


def test_a_tags_score_does_not_depend_on_the_other_tags(model, images):
    tags = [f"t{i}" for i in range(8)]
    full = Vocabulary.from_embeddings(tags, [_unit(1 + i % 4, 512, seed=i) for i in range(8)])
    some = full.select(["t5", "t1", "t6"])
    more = Vocabulary.from_embeddings(
        tags + ["n0", "n1"], [_unit(1 + i % 4, 512, seed=i) for i in range(8)] + [_unit(7, 512, seed=99), _unit(2, 512, seed=98)]
    )
    with torch.inference_mode():
        base = model.tag_logits(images, full)
        torch.testing.assert_close(model.tag_logits(images, some), base[:, [5, 1, 6]], atol=1e-6, rtol=0)
        torch.testing.assert_close(model.tag_logits(images, more)[:, :8], base, atol=1e-6, rtol=0)


def test_padding_is_invisible(model, images):
    # One tag with 2 descriptions scores the same alone (no padding) and next to a 9-description tag.
    short = _unit(2, 512, seed=3)
    alone = Vocabulary.from_embeddings(["short"], short.unsqueeze(0))
    padded = Vocabulary.from_embeddings(["short", "long"], [short, _unit(9, 512, seed=4)])
    assert padded.mask() is not None
    with torch.inference_mode():
        torch.testing.assert_close(model.tag_logits(images, padded)[:, 0], model.tag_logits(images, alone)[:, 0], atol=1e-6, rtol=0)


def test_batched_reweighting_equals_the_official_per_image_loop():
    pooled = torch.randn(4, 512)
    emb = _unit(6, 51, 512)
    scale = torch.tensor(2.6593)
    ours = reweight_descriptions(pooled, scale, emb)
    cls = pooled / pooled.norm(dim=-1, keepdim=True)
    w = ((scale.exp() * cls) @ emb.view(-1, 512).T).view(4, 6, 51).softmax(dim=2)
    ref = torch.stack([(w[b, :, :, None] * emb).sum(dim=1) for b in range(4)])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_save_and_load_round_trip(tmp_path):
    vocab = Vocabulary.from_embeddings(["a", "b"], [_unit(3, 512), _unit(1, 512, seed=1)], thresholds=[0.6, 0.7], name="v", version="7")
    path = vocab.save(tmp_path / "v.safetensors")
    again = Vocabulary.load(path, dim=512)
    assert again.tags == ["a", "b"] and again.ref == "v@7"
    assert torch.equal(again.embeddings, vocab.embeddings) and torch.equal(again.counts, vocab.counts)
    torch.testing.assert_close(again.thresholds, torch.tensor([0.6, 0.7]))
    assert again.metadata.sha256 == vocab.metadata.sha256


def test_fp16_vocabulary_round_trips(tmp_path):
    vocab = Vocabulary.from_embeddings(["a"], _unit(1, 5, 512), dtype="float16")
    again = Vocabulary.load(vocab.save(tmp_path / "h.safetensors"))
    assert again.embeddings.dtype == torch.float16 and again.metadata.dtype == "float16"


def test_altered_bytes_fail_the_checksum(tmp_path):
    path = Vocabulary.from_embeddings(["a", "b"], _unit(2, 3, 512)).save(tmp_path / "v.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # inside the embedding data
    path.write_bytes(bytes(raw))
    with pytest.raises(VocabularyError, match="sha256 mismatch"):
        Vocabulary.load(path)


def test_nan_embeddings_are_refused_naming_the_tag():
    emb = _unit(3, 2, 512)
    emb[1, 0, 7] = float("nan")
    with pytest.raises(VocabularyError, match=r"non-finite .* tag 'b'"):
        Vocabulary.from_embeddings(["a", "b", "c"], emb)


def test_wrong_dimension_is_refused_by_the_model(model):
    vocab = Vocabulary.from_embeddings(["a"], _unit(1, 2, 384), text_encoder="minilm")
    with pytest.raises(VocabularyError, match="384-d but the model expects 512-d"):
        model.set_vocabulary(vocab)
    with pytest.raises(VocabularyError, match="expects 512-d"):
        Vocabulary.load(vocab.save(__import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "v.safetensors"), dim=512)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tags=["a", "a"], embeddings=_unit(2, 1, 512)), "duplicate tags 'a'"),
        (dict(tags=["a", "b"], embeddings=_unit(3, 1, 512)), "2 tags but embeddings for 3"),
        (dict(tags=["a"], embeddings=_unit(1, 512)), r"must be \[num_tags, descriptions, dim\]"),
        (dict(tags=["a", "b"], embeddings=_unit(2, 1, 512), thresholds=[0.5]), "1 thresholds for 2 tags"),
        (dict(tags=["a"], embeddings=_unit(1, 1, 512), thresholds=1.5), r"thresholds must be finite probabilities"),
        (dict(tags=[" "], embeddings=_unit(1, 1, 512)), "empty tag name"),
    ],
)
def test_bad_vocabularies_say_what_is_wrong(kwargs, message):
    with pytest.raises(VocabularyError, match=message):
        Vocabulary.from_embeddings(**kwargs)


def test_official_layout_must_divide_by_the_tag_count():
    with pytest.raises(VocabularyError, match="not a multiple of the 4 tags"):
        Vocabulary.from_official(_unit(10, 512), ["a", "b", "c", "d"])


def test_a_file_that_is_not_a_vocabulary(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + json.dumps({}).encode().ljust(16))
    with pytest.raises(VocabularyError, match="not a RAMPlus vocabulary|not a readable"):
        Vocabulary.load(tmp_path / "x.safetensors")
    with pytest.raises(VocabularyError, match="not found"):
        Vocabulary.load(tmp_path / "missing.safetensors")
