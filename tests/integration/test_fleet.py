"""The streaming fleet against the real local stack: Kafka (KRaft) -> Ray replicas -> s3proxy.

Each test gets its own topics, consumer group and bucket, so they share one stack and one Ray cluster.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import time
import urllib.request
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.structs import TopicPartition

from helpers import jpeg_bytes, random_images
from workers.fleet import Fleet, wait_until
from workers.settings import FetchSettings, FleetSettings, KafkaSettings, ModelSettings, S3Settings, Settings

pytestmark = pytest.mark.integration
PARTITIONS = 4


def make_topics(bootstrap: str, name: str) -> tuple[str, str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, PARTITIONS, 1), NewTopic(name + ".dlq", 1, 1)])
    finally:
        admin.close()
    return name, name + ".dlq"


def fleet_settings(stack, tiny_model_dir, bucket: str, topic: str, *, replicas: int = 2, **fleet) -> Settings:
    return Settings(
        kafka=KafkaSettings(
            bootstrap_servers=stack.kafka_bootstrap, topic=topic, group_id=f"g-{topic}",
            dead_letter_topic=topic + ".dlq", session_timeout_ms=10_000, max_poll_records=64,
        ),
        s3=S3Settings(endpoint_url=stack.s3_endpoint, bucket=bucket, prefix="results/"),
        fetch=FetchSettings(s3_buckets=[bucket], http_hosts=["images.example.com"], timeout_s=5, attempts=2),
        model=ModelSettings(checkpoint=tiny_model_dir, device="cpu"),
        fleet=FleetSettings(
            **{"replicas": replicas, "cpus_per_replica": 0.5, "batch_size": 16, "max_batch_wait_s": 0.05,
               "metrics_port": 0, "drain_timeout_s": 30, **fleet},
        ),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """Sums over replicas per metric (and per `kind`), plus one key per replica label seen."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + (f"{{kind={sample.labels['kind']}}}" if "kind" in sample.labels else "")
            out[key] += sample.value
            out[f"{sample.name}{{replica={sample.labels.get('replica')}}}"] = 1
    return out


def upload_images(s3_client, bucket: str, n: int) -> list[str]:
    keys = []
    for i, image in enumerate(random_images(n, seed=11, size=(72, 96))):
        key = f"images/{i:04d}.jpg"
        s3_client.put_object(Bucket=bucket, Key=key, Body=jpeg_bytes(image))
        keys.append(key)
    return keys


def publish(bootstrap: str, topic: str, payloads: list[tuple[str, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10)
    for key, value in payloads:
        producer.send(topic, key=key.encode(), value=value)
    producer.flush()
    producer.close()


def request(id_: str, uri: str) -> tuple[str, bytes]:
    return id_, json.dumps({"id": id_, "uri": uri}).encode()


def result_lines(s3_client, bucket: str):
    """(object key, parsed result line) for every line under results/, as the bucket is now."""
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="results/"):
        for obj in page.get("Contents", ()):
            try:
                body = s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
            except s3_client.exceptions.NoSuchKey:
                continue  # replaced by a recovering replica since the listing: the final listing is stable
            for line in body.splitlines():
                if line.strip():
                    yield obj["Key"], json.loads(line)


def result_ids(s3_client, bucket: str) -> collections.Counter:
    return collections.Counter(r["id"] for _, r in result_lines(s3_client, bucket))


def dead_letters(bootstrap: str, topic: str, expected: int, timeout_s: float = 60) -> list[dict]:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                             group_id=None, consumer_timeout_ms=2000)
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(out) < expected:
        for message in consumer:
            out.append(json.loads(message.value))
    consumer.close()
    return out


def committed_reaches_end(bootstrap: str, group: str, topic: str) -> bool:
    # A consumer with the group's id reads its committed offsets without joining it (no subscribe).
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = consumer.end_offsets(tps)
        return all(consumer.committed(tp) == ends[tp] for tp in tps if ends[tp] > 0)
    finally:
        consumer.close(autocommit=False)


def result_workers(s3_client, bucket: str) -> set[str]:
    return {r["worker"] for _, r in result_lines(s3_client, bucket)}


def duplicate_report(s3_client, bucket: str, seen: collections.Counter) -> str:
    """For ids written more than once: which objects hold them, by which worker, when (to tell races apart)."""
    dups = {i for i, n in seen.items() if n != 1}
    rows = [
        f"{r['id']} {key} {r['worker']} {r['ts']} offset={r['source']['offset']}"
        for key, r in result_lines(s3_client, bucket) if r["id"] in dups
    ]
    return "\n".join(sorted(rows)[:60])


