"""Vocabulary hot-swap in the running fleet: real Redis, Kafka, s3proxy and Ray."""

from __future__ import annotations

import collections
import json
import time
import uuid

import pytest
import redis
import torch

from helpers import jpeg_bytes, random_images
from ramplus_core import Vocabulary, load_checkpoint
from integration.test_fleet import fleet_settings, make_topics, publish, request, wait_until
from workers.engine import TaggingEngine
from workers.fleet import Fleet
from workers.vocab_store import VocabStore


def make_vocab(name: str, version: str, seed: int, n: int) -> Vocabulary:
    torch.manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, 3, 512), dim=-1)
    return Vocabulary.from_embeddings([f"{version}-tag{i}" for i in range(n)], emb, thresholds=0.3, name=name, version=version)


def all_results(s3_client, bucket: str) -> list[dict]:
    rows = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="results/"):
        for obj in page.get("Contents", ()):
            body = s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
            rows.extend(json.loads(line) for line in body.splitlines() if line.strip())
    return rows


def test_activate_switches_every_replica_mid_stream_and_results_match_their_version(
    stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket
):
    name = f"hs-{uuid.uuid4().hex[:8]}"
    store = VocabStore(redis.Redis.from_url(stack.redis_url))
    v1, v2 = make_vocab(name, "1", 1, 12), make_vocab(name, "2", 2, 20)
    store.publish(v1)
    store.publish(v2)
    store.activate(name, "1")

    topic, _ = make_topics(stack.kafka_bootstrap, f"hs-{uuid.uuid4().hex[:8]}")
    images = {f"img/{i}.jpg": jpeg_bytes(im) for i, im in enumerate(random_images(20, seed=5, size=(72, 96)))}
    for key, data in images.items():
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=data)
    keys = list(images)
    ids = [f"h{i:04d}" for i in range(2000)]
    uri_of = {i: f"s3://{s3_bucket}/{keys[n % 20]}" for n, i in enumerate(ids)}
    publish(stack.kafka_bootstrap, topic, [request(i, uri_of[i]) for i in ids])

    settings = fleet_settings(stack, tiny_model_dir, s3_bucket, topic)
    settings.redis.url, settings.redis.vocabulary, settings.redis.poll_interval_s = stack.redis_url, name, 0.5
    fleet = Fleet(settings)
    fleet.start()
    try:
        assert wait_until(lambda: sum(s.get("tagged", 0) for s in fleet.stats()) >= 300, 120)
        store.activate(name, "2")
        assert wait_until(lambda: sum(s.get("tagged", 0) for s in fleet.stats()) >= 2000, 300)
        assert wait_until(lambda: all(s.get("vocab") == f"{name}@2" for s in fleet.stats()), 10)
        time.sleep(1)
        rows = all_results(s3_client, s3_bucket)
    finally:
        fleet.stop()
        for key in store.redis.scan_iter(match=f"ramplus:vocab:{name}:*"):
            store.redis.delete(key)

    counts = collections.Counter(r["id"] for r in rows)
    assert set(counts) == set(ids) and set(counts.values()) == {1}
    by_version = collections.Counter(r["vocab"] for r in rows)
    assert set(by_version) == {f"{name}@1", f"{name}@2"}, by_version

    # every result agrees with the model run offline with the version it names
    engine = TaggingEngine(load_checkpoint(tiny_model_dir), device="cpu")
    expected = {}
    for vocab in (v1, v2):
        engine.set_vocabulary(vocab)
        for key, data in images.items():
            expected[(vocab.ref, key)] = engine.infer([engine.decode(data, key)])[0]
    for r in rows:
        want = expected[(r["vocab"], r["uri"].split("/", 3)[3])]
        assert [t["tag"] for t in r["tags"]] == want.names
        assert [t["score"] for t in r["tags"]] == pytest.approx([t.score for t in want.tags], abs=1e-5)


def test_a_corrupt_version_is_refused_and_rollback_works_live(stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket):
    name = f"rb-{uuid.uuid4().hex[:8]}"
    store = VocabStore(redis.Redis.from_url(stack.redis_url))
    for version, seed in (("1", 1), ("2", 2), ("3", 3)):
        store.publish(make_vocab(name, version, seed, 8))
    store.activate(name, "1")
    meta = json.loads(store.redis.get(f"ramplus:vocab:{name}:3:meta"))
    store.redis.set(f"ramplus:vocab:{name}:3:{meta['upload']}:0", b"\x00" * meta["bytes"])  # flipped bytes

    topic, _ = make_topics(stack.kafka_bootstrap, f"rb-{uuid.uuid4().hex[:8]}")
    s3_client.put_object(Bucket=s3_bucket, Key="img/0.jpg", Body=jpeg_bytes(random_images(1, seed=9)[0]))
    settings = fleet_settings(stack, tiny_model_dir, s3_bucket, topic)
    settings.redis.url, settings.redis.vocabulary, settings.redis.poll_interval_s = stack.redis_url, name, 0.5
    fleet = Fleet(settings)
    fleet.start()

    def vocabs() -> set[str]:
        return {s.get("vocab") for s in fleet.stats()}

    try:
        assert wait_until(lambda: vocabs() == {f"{name}@1"}, 30)
        store.activate(name, "2")
        assert wait_until(lambda: vocabs() == {f"{name}@2"}, 30)
        store.rollback(name)
        assert wait_until(lambda: vocabs() == {f"{name}@1"}, 30)
        store.activate(name, "3")  # corrupt: refused by every replica, tagging goes on with version 1
        time.sleep(3)
        assert vocabs() == {f"{name}@1"}
        publish(stack.kafka_bootstrap, topic, [request(f"x{i}", f"s3://{s3_bucket}/img/0.jpg") for i in range(20)])
        assert wait_until(lambda: sum(s.get("tagged", 0) for s in fleet.stats()) >= 20, 60)
        rows = all_results(s3_client, s3_bucket)
    finally:
        fleet.stop()
        for key in store.redis.scan_iter(match=f"ramplus:vocab:{name}:*"):
            store.redis.delete(key)
    assert len(rows) == 20 and {r["vocab"] for r in rows} == {f"{name}@1"}
