"""The model side of a replica: bytes -> pixels on worker threads, pixels -> tags on the inference thread.

Decoding is split from the forward pass so that many fetch threads keep one model busy. With
`fast=True` the threads only decode (JPEGs in the DCT domain) and the resize runs batched on the
model's device; with `fast=False` they run the exact official transform.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ramplus_core.errors import ImageError
from ramplus_core.model import RamPlus
from ramplus_core.preprocess import FastPreprocessor, load_image, pil_to_tensor
from ramplus_core.tagger import PRECISIONS
from ramplus_core.tagging import ImageTags, select_tags
from ramplus_core.vocabulary import Vocabulary
from workers.errors import input_error_from


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TaggingEngine:
    def __init__(
        self,
        model: RamPlus,
        *,
        device: str = "auto",
        precision: str = "fp32",
        fast: bool = True,
        max_bytes: int = 20 * 1024 * 1024,
        max_pixels: int = 40_000_000,
        threshold: float | None = None,
        top_k: int | None = None,
    ) -> None:
        if model.vocabulary is None:
            raise ValueError("the model has no vocabulary: load a checkpoint that has one or give a vocabulary file")
        self.device = resolve_device(device)
        self.dtype = PRECISIONS[precision]
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if self.device.type == "cuda":
            self.model.image_encoder.set_fused_attention(True)
        self.image_size = model.config.image_size
        self.model_id = model.config.key
        self.fast = FastPreprocessor(self.image_size, self.device) if fast else None
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.threshold, self.top_k = threshold, top_k
        self._vocab_lock = threading.Lock()

    @property
    def vocabulary(self) -> Vocabulary:
        vocab = self.model.vocabulary
        assert vocab is not None
        return vocab

    def set_vocabulary(self, vocabulary: Vocabulary) -> None:
        """Takes effect from the next batch: a batch in progress finishes with the vocabulary it started with."""
        prepared = self.model.prepare_vocabulary(vocabulary)  # validate + move before taking the lock
        with self._vocab_lock:
            self.model.set_vocabulary(prepared)

    def decode(self, data: bytes, name: str) -> torch.Tensor:
        """Thread-safe: uint8 [3, h, w] (fast path) or the official float [3, S, S]. Raises InputError."""
        try:
            image = load_image(data, max_bytes=self.max_bytes, max_pixels=self.max_pixels, name=name)
            return self.fast.decode(image) if self.fast is not None else pil_to_tensor(image, self.image_size)
        except ImageError as exc:
            raise input_error_from(exc) from exc
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's last-resort errors while converting
            raise input_error_from(ImageError(f"{name}: cannot decode ({exc})")) from exc

    @torch.inference_mode()
    def infer(self, pixels: Sequence[torch.Tensor]) -> list[ImageTags]:
        if self.fast is not None:
            x = self.fast.resize(pixels)
        else:
            x = torch.stack(list(pixels)).to(self.device, non_blocking=True)
        with self._vocab_lock:
            vocab = self.model.vocabulary_tensors
        assert vocab is not None
        logits = self.model.tag_logits(x.to(self.dtype), vocab).float().cpu()
        return select_tags(logits, vocab.vocabulary, threshold=self.threshold, top_k=self.top_k)
