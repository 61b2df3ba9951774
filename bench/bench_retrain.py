"""Held-out mAP of a tiny RAM++ trained from scratch on the synthetic set, against the clock.

    python bench/bench_retrain.py [--images 4000] [--minutes 14] [--workers 2] [--generator 2]

Ray Train with `--workers` CPU workers (DDP, gloo) on a local Ray; data, checkpoints and the artifact on
local disk under bench/out/ (the S3 path is the integration tests' business). Prints the curve: epoch,
elapsed seconds, learning rate, train loss, held-out mAP and the label-prior baseline, the time to mAP
0.90, and the final held-out AP per tag group (colour, shape, background) with calibrated thresholds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--minutes", type=float, default=14.0)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="tiny@64")
    parser.add_argument("--generator", type=int, default=None, help="synthetic generator version (default: the newest)")
    args = parser.parse_args()

    import ray

    from ramplus_core import Vocabulary
    from ramplus_core.evaluation import group_average_precision
    from ramplus_core.synthetic import GENERATOR_VERSION, describe_tags
    from ramplus_core.text_encoder import TextEncoder
    from workers.train.retrain import run
    from workers.settings import Settings
    from workers.train.synth_data import write_dataset

    out = ROOT / "bench" / "out" / "retrain"
    generator = args.generator or GENERATOR_VERSION
    data = out / f"synth-v{generator}-{args.images}"
    if not (data / "manifest.jsonl").exists():
        summary = write_dataset(str(data), n=args.images, seed=0, size=96, progress=False, version=generator)
        print(f"dataset: generator v{generator}, {summary.train} train + {summary.val} val images in {summary.seconds:.0f} s", flush=True)
    groups = json.loads((data / "tags.json").read_text())["groups"]
    encoder = TextEncoder("ramplus-tiny-text", None)
    descriptions = describe_tags(generator)
    vocab = Vocabulary.from_descriptions(
        [{t: descriptions[t]} for g in groups.values() for t in g], encoder.encode, text_encoder=encoder.id, name="synth", version="1", thresholds=0.5,
    )
    vocab.save(out / "synth.safetensors")
    run_name = f"bench-{int(time.time())}"
    settings = Settings(train={
        "run_name": run_name, "manifest": str(data / "manifest.jsonl"), "storage_path": str(out / "runs"),
        "output": str(out / "models"), "model": args.model, "vocabulary": str(out / "synth.safetensors"),
        "text_encoder": "ramplus-tiny-text", "text_weights": "none", "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "warmup_steps": 50, "workers": args.workers, "cpus_per_worker": 1, "max_minutes": args.minutes,
    })
    ray.init(num_cpus=args.workers + 1, include_dashboard=False, log_to_driver=False)
    started = time.monotonic()
    result = run(settings, version="v1")
    wall = time.monotonic() - started
    print("epoch  elapsed_s        lr  train_loss  val_map  prior_map")
    reached = None
    for h in result.history:
        print(f"{h['epoch']:5d}  {h['elapsed_s']:9.0f}  {h.get('lr', float('nan')):8.2e}  {h['train_loss']:10.2f}  "
              f"{h['val_map']:7.3f}  {h['prior_map']:9.3f}")
        if reached is None and h["val_map"] >= 0.90:
            reached = h["elapsed_s"]
    final = json.loads((Path(result.artifact) / "metrics.json").read_text())["final"] if result.artifact else {}
    print(f"final (calibrated thresholds): mAP {final.get('val_map', float('nan')):.3f}, F1 {final.get('val_f1', float('nan')):.3f}, "
          f"P {final.get('val_precision', float('nan')):.3f}, R {final.get('val_recall', float('nan')):.3f}")
    by_group = group_average_precision(final.get("val_tag_ap", {}), groups)
    print("held-out AP by group: " + ", ".join(f"{g} {v:.3f}" if v is not None else f"{g} -" for g, v in by_group.items()))
    print(f"mAP >= 0.90 after {reached:.0f} s of training" if reached is not None else "mAP 0.90 not reached")
    print(f"job wall time {wall:.0f} s (data loading and start-up included); images/s {result.history[-1]['images_per_s']:.0f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
