"""The local stack itself (infra/local/stack.py): real servers that answer, and Kafka data that survives a restart."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

STACK_SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "local" / "stack.py"

pytestmark = pytest.mark.integration


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for i, value in enumerate(values):
            producer.send(topic, value, key=str(i).encode())
        producer.flush(timeout=30)
    finally:
        producer.close()


def consume(consumer: KafkaConsumer, count: int, timeout_s: float = 30.0) -> list[bytes]:
    out: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            out.extend(r.value for r in records)
    return out


def group_consumer(bootstrap: str, topic: str, group: str) -> KafkaConsumer:
    return KafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest", enable_auto_commit=False
    )


def test_kafka_group_consumes_commits_and_keeps_offsets_across_a_restart(stack, kafka_topic):
    topic, group = kafka_topic(partitions=4), f"g-{uuid.uuid4().hex[:8]}"
    produce(stack.kafka_bootstrap, topic, [f"a{i}".encode() for i in range(8)])

    consumer = group_consumer(stack.kafka_bootstrap, topic, group)
    assert sorted(consume(consumer, 8)) == sorted(f"a{i}".encode() for i in range(8))
    consumer.commit()
    tps = [TopicPartition(topic, p) for p in range(4)]
    assert sum(consumer.committed(tp) or 0 for tp in tps) == 8
    consumer.close()

    stack.stop("kafka")
    assert not stack.is_ready("kafka")
    stack.start("kafka")
    assert stack.is_ready("kafka")

    # The topic, its records and the group's committed offsets are all still there...
    produce(stack.kafka_bootstrap, topic, [b"b0", b"b1"])
    consumer = group_consumer(stack.kafka_bootstrap, topic, group)
    assert sum(consumer.committed(tp) or 0 for tp in tps) == 8
    # ...so the group resumes after what it committed: only the new records come.
    assert sorted(consume(consumer, 2)) == [b"b0", b"b1"]
    assert consume(consumer, 1, timeout_s=2) == []
    consumer.close()


def test_redis_set_get_and_pub_sub(redis_client, redis_prefix):
    pubsub = redis_client.pubsub()
    channel = f"{redis_prefix}events"
    pubsub.subscribe(channel)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    redis_client.set(f"{redis_prefix}k", b"v", ex=60)
    assert redis_client.get(f"{redis_prefix}k") == b"v"
    assert redis_client.incr(f"{redis_prefix}n") == 1
    assert redis_client.publish(channel, b"hello") == 1
    message = pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
    assert message and message["data"] == b"hello"
    pubsub.close()


def test_s3_put_get_list_pages_404_and_delete(s3_client, s3_bucket):
    for i in range(7):
        s3_client.put_object(Bucket=s3_bucket, Key=f"p/{i}.json", Body=b'{"i": %d}' % i, ContentType="application/json")
    s3_client.put_object(Bucket=s3_bucket, Key="other/x", Body=b"x")

    got = s3_client.get_object(Bucket=s3_bucket, Key="p/6.json")
    assert got["Body"].read() == b'{"i": 6}' and got["ContentType"] == "application/json"

    pages = list(
        s3_client.get_paginator("list_objects_v2").paginate(
            Bucket=s3_bucket, Prefix="p/", PaginationConfig={"PageSize": 3}
        )
    )
    assert [len(p["Contents"]) for p in pages] == [3, 3, 1]
    assert [o["Key"] for p in pages for o in p["Contents"]] == [f"p/{i}.json" for i in range(7)]

    with pytest.raises(s3_client.exceptions.ClientError) as info:
        s3_client.head_object(Bucket=s3_bucket, Key="p/missing.json")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(s3_client.exceptions.NoSuchKey):
        s3_client.get_object(Bucket=s3_bucket, Key="p/missing.json")

    s3_client.delete_object(Bucket=s3_bucket, Key="p/0.json")
    with pytest.raises(s3_client.exceptions.ClientError):
        s3_client.head_object(Bucket=s3_bucket, Key="p/0.json")
    assert s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="p/")["KeyCount"] == 6


def test_s3_rejects_a_wrong_secret(stack):
    import boto3
    from botocore.config import Config

    wrong = {**stack.s3_credentials, "aws_secret_access_key": "not-the-secret"}
    client = boto3.client("s3", endpoint_url=stack.s3_endpoint, config=Config(s3={"addressing_style": "path"}), **wrong)
    with pytest.raises(client.exceptions.ClientError) as info:
        client.list_buckets()
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_the_cli_runs_on_plain_python_and_up_is_idempotent(stack):
    """stdlib only: the system python3, not the venv. A second `up` leaves the running servers alone."""
    python = "/usr/bin/python3" if sys.platform.startswith("linux") else "python3"
    status = subprocess.run([python, str(STACK_SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert [line.split()[:2] for line in status.stdout.splitlines()] == [
        ["kafka", "running"], ["redis", "running"], ["s3", "running"]
    ]
    pids = {s: stack.module.is_running(stack.config, s) for s in ("kafka", "redis", "s3")}
    again = subprocess.run([python, str(STACK_SCRIPT), "up"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == 3
    assert {s: stack.module.is_running(stack.config, s) for s in pids} == pids

    exported = subprocess.run([python, str(STACK_SCRIPT), "env"], capture_output=True, text=True, timeout=60)
    lines = dict(line.removeprefix("export ").split("=", 1) for line in exported.stdout.splitlines())
    assert lines["RAMPLUS_KAFKA__BOOTSTRAP_SERVERS"] == stack.kafka_bootstrap
    assert lines["RAMPLUS_REDIS__URL"] == stack.redis_url
    assert lines["RAMPLUS_S3__ENDPOINT_URL"] == stack.s3_endpoint
    assert lines["AWS_DEFAULT_REGION"] == "us-east-1"
