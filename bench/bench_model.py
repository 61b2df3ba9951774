"""RAM++ model benchmarks. Speed figures are ratios against a baseline measured in the same run; absolute
images/s only mean something on a GPU (or as a rough guide on the 2-core CPU machines).

    python bench/bench_model.py                # CPU: tiny model, re-weighting, preprocessing
    python bench/bench_model.py --gpu          # + swin_l@384, 4,585 x 51 vocabulary, batch 64, bf16 (needs CUDA)

Results print as a markdown table and go to bench/out/bench_model.json.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import ramplus_core
from ramplus_core import FastPreprocessor, Vocabulary, preprocess


def timed(fn: Callable[[], object], repeat: int, warmup: int = 1, sync: bool = False) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_vocabulary(tags: int, descriptions: int, dtype: str = "float32") -> Vocabulary:
    emb = F.normalize(torch.randn(tags, descriptions, 512), dim=-1)
    return Vocabulary.from_embeddings([f"t{i}" for i in range(tags)], emb, dtype=dtype, name="bench")


def official_reweight_loop(pooled: torch.Tensor, scale: torch.Tensor, label_embed: torch.Tensor, tags: int) -> torch.Tensor:
    """The official per-image loop (ram_plus.py), for comparison."""
    d = label_embed.shape[0] // tags
    cls = pooled / pooled.norm(dim=-1, keepdim=True)
    w = ((scale.exp() * cls) @ label_embed.T).view(pooled.shape[0], tags, d).softmax(dim=2)
    out = torch.empty(pooled.shape[0], tags, label_embed.shape[1])
    for i in range(pooled.shape[0]):
        out[i] = (w[i].unsqueeze(-1) * label_embed.view(tags, d, -1)).sum(dim=1)
    return out


def sample_jpegs(n: int, size: tuple[int, int] = (1024, 768)) -> list[bytes]:
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(photos[i % len(photos)]).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_cpu(results: list[dict]) -> None:
    torch.manual_seed(0)
    # 1. tiny model, end to end from PIL images, 1,000 tags x 51 descriptions
    model = ramplus_core.create_model("tiny@64", vocabulary=random_vocabulary(1000, 51), seed=0)
    images = [Image.open(io.BytesIO(b)) for b in sample_jpegs(32, (320, 240))]
    for im in images:
        im.load()
    batch = 16

    def tiny_loop() -> None:
        with torch.inference_mode():
            for s in range(0, len(images), batch):
                model.tag_logits(preprocess(images[s : s + batch], 64))

    t = timed(tiny_loop, repeat=3)
    results.append({"bench": "tiny@64 preprocess+tag_logits, 1000x51 vocab, batch 16 (CPU)", "images_per_s": len(images) / t})

    # 2. batched re-weighting vs the official per-image loop, official-size vocabulary
    tags, d, b = 4585, 51, 4
    vocab = random_vocabulary(tags, d)
    pooled = torch.randn(b, 512)
    scale = torch.tensor(2.6593)
    flat = vocab.embeddings.reshape(-1, 512)
    with torch.inference_mode():
        t_loop = timed(lambda: official_reweight_loop(pooled, scale, flat, tags), repeat=3)
        t_ours = timed(lambda: ramplus_core.reweight_descriptions(pooled, scale, vocab.embeddings), repeat=3)
        diff = (official_reweight_loop(pooled, scale, flat, tags) - ramplus_core.reweight_descriptions(pooled, scale, vocab.embeddings)).abs().max().item()
    results.append({
        "bench": f"re-weighting 4585x51, batch {b}: batched / official loop (CPU)",
        "speedup": t_loop / t_ours, "official_ms": t_loop * 1e3, "batched_ms": t_ours * 1e3, "max_abs_diff": diff,
        "official_temporary_mb_per_image": tags * d * 512 * 4 / 2**20,
    })

    # 3. preprocessing of 1024x768 JPEGs: official (PIL bilinear) vs fast (draft + batched torch resize)
    jpegs = sample_jpegs(32)
    fast = FastPreprocessor(384)
    t_official = timed(lambda: preprocess([Image.open(io.BytesIO(j)) for j in jpegs], 384), repeat=3)
    t_fast = timed(lambda: fast([Image.open(io.BytesIO(j)) for j in jpegs]), repeat=3)
    ref = preprocess([Image.open(io.BytesIO(j)) for j in jpegs], 384)
    got = fast([Image.open(io.BytesIO(j)) for j in jpegs])
    nodraft = FastPreprocessor(384, use_draft=False)([Image.open(io.BytesIO(j)) for j in jpegs])
    results.append({
        "bench": "preprocess 1024x768 JPEG -> 384: fast / official (CPU, one process)",
        "speedup": t_official / t_fast, "official_images_per_s": len(jpegs) / t_official, "fast_images_per_s": len(jpegs) / t_fast,
        "mean_abs_diff_normalised": (got - ref).abs().mean().item(), "max_abs_diff_normalised": (got - ref).abs().max().item(),
        "mean_abs_diff_without_draft": (nodraft - ref).abs().mean().item(),
    })


def bench_gpu(results: list[dict], batch: int, compile_model: bool) -> None:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    vocab = random_vocabulary(4585, 51)
    model = ramplus_core.create_model("swin_l@384", seed=0).to(device)
    x = torch.randn(batch, 3, 384, 384, device=device)

    # baseline: the naive path (fp32 weights, bf16 autocast, unfused window attention)
    model.set_vocabulary(vocab)
    model.image_encoder.set_fused_attention(False)

    def naive() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.tag_logits(x)

    torch.cuda.reset_peak_memory_stats()
    t_naive = timed(naive, repeat=10, warmup=3, sync=True)
    mem_naive = torch.cuda.max_memory_allocated() / 2**30

    # ours: bf16 weights, fused window attention, optionally compiled
    model = model.to(torch.bfloat16)
    model.image_encoder.set_fused_attention(True)
    xb = x.to(torch.bfloat16)
    forward = torch.compile(model.tag_logits, mode="max-autotune-no-cudagraphs") if compile_model else model.tag_logits

    def fast() -> None:
        with torch.inference_mode():
            forward(xb)

    torch.cuda.reset_peak_memory_stats()
    t_fast = timed(fast, repeat=10, warmup=3, sync=True)
    mem_fast = torch.cuda.max_memory_allocated() / 2**30
    results.append({
        "bench": f"swin_l@384, 4585x51 vocab, batch {batch}, GPU {torch.cuda.get_device_name()}",
        "naive_autocast_images_per_s": batch / t_naive, "naive_peak_gib": mem_naive,
        "bf16_fused_images_per_s": batch / t_fast, "bf16_peak_gib": mem_fast, "compiled": compile_model,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="also run the swin_l@384 GPU benchmark")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="torch.compile the GPU model")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "bench_model.json")
    args = parser.parse_args()
    results: list[dict] = []
    bench_cpu(results)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device here")
        bench_gpu(results, args.batch, args.compile)
    meta = {"machine": platform.node(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(json.dumps(meta))
    for r in results:
        print("| " + r["bench"] + " | " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k != "bench") + " |")


if __name__ == "__main__":
    main()
