"""Activate-to-first-result latency of a vocabulary switch in a running fleet (10 switches, p50/p99).

    python bench/bench_hot_swap.py [--switches 10] [--replicas 2] [--tags 200] [--descriptions 4]
    python bench/bench_hot_swap.py --tags 4585 --descriptions 51       # official size

Replicas prefetch a version when it is published (RAMPLUS_REDIS__PREFETCH, on by default) and the bench
activates it 2 s after publishing, as an operator would; `--no-prefetch` measures the cold path (the
load happens after the activate). A producer keeps a stream flowing (about 40 requests/s) through Kafka -> replicas (tiny model) -> S3 while
`VocabStore.activate` switches to a freshly published version each time (never one a replica still holds
in its cache, so every switch pays the full load). Latency = the earliest result timestamp (`ts`, written
by the replica) naming the new version, minus the time the activate call was made.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_fleet import make_jpegs  # noqa: E402


def replica_figures(expositions: dict[str, bytes]) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    for text in expositions.values():
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    per = lambda what: sums.get(f"{what}_sum", 0.0) / max(sums.get(f"{what}_count", 0.0), 1.0)  # noqa: E731
    return {"switch": per("ramplus_vocab_switch_seconds"), "switches": sums.get("ramplus_vocab_switch_seconds_count", 0.0),
            "batch": per("ramplus_batch_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--tags", type=int, default=200)
    parser.add_argument("--descriptions", type=int, default=4)
    parser.add_argument("--no-prefetch", action="store_true", help="replicas load a version only when it is activated")
    args = parser.parse_args()

    import boto3
    import ray
    import redis
    from kafka import KafkaProducer

    from ramplus_core import Vocabulary, create_model, save_pretrained
    from infra.local.kit import make_topics, wait_until
    from workers.stream.fleet import Fleet
    from workers.settings import FetchSettings, FleetSettings, KafkaSettings, ModelSettings, S3Settings, Settings
    from workers.vocab.store import VocabStore

    from infra.local.kit import local_stack

    env = local_stack()
    bootstrap, endpoint, redis_url = env["RAMPLUS_KAFKA__BOOTSTRAP_SERVERS"], env["RAMPLUS_S3__ENDPOINT_URL"], env["RAMPLUS_REDIS__URL"]

    run = uuid.uuid4().hex[:8]
    name, bucket, topic = f"swap-{run}", f"swap-{run}", f"swap-{run}"
    store = VocabStore(redis.Redis.from_url(redis_url))
    def publish_version(version: int) -> str:
        torch.manual_seed(version)
        emb = torch.nn.functional.normalize(torch.randn(args.tags, args.descriptions, 512), dim=-1)
        return store.publish(Vocabulary.from_embeddings(
            [f"v{version}-{i}" for i in range(args.tags)], emb, thresholds=0.5, name=name, version=str(version)))

    publish_version(0)
    store.activate(name, "0")

    model_dir = save_pretrained(create_model("tiny@64", vocabulary=store.load(name), seed=0), Path(tempfile.mkdtemp()) / "model")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    jpegs = make_jpegs(20, size=(160, 120))
    for i, data in enumerate(jpegs):
        s3.put_object(Bucket=bucket, Key=f"img/{i}.jpg", Body=data)
    make_topics(bootstrap, topic)

    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap, topic=topic, group_id=f"g-{run}", dead_letter_topic=topic + ".dlq"),
        s3=S3Settings(endpoint_url=endpoint, bucket=bucket, prefix="results/"),
        fetch=FetchSettings(s3_buckets=[bucket], concurrency=2),
        model=ModelSettings(checkpoint=model_dir, device="cpu"),
        fleet=FleetSettings(replicas=args.replicas, cpus_per_replica=0.5, batch_size=8, max_batch_wait_s=0.05, metrics_port=0),
    )
    # Only the active version and the one switched away from are held: official-size ones are ~0.7 GB each.
    settings.redis.url, settings.redis.vocabulary, settings.redis.cache_size = redis_url, name, 1
    settings.redis.prefetch = not args.no_prefetch
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    fleet = Fleet(settings)
    fleet.start()

    stop = threading.Event()

    def produce() -> None:
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        n = 0
        while not stop.is_set():
            body = {"id": f"r{n}", "uri": f"s3://{bucket}/img/{n % 20}.jpg"}
            producer.send(topic, key=body["id"].encode(), value=json.dumps(body).encode())
            n += 1
            time.sleep(0.025)
        producer.close()

    seen: set[str] = set()

    def new_results() -> list[dict]:
        rows = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="results/"):
            for obj in page.get("Contents", ()):
                if obj["Key"] not in seen:
                    seen.add(obj["Key"])
                    try:
                        body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
                    except s3.exceptions.NoSuchKey:  # rewritten by a partition's new owner after a rebalance
                        continue
                    rows.extend(json.loads(line) for line in body.splitlines() if line.strip())
        return rows

    threading.Thread(target=produce, daemon=True).start()
    latencies = []
    try:
        assert wait_until(lambda: len(new_results()) > 0, 120), "no results"
        for i in range(args.switches):
            target = str(i + 1)
            publish_version(i + 1)
            if i >= 1:
                store.delete(name, str(i - 1))  # keep Redis at three versions
            time.sleep(2.0)
            new_results()  # drain what came before the switch
            t0 = time.time()
            store.activate(name, target)
            first: list[float] = []

            def arrived() -> bool:
                stamps = [datetime.fromisoformat(r["ts"]).timestamp() for r in new_results() if r["vocab"] == f"{name}@{target}"]
                first.extend(stamps)
                return bool(first)

            assert wait_until(arrived, 60, interval_s=0.1), f"switch {i} to {target} never showed up"
            latencies.append(min(first) - t0)
            print(f"switch {i + 1}: -> {target} first result after {latencies[-1] * 1000:.0f} ms", flush=True)
        inside = replica_figures(fleet.scrape_metrics())
    finally:
        stop.set()
        fleet.stop()
        ray.shutdown()
        for key in store.redis.scan_iter(match=f"ramplus:vocab:{name}:*"):
            store.redis.delete(key)
    print(f"inside the replicas: switch (load + validate + swap, after the activate is noticed) mean "
          f"{inside['switch']:.3f} s over {inside['switches']:.0f}; forward pass mean {inside['batch']:.3f} s per batch")
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    print(f"activate -> first result: p50 {statistics.median(ordered) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"max {ordered[-1] * 1000:.0f} ms over {len(ordered)} switches ({args.replicas} replicas, "
          f"{args.tags} tags x {args.descriptions} descriptions, prefetch {'off' if args.no_prefetch else 'on'})")


if __name__ == "__main__":
    main()
