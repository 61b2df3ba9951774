"""End-to-end fleet throughput (Kafka -> Ray replica -> S3) against the bare model loop, same images, same run.

    python bench/bench_fleet.py [--images 600] [--config tiny@128] [--replicas 1] [--batch-size 32]

Needs the local stack (started here when it is not running: infra/local/stack.py) and starts a local Ray.
The bare loop is what one replica must do per image at the least: decode the JPEG bytes (already in
memory) and run the model, in one process with the same thread count as the replica. The end-to-end
figure adds everything the fleet does on top: Kafka, S3 GETs, result PUTs, commits, dead-letter checks.
Printed as images/s and their ratio (target on the CPU: at least 0.8).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `infra.local` (the stack and its kit) lives in the repository, not the wheel


def make_jpegs(n: int, size=(320, 240), seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(base).resize(size, Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_model_dir(config: str, directory: Path) -> Path:
    from ramplus_core import Vocabulary, create_model, save_pretrained

    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(1000, 8, 512), dim=-1)
    vocab = Vocabulary.from_embeddings([f"tag{i}" for i in range(1000)], emb, thresholds=0.5, name="bench", version="1")
    return save_pretrained(create_model(config, vocabulary=vocab, seed=0), directory)


def bare_loop(model_dir: Path, jpegs: list[bytes], batch_size: int, threads: int) -> float:
    from ramplus_core import load_checkpoint
    from workers.stream.engine import TaggingEngine

    torch.set_num_threads(threads)
    engine = TaggingEngine(load_checkpoint(model_dir), device="cpu")
    engine.infer([engine.decode(jpegs[0], "warm")] * batch_size)
    start = time.perf_counter()
    for i in range(0, len(jpegs), batch_size):
        engine.infer([engine.decode(b, "x") for b in jpegs[i : i + batch_size]])
    return len(jpegs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--config", default="tiny@128")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, bare loop and replica alike")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; medians are compared")
    parser.add_argument("--fetch-threads", type=int, default=2, help="fetch + decode threads in the replica")
    args = parser.parse_args()

    import boto3
    import ray
    from kafka import KafkaProducer

    from infra.local.kit import make_topics, wait_until

    from workers.stream.fleet import Fleet
    from workers.settings import FetchSettings, FleetSettings, KafkaSettings, ModelSettings, S3Settings, Settings

    from infra.local.kit import local_stack

    env = local_stack()
    bootstrap, endpoint = env["RAMPLUS_KAFKA__BOOTSTRAP_SERVERS"], env["RAMPLUS_S3__ENDPOINT_URL"]

    jpegs = make_jpegs(args.images)
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    model_dir = make_model_dir(args.config, work / "model")
    bares = [bare_loop(model_dir, jpegs, args.batch_size, args.threads) for _ in range(args.repeat)]
    bare = statistics.median(bares)
    print(f"bare loop runs: {', '.join(f'{b:.1f}' for b in bares)} images/s")
    print(f"bare model loop ({args.config}, batch {args.batch_size}, {args.threads} threads): {bare:.1f} images/s", flush=True)

    run = uuid.uuid4().hex[:8]
    bucket, topic = f"bench-{run}", f"bench-{run}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    for i, data in enumerate(jpegs):
        s3.put_object(Bucket=bucket, Key=f"img/{i:05d}.jpg", Body=data)
    make_topics(bootstrap, topic)

    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap, topic=topic, group_id=f"g-{run}", dead_letter_topic=topic + ".dlq"),
        s3=S3Settings(endpoint_url=endpoint, bucket=bucket, prefix="results/"),
        fetch=FetchSettings(s3_buckets=[bucket], concurrency=args.fetch_threads),
        model=ModelSettings(checkpoint=model_dir, device="cpu"),
        fleet=FleetSettings(replicas=args.replicas, cpus_per_replica=args.threads, batch_size=args.batch_size,
                            max_batch_wait_s=0.05, metrics_port=0, max_in_flight=512),
    )
    ray.init(num_cpus=max(2, args.threads * args.replicas), include_dashboard=False, log_to_driver=False)
    fleet = Fleet(settings)
    fleet.start()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10)

    def send(prefix: str, count: int) -> None:
        for i in range(count):
            body = {"id": f"{prefix}{i}", "uri": f"s3://{bucket}/img/{i % len(jpegs):05d}.jpg"}
            producer.send(topic, key=body["id"].encode(), value=json.dumps(body).encode())
        producer.flush()

    def tagged() -> int:
        return sum(s.get("tagged", 0) for s in fleet.stats())

    try:
        send("warm", 64)  # the group has joined and every replica has run a batch before the clock starts
        assert wait_until(lambda: tagged() >= 64, 180), "warm-up did not finish"
        runs = []
        for r in range(args.repeat):
            base = tagged()
            send(f"run{r}-", args.images)
            # Steady state: the rate from 10% to 100% of the run (publishing and pipeline fill excluded).
            first = args.images // 10
            assert wait_until(lambda: tagged() - base >= first, 600, interval_s=0.2), "run did not start"
            start = time.perf_counter()
            assert wait_until(lambda: tagged() - base >= args.images, 600, interval_s=0.2), "run did not finish"
            runs.append((args.images - first) / (time.perf_counter() - start))
        print(f"end-to-end runs: {', '.join(f'{r:.1f}' for r in runs)} images/s")
        e2e = statistics.median(runs)
    finally:
        fleet.stop()
        producer.close()
        ray.shutdown()

    print(f"median end to end Kafka -> {args.replicas} replica(s) -> S3: {e2e:.1f} images/s (steady state, 10% to 100% of the run)")
    print(f"ratio of medians, end-to-end / bare loop: {e2e / bare:.2f}  (target >= 0.8)")
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
