"""Vocabulary hot-swap in the running fleet: real Redis, Kafka, s3proxy and Ray."""

from __future__ import annotations

import collections
import json
import time
import uuid

import pytest
import redis
import torch
from kafka import KafkaProducer

from helpers import jpeg_bytes, random_images
from ramplus_core import Vocabulary, load_checkpoint
from fleet_kit import PARTITIONS, dead_letters, fleet_settings, make_topics, publish, request, wait_until
from workers.stream.engine import TaggingEngine
from workers.stream.fleet import Fleet
from workers.vocab.store import VocabStore


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


def test_corrupt_versions_are_refused_and_rollback_works_live(stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket):
    import hashlib

    name = f"rb-{uuid.uuid4().hex[:8]}"
    store = VocabStore(redis.Redis.from_url(stack.redis_url))
    for version, seed in (("1", 1), ("2", 2), ("checksum", 3), ("nan", 5)):
        store.publish(make_vocab(name, version, seed, 8))
    narrow = make_vocab(name, "dimension", 4, 8)
    store.publish(Vocabulary.from_embeddings(narrow.tags, narrow.embeddings[:, :, :256], name=name, version="dimension"))
    meta = json.loads(store.redis.get(f"ramplus:vocab:{name}:checksum:meta"))
    store.redis.set(f"ramplus:vocab:{name}:checksum:{meta['upload']}:0", b"\x00" * meta["bytes"])  # flipped bytes
    # NaN written by a buggy publisher that checksummed what it wrote: only the finiteness check catches it.
    meta = json.loads(store.redis.get(f"ramplus:vocab:{name}:nan:meta"))
    key = f"ramplus:vocab:{name}:nan:{meta['upload']}:0"
    payload = bytearray(store.redis.get(key))
    payload[100:102] = b"\x00\x7e"  # fp16 NaN
    store.redis.set(key, bytes(payload))
    meta["sha256"] = hashlib.sha256(payload).hexdigest()
    store.redis.set(f"ramplus:vocab:{name}:nan:meta", json.dumps(meta))
    store.activate(name, "1")

    topic, _ = make_topics(stack.kafka_bootstrap, f"rb-{uuid.uuid4().hex[:8]}")
    s3_client.put_object(Bucket=s3_bucket, Key="img/0.jpg", Body=jpeg_bytes(random_images(1, seed=9)[0]))
    settings = fleet_settings(stack, tiny_model_dir, s3_bucket, topic)
    settings.redis.url, settings.redis.vocabulary, settings.redis.poll_interval_s = stack.redis_url, name, 0.5
    fleet = Fleet(settings)
    fleet.start()

    def vocabs() -> set[str]:
        return {s.get("vocab") for s in fleet.stats()}

    def refused() -> dict[str, float]:
        out: dict[str, float] = collections.defaultdict(float)
        for line in b"".join(fleet.scrape_metrics().values()).decode().splitlines():
            if line.startswith("ramplus_vocab_refused_total{"):
                out[line.split('reason="')[1].split('"')[0]] += float(line.rsplit(" ", 1)[1])
        return dict(out)

    try:
        assert wait_until(lambda: vocabs() == {f"{name}@1"}, 30)
        store.activate(name, "2")
        assert wait_until(lambda: vocabs() == {f"{name}@2"}, 30)
        store.rollback(name)
        assert wait_until(lambda: vocabs() == {f"{name}@1"}, 30)
        for n, bad in enumerate(("checksum", "dimension", "nan"), start=1):
            store.activate(name, bad)  # refused by every replica: tagging goes on with version 1
            reason = {"nan": "non_finite"}.get(bad, bad)
            assert wait_until(lambda: refused().get(reason, 0) >= 2, 30), refused()  # noqa: B023
            assert vocabs() == {f"{name}@1"}
        assert refused() == {"checksum": 2, "dimension": 2, "non_finite": 2}
        publish(stack.kafka_bootstrap, topic, [request(f"x{i}", f"s3://{s3_bucket}/img/0.jpg") for i in range(20)])
        assert wait_until(lambda: sum(s.get("tagged", 0) for s in fleet.stats()) >= 20, 60)
        rows = all_results(s3_client, s3_bucket)
    finally:
        fleet.stop()
        for key in store.redis.scan_iter(match=f"ramplus:vocab:{name}:*"):
            store.redis.delete(key)
    assert len(rows) == 20 and {r["vocab"] for r in rows} == {f"{name}@1"}


