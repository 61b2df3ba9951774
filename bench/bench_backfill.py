"""Backfill throughput against the bare model loop, on the same images.

    python bench/bench_backfill.py [--images 600] [--config tiny@128] [--repeat 3]

Bare loop: decode the JPEG bytes (already in memory) and run the model, one process, `--threads` torch
threads. Backfill: `run_backfill` over the same JPEGs in the local S3 server (listing, S3 GETs, Ray Data
decode tasks, one tagging actor, shard writes), on a local Ray with `--cpus` CPUs; its steady-state
images/s (from 10% of the images to the end). Medians of `--repeat` runs each are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_fleet import bare_loop, make_jpegs, make_model_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--config", default="tiny@128")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the bare loop")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray the backfill runs on")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs (= torch threads) of the tagging actor")
    parser.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs each fetch + decode task reserves")
    args = parser.parse_args()

    import boto3
    import ray
    from botocore.config import Config

    from workers.backfill.run import run_backfill
    from workers.settings import BackfillSettings, FetchSettings, ModelSettings, S3Settings, Settings

    from infra.local.kit import local_stack

    env = local_stack()
    endpoint = env["RAMPLUS_S3__ENDPOINT_URL"]
    s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))
    bucket = f"bench-backfill-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    jpegs = make_jpegs(args.images)
    for i, body in enumerate(jpegs):
        s3.put_object(Bucket=bucket, Key=f"images/{i:05d}.jpg", Body=body)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(args.config, Path(tmp) / "model")
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        bare, backfill, summaries = [], [], []
        for run in range(args.repeat):
            bare.append(bare_loop(model_dir, jpegs, args.batch_size, args.threads))
            settings = Settings(
                s3=S3Settings(endpoint_url=endpoint, bucket=bucket), fetch=FetchSettings(concurrency=2),
                model=ModelSettings(checkpoint=str(model_dir), device="cpu"),
                backfill=BackfillSettings(input=f"s3://{bucket}/images/", output=f"s3://{bucket}/out-{run}/",
                                          batch_size=args.batch_size, replicas=1, shard_size=100,
                                          cpus_per_replica=args.replica_cpus, decode_cpus=args.decode_cpus),
            )
            summary = run_backfill(settings, progress=False)
            assert summary.images_tagged == args.images and not summary.errors, summary
            backfill.append(summary.images_per_s_steady)
            summaries.append(summary.model_dump(include={"seconds", "images_per_s", "images_per_s_steady"}))
            print(f"run {run + 1}: bare {bare[-1]:.1f} img/s, backfill {backfill[-1]:.1f} img/s steady "
                  f"({summary.images_per_s:.1f} with start-up, {summary.seconds:.0f} s in all)", flush=True)
        ray.shutdown()

    ratio = statistics.median(backfill) / statistics.median(bare)
    print(json.dumps({
        "machine": f"{os.cpu_count()} cores", "images": args.images, "config": args.config, "batch_size": args.batch_size,
        "bare_images_per_s": [round(x, 1) for x in bare], "backfill_images_per_s_steady": [round(x, 1) for x in backfill],
        "ratio_of_medians": round(ratio, 3), "target": 0.8, "runs": summaries, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }, indent=2))


if __name__ == "__main__":
    main()
