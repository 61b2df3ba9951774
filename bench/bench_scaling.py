"""Fleet scaling (issue 22): records/s with 1, 2 and 3 replicas, and a lag spike's way to a new replica serving.

    python bench/bench_scaling.py [--images 1500] [--burst 3000] [--repeat 1] [--max-in-flight 256]
    python bench/bench_scaling.py --config tiny@128 --batch-size 16 --partitions 4 --target-lag 200 --down-delay 10  # defaults
    python bench/bench_scaling.py --smoke            # small counts: a check that it runs (5-6 min on 2 cores: replica starts)
    python bench/bench_scaling.py --skip-throughput  # the lag spike only

Needs the local stack (started here when it is not running: infra/local/stack.py). Starts its own Ray cluster
of four raylets on this machine (ray.cluster_utils, as tests/ray_nodes.py does): a head without the slot
resource and three nodes of 1 CPU and one `ramplus_bench_slot` each. Every replica asks for one slot and
`--cpus-per-replica` CPUs (1: Ray then gives it one torch thread), so replicas land one per node, as on a
real cluster; here the three nodes share this machine's cores with each other, the driver, Kafka and s3proxy.

Part 1, throughput: for 1, 2 and 3 replicas, a fixed fleet (no lag scaling) on a fresh topic of
`--partitions` partitions and a fresh group. Once every replica holds partitions and a warm-up (16 requests
per replica) is tagged, `--images` requests go out and the rate is timed from 10% to 100% of them tagged
(the replicas' `tagged` counts in `Fleet.stats()`, as bench/bench_fleet.py): steady state, publishing and
pipeline fill excluded. Printed as images/s and the ratio to 1 replica, with each replica's share.

Part 2, lag spike: a fleet scaled by its lag (1..3 replicas, `--target-lag` per replica, scale-up delay 2 s,
scale-down delay `--down-delay`, watch every 1 s) starts at 1 replica; `--burst` requests are published at
once. Times are from the start of that publish: the scale-up decision (`Fleet.decisions`), the new replicas
ready (the driver's `ready` gauge, which the watcher sets every 1 s: that is its resolution), the first
result each new replica wrote (the `ts` its result lines carry, read from S3 after the run; a result line's
`worker` is `host/replica-<i>/<pid>`), the last result of the burst, and the scale-down back to 1 replica.
Between ready and serving lies the group's rebalance, in which the old owner first finishes the records it
has in flight (up to `--max-in-flight`). Every decision is listed, so that a fleet that flaps shows it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `infra.local` (the stack and its kit) lives in the repository, not the wheel
sys.path.insert(0, str(ROOT / "bench"))

from bench_fleet import make_jpegs, make_model_dir

SLOT = "ramplus_bench_slot"  # only the added nodes have it: one replica per node
NODES = 3
_REPLICA = re.compile(r"/replica-(\d+)/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500, help="requests per throughput run")
    parser.add_argument("--repeat", type=int, default=1, help="throughput runs per fleet size; the median is compared")
    parser.add_argument("--burst", type=int, default=3000, help="requests of the lag spike")
    parser.add_argument("--config", default="tiny@128")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--partitions", type=int, default=4, help="of each request topic")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs per replica (each node has 1)")
    parser.add_argument("--fetch-threads", type=int, default=2, help="fetch + decode threads in each replica")
    parser.add_argument("--max-in-flight", type=int, default=256,
                        help="fleet.max_in_flight (the default): what an owner finishes before it gives a partition away")
    parser.add_argument("--target-lag", type=int, default=200, help="lag scaling: records per replica")
    parser.add_argument("--down-delay", type=float, default=10.0, help="lag scaling: scale-down delay, s")
    parser.add_argument("--skip-throughput", action="store_true", help="the lag spike only")
    parser.add_argument("--skip-spike", action="store_true", help="the throughput runs only")
    parser.add_argument("--smoke", action="store_true", help="small counts (300 images, a burst of 1,000)")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.burst, args.repeat = 300, 1000, 1

    import boto3
    import ray
    from kafka import KafkaProducer
    from ray.cluster_utils import Cluster

    from infra.local.kit import local_stack, make_topics, wait_until
    from workers.settings import (
        FetchSettings,
        FleetSettings,
        KafkaSettings,
        ModelSettings,
        S3Settings,
        Settings,
    )
    from workers.stream.fleet import NAMESPACE, Fleet

    env = local_stack()  # also puts the stack's AWS_* credentials in os.environ, which the raylets pass on to replicas
    bootstrap, endpoint = env["RAMPLUS_KAFKA__BOOTSTRAP_SERVERS"], env["RAMPLUS_S3__ENDPOINT_URL"]

    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    model_dir = make_model_dir(args.config, work / "model")
    jpegs = make_jpegs(200)
    run = uuid.uuid4().hex[:8]
    bucket = f"scaling-{run}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    for i, data in enumerate(jpegs):
        s3.put_object(Bucket=bucket, Key=f"img/{i:05d}.jpg", Body=data)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10)

    def settings_for(topic: str, prefix: str, **fleet: Any) -> Settings:
        return Settings(
            kafka=KafkaSettings(bootstrap_servers=bootstrap, topic=topic, group_id=f"g-{topic}", dead_letter_topic=topic + ".dlq"),
            s3=S3Settings(endpoint_url=endpoint, bucket=bucket, prefix=prefix),
            fetch=FetchSettings(s3_buckets=[bucket], concurrency=args.fetch_threads),
            model=ModelSettings(checkpoint=model_dir, device="cpu"),
            fleet=FleetSettings(**{
                "cpus_per_replica": args.cpus_per_replica, "resources_per_replica": {SLOT: 1}, "batch_size": args.batch_size,
                "max_batch_wait_s": 0.05, "metrics_port": 0, "max_in_flight": args.max_in_flight, "drain_timeout_s": 30, **fleet,
            }),
        )

    def send(topic: str, prefix: str, count: int) -> None:
        for i in range(count):
            body = {"id": f"{prefix}{i}", "uri": f"s3://{bucket}/img/{i % len(jpegs):05d}.jpg"}
            producer.send(topic, key=body["id"].encode(), value=json.dumps(body).encode())
        producer.flush()

    def tagged(fleet: Fleet) -> int:
        return sum(s.get("tagged", 0) for s in fleet.stats())

    def settled(fleet: Fleet, replicas: int) -> bool:
        """Every replica holds partitions, and all of them are held (the group's rebalance is over)."""
        owned = [s.get("partitions", []) for s in fleet.stats()]
        return len(owned) == replicas and all(owned) and sum(len(p) for p in owned) == args.partitions

    def result_lines(prefix: str) -> list[dict]:
        rows = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                try:
                    body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
                except s3.exceptions.NoSuchKey:  # rewritten by a partition's new owner after a rebalance
                    continue
                rows.extend(json.loads(line) for line in body.splitlines() if line.strip())
        return rows

    def throughput(n: int) -> float:
        topic, _ = make_topics(bootstrap, f"scaling-{run}-n{n}", partitions=args.partitions)
        fleet = Fleet(settings_for(topic, f"results/n{n}/", replicas=n))
        started = time.perf_counter()
        fleet.start()
        try:
            assert wait_until(lambda: settled(fleet, n), 180, interval_s=0.5), f"the group of {n} never settled: {fleet.stats()}"
            up_s = time.perf_counter() - started
            send(topic, "warm", 16 * n)  # every replica has run a batch before the clock starts
            assert wait_until(lambda: tagged(fleet) >= 16 * n, 180), "warm-up did not finish"
            runs, first = [], args.images // 10
            for r in range(args.repeat):
                base = {s["replica"]: s.get("tagged", 0) for s in fleet.stats()}
                send(topic, f"run{r}-", args.images)
                before = sum(base.values())

                def done(count: int, before: int = before) -> bool:
                    return tagged(fleet) - before >= count

                assert wait_until(lambda: done(first), 600, interval_s=0.2), "run did not start"
                start = time.perf_counter()
                assert wait_until(lambda: done(args.images), 600, interval_s=0.2), "run did not finish"
                runs.append((args.images - first) / (time.perf_counter() - start))
                stats = fleet.stats()
                share = ", ".join(f"replica {s['replica']} {s.get('tagged', 0) - base.get(s['replica'], 0)} "
                                  f"(partitions {s.get('partitions')})" for s in stats)
                print(f"  {n} replica(s), run {r + 1}: {runs[-1]:.1f} images/s; {share}", flush=True)
        finally:
            fleet.stop()
        rate = statistics.median(runs)
        print(f"{n} replica(s): {rate:.1f} images/s (median of {len(runs)}; fleet up and group settled in {up_s:.1f} s)", flush=True)
        return rate

    def spike(one_rate: float | None) -> None:
        topic, _ = make_topics(bootstrap, f"scaling-{run}-spike", partitions=args.partitions)
        prefix = "results/spike/"
        fleet = Fleet(settings_for(topic, prefix, replicas=1, min_replicas=1, max_replicas=NODES,
                                   target_lag_per_replica=args.target_lag, scale_up_delay_s=2.0,
                                   scale_down_delay_s=args.down_delay, watch_interval_s=1.0))
        fleet.start()
        try:
            assert wait_until(lambda: settled(fleet, 1), 180, interval_s=0.5), f"the first replica never took the partitions: {fleet.stats()}"
            send(topic, "warm", 32)
            assert wait_until(lambda: tagged(fleet) >= 32, 180), "warm-up did not finish"
            assert wait_until(lambda: fleet.metrics.lag._value.get() == 0, 30), "the warm-up's lag never went to 0"
            time.sleep(2)  # a quiet fleet: no wish to scale is pending when the burst comes
            burst_wall, burst_mono = time.time(), time.monotonic()
            send(topic, "b", args.burst)
            published_s = time.monotonic() - burst_mono
            print(f"burst of {args.burst} published in {published_s:.1f} s", flush=True)

            ready_at: dict[int, float] = {}  # ready replicas (gauge) -> first time seen, s after the burst
            started: set[int] = set(fleet.actors)  # every replica index the fleet had meanwhile
            lag_peak, lag_zero_at, back_at = 0.0, None, None
            deadline = burst_mono + (900 if not args.smoke else 400)
            while time.monotonic() < deadline:
                now = time.monotonic() - burst_mono
                ready, lag = int(fleet.metrics.ready._value.get()), fleet.metrics.lag._value.get()
                ready_at.setdefault(ready, now)
                started |= set(fleet.actors)
                lag_peak = max(lag_peak, lag)
                if lag == 0 and lag_peak > 0 and lag_zero_at is None:
                    lag_zero_at = now
                downs = [d for _, before, d in fleet.decisions if d.replicas < before]
                if downs and len(fleet.actors) == 1:
                    back_at = now
                    break
                time.sleep(0.1)
            assert back_at is not None, f"not back to 1 replica in time; decisions {fleet.decisions}"
            time.sleep(3)  # a flap right after the scale-down shows in the decisions
            decisions = list(fleet.decisions)
        finally:
            fleet.stop()

        rows = [r for r in result_lines(prefix) if r["id"].startswith("b")]
        ids = Counter(r["id"] for r in rows)
        first_by: dict[int, float] = {}
        count_by: Counter = Counter()
        for r in rows:
            index = int(_REPLICA.search(r["worker"]).group(1))
            t = datetime.fromisoformat(r["ts"]).timestamp() - burst_wall
            first_by[index] = min(first_by.get(index, t), t)
            count_by[index] += 1
        last = max(datetime.fromisoformat(r["ts"]).timestamp() for r in rows) - burst_wall

        print(f"burst served: {len(ids)} of {args.burst} ids, {sum(ids.values()) - len(ids)} written twice; "
              f"by replica: {dict(sorted(count_by.items()))}")
        print("decisions (s after the burst, size before -> after, how long the lag asked, reason):")
        for at, before, d in decisions:
            print(f"  {at - burst_mono:6.1f} s  {before} -> {d.replicas}  waited {d.waited_s:.1f} s  {d.reason}")
        ups = [(at - burst_mono, before, d) for at, before, d in decisions if d.replicas > before]
        downs = [(at - burst_mono, before, d) for at, before, d in decisions if d.replicas < before]
        if ups:
            print(f"scale-up decided {ups[0][0]:.1f} s after the burst ({ups[0][1]} -> {ups[0][2].replicas}; lag peak {lag_peak:.0f})")
        print("ready replicas (driver gauge, 1 s resolution): "
              + ", ".join(f"{k} at {v:.1f} s" for k, v in sorted(ready_at.items()) if k > 0))
        for index in sorted(started - {0}):
            print(f"replica {index} (new): " + (f"first result {first_by[index]:.1f} s after the burst" if index in first_by
                                                else "no result (retired before it served, or it never started)"))
        new = [t for i, t in first_by.items() if i != 0]
        if new:
            print(f"lag spike -> a new replica serving: {min(new):.1f} s (the first of them), {max(new):.1f} s (the last)"
                  + (f"; {min(new) - ready_at[max(ready_at)]:.1f} s after all were ready (the group's rebalance: the old "
                     f"owner finishes its records in flight, up to {args.max_in_flight}, before it gives partitions away)"
                     if max(ready_at) > 1 else ""))
        print(f"burst drained: last result {last:.1f} s after the burst; lag 0 seen at "
              f"{lag_zero_at if lag_zero_at is None else round(lag_zero_at, 1)} s")
        if one_rate:
            print(f"  (one replica alone at part 1's rate, {one_rate:.1f} images/s, would take {args.burst / one_rate:.1f} s)")
        if downs:
            print(f"first scale-down decided {downs[0][0]:.1f} s after the burst ({downs[0][1]} -> {downs[0][2].replicas}, "
                  f"asked for {downs[0][2].waited_s:.1f} s; the burst's last result came at {last:.1f} s); "
                  f"back to 1 replica at {back_at:.1f} s")
        directions = [d.replicas > before for _, before, d in decisions]
        turns = sum(1 for a, b in itertools.pairwise(directions) if a != b)
        print(f"decisions in all: {len(decisions)}, direction changed {turns} time(s) "
              f"({'no flapping' if turns <= 1 else 'FLAPPING: more than one up then one down'})")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(NODES):
            cluster.add_node(num_cpus=1, resources={SLOT: 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        rates: dict[int, float] = {}
        if not args.skip_throughput:
            for n in range(1, NODES + 1):
                rates[n] = throughput(n)
            print(f"records/s as ratios to 1 replica ({args.config}, batch {args.batch_size}, {args.cpus_per_replica:g} CPU "
                  f"per replica, {args.partitions} partitions, {args.images} images): "
                  + ", ".join(f"{n}: {rates[n]:.1f} ({rates[n] / rates[1]:.2f}x)" for n in rates))
        if not args.skip_spike:
            spike(rates.get(1))
    finally:
        producer.close()
        ray.shutdown()
        cluster.shutdown()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
