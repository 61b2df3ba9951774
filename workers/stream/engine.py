"""The model side of a replica: bytes -> pixels on worker threads, pixels -> tags on the inference thread.

Decoding is split from the forward pass so that many fetch threads keep one model busy. With
`fast=True` the threads only decode and the resize runs batched on the model's device; with
`fast=False` they run the exact official transform.

Where JPEGs are decoded (`decode`: auto | cpu | gpu, `RAMPLUS_MODEL__DECODE`): on `cpu`, by PIL in the
fetch threads; on `gpu` the fetch threads only check the header (format, size, the byte and pixel limits,
so a decompression bomb is refused before any decode) and the inference thread decodes the batch's JPEGs
together with torchvision's `decode_jpeg` on the model's device (nvJPEG on CUDA; libjpeg-turbo on a CPU
device, which keeps the path testable here). What that decoder does not take (PNG, WebP, GIF, BMP, TIFF,
CMYK JPEGs) is decoded by PIL in the fetch threads as before, and a JPEG it refuses is retried by PIL;
one bad image never fails its batch: `infer` returns its `InputError` in its place. `auto`: `gpu` when
the model runs on CUDA.

A request may name a vocabulary other than the active one (`vocabulary_for`); a batch that mixes
vocabularies runs the image encoder once and the alignment decoder once per vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ramplus_core.errors import ImageError
from ramplus_core.model import RamPlus, TagChunkSize, VocabularyTensors
from ramplus_core.preprocess import EncodedImage, FastPreprocessor, decodable_on_device, decode_jpegs, inspect_image, open_image, pil_to_tensor
from ramplus_core.tagger import place_model
from ramplus_core.tagging import ImageTags, select_tags
from ramplus_core.vocabulary import Vocabulary
from workers.errors import ErrorKind, InputError, input_error_from
from workers.schemas import VocabRef
from workers.metrics import ReplicaMetrics
from workers.vocab.cache import VocabularyCache
from workers.vocab.canary import Canary, CanaryBatch


class VocabularySource(Protocol):
    """Where vocabularies named by requests come from (`workers.vocab.store.VocabStore` in a fleet)."""

    def load(self, name: str, version: str) -> Vocabulary: ...
    def active_version(self, name: str) -> str | None: ...


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclasses.dataclass
class StagedBatch:
    """A batch ready for the model (`TaggingEngine.stage`): pixels on the device for the images at `good`,
    the `InputError` of each one that could not be decoded, and the event that marks the upload done (CUDA)."""

    size: int
    good: list[int]
    pixels: torch.Tensor | None
    errors: dict[int, InputError]
    ready: Any = None


class ImageDecoder:
    """Bytes -> model-ready pixels without the model: what fetch threads, `ramplus tag`'s threads and the
    backfill's decode tasks run.

    With `fast=True`, uint8 [3, h, w] (the final resize happens batched in `TaggingEngine.infer`); with
    `fast=False`, the official float [3, S, S]. With `defer_jpegs=True` (needs `fast`), a JPEG the batched
    decoder takes is only checked (header, byte and pixel limits) and returned as an `EncodedImage`, left
    for `TaggingEngine.infer` to decode with its batch on the model's device.
    """

    def __init__(
        self, image_size: int, *, fast: bool = True, max_bytes: int = 20 * 1024 * 1024, max_pixels: int = 40_000_000,
        defer_jpegs: bool = False,
    ) -> None:
        if defer_jpegs and not fast:
            raise ValueError("JPEGs can be left to the batched decoder only on the fast path (it feeds the batched resize)")
        self.image_size = image_size
        self.fast = FastPreprocessor(image_size, "cpu") if fast else None
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.defer_jpegs = defer_jpegs

    def decode(self, data: bytes, name: str) -> torch.Tensor | EncodedImage:
        """Thread-safe. Raises InputError (too_large, not_image, decode)."""
        if self.defer_jpegs:
            try:
                checked = inspect_image(data, max_bytes=self.max_bytes, max_pixels=self.max_pixels, name=name)
            except ImageError as exc:
                raise input_error_from(exc) from exc
            if decodable_on_device(checked):
                return checked
        return self.decode_pixels(data, name)

    def decode_pixels(self, data: bytes, name: str) -> torch.Tensor:
        """Decoded here, whatever the format. Thread-safe. Raises InputError."""
        try:
            checked = inspect_image(data, max_bytes=self.max_bytes, max_pixels=self.max_pixels, name=name)
            if self.fast is None:
                return pil_to_tensor(open_image(checked), self.image_size)
            # Reduced in the DCT domain while decoding: draft() on an image already loaded would do nothing.
            return self.fast.decode(open_image(checked, jpeg_draft=self.image_size if self.fast.use_draft else None))
        except ImageError as exc:
            raise input_error_from(exc) from exc
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's last-resort errors while converting
            raise input_error_from(ImageError(f"{name}: cannot decode ({exc})")) from exc


def defers_jpegs(decode: str, *, fast: bool, on_cuda: bool) -> bool:
    """Whether JPEGs wait for the batched decoder (`RAMPLUS_MODEL__DECODE`): it feeds the batched resize, so
    only on the fast path; `auto` means on CUDA."""
    if decode not in ("auto", "cpu", "gpu"):
        raise ValueError(f"decode must be auto, cpu or gpu, not {decode!r}")
    return fast and (decode == "gpu" or (decode == "auto" and on_cuda))


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
        decode: str = "auto",
        all_scores: bool = False,
        compile_buckets: Sequence[int] | None = None,
        compile_backend: Any = "inductor",
        tag_chunk_size: TagChunkSize = "auto",
        head_memory_bytes: int | None = None,
    ) -> None:
        if model.vocabulary is None:
            raise ValueError("the model has no vocabulary: load a checkpoint that has one or give a vocabulary file")
        self.model, self.device, self.dtype = place_model(model, resolve_device(device), precision)
        self.image_size = model.config.image_size
        self.model_id = model.config.key
        self.fast = FastPreprocessor(self.image_size, self.device) if fast else None
        self.decode_on_device = defers_jpegs(decode, fast=fast, on_cuda=self.device.type == "cuda")
        self.decoder = ImageDecoder(
            self.image_size, fast=fast, max_bytes=max_bytes, max_pixels=max_pixels, defer_jpegs=self.decode_on_device,
        )
        self.threshold, self.top_k, self.all_scores = threshold, top_k, all_scores
        # How the head chunks a vocabulary's tags (RamPlus.head_logits): "auto" keeps its memory within a
        # budget whatever the vocabulary's size, and gives the same logits as one pass.
        self.tag_chunk_size, self.head_memory_bytes = tag_chunk_size, head_memory_bytes
        self.buckets = sorted(set(compile_buckets)) if compile_buckets else []
        if any(b < 1 for b in self.buckets):
            raise ValueError(f"compile buckets must be batch sizes >= 1, got {list(compile_buckets or ())}")
        self._encode = self._compiled_encoder(compile_backend) if self.buckets else self.model.encode_image
        self._side_stream: Any = None
        self._vocab_lock = threading.Lock()
        self._canary: Canary | None = None
        # Without a store it still keeps the versions it switched away from (for requests pinned to them).
        self.cache = VocabularyCache(
            self.prepare_vocabulary, capacity=vocab_cache_size, resolve_ttl_s=vocab_resolve_ttl_s, metrics=metrics,
            load=vocab_store.load if vocab_store is not None else None,
            active_version=vocab_store.active_version if vocab_store is not None else None,
        )

    def _compiled_encoder(self, backend: Any) -> Any:
        """The image encoder compiled for fixed batch sizes (one graph per bucket, no dynamic shapes).

        Only the encoder: it is most of the work and knows nothing of vocabularies, so a hot swap to a
        vocabulary of another size never recompiles; the alignment decoder runs eagerly.
        """
        import torch._dynamo

        config = torch._dynamo.config
        for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if hasattr(config, limit):
                setattr(config, limit, max(getattr(config, limit), len(self.buckets) + 2))
        return torch.compile(self.model.encode_image, dynamic=False, backend=backend)

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings; compiled, each chunk is padded to its bucket and the padding dropped."""
        if not self.buckets:
            return self._encode(x)
        parts = []
        for start in range(0, x.shape[0], self.buckets[-1]):
            chunk = x[start : start + self.buckets[-1]]
            n = chunk.shape[0]
            size = next(b for b in self.buckets if b >= n)
            if size > n:
                chunk = torch.cat([chunk, chunk.new_zeros(size - n, *chunk.shape[1:])])
            parts.append(self._encode(chunk)[:n])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile and run every bucket once, with the active vocabulary, before the first real batch:
        seconds taken. A replica calls it before it joins its consumer group, so a slow first batch can
        never hold a partition past the group's timeouts."""
        started = time.perf_counter()
        s = self.image_size
        for size in self.buckets or [1]:
            x = torch.zeros(size, 3, s, s, device=self.device, dtype=self.dtype)
            self.head_logits(self.encode_images(x), self.model.vocabulary_tensors)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def head_logits(self, embeds: torch.Tensor, vocab: VocabularyTensors | None) -> torch.Tensor:
        return self.model.head_logits(embeds, vocab, tag_chunk_size=self.tag_chunk_size, head_memory_bytes=self.head_memory_bytes)

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

    @property
    def canary(self) -> Canary | None:
        """The canary vocabulary and fraction (workers/vocab/canary.py), None when there is none."""
        return self._canary

    def set_canary(self, vocabulary: Vocabulary | VocabularyTensors | None, fraction: float = 0.0) -> Canary | None:
        """Score `fraction` of the requests (those the pipeline picks) with `vocabulary` too, from the next
        batch on; None stops it and lets its tensors go."""
        if vocabulary is None:
            self._canary = None
            return None
        if not 0 < fraction <= 1:
            raise ValueError(f"canary fraction must be in (0, 1], got {fraction}")
        self._canary = Canary(self.model.prepare_vocabulary(vocabulary), fraction)
        return self._canary

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

    def decode(self, data: bytes, name: str) -> torch.Tensor | EncodedImage:
        """Thread-safe: uint8 [3, h, w] (fast path), the official float [3, S, S], or a JPEG checked but left
        for `infer` to decode with its batch. Raises InputError."""
        return self.decoder.decode(data, name)

    def _decode_deferred(self, items: Sequence[torch.Tensor | EncodedImage]) -> list[torch.Tensor | InputError]:
        """The batch's deferred JPEGs decoded together on the device; one the decoder refuses is retried by PIL."""
        deferred = [i for i, item in enumerate(items) if isinstance(item, EncodedImage)]
        out: list[torch.Tensor | InputError] = list(items)  # type: ignore[arg-type]
        if not deferred:
            return out
        decoded = decode_jpegs([items[i] for i in deferred], self.device)  # type: ignore[misc]
        for i, result in zip(deferred, decoded):
            if isinstance(result, torch.Tensor):
                out[i] = result
                continue
            encoded = items[i]
            assert isinstance(encoded, EncodedImage)
            try:
                out[i] = self.decoder.decode_pixels(encoded.data, encoded.name)
            except InputError as exc:
                out[i] = exc
        return out

    @torch.inference_mode()
    def infer(
        self, items: Sequence[torch.Tensor | EncodedImage], vocabularies: Sequence[VocabularyTensors | None] | None = None,
    ) -> list[ImageTags | InputError]:
        """Tags for each image (what `decode` gave), with its vocabulary from `vocabulary_for` (None or no list:
        the active one); an image that could not be decoded gets its `InputError` instead."""
        return self.run(self.stage(items), vocabularies)

    @torch.inference_mode()
    def stage(self, items: Sequence[torch.Tensor | EncodedImage]) -> StagedBatch:
        """The batch's deferred JPEGs decoded, the images resized, normalised and on the device: all that
        `run` needs. On CUDA this runs on a stream of its own, so a thread can stage batch n+1 while batch n
        runs (the stream pipeline does)."""
        side = self._stage_stream()
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            decoded = self._decode_deferred(items)
            good = [i for i, d in enumerate(decoded) if not isinstance(d, InputError)]
            pixels: list[torch.Tensor] = [decoded[i] for i in good]  # type: ignore[misc]
            x = None
            if pixels:
                x = self.fast.resize(pixels) if self.fast is not None else torch.stack(pixels).to(self.device, non_blocking=True)
                x = x.to(self.dtype)
            ready = side.record_event() if side is not None else None
        errors = {i: d for i, d in enumerate(decoded) if isinstance(d, InputError)}
        return StagedBatch(len(items), good, x, errors, ready)

    @torch.inference_mode()
    def run(
        self, staged: StagedBatch, vocabularies: Sequence[VocabularyTensors | None] | None = None,
        canary: CanaryBatch | None = None,
    ) -> list[ImageTags | InputError]:
        """Model and tag selection for a staged batch; the vocabularies are resolved now, between batches.
        With `canary`, its rows are also scored with the canary vocabulary (into `canary.tags`), from the
        same image embeddings."""
        out: list[ImageTags | InputError] = [staged.errors.get(i) for i in range(staged.size)]  # type: ignore[misc]
        if staged.pixels is None:
            return out
        x = staged.pixels
        if staged.ready is not None:  # staged on the side stream: wait for it on the GPU, not in Python
            current = torch.cuda.current_stream(self.device)
            current.wait_event(staged.ready)
            x.record_stream(current)
        chosen_for_good = [vocabularies[i] for i in staged.good] if vocabularies is not None else None
        position = {i: n for n, i in enumerate(staged.good)}
        canary_rows = [position[i] for i in canary.rows if i in position] if canary is not None else []
        tags, canary_tags = self._infer(x, chosen_for_good, canary.canary.vocab if canary is not None else None, canary_rows)
        for i, t in zip(staged.good, tags):
            out[i] = t
        if canary is not None:
            canary.tags = {staged.good[n]: t for n, t in zip(canary_rows, canary_tags)}
        return out

    def _stage_stream(self) -> Any:
        if self.device.type != "cuda":
            return None
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return self._side_stream

    def _infer(
        self, x: torch.Tensor, vocabularies: Sequence[VocabularyTensors | None] | None,
        canary: VocabularyTensors | None = None, canary_rows: Sequence[int] = (),
    ) -> tuple[list[ImageTags], list[ImageTags]]:
        with self._vocab_lock:
            active = self.model.vocabulary_tensors
        assert active is not None
        chosen = [v or active for v in vocabularies] if vocabularies is not None else [active] * x.shape[0]
        groups: dict[int, list[int]] = {}
        for i, vocab in enumerate(chosen):
            groups.setdefault(id(vocab), []).append(i)
        embeds = self.encode_images(x)
        if len(groups) == 1:
            logits = self.head_logits(embeds, chosen[0])  # selected where they are: only hits come back
            out = select_tags(logits, chosen[0].vocabulary, threshold=self.threshold, top_k=self.top_k, all_scores=self.all_scores)
        else:
            out = [None] * len(chosen)
            for rows in groups.values():
                vocab = chosen[rows[0]]
                logits = self.head_logits(embeds[rows], vocab)
                for i, tags in zip(rows, select_tags(logits, vocab.vocabulary, threshold=self.threshold, top_k=self.top_k, all_scores=self.all_scores)):
                    out[i] = tags
        if canary is None or not canary_rows:
            return out, []
        # The encoder's work is shared: only the head runs again, for the chosen rows.
        logits = self.head_logits(embeds[list(canary_rows)], canary)
        return out, select_tags(logits, canary.vocabulary, threshold=self.threshold, top_k=self.top_k)