def publish_everywhere(bootstrap: str, topic: str, payloads: list[tuple[str, bytes]]) -> None:
    """Round-robin over every partition, so that every replica (whatever it owns) sees some of them."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10)
    for n, (key, value) in enumerate(payloads):
        producer.send(topic, key=key.encode(), value=value, partition=n % PARTITIONS)
    producer.flush()
    producer.close()


def vocab_request(id_: str, uri: str, vocab: str | None) -> tuple[str, bytes]:
    return id_, json.dumps({"id": id_, "uri": uri, **({"vocab": vocab} if vocab else {})}).encode()


def test_redis_away_for_30_s_mid_stream_tagging_goes_on_and_a_switch_works_after(
    stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket
):
    name, other = f"ro-{uuid.uuid4().hex[:8]}", f"ro-other-{uuid.uuid4().hex[:8]}"
    store = VocabStore(redis.Redis.from_url(stack.redis_url))
    vocabs = {v.ref: v for v in (make_vocab(name, "1", 1, 10), make_vocab(name, "2", 2, 14), make_vocab(name, "3", 3, 9),
                                  make_vocab(other, "1", 4, 11))}
    for v in vocabs.values():
        store.publish(v)
    store.activate(name, "1")
    store.activate(other, "1")

    topic, dlq = make_topics(stack.kafka_bootstrap, f"ro-{uuid.uuid4().hex[:8]}")
    images = {f"img/{i}.jpg": jpeg_bytes(im) for i, im in enumerate(random_images(8, seed=6, size=(72, 96)))}
    for key, data in images.items():
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=data)
    uris = [f"s3://{s3_bucket}/{k}" for k in images]
    # What each phase asks for: the active one, a pinned version, another vocabulary by name.
    asks = [None, f"{name}@1", other]
    wanted: dict[str, str | None] = {}  # id -> the vocabulary its result must name (None: a dead letter)

    def phase(prefix: str, n: int, active: str, extra: list[tuple[str | None, str | None]] = ()) -> list[tuple[str, bytes]]:
        out = []
        for i in range(n):
            ask = asks[i % len(asks)]
            id_ = f"{prefix}{i:04d}"
            wanted[id_] = {None: active, other: f"{other}@1"}.get(ask, ask)
            out.append(vocab_request(id_, uris[i % len(uris)], ask))
        for i, (ask, expect) in enumerate(extra):
            wanted[f"{prefix}x{i}"] = expect
            out.append(vocab_request(f"{prefix}x{i}", uris[0], ask))
        return out

    settings = fleet_settings(stack, tiny_model_dir, s3_bucket, topic)
    settings.redis.url, settings.redis.vocabulary, settings.redis.poll_interval_s = stack.redis_url, name, 0.5
    fleet = Fleet(settings)
    fleet.start()

    def tagged() -> int:
        return sum(s.get("tagged", 0) for s in fleet.stats())

    try:
        assert wait_until(lambda: {s.get("vocab") for s in fleet.stats()} == {f"{name}@1"}, 60)
        # Every replica must have resolved `other` before the outage (a name never resolved cannot be while
        # Redis is away); a replica that joined the group late may have missed the first requests.
        sent = 0
        for k in range(5):
            publish_everywhere(stack.kafka_bootstrap, topic, phase(f"a{k}", 120 if k == 0 else 30, f"{name}@1"))
            sent += 120 if k == 0 else 30
            assert wait_until(lambda: tagged() >= sent, 120)
            if all(f"{other}@1" in s.get("cached_vocabs", []) and s.get("tagged", 0) for s in fleet.stats()):
                break
        else:
            raise AssertionError(f"not every replica served {other}: {fleet.stats()}")

        stack.stop("redis")
        outage_started = time.monotonic()
        before = tagged()
        # While Redis is away: loaded versions keep serving; one never loaded cannot be (a `fetch` dead letter).
        for k in range(3):
            publish_everywhere(stack.kafka_bootstrap, topic, phase(f"b{k}", 60, f"{name}@1", [(f"{name}@2", None)]))
            time.sleep(5)
        assert wait_until(lambda: tagged() >= before + 180, 60)
        during_outage = tagged() - before
        assert not stack.is_ready("redis"), "the stream must be tagged while Redis is still away"
        time.sleep(max(0.0, 30 - (time.monotonic() - outage_started)))  # an outage of at least 30 s, not a bound
        stack.start("redis")

        assert store.versions(name) == ["1", "2", "3"]  # persisted: the store survives a restart
        store.activate(name, "3")
        assert wait_until(lambda: {s.get("vocab") for s in fleet.stats()} == {f"{name}@3"}, 30)
        publish_everywhere(stack.kafka_bootstrap, topic, phase("c", 60, f"{name}@3", [(f"{name}@2", f"{name}@2")]))
        assert wait_until(lambda: tagged() >= before + 180 + 61, 120)
        time.sleep(1)
        rows = all_results(s3_client, s3_bucket)
        letters = dead_letters(stack.kafka_bootstrap, dlq, expected=3)
    finally:
        fleet.stop()
        if not stack.is_ready("redis"):  # failed mid-outage: the next tests need it
            stack.start("redis")
        for key in store.redis.scan_iter(match="ramplus:vocab:ro-*"):
            store.redis.delete(key)

    assert during_outage >= 180
    assert sorted({d["id"] for d in letters}) == sorted(i for i, v in wanted.items() if v is None)
    assert {d["error"]["kind"] for d in letters} == {"fetch"}
    assert all("store unavailable" in d["error"]["message"] for d in letters)
    counts = collections.Counter(r["id"] for r in rows)
    assert set(counts.values()) == {1}
    assert {r["id"]: r["vocab"] for r in rows} == {i: v for i, v in wanted.items() if v is not None}

    # every result agrees with the model run offline with the version it names
    engine = TaggingEngine(load_checkpoint(tiny_model_dir), device="cpu")
    expected = {}
    for vocab in vocabs.values():
        engine.set_vocabulary(vocab)
        for key, data in images.items():
            expected[(vocab.ref, key)] = engine.infer([engine.decode(data, key)])[0]
    for r in rows:
        want = expected[(r["vocab"], r["uri"].split("/", 3)[3])]
        assert [t["tag"] for t in r["tags"]] == want.names
        assert [t["score"] for t in r["tags"]] == pytest.approx([t.score for t in want.tags], abs=1e-5)
