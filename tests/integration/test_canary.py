"""Canary vocabularies in the running fleet: real Redis, Kafka, s3proxy and Ray, driven through `ramplus vocab`."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
import torch
from typer.testing import CliRunner

from fleet_kit import assert_each_once, fleet_settings, publish, publish_image_requests, request, result_lines, wait_for_ids, wait_until
from ramplus_core import Vocabulary, load_checkpoint
from workers.cli import app
from workers.stream.engine import TaggingEngine
from workers.stream.fleet import Fleet
from workers.vocab.canary import chosen, jaccard
from workers.vocab.canary_results import S3CanarySink
from workers.vocab.store import VocabStore


def vocabularies(name: str) -> tuple[Vocabulary, Vocabulary]:
    """The active version and a candidate that keeps 8 of its 12 tags, re-describes 4 and adds 3."""
    torch.manual_seed(3)
    emb = torch.nn.functional.normalize(torch.randn(15, 3, 512), dim=-1)
    tags = [f"tag{i}" for i in range(15)]
    v1 = Vocabulary.from_embeddings(tags[:12], emb[:12], thresholds=0.3, name=name, version="1")
    emb2 = torch.cat([emb[:8], torch.nn.functional.normalize(torch.randn(4, 3, 512), dim=-1), emb[12:]])
    v2 = Vocabulary.from_embeddings(tags, emb2, thresholds=0.3, name=name, version="2")
    return v1, v2


def test_a_canary_scores_a_fifth_of_the_stream_apart_and_its_report_matches_an_offline_comparison(
    stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket
):
    name = f"can-{uuid.uuid4().hex[:8]}"
    store = VocabStore(redis.Redis.from_url(stack.redis_url))
    v1, v2 = vocabularies(name)
    store.publish(v1)
    store.publish(v2)
    store.activate(name, "1")
    # Two candidates that cannot load: a flipped chunk, and embeddings of the wrong dimension.
    store.publish(Vocabulary.from_embeddings(v1.tags, v1.embeddings, name=name, version="corrupt"))
    meta = json.loads(store.redis.get(f"ramplus:vocab:{name}:corrupt:meta"))
    store.redis.set(f"ramplus:vocab:{name}:corrupt:{meta['upload']}:0", b"\x00" * meta["bytes"])
    store.publish(Vocabulary.from_embeddings(v1.tags, v1.embeddings[:, :, :256], name=name, version="narrow"))
    env = {"RAMPLUS_REDIS__URL": stack.redis_url, "RAMPLUS_S3__ENDPOINT_URL": stack.s3_endpoint, "RAMPLUS_S3__BUCKET": s3_bucket}

    def vocab(*args: str):
        return CliRunner().invoke(app, ["vocab", *args], env=env)

    for bad, words in (("corrupt", "checksum"), ("narrow", "dimension")):
        r = vocab("canary", f"{name}@{bad}", "--fraction", "0.2")
        assert r.exit_code == 2 and words in r.output, r.output
    assert store.redis.get(f"ramplus:vocab:{name}:canary") is None and store.active_version(name) == "1"
    r = vocab("canary", f"{name}@2", "--fraction", "0.2")
    assert r.exit_code == 0, r.output

    topic, _, ids = publish_image_requests(stack, s3_client, s3_bucket, "can", "c", 0)
    settings = fleet_settings(stack, tiny_model_dir, s3_bucket, topic)
    settings.redis.url, settings.redis.vocabulary, settings.redis.poll_interval_s = stack.redis_url, name, 0.5
    fleet = Fleet(settings)
    fleet.start()
    canary_sink = S3CanarySink(settings.s3, client=s3_client)
    try:
        assert wait_until(lambda: {s.get("canary") for s in fleet.stats()} == {f"{name}@2"}, 60), fleet.stats()
        keys = [f"images/{i:04d}.jpg" for i in range(20)]  # what publish_image_requests uploaded
        ids = [f"c{i:04d}" for i in range(500)]
        uri_of = {i: f"s3://{s3_bucket}/{keys[n % 20]}" for n, i in enumerate(ids)}
        publish(stack.kafka_bootstrap, topic, [request(i, uri_of[i]) for i in ids])
        seen = wait_for_ids(s3_client, s3_bucket, set(ids), 240)
        assert_each_once(s3_client, s3_bucket, seen, ids)
        wanted = {i for i in ids if chosen(i, 0.2)}
        assert wait_until(lambda: {row["id"] for row in canary_sink.read(f"{name}@2")} >= wanted, 30)
        lines = canary_sink.read(f"{name}@2")
        metrics = b"".join(fleet.scrape_metrics().values()).decode()

        r = vocab("canary", name, "--stop")
        assert r.exit_code == 0 and f"stopped the canary {name}@2" in r.output
        assert wait_until(lambda: {s.get("canary") for s in fleet.stats()} == {None}, 30)
        after = [f"after{i:03d}" for i in range(40)]
        publish(stack.kafka_bootstrap, topic, [request(i, uri_of[ids[n]]) for n, i in enumerate(after)])
        wait_for_ids(s3_client, s3_bucket, set(ids) | set(after), 120)
        time.sleep(1)
        lines_after_stop = canary_sink.read(f"{name}@2")
        metrics_after_stop = b"".join(fleet.scrape_metrics().values()).decode()
        report = json.loads(vocab("canary-report", f"{name}@2", "--json").output)
        refused = vocab("activate", name, "2", "--min-agreement", "0.99")
        forced = vocab("activate", name, "2", "--min-agreement", "0.99", "--force")
    finally:
        fleet.stop()
        for key in store.redis.scan_iter(match=f"ramplus:vocab:{name}:*"):
            store.redis.delete(key)

    # The consumers' results: every id once, all with the active version, as the model gives offline.
    rows = [row for _, row in result_lines(s3_client, s3_bucket)]
    assert {row["vocab"] for row in rows} == {f"{name}@1"}
    engine = TaggingEngine(load_checkpoint(tiny_model_dir), device="cpu")
    offline: dict[tuple[str, str], list[str]] = {}
    for version in (v1, v2):
        engine.set_vocabulary(version)
        for key in keys:
            data = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
            offline[(version.ref, f"s3://{s3_bucket}/{key}")] = engine.infer([engine.decode(data, key)])[0].names
    for row in rows:
        assert [t["tag"] for t in row["tags"]] == offline[(v1.ref, row["uri"])]

    # The canary: exactly the chosen requests, about a fifth, apart from the results, both answers right.
    by_id = {row["id"]: row for row in lines}
    assert set(by_id) == wanted and 75 <= len(wanted) <= 125, len(wanted)
    for i, row in by_id.items():
        assert row["active"] == v1.ref and row["canary"] == v2.ref
        assert row["active_tags"] == offline[(v1.ref, uri_of[i])] and row["canary_tags"] == offline[(v2.ref, uri_of[i])]
    expected = [jaccard(offline[(v1.ref, uri_of[i])], offline[(v2.ref, uri_of[i])]) for i in sorted(wanted)]
    assert report["images"] == len(wanted)
    assert report["agreement_mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    assert 0 < report["agreement_mean"] < 0.99  # the candidate really differs: the gate below has work to do
    assert f'ramplus_canary_images_total{{canary="{v2.ref}"}}' in metrics
    scored = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("ramplus_canary_images_total{"))
    assert scored == len(wanted)

    # Stopped: nothing scores, nothing is exported as running, nothing more is written.
    assert len(lines_after_stop) == len(lines)
    assert "ramplus_canary_fraction{" not in metrics_after_stop

    assert refused.exit_code == 2 and "canary agreement" in refused.output and f"{len(wanted)} images" in refused.output
    assert forced.exit_code == 0 and f"activated {name}@2" in forced.output
