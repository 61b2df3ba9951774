"""Activate-to-first-result latency of a vocabulary switch in a running fleet (10 switches, p50/p99).

    python bench/bench_hot_swap.py [--switches 10] [--replicas 2] [--tags 200] [--descriptions 4]
    python bench/bench_hot_swap.py --tags 4585 --descriptions 51       # official size
    python bench/bench_hot_swap.py --tags 50000 --descriptions 51 --alternate --switches 5 --rate 10 --threshold 0.99 \
        --head-memory-mb 256

`--alternate` (large vocabularies, issue 19): two versions only, both held by every replica, switched back
and forth. It measures the publish of the second one, publish -> every replica has prefetched it (their
`stats()` list it as cached), each replica's resident memory holding one and then two versions, Redis'
memory per version, and per switch the replicas' own `ramplus_vocab_switch_seconds` (the histogram's sum
scraped before and after: one exact value per replica and switch), besides the activate -> first result
latency. `--threshold 0.99` keeps result lines short (a random model scores every tag near 0.5).
`--head-memory-mb` bounds each replica's head: by default each replica takes up to a quarter of what the
host has available when its batch runs, and on one 24 GiB host that also holds Redis' two 2.6 GB versions
and both replicas' four, that is memory the host does not have.

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
import torch.nn.functional as F

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


def switch_sums(expositions: dict[str, bytes]) -> dict[str, tuple[float, float]]:
    """Per replica: (sum, count) of `ramplus_vocab_switch_seconds`."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for replica, text in expositions.items():
        values = {s.name: s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples}
        out[replica] = (values.get("ramplus_vocab_switch_seconds_sum", 0.0), values.get("ramplus_vocab_switch_seconds_count", 0.0))
    return out


def random_vocabulary(tags: int, descriptions: int, seed: int, **kwargs: object):  # noqa: ANN201 - a Vocabulary
    """Random unit vectors stored in fp16, made a slice at a time: 50,000 x 51 never exists in fp32 here."""
    from ramplus_core import Vocabulary

    g = torch.Generator().manual_seed(seed)
    emb = torch.empty(tags, descriptions, 512, dtype=torch.float16)
    for start in range(0, tags, 2048):
        n = min(2048, tags - start)
        emb[start : start + n] = F.normalize(torch.randn(n, descriptions, 512, generator=g), dim=-1)
    return Vocabulary.from_embeddings([f"v{seed}-{i}" for i in range(tags)], emb, dtype="float16", **kwargs)


