"""Checkpoint loading: strict layout checks, the pickle policy, our own format, the official vocabulary."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import ramplus_core
from helpers import TINY_TAGS, random_images
from ramplus_core.checkpoint import read_torch_file
from ramplus_core.errors import CheckpointError, CheckpointLayoutError, UntrustedCheckpointError


def _save(tmp_path, sd, name="ckpt.pth", **kwargs):
    path = tmp_path / name
    torch.save({"model": sd}, path, **kwargs)
    return path


def test_missing_key_is_named(tmp_path, tiny_official_state_dict):
    sd = dict(tiny_official_state_dict)
    del sd["tagging_head.encoder.layer.1.output.dense.weight"]
    with pytest.raises(CheckpointLayoutError, match=r"1 missing: decoder\.layers\.1\.fc2\.weight"):
        ramplus_core.load_checkpoint(_save(tmp_path, sd))


def test_unexpected_key_is_named(tmp_path, tiny_official_state_dict):
    sd = {**tiny_official_state_dict, "tagging_head.pooler.dense.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointLayoutError, match=r"unexpected: tagging_head\.pooler\.dense\.weight"):
        ramplus_core.load_checkpoint(_save(tmp_path, sd))


def test_wrong_shape_is_named(tmp_path, tiny_official_state_dict):
    sd = {**tiny_official_state_dict, "fc.weight": torch.zeros(2, 768)}
    with pytest.raises(CheckpointLayoutError, match=r"shape mismatch: fc\.weight: checkpoint \(2, 768\)"):
        ramplus_core.load_checkpoint(_save(tmp_path, sd))


def test_unknown_layout_is_refused(tmp_path):
    path = _save(tmp_path, {"backbone.conv1.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointLayoutError, match="unknown checkpoint layout"):
        ramplus_core.load_checkpoint(path)


def test_ram_not_plus_checkpoint_is_recognised(tmp_path, tiny_official_state_dict):
    sd = {k: v for k, v in tiny_official_state_dict.items() if k != "reweight_scale"}
    with pytest.raises(CheckpointLayoutError, match=r"RAM \(not \+\+\)"):
        ramplus_core.load_checkpoint(_save(tmp_path, sd))


def test_timm_layout_swin_is_not_mistaken_for_official(tmp_path, tiny_official_state_dict):
    sd = {k.replace("layers.0.downsample", "layers.1.downsample") if "downsample" in k else k: v
          for k, v in tiny_official_state_dict.items()}
    sd = {k: v for k, v in sd.items() if "layers.2.downsample" not in k}
    with pytest.raises(CheckpointLayoutError):
        ramplus_core.load_checkpoint(_save(tmp_path, sd))


def test_requesting_another_variant_names_the_mismatch(tiny_official_checkpoint):
    with pytest.raises(CheckpointLayoutError, match=r"variant 'swin_l@384'"):
        ramplus_core.load_checkpoint(tiny_official_checkpoint, variant="swin_l", image_size=384)


def test_not_a_checkpoint_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(CheckpointLayoutError, match="unknown checkpoint format"):
        ramplus_core.load_checkpoint(path)


def test_truncated_checkpoint(tmp_path, tiny_official_checkpoint):
    path = tmp_path / "cut.pth"
    path.write_bytes(tiny_official_checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ramplus_core.load_checkpoint(path)


def test_missing_checkpoint_says_how_to_get_the_weights(tmp_path):
    with pytest.raises(CheckpointError, match="xinyu1205/recognize-anything-plus-model"):
        ramplus_core.load_checkpoint(tmp_path / "ram_plus_swin_large_14m.pth")


class _Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_untrusted_pickle_is_refused_without_running_code(tmp_path, tiny_official_state_dict):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_official_state_dict, "extra": _Payload(str(marker))}, path)
    with pytest.raises(UntrustedCheckpointError, match="trust_pickle=True"):
        ramplus_core.load_checkpoint(path)
    assert not marker.exists()


def test_trusted_pickle_loads_when_asked(tmp_path, tiny_official_state_dict):
    path = tmp_path / "old.pth"
    torch.save({"model": tiny_official_state_dict, "args": _Harmless()}, path)
    with pytest.raises(UntrustedCheckpointError):
        ramplus_core.load_checkpoint(path)
    model = ramplus_core.load_checkpoint(path, trust_pickle=True)
    assert len(model.vocabulary) == TINY_TAGS


class _Harmless:
    pass


def test_official_save_object_loads_with_weights_only(tiny_official_checkpoint, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ramplus_core.load_checkpoint(tiny_official_checkpoint)
    assert calls == [True]


def test_legacy_non_zip_checkpoint_loads_without_mmap(tmp_path, tiny_official_state_dict):
    path = _save(tmp_path, tiny_official_state_dict, _use_new_zipfile_serialization=False)
    obj = read_torch_file(path, mmap=True)
    assert "label_embed" in obj["model"]


def test_own_format_round_trip_needs_no_pickle(tmp_path, tiny_official_checkpoint, monkeypatch):
    model = ramplus_core.load_checkpoint(tiny_official_checkpoint)
    out = ramplus_core.save_pretrained(model, tmp_path / "ours")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocabulary.safetensors"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called for our own format")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    again = ramplus_core.load_checkpoint(out)
    x = ramplus_core.preprocess(random_images(2), 64)
    with torch.inference_mode():
        torch.testing.assert_close(again.tag_logits(x), model.tag_logits(x), atol=0, rtol=0)
    assert again.vocabulary.tags == model.vocabulary.tags
    assert again.config == model.config


def test_own_format_with_a_wrong_config_is_refused(tmp_path, tiny_official_checkpoint):
    model = ramplus_core.load_checkpoint(tiny_official_checkpoint)
    out = ramplus_core.save_pretrained(model, tmp_path / "ours")
    cfg = (out / "config.json").read_text().replace('"decoder_layers": 2', '"decoder_layers": 3')
    (out / "config.json").write_text(cfg)
    with pytest.raises(CheckpointLayoutError, match="missing: decoder.layers.2"):
        ramplus_core.load_checkpoint(out)


def test_official_vocabulary_uses_tag_list_and_thresholds(tmp_path, tiny_official_checkpoint):
    tags = [f"thing {i}" for i in range(TINY_TAGS)]
    (tmp_path / "tags.txt").write_text("\n".join(tags))  # no trailing newline, like the official file
    (tmp_path / "thr.txt").write_text("\n".join(str(0.5 + i / 100) for i in range(TINY_TAGS)) + "\n")
    vocab = ramplus_core.import_official_vocabulary(tiny_official_checkpoint, tmp_path / "tags.txt", tmp_path / "thr.txt")
    assert vocab.tags == tags
    assert vocab.embeddings.shape == (TINY_TAGS, 51, 512)
    assert vocab.thresholds[3].item() == pytest.approx(0.53)
    model = ramplus_core.load_checkpoint(tiny_official_checkpoint, tag_list=tmp_path / "tags.txt")
    assert model.vocabulary.tags == tags
    assert model.vocabulary.thresholds.eq(0.68).all()  # official default without a threshold file


def test_tag_list_of_the_wrong_length_is_refused(tmp_path, tiny_official_checkpoint):
    (tmp_path / "tags.txt").write_text("a\nb\nc\nd\ne\nf\ng\nh")
    with pytest.raises(ramplus_core.VocabularyError, match="not a multiple of the 8 tags"):
        ramplus_core.load_checkpoint(tiny_official_checkpoint, tag_list=tmp_path / "tags.txt")
