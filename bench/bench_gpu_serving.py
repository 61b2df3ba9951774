"""What a GPU replica delivers against what its model can do, in one short run (issue 16).

    python bench/bench_gpu_serving.py --smoke          # CPU, tiny model: checks the script, figures mean nothing
    python bench/bench_gpu_serving.py                  # CUDA: swin_l@384, 4,585 x 51, bf16 (under 5 minutes)
    python bench/bench_gpu_serving.py --compile        # + the compiled engine and compiled tag_logits (adds compile time)
    python bench/bench_gpu_serving.py --record         # + a markdown table appended to bench/RESULTS.md

Each figure is printed as one JSON line the moment it is measured (a run cut short keeps what it measured):
- model only: `model.tag_logits` on ready tensors, at each batch size;
- tag selection alone (`select_tags`) at about 10 and about 3,000 tags per image, against the old per-image
  loop and as a share of the model's time for the same batch;
- the engine on decoded pixels (resize + model + selection) and from JPEG bytes as the stream pipeline
  drives it (decode threads, a staging thread for batch n+1 beside the model on batch n), also with a fifth
  of the images PNG;
- with --compile: the engine with its image encoder compiled (RAMPLUS_MODEL__COMPILE; warm-up time), and the
  whole of `tag_logits` compiled for comparison;
- peak GPU memory per stage.
Ratios are what to read: engine / model-only at the same batch size and precision.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ramplus_core import Vocabulary, create_model, select_tags  # noqa: E402
from workers.stream.engine import TaggingEngine  # noqa: E402
from bench_model import timed  # noqa: E402 - the one timer of the benches (sync=True on CUDA)


def photos(n: int, size: tuple[int, int], png_share: float = 0.0) -> list[bytes]:
    """Encoded test images (scikit-image's photos, resized): JPEG, and PNG for `png_share` of them."""
    import skimage.data

    sources = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    png_every = round(1 / png_share) if png_share else 0
    out = []
    for i in range(n):
        image = Image.fromarray(sources[i % len(sources)]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        if png_every and i % png_every == png_every - 1:
            image.save(buf, "PNG", compress_level=1)
        else:
            image.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def old_select(logits: torch.Tensor, vocabulary: Vocabulary) -> int:
    """The per-image loop with a pydantic object per tag, as `select_tags` was before issue 16 (for comparison)."""
    from ramplus_core.tagging import TagScore

    scores = torch.sigmoid(logits.float()).cpu()
    n = 0
    for row in scores:
        hits = (row > vocabulary.thresholds).nonzero().flatten()
        order = hits[row[hits].argsort(descending=True, stable=True)]
        n += len([TagScore(tag=vocabulary.tags[i], score=float(row[i])) for i in order.tolist()])
    return n


def stream_rate(engine: TaggingEngine, data: list[bytes], batch: int, threads: int, repeat: int, cuda: bool) -> float:
    """Images/s through the engine as the stream pipeline drives it: decode threads, one staging thread
    (`engine.stage` of batch n+1) beside the model running batch n (`engine.run`)."""
    chunks = [data[i : i + batch] for i in range(0, len(data), batch)]
    with ThreadPoolExecutor(threads) as pool, ThreadPoolExecutor(1) as stager:
        def staged(chunk: list[bytes]):  # noqa: ANN202
            return engine.stage(list(pool.map(lambda d: engine.decode(d, "x"), chunk)))

        def all_chunks() -> None:
            pending = stager.submit(staged, chunks[0])
            for n in range(len(chunks)):
                ready = pending.result()
                if n + 1 < len(chunks):
                    pending = stager.submit(staged, chunks[n + 1])
                engine.run(ready)

        seconds = timed(all_chunks, max(1, repeat // 3), 1, cuda)
    return len(data) / seconds


def thresholds_for(logits: torch.Tensor, per_image: int) -> torch.Tensor:
    """One threshold for every tag that lets about `per_image` tags per image through on these logits."""
    scores = torch.sigmoid(logits.float()).flatten().cpu()
    keep = min(1.0, per_image / logits.shape[1])
    return torch.full((logits.shape[1],), float(torch.quantile(scores, 1 - keep)))


class Run:
    def __init__(self, out: Path | None) -> None:
        self.rows: list[dict] = []
        self.out = out
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("")

    def emit(self, **row: object) -> None:
        self.rows.append(row)
        line = json.dumps(row, default=str)
        print(line, flush=True)
        if self.out is not None:
            with self.out.open("a") as f:
                f.write(line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few iterations")
    parser.add_argument("--compile", action="store_true", help="also measure the compiled engine and torch.compile(model.tag_logits)")
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--decode-threads", type=int, default=0, help="0: the machine's cores")
    parser.add_argument("--record", action="store_true", help="append a markdown table to bench/RESULTS.md")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "bench_gpu_serving.jsonl")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config, tags, descriptions = ("tiny@64", 300, 4) if args.smoke else ("swin_l@384", 4585, 51)
    batches = [8, 16] if args.smoke else [int(b) for b in args.batches.split(",")]
    repeat, warmup = (2, 1) if args.smoke else (10, 3)
    precision = "bf16" if cuda else "fp32"
    vocab = Vocabulary.from_embeddings(
        [f"t{i}" for i in range(tags)], F.normalize(torch.randn(tags, descriptions, 512), dim=-1), name="bench", version="1",
    )
    run = Run(args.out)
    machine = torch.cuda.get_device_name() if cuda else f"{platform.machine()} {torch.get_num_threads()} threads, CPU"
    run.emit(what="setup", machine=machine, torch=torch.__version__, config=config, vocabulary=f"{tags}x{descriptions}",
             precision=precision, smoke=args.smoke, date=str(date.today()))

    engine = TaggingEngine(create_model(config, vocabulary=vocab, seed=0), device=str(device), precision=precision)
    model, size = engine.model, engine.image_size

    def peak() -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None

    model_rate: dict[int, float] = {}
    forward = model.tag_logits
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=device, dtype=engine.dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            seconds = timed(lambda: forward(x), repeat, warmup, cuda)
        model_rate[batch] = batch / seconds
        run.emit(what="model only", batch=batch, images_per_s=round(model_rate[batch], 1), peak_gib=peak())

    batch = batches[0] if args.smoke else min(128, max(batches))
    x = torch.randn(batch, 3, size, size, device=device, dtype=engine.dtype)
    with torch.inference_mode():
        logits = forward(x).float()
        model_seconds = timed(lambda: forward(x), repeat, warmup, cuda)
    for per_image in (10, 3000 if not args.smoke else 200):
        selected = Vocabulary.from_embeddings(vocab.tags, vocab.embeddings, thresholds=thresholds_for(logits, per_image).tolist())
        got = select_tags(logits, selected)
        seconds = timed(lambda: select_tags(logits, selected), repeat, warmup, cuda)
        old = timed(lambda: old_select(logits, selected), max(1, repeat // 3), 1, cuda)
        run.emit(what="tag selection", batch=batch, tags_per_image=round(sum(len(g.names) for g in got) / batch, 1),
                 seconds=round(seconds, 5), share_of_model_time=round(seconds / model_seconds, 4),
                 old_loop_seconds=round(old, 5), speedup_vs_old=round(old / seconds, 1))

    # The engine: resize + model + selection on decoded pixels, then from encoded bytes with decode threads.
    encoded = photos(batch, (1024, 768) if not args.smoke else (320, 240))
    pixels = [engine.decoder.decode_pixels(data, f"{i}") for i, data in enumerate(encoded)]  # decoded already: uint8 [3, h, w]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(lambda: engine.infer(pixels), repeat, warmup, cuda)
    run.emit(what="engine on decoded pixels", batch=batch, images_per_s=round(batch / seconds, 1),
             ratio_to_model_only=round(batch / seconds / (batch / model_seconds), 3), peak_gib=peak())

    threads = args.decode_threads or max(1, (torch.get_num_threads() if not cuda else 16) - 1)
    for decode, label, share in (("gpu", "JPEG", 0.0), ("gpu", "JPEG + 20% PNG", 0.2), ("cpu", "JPEG", 0.0)):
        engine.decoder.defer_jpegs = decode == "gpu"  # gpu: batched decode_jpeg on the model's device (nvJPEG on CUDA)
        data = photos(batch * 4, (1024, 768) if not args.smoke else (320, 240), png_share=share)
        rate = stream_rate(engine, data, batch, threads, repeat, cuda)
        run.emit(what=f"engine from {label} bytes, decode={decode}", batch=batch, decode_threads=threads, images_per_s=round(rate, 1),
                 ratio_to_model_only=round(rate / (batch / model_seconds), 3))
    engine.decoder.defer_jpegs = engine.decode_on_device

    if args.compile:
        # RAMPLUS_MODEL__COMPILE=true: the image encoder compiled for this batch size, the alignment decoder eager.
        compiled_engine = TaggingEngine(
            engine.model, device=str(device), precision=precision, compile_buckets=[batch], threshold=engine.threshold,
        )
        warm_up_s = compiled_engine.warm_up()
        seconds = timed(lambda: compiled_engine.infer(pixels), repeat, warmup, cuda)
        run.emit(what="engine on decoded pixels, compiled encoder", batch=batch, images_per_s=round(batch / seconds, 1),
                 warm_up_s=round(warm_up_s, 1), ratio_to_model_only=round(batch / seconds / (batch / model_seconds), 3))
        data = photos(batch * 4, (1024, 768) if not args.smoke else (320, 240))
        rate = stream_rate(compiled_engine, data, batch, threads, repeat, cuda)
        run.emit(what="engine from JPEG bytes, compiled encoder", batch=batch, decode_threads=threads, images_per_s=round(rate, 1))
        # For comparison: the whole of tag_logits compiled (encoder and alignment decoder; recompiles per vocabulary size).
        t0 = time.perf_counter()
        compiled = torch.compile(model.tag_logits)
        with torch.inference_mode():
            compiled(x)
            if cuda:
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            seconds = timed(lambda: compiled(x), repeat, warmup, cuda)
        run.emit(what="model only, tag_logits compiled", batch=batch, images_per_s=round(batch / seconds, 1), compile_s=round(compile_s, 1))

    if args.record:
        lines = ["", f"### bench_gpu_serving.py on {machine}, {date.today()} (`python bench/bench_gpu_serving.py"
                 + (" --compile" if args.compile else "") + "`)", "", "| what | batch | figures |", "|---|---|---|"]
        for row in run.rows[1:]:
            rest = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("what", "batch"))
            lines.append(f"| {row['what']} | {row.get('batch', '')} | {rest} |")
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
