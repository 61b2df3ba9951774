"""Training speed on one GPU, option by option, in one short run (issue 18).

    python bench/bench_gpu_train.py --smoke      # CPU, tiny model: checks the script, figures mean nothing
    python bench/bench_gpu_train.py              # CUDA: swin_l@384, 4,585 x 51 tags, bf16 autocast (under 5 minutes)
    python bench/bench_gpu_train.py --record     # + a markdown table appended to bench/RESULTS.md

The step is the retraining job's (`RamPlusTraining`: image encoder, tag head with re-weighting, image-text
alignment against the batch's captions; AdamW; bf16 autocast on CUDA), with random weights and random
description/caption embeddings: speed only. Each option is measured alone against the baseline, then all
together: channels-last, fused AdamW, activation checkpointing of the Swin stages (also at twice the
batch: what the saved memory buys), `torch.compile` of the step module. Last, the DDP path the Ray Train
workers take (NCCL on CUDA, gloo on the CPU) with one rank. Each figure is printed as one JSON line the
moment it is measured (a run cut short keeps what it measured): images/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ramplus_core import Vocabulary, create_model  # noqa: E402
from ramplus_core.training import (  # noqa: E402
    RamPlusTraining,
    StepOptions,
    build_optimizer,
    fused_for,
    prepare_step,
)

RESULTS = ROOT / "bench" / "RESULTS.md"


def random_vocabulary(num_tags: int, descriptions: int, dim: int, seed: int = 0) -> Vocabulary:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(num_tags, descriptions, dim, generator=g), dim=-1)
    return Vocabulary.from_embeddings([f"tag{i}" for i in range(num_tags)], emb, text_encoder="random")


def build(args: argparse.Namespace, options: StepOptions, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = create_model(args.model, seed=0).to(device)
    vocab = random_vocabulary(args.tags, args.descriptions, model.config.text_dim)
    model.set_vocabulary(vocab)
    step = RamPlusTraining(model, vocab).train()
    prepare_step(step, options)
    step.vocab_tensors()  # eagerly, as the retraining loop does before it compiles
    optimizer = build_optimizer(model, lr=1e-4, fused=fused_for(model, options.fused_optimizer))
    return step, optimizer


def batch(args: argparse.Namespace, size: int, dim: int, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(size, 3, args.image_size, args.image_size, generator=g).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    tags = (torch.rand(size, args.tags, generator=g) < 10 / args.tags).float().to(device)
    captions = torch.nn.functional.normalize(torch.randn(size, dim, generator=g), dim=-1).to(device)
    return images, tags, captions, torch.eye(size, device=device)


def measure(args: argparse.Namespace, name: str, options: StepOptions, batch_size: int, device: torch.device,
            wrap=None) -> dict:  # noqa: ANN001 - wrap: module -> module (DDP)
    torch.manual_seed(0)
    torch._dynamo.reset()  # the previous option's compiled graphs hold its model's memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step, optimizer = build(args, options, device)
    module = wrap(step) if wrap else step
    if options.compile:
        module = torch.compile(module, backend=args.compile_backend)
    data = batch(args, batch_size, step.model.config.text_dim, device, options.channels_last)

    def one() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = module(*data)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        return float(out["loss"].detach())

    started = time.perf_counter()
    try:
        for _ in range(args.warmup):
            one()
        if device.type == "cuda":
            torch.cuda.synchronize()
        warm_s = time.perf_counter() - started
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = one()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        row = {"figure": name, "batch": batch_size, "out_of_memory": True}
        print(json.dumps(row), flush=True)
        return row
    row = {
        "figure": name, "batch": batch_size, "images_per_s": round(args.steps * batch_size / seconds, 1),
        "step_ms": round(1000 * seconds / args.steps, 1), "warmup_s": round(warm_s, 1), "loss": round(loss, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        **{k: v for k, v in asdict(options).items() if v},
    }
    print(json.dumps(row), flush=True)
    return row


def ddp_wrap(device: torch.device):  # noqa: ANN201
    """One-rank DDP, as `ray.train.torch.prepare_model` sets it up (NCCL on CUDA, gloo otherwise)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    return wrap


def record(rows: list[dict], args: argparse.Namespace, device_name: str) -> None:
    lines = [
        "", f"### {date.today().isoformat()}, {device_name}, `python bench/bench_gpu_train.py{' --smoke' if args.smoke else ''}`",
        f"({args.model}, {args.tags:,} tags x {args.descriptions} descriptions, {args.steps} timed steps after {args.warmup}"
        f"{', bf16 autocast' if device_name != 'cpu' else ''}, torch {torch.__version__})", "",
        "| figure | batch | images/s | step ms | peak GiB | warm-up s |", "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("out_of_memory"):
            lines.append(f"| {r['figure']} | {r['batch']} | out of memory | | | |")
        else:
            lines.append(f"| {r['figure']} | {r['batch']} | {r['images_per_s']} | {r['step_ms']} | {r['peak_gib'] or '-'} | {r['warmup_s']} |")
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny@64, 12 tags: checks the script only")
    parser.add_argument("--model", default="swin_l@384")
    parser.add_argument("--tags", type=int, default=4585)
    parser.add_argument("--descriptions", type=int, default=51)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.tags, args.descriptions, args.steps, args.warmup = "tiny@64", 12, 3, 3, 1
        args.compile_backend = "aot_eager"  # inductor's CPU compile of forward + backward would dominate a smoke run
    args.image_size = int(args.model.split("@")[1]) if "@" in args.model else 384
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"device": device_name, "torch": torch.__version__, "python": platform.python_version(),
                      "model": args.model, "tags": args.tags}), flush=True)
    b = args.batch_size
    base = StepOptions(fused_optimizer=False)
    plan = [
        ("baseline (AdamW foreach)", base, b),
        ("channels-last", replace(base, channels_last=True), b),
        ("fused AdamW", replace(base, fused_optimizer=True), b),
        ("activation checkpointing", replace(base, grad_checkpointing=True), b),
        ("activation checkpointing, 2x batch", replace(base, grad_checkpointing=True), 2 * b),
        ("baseline, 2x batch", base, 2 * b),
    ]
    every = StepOptions(channels_last=True, fused_optimizer=True)
    if not args.skip_compile:
        plan += [("torch.compile", replace(base, compile=True), b),
                 ("all: channels-last + fused + compile", replace(every, compile=True), b)]
    else:
        plan += [("all: channels-last + fused", every, b)]
    rows = [measure(args, name, options, size, device) for name, options, size in plan]
    rows.append(measure(args, "DDP, 1 rank (the Ray Train path)", every, b, device, wrap=ddp_wrap(device)))
    if args.record:
        record(rows, args, device_name)


if __name__ == "__main__":
    main()