def memory_of(pid: int) -> dict[str, float]:
    """A process's resident set now and at its highest, GiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(line.split()[1]) / 2**20, 2)
    return fields


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--tags", type=int, default=200)
    parser.add_argument("--descriptions", type=int, default=4)
    parser.add_argument("--no-prefetch", action="store_true", help="replicas load a version only when it is activated")
    parser.add_argument("--alternate", action="store_true", help="two prefetched versions switched back and forth (see above)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second in the stream")
    parser.add_argument("--threshold", type=float, default=0.5, help="every tag's threshold in the published versions")
    parser.add_argument("--head-memory-mb", type=int, default=None,
                        help="RAMPLUS_MODEL__HEAD_MEMORY_MB of each replica (default: a share of the host's available memory)")
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
    store = VocabStore(redis.Redis.from_url(redis_url, socket_timeout=120))

    def publish_version(version: int) -> float:
        """Seconds the publish took (the vocabulary is made before the clock starts)."""
        vocabulary = random_vocabulary(args.tags, args.descriptions, version, thresholds=args.threshold, name=name,
                                       version=str(version))
        started = time.perf_counter()
        store.publish(vocabulary)
        return time.perf_counter() - started

    publish_version(0)
    store.activate(name, "0")

    # The checkpoint carries a three-tag vocabulary: replicas take the active version from Redis as they start.
    placeholder = Vocabulary.from_embeddings(["a", "b", "c"], F.normalize(torch.randn(3, 1, 512), dim=-1))
    model_dir = save_pretrained(create_model("tiny@64", vocabulary=placeholder, seed=0), Path(tempfile.mkdtemp()) / "model")
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
        model=ModelSettings(checkpoint=model_dir, device="cpu", head_memory_mb=args.head_memory_mb),
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
            time.sleep(1 / args.rate)
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

    def first_result_after(t0: float, target: str) -> float:
        first: list[float] = []

        def arrived() -> bool:
            stamps = [datetime.fromisoformat(r["ts"]).timestamp() for r in new_results() if r["vocab"] == f"{name}@{target}"]
            first.extend(stamps)
            return bool(first)

        assert wait_until(arrived, 120, interval_s=0.1), f"the switch to {target} never showed up"
        return min(first) - t0

    threading.Thread(target=produce, daemon=True).start()
    latencies = []
    try:
        assert wait_until(lambda: len(new_results()) > 0, 300), "no results"
        if args.alternate:
            alternate(args, store, fleet, name, publish_version, new_results, first_result_after, wait_until)
            return
        for i in range(args.switches):
            target = str(i + 1)
            publish_version(i + 1)
            if i >= 1:
                store.delete(name, str(i - 1))  # keep Redis at three versions
            time.sleep(2.0)
            new_results()  # drain what came before the switch
            t0 = time.time()
            store.activate(name, target)
            latencies.append(first_result_after(t0, target))
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
    print(f"activate -> first result: p50 {statistics.median(ordered) * 1000:.0f} ms, p99 {percentile(ordered, 0.99) * 1000:.0f} ms, "
          f"max {ordered[-1] * 1000:.0f} ms over {len(ordered)} switches ({args.replicas} replicas, "
          f"{args.tags} tags x {args.descriptions} descriptions, prefetch {'off' if args.no_prefetch else 'on'})")


def alternate(args, store, fleet, name, publish_version, new_results, first_result_after, wait_until) -> None:  # noqa: ANN001
    """The `--alternate` figures (see the module's docstring); version 0 is active and held by every replica."""
    ref = lambda version: f"{name}@{version}"  # noqa: E731
    pids = fleet.pids()
    assert wait_until(lambda: all(s.get("vocab") == ref(0) for s in fleet.stats()), 300), "replicas never took version 0"
    one = [memory_of(p) for p in pids]
    redis_before = store.redis.info("memory")["used_memory"]
    publish_s = publish_version(1)
    published = time.perf_counter()
    redis_bytes = store.redis.info("memory")["used_memory"] - redis_before
    held = lambda: all(ref(1) in s.get("cached_vocabs", []) for s in fleet.stats())  # noqa: E731
    assert wait_until(held, 600, interval_s=0.1), "not every replica prefetched version 1"
    prefetched_s = time.perf_counter() - published
    two = [memory_of(p) for p in pids]
    print(f"{args.tags} x {args.descriptions} x 512 fp16: publish {publish_s:.1f} s, {redis_bytes / 2**30:.2f} GiB in Redis; "
          f"publish -> all {len(pids)} replicas prefetched {prefetched_s:.1f} s", flush=True)
    for i, (a, b) in enumerate(zip(one, two)):
        print(f"replica {i}: resident {a['VmRSS']} GiB holding one version, {b['VmRSS']} GiB holding two "
              f"(+{b['VmRSS'] - a['VmRSS']:.2f}); highest {b['VmHWM']} GiB", flush=True)

    inside: list[float] = []
    latencies: list[float] = []
    for i in range(args.switches):
        target = "1" if i % 2 == 0 else "0"
        new_results()  # drain what came before the switch
        before = switch_sums(fleet.scrape_metrics())
        t0 = time.time()
        store.activate(name, target)
        latencies.append(first_result_after(t0, target))

        def observed() -> bool:
            now = switch_sums(fleet.scrape_metrics())
            return len(now) == len(pids) and all(now[r][1] == before[r][1] + 1 for r in before)

        assert wait_until(observed, 120, interval_s=0.1), f"not every replica switched to {target}"
        after = switch_sums(fleet.scrape_metrics())
        seconds = [after[r][0] - before[r][0] for r in sorted(before)]
        inside.extend(seconds)
        print(f"switch {i + 1}: -> {target}, first result after {latencies[-1] * 1000:.0f} ms; inside the replicas "
              + ", ".join(f"{s * 1000:.1f} ms" for s in seconds), flush=True)
    stats = fleet.stats()
    assert all(s.get("vocab") == ref(target) for s in stats)
    print(f"ramplus_vocab_switch_seconds over {len(inside)} switches ({args.switches} per replica): "
          f"p50 {statistics.median(inside) * 1000:.1f} ms, p99 {percentile(inside, 0.99) * 1000:.1f} ms, max {max(inside) * 1000:.1f} ms")
    print(f"activate -> first result: p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms over {len(latencies)} switches")
    print(f"forward pass mean {replica_figures(fleet.scrape_metrics())['batch']:.2f} s per batch (batch 8)")


if __name__ == "__main__":
    main()
