"""Model artifacts on disk: complete-marker last, immutable, every file checked when read."""

from __future__ import annotations

import json

import pytest

from helpers import make_tiny_model
from ramplus_core import load_checkpoint, save_pretrained
from workers.train.artifacts import COMPLETE, ArtifactError, fetch_artifact, publish_artifact, resolve_checkpoint, split_s3_uri


def test_a_published_directory_loads_back_as_the_same_model(tmp_path):
    model = make_tiny_model()
    src = save_pretrained(model, tmp_path / "src")
    (src / "metrics.json").write_text('{"map": 0.9}')
    dest = publish_artifact(src, str(tmp_path / "published" / "v1"))
    listing = json.loads((tmp_path / "published" / "v1" / COMPLETE).read_text())
    assert "model.safetensors" in listing["files"] and "metrics.json" in listing["files"]
    back = load_checkpoint(resolve_checkpoint(fetch_artifact(dest)))
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert (a == b).all(), name
    assert back.vocabulary.ref == model.vocabulary.ref


def test_artifacts_are_immutable_and_a_tampered_or_half_written_one_is_refused(tmp_path):
    src = save_pretrained(make_tiny_model(), tmp_path / "src")
    dest = str(tmp_path / "pub")
    publish_artifact(src, dest)
    with pytest.raises(ArtifactError, match="immutable"):
        publish_artifact(src, dest)
    (tmp_path / "pub" / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="config.json .* sha256"):
        fetch_artifact(dest)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not a complete artifact"):
        fetch_artifact(str(tmp_path / "half"))


def test_s3_uris_split_and_bad_ones_say_so(tmp_path):
    assert split_s3_uri("s3://b/models/x/1/") == ("b", "models/x/1/")
    with pytest.raises(ArtifactError):
        split_s3_uri("http://b/x")
    with pytest.raises(ArtifactError, match="no files"):
        publish_artifact(tmp_path, str(tmp_path / "out"))