def wait_for_ids(s3_client, bucket: str, wanted: set[str], timeout_s: float) -> collections.Counter:
    seen: collections.Counter = collections.Counter()

    def done() -> bool:
        nonlocal seen
        seen = result_ids(s3_client, bucket)
        return wanted <= set(seen)

    wait_until(done, timeout_s, interval_s=2)
    return seen


def test_mixed_stream_lands_once_in_s3_and_bad_input_in_the_dead_letter_topic(
    stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket
):
    topic, dlq = make_topics(stack.kafka_bootstrap, f"req-{uuid.uuid4().hex[:8]}")
    keys = upload_images(s3_client, s3_bucket, 40)
    for i in range(50):
        s3_client.put_object(Bucket=s3_bucket, Key=f"corrupt/{i}.jpg", Body=jpeg_bytes(random_images(1, seed=i)[0])[:300])
    payloads, expected_kind, valid, malformed = [], {}, set(), set()
    for i in range(1000):
        id_ = f"r{i:04d}"
        if i % 20 == 1:
            payloads.append(request(id_, f"s3://{s3_bucket}/missing/{i}.jpg"))
            expected_kind[id_] = "not_found"
        elif i % 20 == 2:
            payloads.append(request(id_, f"s3://{s3_bucket}/corrupt/{i % 50}.jpg"))
            expected_kind[id_] = "decode"
        elif i % 50 == 3:
            payloads.append((id_, b'{"id": "' + id_.encode() + b'", "uri": '))  # truncated JSON
            malformed.add(payloads[-1][1].decode())
        elif i % 50 == 4:
            payloads.append(request(id_, f"s3://other-bucket/{i}.jpg"))
            expected_kind[id_] = "forbidden"
        elif i % 50 == 5:
            payloads.append(request(id_, "file:///etc/passwd"))
            expected_kind[id_] = "forbidden"
        else:
            payloads.append(request(id_, f"s3://{s3_bucket}/{keys[i % len(keys)]}"))
            valid.add(id_)
    publish(stack.kafka_bootstrap, topic, payloads)

    port = free_port()
    fleet = Fleet(fleet_settings(stack, tiny_model_dir, s3_bucket, topic, metrics_port=port))
    fleet.start()
    try:
        seen = wait_for_ids(s3_client, s3_bucket, valid, timeout_s=240)
        letters = dead_letters(stack.kafka_bootstrap, dlq, expected=len(expected_kind) + len(malformed))
        assert wait_until(lambda: committed_reaches_end(stack.kafka_bootstrap, f"g-{topic}", topic), 60)
        seen = result_ids(s3_client, s3_bucket)  # everything committed: nothing moves any more
        metrics = scrape(port)
    finally:
        fleet.stop()

    # one Prometheus endpoint for the fleet, a `replica` label per replica
    assert metrics.get("ramplus_images_tagged_total", 0) >= len(valid)
    assert metrics.get("ramplus_dead_letters_total{kind=not_found}", 0) >= 50
    assert {k.split("replica=")[1].rstrip("}") for k in metrics if "replica=" in k} == {"0", "1"}

    assert set(seen) == valid, f"missing {sorted(valid - set(seen))[:5]}, unexpected {sorted(set(seen) - valid)[:5]}"
    assert [i for i, n in seen.items() if n != 1] == [], duplicate_report(s3_client, s3_bucket, seen)
    # at-least-once: a dead letter may repeat after a rebalance, but each bad request is there with its kind
    assert {letter["id"]: letter["error"]["kind"] for letter in letters if letter["id"]} == expected_kind
    unparsed = [letter for letter in letters if letter["id"] is None]
    assert {letter["original"] for letter in unparsed} == malformed
    assert {letter["error"]["kind"] for letter in unparsed} == {"malformed"}


