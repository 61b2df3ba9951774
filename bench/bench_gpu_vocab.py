"""Large vocabularies on one GPU, in one short run (issue 19).

    python bench/bench_gpu_vocab.py --smoke      # CPU, tiny@64, fp32, a tenth of the tags: checks the script
    python bench/bench_gpu_vocab.py --cpu        # CPU, tiny@64, fp32, the real tag counts: the ratios a CPU can check
    python bench/bench_gpu_vocab.py              # CUDA: swin_l@384 random weights, bf16, batch 64 (under 5 minutes)
    python bench/bench_gpu_vocab.py --record     # + a section appended to bench/RESULTS.md

For 1,000 / 4,585 / 20,000 / 50,000 tags x 51 descriptions (random unit vectors, fp16 as a replica gets them
from Redis), with `tag_chunk_size="auto"` and the budget a replica would get:
- the head alone (re-weighting + alignment decoder on ready image embeddings): images/s, the chunk chosen,
  peak memory;
- the whole model (`tag_logits`): images/s, peak memory;
- the same two with the head compiled (`RamPlus.compile_head`; dynamic sizes, compiled once);
then the 4,585-tag head in one go (`tag_chunk_size=None`, the path before this issue) as the baseline, the
image encoder alone, the whole model's rate at 50,000 tags over its rate at 4,585, and on CUDA the
50,000-tag whole model with the process held to 24 GiB (`torch.cuda.set_per_process_memory_fraction`,
which the automatic budget reads): the issue's 24 GiB GPU on a bigger one.

Peak memory: on CUDA what the allocator had allocated (and reserved) at most during the figure, model and
vocabulary included; on the CPU how far the resident set grew above what the model and vocabulary hold.
Each figure is one JSON line printed the moment it is measured (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ramplus_core import Vocabulary, create_model  # noqa: E402
from ramplus_core.model import RamPlus, VocabularyTensors  # noqa: E402
from ramplus_core.tagger import place_model  # noqa: E402
from bench_model import timed  # noqa: E402 - the one timer of the benches (sync=True on CUDA)

RESULTS = ROOT / "bench" / "RESULTS.md"
TAG_COUNTS = (1000, 4585, 20_000, 50_000)
GiB = 2**30


def random_vocabulary(tags: int, descriptions: int, device: torch.device) -> Vocabulary:
    """Random unit vectors stored in fp16, made on `device` a slice at a time (no fp32 copy of the whole)."""
    emb = torch.empty(tags, descriptions, 512, dtype=torch.float16)
    g = torch.Generator(device).manual_seed(tags)
    for start in range(0, tags, 2048):
        part = torch.randn(min(2048, tags - start), descriptions, 512, device=device, generator=g)
        emb[start : start + part.shape[0]] = F.normalize(part, dim=-1).to(torch.float16).cpu()
    return Vocabulary.from_embeddings([f"t{i}" for i in range(tags)], emb, dtype="float16", name=f"bench-{tags}")


class Peak:
    """Peak memory over one figure (see the module's docstring)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.base = 0
        if not cuda:
            try:  # glibc: map every block of 64 KiB or more on its own, so a freed tensor leaves the resident set
                ctypes.CDLL(None).mallopt(-3, 65536)  # M_MMAP_THRESHOLD
            except (OSError, AttributeError):
                pass

    @staticmethod
    def _status(key: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) * 1024

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
            self.base = self._status("VmRSS:")
        except OSError:
            self.base = -1

    def figures(self) -> dict[str, float | None]:
        if self.cuda:
            return {"peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2),
                    "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2)}
        if self.base < 0:
            return {"peak_growth_gib": None}
        return {"peak_growth_gib": round((self._status("VmHWM:") - self.base) / GiB, 3)}


class Run:
    def __init__(self, out: Path) -> None:
        self.rows: list[dict] = []
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")

    def emit(self, **row: object) -> dict:
        self.rows.append(row)
        line = json.dumps(row, default=str)
        print(line, flush=True)
        with self.out.open("a") as f:
            f.write(line + "\n")
        return row


def measure_count(
    run: Run, model: RamPlus, compiled: RamPlus, tags: int, x: torch.Tensor, args: argparse.Namespace, peak: Peak,
) -> dict[str, float]:
    """Every figure at one vocabulary size; returns the whole-model rates (eager and compiled head)."""
    cuda = x.device.type == "cuda"
    repeat, warmup, budget = args.repeat, args.warmup, args.head_memory_bytes
    vocab: VocabularyTensors = model.prepare_vocabulary(random_vocabulary(tags, args.descriptions, x.device))
    batch = x.shape[0]
    with torch.inference_mode():
        embeds = model.encode_image(x)
        chunk = model.tag_chunk(embeds, vocab, head_memory_bytes=budget)  # what "auto" picks, the encoder's cache still held
        rates: dict[str, float] = {}
        for label, m in (("eager", model), ("compiled", compiled)):
            t0 = time.perf_counter()
            m.head_logits(embeds, vocab, tag_chunk_size="auto", head_memory_bytes=budget)
            if cuda:
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            peak.start()
            seconds = timed(lambda: m.head_logits(embeds, vocab, tag_chunk_size="auto", head_memory_bytes=budget), repeat, warmup, cuda)
            run.emit(figure=f"head, {label}", tags=tags, batch=batch, images_per_s=round(batch / seconds, 1),
                     chunk=chunk or "all", first_call_s=round(first_s, 2), **peak.figures())
            peak.start()
            seconds = timed(lambda: m.tag_logits(x, vocab, tag_chunk_size="auto", head_memory_bytes=budget), repeat, warmup, cuda)
            rates[label] = batch / seconds
            run.emit(figure=f"whole model, {label} head", tags=tags, batch=batch, images_per_s=round(rates[label], 1),
                     **peak.figures())
        if tags == args.base_tags:  # the head as it ran before this issue: all tags in one go
            peak.start()
            seconds = timed(lambda: model.head_logits(embeds, vocab, tag_chunk_size=None), repeat, warmup, cuda)
            run.emit(figure="head, eager, one go (before)", tags=tags, batch=batch, images_per_s=round(batch / seconds, 1),
                     **peak.figures())
        if tags == max(args.tags) and cuda:
            run.emit(**held_to_24_gib(model, vocab, x, args))
    return rates


def held_to_24_gib(model: RamPlus, vocab: VocabularyTensors, x: torch.Tensor, args: argparse.Namespace) -> dict:
    """The whole model as on a 24 GiB GPU: the process may allocate no more (an out-of-memory error otherwise),
    and the automatic budget sees that limit."""
    total = torch.cuda.get_device_properties(x.device).total_memory
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, 24 * GiB / total))
    torch.cuda.reset_peak_memory_stats()
    row: dict[str, object] = {"figure": "whole model, eager head, process held to 24 GiB", "tags": vocab.num_tags,
                              "batch": x.shape[0]}
    try:
        with torch.inference_mode():
            row["chunk"] = model.tag_chunk(model.encode_image(x), vocab) or "all"
            seconds = timed(lambda: model.tag_logits(x, vocab, tag_chunk_size="auto"), args.repeat, args.warmup, True)
        row |= {"images_per_s": round(x.shape[0] / seconds, 1),
                "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2)}
    except torch.OutOfMemoryError:
        row["out_of_memory"] = True
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    return row


def record(run: Run, args: argparse.Namespace, machine: str) -> None:
    mode = " --smoke" if args.smoke else " --cpu" if args.cpu else ""
    setup = run.rows[0]
    lines = [
        "", f"### {date.today().isoformat()}, {machine}, `python bench/bench_gpu_vocab.py{mode}`",
        f"({setup['model']}, {setup['precision']}, batch {setup['batch']}, x {args.descriptions} descriptions, "
        f"tag_chunk_size=auto{f', head budget {args.head_memory_mb} MiB' if args.head_memory_mb else ''}, "
        f"{args.repeat} timed passes after {args.warmup}, torch {torch.__version__})", "",
        "| figure | tags | images/s | chunk | peak |", "|---|---|---|---|---|",
    ]
    for r in run.rows[1:]:
        if "images_per_s" not in r and "ratio" not in r:
            lines.append(f"| {r['figure']} | {r.get('tags', '')} | out of memory | | |")
            continue
        if "ratio" in r:
            lines.append(f"| {r['figure']} | | {r['ratio']} | | |")
            continue
        mem = r.get("peak_gib", r.get("peak_growth_gib"))
        unit = "GiB" if "peak_gib" in r else "GiB growth"
        reserved = f" ({r['peak_reserved_gib']} reserved)" if "peak_reserved_gib" in r else ""
        lines.append(f"| {r['figure']} | {r.get('tags', '')} | {r['images_per_s']} | {r.get('chunk', '')} | "
                     f"{'' if mem is None else f'{mem} {unit}{reserved}'} |")
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny@64, a tenth of the tags, batch 16: checks the script")
    parser.add_argument("--cpu", action="store_true", help="CPU, tiny@64, the real tag counts: the CPU's ratios")
    parser.add_argument("--model", default="swin_l@384")
    parser.add_argument("--tags", default=",".join(map(str, TAG_COUNTS)))
    parser.add_argument("--descriptions", type=int, default=51)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--head-memory-mb", type=int, default=None, help="the head's budget; default: the device's (auto)")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "bench_gpu_vocab.jsonl")
    args = parser.parse_args()
    args.tags = [int(t) for t in args.tags.split(",")]
    on_cpu = args.smoke or args.cpu or not torch.cuda.is_available()
    if on_cpu:
        args.model, args.repeat, args.warmup = "tiny@64", 1, 1
    if args.smoke:  # a budget small enough that the larger vocabularies are chunked
        args.tags, args.batch_size = [max(1, t // 10) for t in args.tags], 16
        args.head_memory_mb = args.head_memory_mb or 64
    args.head_memory_bytes = args.head_memory_mb * 2**20 if args.head_memory_mb else None
    args.base_tags = 4585 // 10 if args.smoke else 4585  # the official vocabulary's size: the baseline
    device = torch.device("cpu" if on_cpu else "cuda")
    precision = "fp32" if on_cpu else "bf16"
    if not on_cpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    machine = (f"{platform.machine()} CPU, {torch.get_num_threads()} threads" if on_cpu
               else torch.cuda.get_device_name(device))
    run = Run(args.out)
    run.emit(figure="setup", machine=machine, torch=torch.__version__, python=platform.python_version(), model=args.model,
             precision=precision, batch=args.batch_size, tags=args.tags, descriptions=args.descriptions, date=str(date.today()))

    model, _, dtype = place_model(create_model(args.model, seed=0), device, precision)
    # The same weights with the head compiled: a shallow copy shares every submodule and parameter, and
    # compile_head sets the compiled scorer on the copy alone.
    compiled = copy.copy(model)
    compiled.compile_head()
    size = model.config.image_size
    x = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    peak = Peak(device.type == "cuda")
    with torch.inference_mode():
        seconds = timed(lambda: model.encode_image(x), args.repeat, args.warmup, device.type == "cuda")
    run.emit(figure="image encoder alone", batch=args.batch_size, images_per_s=round(args.batch_size / seconds, 1))

    rates = {tags: measure_count(run, model, compiled, tags, x, args, peak) for tags in args.tags}
    base, top = args.base_tags, max(args.tags)
    if base in rates and top != base:
        for label in ("eager", "compiled"):
            run.emit(figure=f"whole model at {top:,} tags / at {base:,}, {label} head",
                     ratio=round(rates[top][label] / rates[base][label], 3))
    if args.record:
        record(run, args, machine)


if __name__ == "__main__":
    main()
