"""How many tags the head scores at once: its working set per (image, tag) and the memory it may take.

Tags never interact in the head, so scoring a vocabulary in chunks of tags changes no logit; it only bounds
the memory the head's intermediate tensors take, which otherwise grows with images x tags (54 GiB for
50,000 tags at batch 64 in bf16 on an H200). `tag_chunk_size="auto"` picks the largest chunk whose working
set fits a budget: on CUDA a fraction of the memory the allocator could still get (the device's free memory
plus what its cache holds unused), on the CPU a fraction of the memory available to this process, capped
(a bigger chunk does not make the CPU head faster). A vocabulary that fits is not chunked at all.

The per-(image, tag) figure is read off the tensors the head makes (`model.reweight_descriptions`,
`model.RamPlus.tag_queries`, `decoder.CrossAttention` and `decoder.DecoderLayer`), at the moment the most of
them are alive, in elements of the compute dtype:

- re-weighting: the similarities [D] (masked in place) and their softmax [D], then the softmax beside the
  mixture [K];
- projection: the mixture [K] and the contiguous copy `wordvec_proj` makes of its transposed layout [K],
  beside the projection [Dd] (its ReLU is in place);
- each decoder layer: the queries (held by the caller for the whole decoder) and the layer's input (held by
  the decoder's loop), beside attention's query, context, merged heads and output projection [6 Dd], plus
  attention scores and their softmax [2 heads N] where attention is not fused; the feed-forward's fc1 output
  and its GELU [2 F] beside the queries, the layer's input and the attention block's output [3 Dd];
- the chunk's logits [1], kept until all chunks are concatenated [1].

Per tag of a chunk (whatever the batch): its description embeddings cast to the compute dtype when the
vocabulary is kept narrower than the model (a 16-bit vocabulary beside an fp32 model, see
`RamPlus.prepare_vocabulary`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ramplus_core.configs import ModelConfig

GiB = 2**30
# CUDA: half of what the allocator could still get; the rest is headroom for the next batch's image encoder,
# the staging of the batch after it and fragmentation.
CUDA_FRACTION = 0.5
# CPU: a quarter of the memory available to the process, at most 2 GiB. Replicas share a host, and the CPU
# head is no faster per tag in bigger chunks: a swin-shaped head at batch 16 took 115 us per (image, tag)
# unchunked, 115 in chunks of 1,000 tags and 109 in chunks of 250 (2 cores).
CPU_FRACTION = 0.25
CPU_CAP_BYTES = 2 * GiB


@dataclass(frozen=True)
class HeadFootprint:
    """Bytes the head holds at its peak: `per_pair` for each (image, tag) of a chunk, `per_tag` for each tag."""

    per_pair: int
    per_tag: int

    def bytes_for(self, batch: int, tags: int) -> int:
        return tags * (batch * self.per_pair + self.per_tag)

    def tag_chunk(self, num_tags: int, batch: int, budget: int) -> int | None:
        """The chunk size under `budget` for `batch` images; None when all `num_tags` fit in one go.

        Chunks are balanced (20,000 tags that fit 15,000 at a time run as two of 10,000, not 15,000 + 5,000):
        the same number of passes, a lower peak. At least one tag per chunk, whatever the budget.
        """
        fit = max(1, budget // (batch * self.per_pair + self.per_tag))
        if fit >= num_tags:
            return None
        chunks = math.ceil(num_tags / fit)
        return math.ceil(num_tags / chunks)


def head_footprint(
    config: ModelConfig,
    *,
    descriptions: int,
    image_tokens: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    cast_to: torch.dtype | None = None,
) -> HeadFootprint:
    """The head's working set for a vocabulary of `descriptions` per tag (see the module's docstring).

    `compute_dtype` is the activations' (the image embeddings'); `cast_to` the dtype each chunk's embeddings
    are cast to when the vocabulary is held narrower, None when it is held as it is used.
    """
    s = compute_dtype.itemsize
    d, k, dd, f = descriptions, config.text_dim, config.decoder_dim, config.decoder_ffn_dim
    n = image_tokens if image_tokens is not None else config.num_image_tokens
    stages = (
        2 * d,  # similarities and their softmax
        d + k,  # softmax weights and the mixture
        2 * k + dd,  # the mixture, its contiguous copy and the projection
        6 * dd + 2 * config.decoder_heads * n,  # attention, with scores where it is not fused
        3 * dd + 2 * f,  # feed-forward
    )
    per_pair = (max(stages) + 2) * s  # + the chunk's logits and their concatenation
    return HeadFootprint(per_pair=per_pair, per_tag=d * k * cast_to.itemsize if cast_to is not None else 0)


def _cgroup_available() -> int | None:
    """Bytes the process's cgroup (a container's memory limit) still allows, None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        # v2 says "max" for no limit; v1 a number near 2**63
        if limit == "max" or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None


def available_host_memory() -> int:
    """Bytes this process could still allocate on the host: the kernel's MemAvailable, lowered to what the
    process's container limit still allows."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if available is None:  # not Linux: free physical pages
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limited = _cgroup_available()
    return min(available, limited) if limited is not None else available


def cuda_head_budget(device: torch.device, fraction: float = CUDA_FRACTION) -> int:
    """`fraction` of the memory the caching allocator could still give the head on `device`.

    That is the device's free memory plus what the allocator holds but does not use (the image encoder's
    activations of this batch, freed, stay reserved), within the per-process limit if one is set
    (`torch.cuda.set_per_process_memory_fraction`: a GPU shared between processes).
    """
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    limit = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
    obtainable = min(free, int(limit * total) - reserved)
    return int(fraction * max(0, obtainable + reserved - allocated))


def head_memory_budget(device: torch.device) -> int:
    """The memory the head may take on `device` when the caller gives no budget."""
    if device.type == "cuda":
        return cuda_head_budget(device)
    return int(min(CPU_FRACTION * available_host_memory(), CPU_CAP_BYTES))
