"""The local stack itself: real servers that answer, and data that survives a restart."""

from __future__ import annotations

import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition


def test_kafka_keeps_committed_offsets_across_a_restart(stack):
    topic, group = f"smoke-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all")
    for i in range(5):
        producer.send(topic, str(i).encode()).get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=stack.kafka_bootstrap, group_id=group, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=5000)
    values = [m.value for m in consumer]
    consumer.commit()
    consumer.close()
    assert sorted(values) == [b"0", b"1", b"2", b"3", b"4"]

    stack.stop("kafka")
    assert not stack.is_ready("kafka")
    stack.start("kafka")

    consumer = KafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, group_id=group, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    assert sum(consumer.committed(tp) or 0 for tp in tps) == 5
    consumer.close()


def test_redis_answers_and_publishes(redis_client, unique):
    pubsub = redis_client.pubsub()
    pubsub.subscribe(f"ch-{unique}")
    pubsub.get_message(timeout=2)  # the subscribe confirmation
    redis_client.set(f"k-{unique}", b"v")
    assert redis_client.get(f"k-{unique}") == b"v"
    assert redis_client.publish(f"ch-{unique}", b"hello") == 1
    message = pubsub.get_message(timeout=5)
    assert message and message["data"] == b"hello"
    pubsub.close()


def test_s3_server_lists_pages_and_reports_missing_keys(s3_client, s3_bucket):
    for i in range(7):
        s3_client.put_object(Bucket=s3_bucket, Key=f"p/{i}.txt", Body=str(i).encode())
    pages = list(s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="p/", PaginationConfig={"PageSize": 3}))
    assert [len(p["Contents"]) for p in pages] == [3, 3, 1]
    assert s3_client.get_object(Bucket=s3_bucket, Key="p/6.txt")["Body"].read() == b"6"
    with pytest.raises(s3_client.exceptions.ClientError) as info:
        s3_client.head_object(Bucket=s3_bucket, Key="nope")
    assert info.value.response["Error"]["Code"] in ("404", "NoSuchKey")