def test_a_replica_killed_mid_stream_is_restarted_and_nothing_is_missing(
    stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket
):
    topic, _ = make_topics(stack.kafka_bootstrap, f"kill-{uuid.uuid4().hex[:8]}")
    keys = upload_images(s3_client, s3_bucket, 20)
    ids = [f"k{i:04d}" for i in range(800)]
    publish(stack.kafka_bootstrap, topic, [request(i, f"s3://{s3_bucket}/{keys[n % 20]}") for n, i in enumerate(ids)])
    fleet = Fleet(fleet_settings(stack, tiny_model_dir, s3_bucket, topic, max_in_flight=64))
    fleet.start()
    try:
        victim = fleet.pids()[0]
        assert wait_until(lambda: len(result_ids(s3_client, s3_bucket)) >= 100, 120)
        os.kill(victim, signal.SIGKILL)
        seen = wait_for_ids(s3_client, s3_bucket, set(ids), timeout_s=240)
        assert wait_until(lambda: victim not in fleet.pids(), 60)  # Ray restarted it: a new process
        assert wait_until(lambda: committed_reaches_end(stack.kafka_bootstrap, f"g-{topic}", topic), 60)
        seen = result_ids(s3_client, s3_bucket)  # everything committed: nothing moves any more
    finally:
        fleet.stop()
    assert set(seen) == set(ids)
    assert [i for i, n in seen.items() if n != 1] == [], duplicate_report(s3_client, s3_bucket, seen)


def test_the_fleet_recovers_by_itself_when_kafka_goes_away_and_comes_back(
    stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket
):
    topic, _ = make_topics(stack.kafka_bootstrap, f"outage-{uuid.uuid4().hex[:8]}")
    keys = upload_images(s3_client, s3_bucket, 20)
    ids = [f"o{i:04d}" for i in range(800)]
    publish(stack.kafka_bootstrap, topic, [request(i, f"s3://{s3_bucket}/{keys[n % 20]}") for n, i in enumerate(ids)])
    fleet = Fleet(fleet_settings(stack, tiny_model_dir, s3_bucket, topic, max_in_flight=64))
    fleet.start()
    try:
        assert wait_until(lambda: len(result_ids(s3_client, s3_bucket)) >= 100, 120)
        stack.stop("kafka")
        time.sleep(15)
        stack.start("kafka")
        seen = wait_for_ids(s3_client, s3_bucket, set(ids), timeout_s=300)
        assert wait_until(lambda: committed_reaches_end(stack.kafka_bootstrap, f"g-{topic}", topic), 120)
        seen = result_ids(s3_client, s3_bucket)  # everything committed: nothing moves any more
    finally:
        fleet.stop()
    assert set(seen) == set(ids)
    assert [i for i, n in seen.items() if n != 1] == [], duplicate_report(s3_client, s3_bucket, seen)


def test_a_replica_frozen_past_its_session_writes_nothing_its_successor_redoes(
    stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket
):
    """A zombie: evicted from the group while stopped, it wakes with results in flight for partitions that
    another replica has since cleaned up and redone. Writing them would duplicate them, silently."""
    topic, _ = make_topics(stack.kafka_bootstrap, f"zombie-{uuid.uuid4().hex[:8]}")
    keys = upload_images(s3_client, s3_bucket, 20)
    ids = [f"z{i:04d}" for i in range(3000)]
    publish(stack.kafka_bootstrap, topic, [request(i, f"s3://{s3_bucket}/{keys[n % 20]}") for n, i in enumerate(ids)])
    port = free_port()
    fleet = Fleet(fleet_settings(stack, tiny_model_dir, s3_bucket, topic, max_in_flight=64, metrics_port=port))
    fleet.start()
    try:
        # both replicas busy, each with its own partitions and records in flight
        assert wait_until(lambda: len(result_workers(s3_client, s3_bucket)) == 2, 120)
        zombie = fleet.pids()[0]
        os.kill(zombie, signal.SIGSTOP)
        try:
            time.sleep(16)  # past the 10 s session: the group gives its partitions to the other replica
        finally:
            os.kill(zombie, signal.SIGCONT)
        seen = wait_for_ids(s3_client, s3_bucket, set(ids), timeout_s=300)
        assert wait_until(lambda: committed_reaches_end(stack.kafka_bootstrap, f"g-{topic}", topic), 120)
        seen = result_ids(s3_client, s3_bucket)
        metrics = scrape(port)
    finally:
        fleet.stop()
    assert set(seen) == set(ids)
    assert [i for i, n in seen.items() if n != 1] == [], duplicate_report(s3_client, s3_bucket, seen)
    # the zombie did notice, with results in hand: it held writes it could no longer vouch for, or dropped
    # them once it learnt the partitions were gone (which comes first depends on its threads' wake-up order)
    noticed = {k: metrics.get(k, 0) for k in ("ramplus_ownership_lapses_total", "ramplus_stale_results_dropped_total")}
    assert sum(noticed.values()) >= 1, noticed
