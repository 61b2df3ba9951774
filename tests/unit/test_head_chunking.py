"""Large vocabularies (issue 19): the head scores tags in chunks chosen from a memory budget, with the same
logits as in one go; a 16-bit vocabulary is held as it is; the compiled head scores as the eager one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo

from helpers import random_images
from ramplus_core import Vocabulary, create_model, preprocess
from ramplus_core import head_memory
from ramplus_core.head_memory import GiB, cuda_head_budget, head_footprint, head_memory_budget

ROOT = Path(__file__).resolve().parents[2]


def ragged_vocabulary(num_tags: int, descriptions: int = 5, seed: int = 0, dtype: str = "float32") -> Vocabulary:
    """Random unit embeddings, tag i with 1 + i % descriptions real rows: padding and its mask are present."""
    with torch.inference_mode(False):  # a vocabulary validates its tensors' version counters
        g = torch.Generator().manual_seed(seed)
        emb = torch.nn.functional.normalize(torch.randn(num_tags, descriptions, 512, generator=g), dim=-1)
        counts = [1 + i % descriptions for i in range(num_tags)]
        return Vocabulary.from_embeddings([f"t{i}" for i in range(num_tags)], emb, counts=counts, dtype=dtype)


@pytest.fixture(scope="module")
def model():
    return create_model("tiny@64", seed=0)


@pytest.fixture(scope="module")
def embeds(model):
    with torch.inference_mode():
        return model.encode_image(preprocess(random_images(3, seed=2), image_size=64))


def per_tag_bytes(model, vocab: Vocabulary, embeds: torch.Tensor) -> int:
    footprint = head_footprint(model.config, descriptions=vocab.embeddings.shape[1], image_tokens=embeds.shape[1])
    return embeds.shape[0] * footprint.per_pair + footprint.per_tag


@torch.inference_mode()
def test_automatic_chunks_give_the_logits_of_one_go(model, embeds):
    vocab = model.prepare_vocabulary(ragged_vocabulary(3001))
    assert vocab.mask is not None
    whole = model.head_logits(embeds, vocab)
    budget = 700 * per_tag_bytes(model, vocab.vocabulary, embeds)
    chunk = model.tag_chunk(embeds, vocab, head_memory_bytes=budget)
    assert chunk is not None and chunk <= 700 and 3001 % chunk  # several chunks, the last one shorter
    auto = model.head_logits(embeds, vocab, tag_chunk_size="auto", head_memory_bytes=budget)
    fixed = model.head_logits(embeds, vocab, tag_chunk_size=1000)
    assert whole.shape == (3, 3001) and whole.std() > 1e-3
    torch.testing.assert_close(auto, whole)  # fp32 tolerances
    torch.testing.assert_close(fixed, whole)


@torch.inference_mode()
def test_the_chunk_follows_the_budget_and_the_batch(model, embeds):
    vocab = model.prepare_vocabulary(ragged_vocabulary(2000))
    one_tag = per_tag_bytes(model, vocab.vocabulary, embeds)
    chunks = [model.tag_chunk(embeds, vocab, head_memory_bytes=n * one_tag) for n in (100, 400, 1600)]
    assert chunks[0] < chunks[1] < chunks[2] < 2000
    assert [c <= n for c, n in zip(chunks, (100, 400, 1600))] == [True] * 3  # the working set stays within the budget
    budget = 400 * one_tag
    twice = torch.cat([embeds, embeds])
    assert model.tag_chunk(twice, vocab, head_memory_bytes=budget) < model.tag_chunk(embeds, vocab, head_memory_bytes=budget)
    assert model.tag_chunk(embeds, vocab, head_memory_bytes=2000 * one_tag) is None  # it all fits: no chunking
    assert model.tag_chunk(embeds, vocab, head_memory_bytes=0) == 1  # at least a tag at a time
    assert model.tag_chunk(embeds, vocab, tag_chunk_size=None) is None
    assert model.tag_chunk(embeds, vocab, tag_chunk_size=500) == 500
    assert model.tag_chunk(embeds, vocab, tag_chunk_size=5000) is None


@pytest.mark.parametrize("bad", [0, -3, "big", True, 2.5])
def test_a_chunk_size_that_is_not_none_auto_or_a_positive_count_is_refused(model, embeds, bad):
    vocab = model.prepare_vocabulary(ragged_vocabulary(10))
    with pytest.raises(ValueError, match="tag_chunk_size"):
        model.head_logits(embeds, vocab, tag_chunk_size=bad)


def test_the_default_budget_on_the_cpu_is_a_quarter_of_the_available_memory_at_most_2_gib(monkeypatch):
    monkeypatch.setattr(head_memory, "available_host_memory", lambda: 4 * GiB)
    assert head_memory_budget(torch.device("cpu")) == GiB
    monkeypatch.setattr(head_memory, "available_host_memory", lambda: 100 * GiB)
    assert head_memory_budget(torch.device("cpu")) == 2 * GiB
    assert 0 < head_memory.available_host_memory()  # the real one reads this machine


def test_the_cuda_budget_counts_free_memory_and_the_allocators_unused_cache_within_the_process_limit(monkeypatch):
    fake = {"free": 10 * GiB, "total": 24 * GiB, "reserved": 6 * GiB, "allocated": 2 * GiB, "fraction": 1.0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (fake["free"], fake["total"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: fake["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: fake["allocated"])
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: fake["fraction"], raising=False)
    cuda = torch.device("cuda", 0)
    assert cuda_head_budget(cuda) == (10 + 4) * GiB // 2  # free + reserved but unused, half of it
    fake["fraction"] = 0.5  # this process may hold 12 GiB and holds 6: 6 more, not the 10 free
    assert cuda_head_budget(cuda) == (6 + 4) * GiB // 2
    assert head_memory_budget(cuda) == cuda_head_budget(cuda)


@torch.inference_mode()
def test_a_16_bit_vocabulary_is_held_as_it_is_and_scores_as_its_fp32_copy(model, embeds):
    half = ragged_vocabulary(1500, dtype="float16")
    with torch.inference_mode(False):
        widened = Vocabulary.from_embeddings(half.tags, half.embeddings.float(), counts=half.counts)
    held = model.prepare_vocabulary(half)
    assert held.embeddings.dtype == torch.float16 and held.embeddings.data_ptr() == half.embeddings.data_ptr()
    assert model.prepare_vocabulary(held) is held and model.is_prepared(held)
    # fp16 -> fp32 is exact, so casting chunk by chunk scores exactly as the widened copy does
    assert torch.equal(model.head_logits(embeds, held), model.head_logits(embeds, widened))
    budget = 400 * per_tag_bytes(model, half, embeds)
    torch.testing.assert_close(
        model.head_logits(embeds, held, tag_chunk_size="auto", head_memory_bytes=budget), model.head_logits(embeds, widened)
    )
    # the cast chunk is part of the working set: it lowers the chunk a budget allows
    assert model.tag_chunk(embeds, held, head_memory_bytes=budget) < model.tag_chunk(embeds, widened, head_memory_bytes=budget)


def test_a_16_bit_model_takes_the_vocabulary_in_its_own_dtype():
    bf16 = create_model("tiny@64", seed=0).to(torch.bfloat16)
    held = bf16.prepare_vocabulary(ragged_vocabulary(20, dtype="float16"))
    assert held.embeddings.dtype == torch.bfloat16  # same size: cast once, not per batch
    model = create_model("tiny@64", vocabulary=ragged_vocabulary(20, dtype="float16"), seed=0)
    assert model.vocabulary_tensors.embeddings.dtype == torch.float16
    model.to(torch.float64)
    assert model.vocabulary_tensors.embeddings.dtype == torch.float16 and model.is_prepared(model.vocabulary_tensors)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly (fast on 2 cores)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs += 1
        return gm.forward


@torch.inference_mode()
def test_the_compiled_head_scores_as_the_eager_one_and_another_vocabulary_size_does_not_recompile(embeds):
    torch._dynamo.reset()
    model = create_model("tiny@64", seed=0)
    vocab = model.prepare_vocabulary(ragged_vocabulary(900))
    eager = model.head_logits(embeds, vocab)
    backend = CountingBackend()
    model.compile_head(backend=backend)
    torch.testing.assert_close(model.head_logits(embeds, vocab), eager)
    graphs = backend.graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        other = model.prepare_vocabulary(ragged_vocabulary(1234, seed=1))
        model.head_logits(embeds, other)
        model.head_logits(embeds, vocab, tag_chunk_size=250)
        model.head_logits(embeds[:2], vocab)
    assert backend.graphs == graphs
    torch._dynamo.reset()


@pytest.mark.slow
@torch.inference_mode()
def test_the_inductor_compiled_head_gives_the_eager_logits(embeds):
    torch._dynamo.reset()
    model = create_model("tiny@64", seed=0)
    vocab = model.prepare_vocabulary(ragged_vocabulary(700))
    eager = model.head_logits(embeds, vocab)
    model.compile_head()
    torch.testing.assert_close(model.head_logits(embeds, vocab), eager, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# Runs in a fresh process so that its peak resident memory is the head's. glibc is told to map every block of
# 64 KiB or more on its own (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once and
# the high-water mark is what was alive at the same time.
PEAK_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from ramplus_core import Vocabulary, create_model
from ramplus_core.head_memory import head_footprint

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) * 1024

torch.set_num_threads(2)
tags, batch, chunking, budget = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
model = create_model("tiny@64", seed=0)
g = torch.Generator().manual_seed(0)
emb = torch.nn.functional.normalize(torch.randn(tags, 3, 512, generator=g), dim=-1)
vocab = model.prepare_vocabulary(Vocabulary.from_embeddings([f"t{i}" for i in range(tags)], emb, counts=[1 + i % 3 for i in range(tags)]))
del emb
embeds = torch.randn(batch, model.config.num_image_tokens, 512, generator=g)
with torch.inference_mode():
    model.head_logits(embeds[:1], vocab.tags(0, 10))  # kernels and thread pools set up before measuring
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark to the current resident set
    before = status("VmRSS:")
    logits = model.head_logits(embeds, vocab, tag_chunk_size=None if chunking == "none" else "auto", head_memory_bytes=budget)
    peak = status("VmHWM:")
fp = head_footprint(model.config, descriptions=3, image_tokens=embeds.shape[1])
print(json.dumps({"peak": peak - before, "estimate": fp.bytes_for(batch, tags), "checksum": float(logits.double().sum())}))
"""


def head_peak(tags: int, batch: int, chunking: str, budget: int) -> dict:
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tags), str(batch), chunking, str(budget)],
                          capture_output=True, text=True, env=env, timeout=120)
    if "clear_refs" in done.stderr and "Error" in done.stderr:
        pytest.skip("this kernel does not let a process reset its memory high-water mark (/proc/self/clear_refs)")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set from /proc")
def test_automatic_chunking_bounds_the_heads_measured_peak_memory():
    budget = 64 * 2**20
    whole = head_peak(20_000, 8, "none", budget)
    chunked = head_peak(20_000, 8, "auto", budget)
    assert chunked["checksum"] == pytest.approx(whole["checksum"], rel=1e-6)
    # the estimate is the head's real working set: unchunked, the peak is the estimate (to allocator slack)
    assert 0.9 * whole["estimate"] < whole["peak"] < 1.1 * whole["estimate"] + 16 * 2**20
    assert whole["peak"] > 500 * 2**20
    assert chunked["peak"] < budget + 16 * 2**20  # within the budget, up to a few MiB of allocator slack
    assert chunked["peak"] < whole["peak"] / 6
