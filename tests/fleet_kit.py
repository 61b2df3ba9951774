"""What the fleet tests share: topics, settings, publishing, and reading back results, dead letters and commits.

Read back with plain clients (kafka-python, boto3), as a user's own tools would.
"""

from __future__ import annotations

import collections
import json
import urllib.request
import uuid

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from helpers import jpeg_bytes, random_images
from infra.local.kit import PARTITIONS, dead_letters, free_port, make_topics, wait_until  # noqa: F401 (re-exported for the fleet tests)
from workers.settings import FetchSettings, FleetSettings, KafkaSettings, ModelSettings, S3Settings, Settings


def fleet_settings(
    stack, tiny_model_dir, bucket: str, topic: str, *, replicas: int = 2, kafka: dict | None = None, fetch: dict | None = None,
    **fleet,
) -> Settings:
    return Settings(
        kafka=KafkaSettings(**{
            "bootstrap_servers": stack.kafka_bootstrap, "topic": topic, "group_id": f"g-{topic}",
            "dead_letter_topic": topic + ".dlq", "session_timeout_ms": 10_000, "max_poll_records": 64, **(kafka or {}),
        }),
        s3=S3Settings(endpoint_url=stack.s3_endpoint, bucket=bucket, prefix="results/"),
        fetch=FetchSettings(**{
            "s3_buckets": [bucket], "http_hosts": ["images.example.com"], "timeout_s": 5, "attempts": 2, **(fetch or {}),
        }),
        model=ModelSettings(checkpoint=tiny_model_dir, device="cpu"),
        fleet=FleetSettings(
            **{"replicas": replicas, "cpus_per_replica": 0.5, "batch_size": 16, "max_batch_wait_s": 0.05,
               "metrics_port": 0, "drain_timeout_s": 30, **fleet},
        ),
    )


def scrape(port: int) -> dict[str, float]:
    """Sums over replicas per metric (and per `kind`), plus one key per replica label seen."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + (f"{{kind={sample.labels['kind']}}}" if "kind" in sample.labels else "")
            out[key] += sample.value
            if "replica" in sample.labels:  # the driver's own metrics (ramplus_fleet_*) have no replica label
                out[f"{sample.name}{{replica={sample.labels['replica']}}}"] = 1
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


def publish_image_requests(stack, s3_client, bucket: str, name: str, id_prefix: str, count: int, *, images: int = 20) -> tuple[str, str, list[str]]:
    """A fresh topic `<name>-<8 hex>` and its dead-letter topic, with `count` requests (ids `<id_prefix>0000`...)
    for `images` uploaded images, round robin."""
    topic, dlq = make_topics(stack.kafka_bootstrap, f"{name}-{uuid.uuid4().hex[:8]}")
    keys = upload_images(s3_client, bucket, images)
    ids = [f"{id_prefix}{i:04d}" for i in range(count)]
    publish(stack.kafka_bootstrap, topic, [request(i, f"s3://{bucket}/{keys[n % images]}") for n, i in enumerate(ids)])
    return topic, dlq, ids


def assert_each_once(s3_client, bucket: str, seen: collections.Counter, ids: list[str]) -> None:
    """Every id in S3 exactly once, the fleet's promise; on failure, where each duplicate came from."""
    assert set(seen) == set(ids), f"missing {sorted(set(ids) - set(seen))[:5]}, unexpected {sorted(set(seen) - set(ids))[:5]}"
    assert [i for i, n in seen.items() if n != 1] == [], duplicate_report(s3_client, bucket, seen)
