"""RAM++: image tokens -> description re-weighting -> alignment decoder -> one logit per tag.

The split mirrors the paper: `encode_image` (Swin + projection into the 512-d text space), then the
head, which scores any vocabulary against those tokens: `tag_queries` (re-weighting of each tag's
description embeddings by the image, then `wordvec_proj`), `decode` (cross-attention layers + `fc`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ramplus_core.configs import ModelConfig
from ramplus_core.decoder import AlignmentDecoder
from ramplus_core.errors import VocabularyError
from ramplus_core.head_memory import head_footprint, head_memory_budget
from ramplus_core.image_encoder import SwinImageEncoder
from ramplus_core.vocabulary import Vocabulary


TagChunkSize = int | Literal["auto"] | None


@dataclass(frozen=True)
class VocabularyTensors:
    """A vocabulary's tensors on the model's device, ready for the head.

    The embeddings are in the model's dtype, or in the vocabulary's own when that is 16-bit and the model's
    wider (an fp16 vocabulary from Redis beside an fp32 model on the CPU): the head casts each chunk of tags as it scores it, which gives
    the same numbers as casting the whole once (fp16 and bf16 are exact in fp32) at half the memory held.
    """

    embeddings: torch.Tensor  # [C, D, K]
    mask: torch.Tensor | None  # [C, D] bool, None when no padding
    thresholds: torch.Tensor  # [C] float32
    vocabulary: Vocabulary

    @property
    def num_tags(self) -> int:
        return self.embeddings.shape[0]

    def tags(self, start: int, stop: int) -> VocabularyTensors:
        """Tags [start, stop) as views, no copy."""
        mask = self.mask[start:stop] if self.mask is not None else None
        return VocabularyTensors(self.embeddings[start:stop], mask, self.thresholds[start:stop], self.vocabulary)


def reweight_descriptions(
    pooled: torch.Tensor,
    log_scale: torch.Tensor,
    embeddings: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image-conditioned mixture of each tag's description embeddings: [B, K] x [C, D, K] -> [B, C, K].

    Same math as the official code (L2-normalised pooled token times exp(scale), softmax over each tag's
    descriptions, weighted sum) without its [C, D, K] temporary per image: two matmuls over [B, C, D].
    """
    c, d, k = embeddings.shape
    cls = pooled / pooled.norm(dim=-1, keepdim=True)
    sims = ((log_scale.exp() * cls) @ embeddings.reshape(c * d, k).T).view(-1, c, d)
    if mask is not None:
        sims = sims.masked_fill(~mask, float("-inf"))
    weights = sims.softmax(dim=-1)
    # [C, B, D] @ [C, D, K] -> [C, B, K]
    return torch.bmm(weights.transpose(0, 1), embeddings).transpose(0, 1)


