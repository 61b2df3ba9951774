"""The model side of a replica: bytes -> pixels on worker threads, pixels -> tags on the inference thread.

Decoding is split from the forward pass so that many fetch threads keep one model busy. With
`fast=True` the threads only decode (JPEGs in the DCT domain) and the resize runs batched on the
model's device; with `fast=False` they run the exact official transform.

A request may name a vocabulary other than the active one (`vocabulary_for`); a batch that mixes
vocabularies runs the image encoder once and the alignment decoder once per vocabulary.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ramplus_core.errors import ImageError
from ramplus_core.model import RamPlus, VocabularyTensors
from ramplus_core.preprocess import FastPreprocessor, load_image, pil_to_tensor
from ramplus_core.tagger import place_model
from ramplus_core.tagging import ImageTags, select_tags
from ramplus_core.vocabulary import Vocabulary
from workers.errors import ErrorKind, InputError, input_error_from
from workers.schemas import VocabRef
from workers.metrics import ReplicaMetrics
from workers.vocab.cache import VocabularyCache


class VocabularySource(Protocol):
    """Where vocabularies named by requests come from (`workers.vocab.store.VocabStore` in a fleet)."""

    def load(self, name: str, version: str) -> Vocabulary: ...
    def active_version(self, name: str) -> str | None: ...


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ImageDecoder:
    """Bytes -> model-ready pixels without the model: what fetch threads and backfill decode tasks run.

    With `fast=True`, uint8 [3, h, w] (JPEGs decoded in the DCT domain near the model's size; the final
    resize happens batched in `TaggingEngine.infer`); with `fast=False`, the official float [3, S, S].
    """

    def __init__(self, image_size: int, *, fast: bool = True, max_bytes: int = 20 * 1024 * 1024, max_pixels: int = 40_000_000) -> None:
        self.image_size = image_size
        self.fast = FastPreprocessor(image_size, "cpu") if fast else None
        self.max_bytes, self.max_pixels = max_bytes, max_pixels

    def decode(self, data: bytes, name: str) -> torch.Tensor:
        """Thread-safe. Raises InputError (too_large, not_image, decode)."""
        try:
            image = load_image(data, max_bytes=self.max_bytes, max_pixels=self.max_pixels, name=name)
            return self.fast.decode(image) if self.fast is not None else pil_to_tensor(image, self.image_size)
        except ImageError as exc:
            raise input_error_from(exc) from exc
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's last-resort errors while converting
            raise input_error_from(ImageError(f"{name}: cannot decode ({exc})")) from exc


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
        vocab_store: VocabularySource | None = None,
        vocab_cache_size: int = 4,
        vocab_resolve_ttl_s: float = 1.0,
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        if model.vocabulary is None:
            raise ValueError("the model has no vocabulary: load a checkpoint that has one or give a vocabulary file")
        self.model, self.device, self.dtype = place_model(model, resolve_device(device), precision)
        self.image_size = model.config.image_size
        self.model_id = model.config.key
        self.fast = FastPreprocessor(self.image_size, self.device) if fast else None
        self.decoder = ImageDecoder(self.image_size, fast=fast, max_bytes=max_bytes, max_pixels=max_pixels)
        self.threshold, self.top_k = threshold, top_k
        self._vocab_lock = threading.Lock()
        # Without a store it still keeps the versions it switched away from (for requests pinned to them).
        self.cache = VocabularyCache(
            self.prepare_vocabulary, capacity=vocab_cache_size, resolve_ttl_s=vocab_resolve_ttl_s, metrics=metrics,
            load=vocab_store.load if vocab_store is not None else None,
            active_version=vocab_store.active_version if vocab_store is not None else None,
        )

    @property
    def vocabulary(self) -> Vocabulary:
        vocab = self.model.vocabulary
        assert vocab is not None
        return vocab

    def prepare_vocabulary(self, vocabulary: Vocabulary | VocabularyTensors) -> VocabularyTensors:
        return self.model.prepare_vocabulary(vocabulary)

    def set_vocabulary(self, vocabulary: Vocabulary | VocabularyTensors) -> None:
        """Takes effect from the next batch: a batch in progress finishes with the vocabulary it started with."""
        prepared = self.model.prepare_vocabulary(vocabulary)  # validate + move before taking the lock
        with self._vocab_lock:
            previous = self.model.vocabulary_tensors
            self.model.set_vocabulary(prepared)
        if previous is not None and previous.vocabulary.ref != prepared.vocabulary.ref:
            self.cache.discard(prepared.vocabulary.ref)  # active now: its slot is free for another
            self.cache.put(previous)

    def vocabulary_for(self, ref: str) -> VocabularyTensors | None:
        """What a request naming `ref` ('name' or 'name@version') is tagged with; None: the active one at batch time.

        Raises InputError (VALIDATION for a vocabulary that cannot be served, FETCH while the store is away).
        """
        try:
            name, version = VocabRef.parse(ref)
        except ValueError as exc:
            raise InputError(ErrorKind.VALIDATION, str(exc)) from None
        with self._vocab_lock:
            active = self.model.vocabulary_tensors
        assert active is not None
        if name == active.vocabulary.name and (not version or version == active.vocabulary.metadata.version):
            # Following the name: whatever is active when its batch runs. Pinned: exactly this version.
            return None if not version else active
        return self.cache.get(name, version or None)

    def decode(self, data: bytes, name: str) -> torch.Tensor:
        """Thread-safe: uint8 [3, h, w] (fast path) or the official float [3, S, S]. Raises InputError."""
        return self.decoder.decode(data, name)

    @torch.inference_mode()
    def infer(self, pixels: Sequence[torch.Tensor], vocabularies: Sequence[VocabularyTensors | None] | None = None) -> list[ImageTags]:
        """Tags for each image, with its vocabulary from `vocabulary_for` (None or no list: the active one)."""
        if self.fast is not None:
            x = self.fast.resize(pixels)
        else:
            x = torch.stack(list(pixels)).to(self.device, non_blocking=True)
        with self._vocab_lock:
            active = self.model.vocabulary_tensors
        assert active is not None
        chosen = [v or active for v in vocabularies] if vocabularies is not None else [active] * len(pixels)
        groups: dict[int, list[int]] = {}
        for i, vocab in enumerate(chosen):
            groups.setdefault(id(vocab), []).append(i)
        if len(groups) == 1:
            logits = self.model.tag_logits(x.to(self.dtype), chosen[0])  # selected where they are: only hits come back
            return select_tags(logits, chosen[0].vocabulary, threshold=self.threshold, top_k=self.top_k)
        embeds = self.model.encode_image(x.to(self.dtype))
        out: list[Any] = [None] * len(chosen)
        for rows in groups.values():
            vocab = chosen[rows[0]]
            logits = self.model.head_logits(embeds[rows], vocab)
            for i, tags in zip(rows, select_tags(logits, vocab.vocabulary, threshold=self.threshold, top_k=self.top_k)):
                out[i] = tags
        return out
