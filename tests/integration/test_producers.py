"""Producers we did not write: librdkafka (confluent-kafka) with every codec, keys and headers.

Replicas run in this process (no Ray: the point is what the Kafka client reads), against the real broker.
Requests are in exactly the form `ramplus produce` sends (key = id, value = the request's JSON); each
message also carries headers, binary and empty values included, which the fleet must ignore.
"""

from __future__ import annotations

import json
import threading
import uuid

import kafka.codec
import pytest
import structlog
from confluent_kafka import Producer
from kafka import KafkaConsumer, KafkaProducer
from kafka.record.memory_records import MemoryRecords
from kafka.structs import TopicPartition

from fleet_kit import (
    PARTITIONS, committed_reaches_end, dead_letters, duplicate_report, fleet_settings, make_topics, result_ids,
    upload_images, wait_for_ids,
)
from infra.local.kit import wait_until
from workers.stream.replica import Replica
from workers.schemas import TagRequest

pytestmark = pytest.mark.integration
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
HEADERS = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), ("bin", b"\x00\xff\xfe"), ("empty", b"")]


def produce_with_librdkafka(bootstrap: str, topic: str, requests: list[TagRequest], codec: str, partition: int | None = None) -> None:
    # linger: the requests go out as one batch per partition, so a codec compresses several records together
    producer = Producer({"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 200, "acks": "all"})
    failures: list[str] = []

    def delivered(err, _msg) -> None:  # noqa: ANN001
        if err is not None:
            failures.append(str(err))

    for request in requests:
        extra = {} if partition is None else {"partition": partition}
        producer.produce(topic, key=request.id.encode(), value=request.model_dump_json(exclude_none=True).encode(),
                         headers=HEADERS, on_delivery=delivered, **extra)
    assert producer.flush(30) == 0 and failures == []


def codecs_on_disk(stack, topic: str) -> set[str]:  # noqa: ANN001
    """The compression of every record batch the broker stored for `topic` (its log segments, read as they are)."""
    names = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}
    found = set()
    for segment in stack.config.data_dir("kafka").glob(f"{topic}-[0-9]*/*.log"):
        records = MemoryRecords(segment.read_bytes())
        while (batch := records.next_batch()) is not None:
            found.add(names[batch.compression_type])
    return found


def requests_for(prefix: str, n: int, bucket: str, keys: list[str]) -> list[TagRequest]:
    return [TagRequest(id=f"{prefix}-{i:03d}", uri=f"s3://{bucket}/{keys[i % len(keys)]}") for i in range(n)]


def run_replica(settings, index: int = 0, *, then=None) -> tuple[Replica, threading.Thread]:  # noqa: ANN001
    """Start a replica in a thread; `then` runs after it is built (its codec check passed) and before it polls."""
    replica = Replica(settings, index)
    if then is not None:
        then()
    thread = threading.Thread(target=replica.run, name=f"replica-{index}", daemon=True)
    thread.start()
    return replica, thread


def stop(*running: tuple[Replica, threading.Thread]) -> None:
    for replica, _ in running:
        replica.stop_event.set()
    for _, thread in running:
        thread.join(60)


def test_librdkafka_batches_in_every_codec_and_a_broker_compressed_topic_are_tagged_exactly_once(
    stack, aws_env, tiny_model_dir, s3_client, s3_bucket
):
    keys = upload_images(s3_client, s3_bucket, 6)
    run = uuid.uuid4().hex[:8]
    # Producer-side compression: one topic, one producer per codec.
    mixed, mixed_dlq = make_topics(stack.kafka_bootstrap, f"codecs-{run}")
    wanted: set[str] = set()
    for codec in CODECS:
        requests = requests_for(codec, 12, s3_bucket, keys)
        produce_with_librdkafka(stack.kafka_bootstrap, mixed, requests, codec)
        wanted |= {r.id for r in requests}
    # Broker-side: the topic recompresses whatever it is sent (a common cluster default).
    zstd_topic, zstd_dlq = make_topics(stack.kafka_bootstrap, f"codecs-{run}-zstd", {"compression.type": "zstd"})
    requests = requests_for("broker-zstd", 16, s3_bucket, keys)
    produce_with_librdkafka(stack.kafka_bootstrap, zstd_topic, requests, "none")
    wanted |= {r.id for r in requests}
    # what the broker holds is what a cluster would hand the fleet: batches in every codec
    assert codecs_on_disk(stack, mixed) == set(CODECS) and codecs_on_disk(stack, zstd_topic) == {"zstd"}

    running = [run_replica(fleet_settings(stack, tiny_model_dir, s3_bucket, topic)) for topic in (mixed, zstd_topic)]
    try:
        seen = wait_for_ids(s3_client, s3_bucket, wanted, timeout_s=180)
        # what each replica owns and has set aside, should anything below fail
        states = [(r.source.assignment(), r.source.undecodable(), r.stats()) for r, _ in running]
        for topic in (mixed, zstd_topic):
            assert wait_until(lambda t=topic: committed_reaches_end(stack.kafka_bootstrap, f"g-{t}", t), 60), (topic, states)
        assert all(thread.is_alive() for _, thread in running)  # no replica fell over on a batch
    finally:
        stop(*running)
    assert set(seen) == wanted, (sorted(wanted - set(seen))[:10], states)
    assert all(not undecodable for _, undecodable, _ in states), states
    assert [i for i, n in seen.items() if n != 1] == [], duplicate_report(s3_client, s3_bucket, seen)
    assert dead_letters(stack.kafka_bootstrap, mixed_dlq, expected=1, timeout_s=3) == []
    assert dead_letters(stack.kafka_bootstrap, zstd_dlq, expected=1, timeout_s=3) == []


def publish_plain(bootstrap: str, topic: str, requests: list[TagRequest], partition: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for r in requests:
        producer.send(topic, key=r.id.encode(), value=r.model_dump_json(exclude_none=True).encode(), partition=partition)
    producer.flush()
    producer.close()


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
    finally:
        consumer.close(autocommit=False)


def test_an_undecodable_batch_pauses_its_partition_only_and_the_replica_goes_on(
    stack, aws_env, tiny_model_dir, s3_client, s3_bucket, monkeypatch
):
    """An lz4 batch on partition 2 that this replica cannot decode (as if lz4 were missing: kafka-python's own
    check says so, on the real fetch path). Partitions 0, 1, 3 go on, partition 2 stops before that batch and
    is reported; once the codec is back, a restarted replica reads partition 2 from there, nothing lost."""
    keys = upload_images(s3_client, s3_bucket, 6)
    topic, _ = make_topics(stack.kafka_bootstrap, f"undecodable-{uuid.uuid4().hex[:8]}")
    before = {p: requests_for(f"p{p}-a", 6, s3_bucket, keys) for p in range(PARTITIONS)}
    for p, requests in before.items():
        publish_plain(stack.kafka_bootstrap, topic, requests, partition=p)
    compressed = requests_for("p2-lz4", 5, s3_bucket, keys)
    produce_with_librdkafka(stack.kafka_bootstrap, topic, compressed, "lz4", partition=2)
    after_2 = requests_for("p2-b", 4, s3_bucket, keys)
    publish_plain(stack.kafka_bootstrap, topic, after_2, partition=2)
    settings = fleet_settings(stack, tiny_model_dir, s3_bucket, topic)
    group = settings.kafka.group_id

    has_lz4 = kafka.codec.has_lz4
    replica, thread = run_replica(settings, then=lambda: monkeypatch.setattr(kafka.codec, "has_lz4", lambda: False))
    with structlog.testing.capture_logs() as logs:
        try:
            reachable = {r.id for rs in before.values() for r in rs}
            seen = wait_for_ids(s3_client, s3_bucket, reachable, timeout_s=120)
            assert reachable <= set(seen)
            assert wait_until(lambda: replica.source.undecodable() != [], 30)
            later = {p: requests_for(f"p{p}-later", 4, s3_bucket, keys) for p in (0, 1, 3)}  # the rest still flows
            for p, requests in later.items():
                publish_plain(stack.kafka_bootstrap, topic, requests, partition=p)
            seen = wait_for_ids(s3_client, s3_bucket, {r.id for rs in later.values() for r in rs}, timeout_s=120)
            assert wait_until(lambda: committed(stack.kafka_bootstrap, group, topic)[2] == 6, 30)
            ends_ok = wait_until(lambda: all(
                committed(stack.kafka_bootstrap, group, topic)[p] == 10 for p in (0, 1, 3)), 30)
            stats = replica.stats()
            alive = thread.is_alive()
            gauge = replica.metrics.undecodable.labels(topic=topic, partition="2", offset="6")._value.get()
            ready = replica.metrics.ready._value.get()
        finally:
            stop((replica, thread))
    assert alive, "the replica stopped on the undecodable batch"
    assert ends_ok, committed(stack.kafka_bootstrap, group, topic)
    assert stats["ready"] is False
    [paused] = stats["undecodable"]
    assert (paused["partition"], paused["offset"]) == (2, 6) and "lz4" in paused["cause"]
    assert gauge == 1 and ready == 0
    lines = [e for e in logs if e["event"] == "partition.undecodable"]
    assert len(lines) == 1 and (lines[0]["topic"], lines[0]["partition"], lines[0]["offset"]) == (topic, 2, 6)
    assert "UnsupportedCodecError" in lines[0]["cause"] and "lz4" in lines[0]["cause"]
    written = result_ids(s3_client, s3_bucket)
    assert not {r.id for r in compressed + after_2} & set(written)  # nothing past the batch was read

    # What the README tells an operator to do: install the codec, restart. Partition 2 resumes at the batch.
    monkeypatch.setattr(kafka.codec, "has_lz4", has_lz4)
    replica, thread = run_replica(settings)
    try:
        everything = set(written) | {r.id for r in compressed + after_2}
        seen = wait_for_ids(s3_client, s3_bucket, everything, timeout_s=120)
        assert wait_until(lambda: committed_reaches_end(stack.kafka_bootstrap, group, topic), 60)
    finally:
        stop((replica, thread))
    assert set(seen) == everything
    assert [i for i, n in seen.items() if n != 1] == [], duplicate_report(s3_client, s3_bucket, seen)
    assert json.dumps(replica.stats()["undecodable"]) == "[]"
