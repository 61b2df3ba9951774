"""Retraining on the real stack: Ray Train (2 CPU workers) on synthetic data in S3, vocabulary from Redis,
checkpoints and the artifact in S3. A base model is trained from scratch on scenes in four colours, then
fine-tuned from its artifact with two colours it never saw added to the vocabulary (the encoder at a tenth of
the head's learning rate, activation checkpointing on); the fine-tuned artifact, new tags and calibrated
thresholds included, then serves in `ramplus tag` and in the fleet."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fleet_kit import fleet_settings, make_topics, publish, request, wait_until
from ramplus_core import Vocabulary, load_checkpoint
from ramplus_core.synthetic import COLOURS, TAGS, describe_tags
from ramplus_core.text_encoder import TextEncoder
from workers.train.artifacts import fetch_artifact
from workers.cli import app
from workers.stream.fleet import Fleet
from workers.settings import S3Settings, Settings
from workers.train.synth_data import write_dataset
from workers.vocab.store import VocabStore

IMAGES = 800  # at most 1,000, as the acceptance says
MINUTES = 2.0  # the base model
TUNE_MINUTES = 1.5
NEW_COLOURS = ["orange", "purple"]
BASE_TAGS = [t for t in TAGS if t not in NEW_COLOURS]


def synthetic_vocabulary(name: str, tags: list[str] = TAGS, version: str = "1") -> Vocabulary:
    encoder = TextEncoder("ramplus-tiny-text", None)  # random weights, seed 0: the same in every worker
    descriptions = describe_tags()
    return Vocabulary.from_descriptions(
        [{t: descriptions[t]} for t in tags], encoder.encode, text_encoder=encoder.id, name=name, version=version, thresholds=0.5,
    )


def train_settings(stack, bucket: str, vocab_ref: str, run_name: str, data: str = "synth", **train) -> Settings:
    return Settings(
        s3=S3Settings(endpoint_url=stack.s3_endpoint, region=stack.s3_credentials["region_name"], bucket=bucket),
        redis={"url": stack.redis_url},
        train={
            "run_name": run_name, "manifest": f"s3://{bucket}/{data}/manifest.jsonl",
            "storage_path": f"s3://{bucket}/runs", "output": f"s3://{bucket}/models", "model": "tiny@64",
            "vocabulary": f"redis:{vocab_ref}", "text_encoder": "ramplus-tiny-text", "text_weights": "none",
            "workers": 2, "cpus_per_worker": 1, "batch_size": 16, "lr": 5e-4, "warmup_steps": 20,
            **train,
        },
    )


@pytest.fixture(scope="module")
def base(stack, ray_cluster, s3_client):
    """A model trained from scratch on scenes drawn without the new colours, with a vocabulary without them."""
    from workers.train.retrain import run

    bucket = f"retrain-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=bucket)
    s3 = S3Settings(endpoint_url=stack.s3_endpoint, region=stack.s3_credentials["region_name"])
    old_colours = [c for c in COLOURS if c not in NEW_COLOURS]
    write_dataset(f"s3://{bucket}/synth-base", n=IMAGES, seed=1, size=96, s3=s3, progress=False, colours=old_colours)
    write_dataset(f"s3://{bucket}/synth", n=IMAGES, seed=0, size=96, s3=s3, progress=False)
    store = VocabStore(redis.Redis.from_url(stack.redis_url))
    name = f"synth-{uuid.uuid4().hex[:6]}"
    ref = store.publish(synthetic_vocabulary(name, BASE_TAGS))
    settings = train_settings(stack, bucket, ref, f"run-{uuid.uuid4().hex[:6]}", data="synth-base", epochs=40, max_minutes=MINUTES)
    result = run(settings, version="v1")
    yield settings, result, bucket, store, name
    for key in store.redis.scan_iter(match=f"ramplus:vocab:{name}:*"):
        store.redis.delete(key)


@pytest.fixture(scope="module")
def trained(base, stack):
    """The base artifact fine-tuned on scenes in every colour, with the two new colours added to its vocabulary."""
    from workers.train.retrain import run

    base_settings, base_result, bucket, store, name = base
    ref = store.publish(synthetic_vocabulary(name, TAGS, version="2"))
    settings = train_settings(
        stack, bucket, ref, f"tune-{uuid.uuid4().hex[:6]}", init=base_result.artifact, epochs=20, max_minutes=TUNE_MINUTES,
        encoder_lr_scale=0.1, grad_checkpointing=True, warmup_steps=0,
    )
    return settings, run(settings, version="v1"), bucket


def test_training_lowers_the_loss_and_beats_the_label_prior_twice(base):
    _, result, _, _, _ = base
    history = result.history
    assert len(history) >= 2 and history[-1]["elapsed_s"] <= MINUTES * 60 + 60
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"], [h["train_loss"] for h in history]
    assert history[-1]["val_map"] >= 2 * history[-1]["prior_map"], (history[-1]["val_map"], history[-1]["prior_map"])
    assert [h["step"] for h in history] == sorted({h["step"] for h in history})


def test_the_lr_follows_the_time_budget(base):
    _, result, _, _, _ = base
    lrs = [h["lr"] for h in result.history]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] <= 0.1 * 5e-4, lrs  # at its floor when the time is up


def test_the_fine_tune_learns_the_added_tags_and_keeps_the_old_ones(base, trained):
    base_settings, base_result, _, _, _ = base
    settings, result, _ = trained
    before = json.loads((fetch_artifact(base_result.artifact, base_settings.s3) / "metrics.json").read_text())["final"]["val_tag_ap"]
    after = json.loads((fetch_artifact(result.artifact, settings.s3) / "metrics.json").read_text())
    assert after["train"]["init"] == base_result.artifact and after["train"]["encoder_lr_scale"] == 0.1
    tag_ap = after["final"]["val_tag_ap"]
    assert set(tag_ap) == set(TAGS)
    prior = after["final"]["prior_map"]
    assert all(tag_ap[t] > 2 * prior for t in NEW_COLOURS), {t: tag_ap[t] for t in NEW_COLOURS}
    kept = {t: tag_ap[t] / before[t] for t in BASE_TAGS if before[t]}
    assert sum(kept.values()) / len(kept) >= 0.9, kept


def test_the_artifact_holds_the_model_its_vocabulary_metrics_and_its_own_scores(trained, s3_client):
    settings, result, bucket = trained
    assert result.artifact == f"s3://{bucket}/models/{settings.train.run_name}/v1"
    local = fetch_artifact(result.artifact, settings.s3)
    metrics = json.loads((local / "metrics.json").read_text())
    assert metrics["final"]["val_map"] >= 2 * metrics["final"]["prior_map"]
    model = load_checkpoint(local)
    assert model.vocabulary.tags == TAGS and not torch.allclose(model.vocabulary.thresholds, torch.full((len(TAGS),), 0.5))
    with pytest.raises(Exception, match="immutable"):
        from workers.train.artifacts import publish_artifact

        publish_artifact(local, result.artifact, settings.s3)


def _job_scores(settings, result) -> tuple[Path, dict[str, torch.Tensor]]:
    local = fetch_artifact(result.artifact, settings.s3)
    scores = load_file(str(local / "eval" / "val_scores.safetensors"))["scores"]
    uris = json.loads((local / "eval" / "val_uris.json").read_text())
    return local, dict(zip(uris, scores))


def test_ramplus_tag_on_the_artifact_gives_the_jobs_scores(trained, s3_client, aws_env, tmp_path, monkeypatch):
    settings, result, bucket = trained
    _, by_uri = _job_scores(settings, result)
    wanted = list(by_uri)[:12]
    for n, uri in enumerate(wanted):
        key = uri.split("/", 3)[3]
        (tmp_path / f"{n:02d}.jpg").write_bytes(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
    monkeypatch.setenv("RAMPLUS_S3__ENDPOINT_URL", settings.s3.endpoint_url)
    monkeypatch.setenv("RAMPLUS_MODEL__CACHE_DIR", str(tmp_path / "cache"))
    out = CliRunner().invoke(app, ["tag", str(tmp_path), "--checkpoint", result.artifact, "--json", "--all-scores"])
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.output.splitlines() if line.startswith("{")]
    assert len(lines) == len(wanted)
    for line, uri in zip(sorted(lines, key=lambda r: r["path"]), wanted):
        expected = by_uri[uri]
        got = torch.tensor([line["scores"][t] for t in TAGS])
        assert torch.allclose(got, expected, atol=1e-5), (uri, (got - expected).abs().max())


def test_the_fleet_serves_the_artifact_with_the_jobs_scores(trained, stack, s3_client):
    settings, result, bucket = trained
    local, by_uri = _job_scores(settings, result)
    thresholds = load_checkpoint(local).vocabulary.thresholds
    topic, _ = make_topics(stack.kafka_bootstrap, f"rt-{uuid.uuid4().hex[:8]}")
    fleet_cfg = fleet_settings(stack, local, bucket, topic)
    fleet_cfg.model.checkpoint, fleet_cfg.model.fast_preprocess = result.artifact, False
    fleet_cfg.s3.prefix = "fleet-results/"
    uris = list(by_uri)[:30]
    publish(stack.kafka_bootstrap, topic, [request(f"r{n:03d}", uri) for n, uri in enumerate(uris)])
    fleet = Fleet(fleet_cfg)
    fleet.start()
    try:
        assert wait_until(lambda: sum(s.get("tagged", 0) for s in fleet.stats()) >= len(uris), 180)
    finally:
        fleet.stop()
    rows = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="fleet-results/"):
        for obj in page.get("Contents", ()):
            body = s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
            rows.extend(json.loads(line) for line in body.splitlines() if line.strip())
    assert len(rows) == len(uris)
    for row in rows:
        expected = by_uri[row["uri"]]
        above = {TAGS[i] for i in range(len(TAGS)) if expected[i] > thresholds[i]}
        assert {t["tag"] for t in row["tags"]} == above
        for t in row["tags"]:
            assert t["score"] == pytest.approx(float(expected[TAGS.index(t["tag"])]), abs=1e-5)
