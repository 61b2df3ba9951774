"""Everything a single process needs to tag PIL images: model + preprocessing + tag selection."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from ramplus_core.configs import get_config
from ramplus_core.model import RamPlus, VocabularyTensors
from ramplus_core.preprocess import FastPreprocessor, preprocess
from ramplus_core.tagging import ImageTags, select_tags
from ramplus_core.vocabulary import Vocabulary

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def place_model(model: RamPlus, device: str | torch.device, precision: str) -> tuple[RamPlus, torch.device, torch.dtype]:
    """`model` on `device` in `precision`, in eval mode, with the fused window attention where it is faster (CUDA):
    how every inference path (the Tagger, the fleet's engine, the backfill) prepares a model."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device, dtype = torch.device(device), PRECISIONS[precision]
    model = model.to(device=device, dtype=dtype).eval()
    if device.type == "cuda":
        model.image_encoder.set_fused_attention(True)
    return model, device, dtype


def create_model(name: str = "swin_l@384", *, vocabulary: Vocabulary | None = None, seed: int | None = None) -> RamPlus:
    """A randomly initialised RAM++ of a named config (for training from scratch, tests and benchmarks)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = RamPlus(get_config(name))
    if vocabulary is not None:
        model.set_vocabulary(vocabulary)
    return model.eval()


class Tagger:
    """Tags batches of images with one model; the vocabulary can change between calls.

    `fast=True` uses the batched `FastPreprocessor` (not bit-identical to the official transform);
    `precision="bf16"` casts the weights, which is how the GPU numbers in bench/RESULTS.md are measured.
    """

    def __init__(
        self,
        model: RamPlus,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        batch_size: int = 16,
        fast: bool = False,
        tag_chunk_size: int | None = None,
    ) -> None:
        self.model, self.device, self.dtype = place_model(model, device, precision)
        self.batch_size = batch_size
        self.tag_chunk_size = tag_chunk_size
        self.image_size = model.config.image_size
        self._fast = FastPreprocessor(self.image_size, self.device) if fast else None

    @property
    def vocabulary(self) -> Vocabulary | None:
        return self.model.vocabulary

    def set_vocabulary(self, vocabulary: Vocabulary | VocabularyTensors) -> None:
        self.model.set_vocabulary(vocabulary)

    def to_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self._fast is not None:
            x = self._fast(images)
        else:
            x = preprocess(images, self.image_size)
        return x.to(self.device, self.dtype, non_blocking=True)

    @torch.inference_mode()
    def logits(self, images: Sequence[Image.Image], vocabulary: Vocabulary | VocabularyTensors | None = None) -> torch.Tensor:
        parts = []
        for start in range(0, len(images), self.batch_size):
            x = self.to_tensor(images[start : start + self.batch_size])
            parts.append(self.model.tag_logits(x, vocabulary, tag_chunk_size=self.tag_chunk_size).float().cpu())
        return torch.cat(parts)

    def tag(
        self,
        images: Sequence[Image.Image],
        *,
        vocabulary: Vocabulary | None = None,
        threshold: float | None = None,
        top_k: int | None = None,
        all_scores: bool = False,
    ) -> list[ImageTags]:
        vocab = vocabulary or self.model.vocabulary
        if vocab is None:
            raise ValueError("no vocabulary: load a checkpoint that has one or pass vocabulary=")
        if not images:
            return []
        prepared = self.model.prepare_vocabulary(vocab) if vocabulary is not None else None
        return select_tags(self.logits(images, prepared), vocab, threshold=threshold, top_k=top_k, all_scores=all_scores)