class RamPlus(nn.Module):
    """The RAM++ network. The vocabulary is set (or passed) at run time; it is not a parameter."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = SwinImageEncoder(config)
        self.image_proj = nn.Linear(config.vision_width, config.text_dim)
        self.reweight_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.wordvec_proj = nn.Linear(config.text_dim, config.decoder_dim)
        self.decoder = AlignmentDecoder(
            dim=config.decoder_dim,
            kv_dim=config.text_dim,
            num_layers=config.decoder_layers,
            num_heads=config.decoder_heads,
            ffn_dim=config.decoder_ffn_dim,
            ln_eps=config.decoder_ln_eps,
        )
        self.fc = nn.Linear(config.decoder_dim, 1)
        self._vocab: VocabularyTensors | None = None
        self._compiled_score: Callable[[torch.Tensor, VocabularyTensors], torch.Tensor] | None = None

    # -- vocabulary ---------------------------------------------------------------------------------------

    @property
    def vocabulary(self) -> Vocabulary | None:
        return self._vocab.vocabulary if self._vocab is not None else None

    @property
    def vocabulary_tensors(self) -> VocabularyTensors | None:
        """The active vocabulary as prepared for this model (device, dtype), for callers that swap it."""
        return self._vocab

    def _held_dtype(self, stored: torch.dtype) -> torch.dtype:
        """The dtype a vocabulary stored in `stored` is held in: a 16-bit one as it is beside a wider model (a
        wider copy would carry no more information), anything else in the model's dtype."""
        compute = self.reweight_scale.dtype
        if stored in (torch.float16, torch.bfloat16) and compute.itemsize > stored.itemsize:
            return stored
        return compute

    def is_prepared(self, vocab: VocabularyTensors) -> bool:
        """Whether `vocab` is on this model's device in the dtype `prepare_vocabulary` would give it."""
        e = vocab.embeddings
        return e.device == self.reweight_scale.device and e.dtype == self._held_dtype(vocab.vocabulary.embeddings.dtype)

    def prepare_vocabulary(self, vocabulary: Vocabulary | VocabularyTensors, *, validate: bool = True) -> VocabularyTensors:
        """Validate against this model and move to its device (and dtype, see `VocabularyTensors`); do it
        once, not per batch.

        The checksum is not recomputed here: files are checked when read (`Vocabulary.load`).
        """
        p = self.reweight_scale
        if isinstance(vocabulary, VocabularyTensors):
            if self.is_prepared(vocabulary):
                return vocabulary
            vocabulary = vocabulary.vocabulary
        if validate:
            vocabulary.validate(dim=self.config.text_dim, check_sha=False)
        mask = vocabulary.mask()
        return VocabularyTensors(
            embeddings=vocabulary.embeddings.to(device=p.device, dtype=self._held_dtype(vocabulary.embeddings.dtype)),
            mask=mask.to(p.device) if mask is not None else None,
            thresholds=vocabulary.thresholds.to(p.device),
            vocabulary=vocabulary,
        )

    def set_vocabulary(self, vocabulary: Vocabulary | VocabularyTensors) -> VocabularyTensors:
        self._vocab = self.prepare_vocabulary(vocabulary)
        return self._vocab

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Keep the active vocabulary on the model's device/dtype across .to()/.half()/.cuda().
        out = super()._apply(fn, recurse)
        if self._vocab is not None:
            self._vocab = self.prepare_vocabulary(self._vocab.vocabulary, validate=False)
        return out

    def _resolve(self, vocabulary: Vocabulary | VocabularyTensors | None) -> VocabularyTensors:
        if vocabulary is None:
            if self._vocab is None:
                raise VocabularyError("no vocabulary: pass one or call model.set_vocabulary(...) first")
            return self._vocab
        return self.prepare_vocabulary(vocabulary)

    # -- forward pieces -----------------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> image embeddings [B, 1 + HW, text_dim], the pooled token first."""
        return self.image_proj(self.image_encoder(images))

    def tag_queries(self, image_embeds: torch.Tensor, vocab: VocabularyTensors) -> torch.Tensor:
        embeddings = vocab.embeddings.to(self.reweight_scale.dtype)  # a chunk of a 16-bit vocabulary, see above
        mixed = reweight_descriptions(image_embeds[:, 0], self.reweight_scale, embeddings, vocab.mask)
        # In place: a linear layer's backward needs its input, not its output.
        return F.relu(self.wordvec_proj(mixed))

    def decode(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Tag (or caption) queries [B, T, decoder_dim] against image tokens -> logits [B, T]."""
        return self.fc(self.decoder(queries, image_embeds)).squeeze(-1)

    def score_tags(self, image_embeds: torch.Tensor, vocab: VocabularyTensors) -> torch.Tensor:
        """Logits [B, C] of prepared vocabulary tensors, all tags in one go: what `head_logits` runs per chunk."""
        return self.decode(self.tag_queries(image_embeds, vocab), image_embeds)

    def compile_head(self, backend: Any = "inductor", **options: Any) -> None:
        """Score tags through `torch.compile` from now on (inference; the image encoder is compiled apart).

        The re-weighting's softmax and masking, the ReLU, the residual adds, layer norms and GELU are fused
        instead of each making a round trip through memory: the same logits to rounding, about 1.2x the
        eager head's speed on the CPU (bench/RESULTS.md). The number of tags and images are dynamic
        dimensions, so a vocabulary or a chunk of another size does not recompile.
        """
        self._compiled_score = torch.compile(self.score_tags, dynamic=True, backend=backend, **options)

    def tag_chunk(
        self,
        image_embeds: torch.Tensor,
        vocabulary: Vocabulary | VocabularyTensors | None = None,
        *,
        tag_chunk_size: TagChunkSize = "auto",
        head_memory_bytes: int | None = None,
    ) -> int | None:
        """How many tags `head_logits` scores at once for these images; None: all in one go.

        `tag_chunk_size`: None (never chunk), a number of tags, or "auto": the largest chunk whose working set
        (`head_memory.head_footprint`) fits `head_memory_bytes`, by default `head_memory.head_memory_budget`
        of the model's device (a fraction of the free GPU memory; on the CPU of the available memory, capped).
        """
        vocab = self._resolve(vocabulary)
        if tag_chunk_size is None:
            return None
        if tag_chunk_size == "auto":
            if head_memory_bytes is not None and head_memory_bytes < 0:
                raise ValueError(f"head_memory_bytes must be >= 0, got {head_memory_bytes}")
            c, d, _ = vocab.embeddings.shape
            held, used = vocab.embeddings.dtype, self.reweight_scale.dtype
            footprint = head_footprint(
                self.config, descriptions=d, image_tokens=image_embeds.shape[1], compute_dtype=image_embeds.dtype,
                cast_to=used if held != used else None,
            )
            budget = head_memory_bytes if head_memory_bytes is not None else head_memory_budget(image_embeds.device)
            return footprint.tag_chunk(c, image_embeds.shape[0], budget)
        if isinstance(tag_chunk_size, bool) or not isinstance(tag_chunk_size, int) or tag_chunk_size < 1:
            raise ValueError(f"tag_chunk_size must be None, 'auto' or a number of tags >= 1, got {tag_chunk_size!r}")
        return tag_chunk_size if tag_chunk_size < vocab.num_tags else None

    def head_logits(
        self,
        image_embeds: torch.Tensor,
        vocabulary: Vocabulary | VocabularyTensors | None = None,
        *,
        tag_chunk_size: TagChunkSize = None,
        head_memory_bytes: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, C] of a vocabulary for already encoded images.

        Tags never interact, so scoring them in chunks bounds the head's memory for huge vocabularies without
        changing any score: `tag_chunk_size` None (one go), N tags, or "auto" within `head_memory_bytes`
        (see `tag_chunk`).
        """
        vocab = self._resolve(vocabulary)
        chunk = self.tag_chunk(image_embeds, vocab, tag_chunk_size=tag_chunk_size, head_memory_bytes=head_memory_bytes)
        score = self._compiled_score or self.score_tags
        if chunk is None:
            return score(image_embeds, vocab)
        parts = [score(image_embeds, vocab.tags(start, start + chunk)) for start in range(0, vocab.num_tags, chunk)]
        return torch.cat(parts, dim=1)

    def tag_logits(
        self,
        images: torch.Tensor,
        vocabulary: Vocabulary | VocabularyTensors | None = None,
        *,
        tag_chunk_size: TagChunkSize = None,
        head_memory_bytes: int | None = None,
    ) -> torch.Tensor:
        """Pre-sigmoid logits [B, C] for preprocessed images; the model's own vocabulary by default."""
        return self.head_logits(
            self.encode_image(images), vocabulary, tag_chunk_size=tag_chunk_size, head_memory_bytes=head_memory_bytes
        )

    def text_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Image-text alignment logits [B, T] for L2-normalised text embeddings [T, K] (training)."""
        queries = F.relu(self.wordvec_proj(text_embeds.to(image_embeds.dtype)))
        return self.decode(queries.unsqueeze(0).expand(image_embeds.shape[0], -1, -1), image_embeds)
