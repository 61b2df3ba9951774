"""RAM++: image tokens -> description re-weighting -> alignment decoder -> one logit per tag.

The split mirrors the paper: `encode_image` (Swin + projection into the 512-d text space), then the
head, which scores any vocabulary against those tokens: `tag_queries` (re-weighting of each tag's
description embeddings by the image, then `wordvec_proj`), `decode` (cross-attention layers + `fc`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ramplus_core.configs import ModelConfig
from ramplus_core.decoder import AlignmentDecoder
from ramplus_core.errors import VocabularyError
from ramplus_core.image_encoder import SwinImageEncoder
from ramplus_core.vocabulary import Vocabulary


@dataclass(frozen=True)
class VocabularyTensors:
    """A vocabulary's tensors on the model's device and dtype, ready for the head."""

    embeddings: torch.Tensor  # [C, D, K]
    mask: torch.Tensor | None  # [C, D] bool, None when no padding
    thresholds: torch.Tensor  # [C] float32
    vocabulary: Vocabulary

    @property
    def num_tags(self) -> int:
        return self.embeddings.shape[0]


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

    # -- vocabulary ---------------------------------------------------------------------------------------

    @property
    def vocabulary(self) -> Vocabulary | None:
        return self._vocab.vocabulary if self._vocab is not None else None

    @property
    def vocabulary_tensors(self) -> VocabularyTensors | None:
        """The active vocabulary as prepared for this model (device, dtype), for callers that swap it."""
        return self._vocab

    def prepare_vocabulary(self, vocabulary: Vocabulary | VocabularyTensors, *, validate: bool = True) -> VocabularyTensors:
        """Validate against this model and move to its device and dtype (do it once, not per batch).

        The checksum is not recomputed here: files are checked when read (`Vocabulary.load`).
        """
        p = self.reweight_scale
        if isinstance(vocabulary, VocabularyTensors):
            if vocabulary.embeddings.device == p.device and vocabulary.embeddings.dtype == p.dtype:
                return vocabulary
            vocabulary = vocabulary.vocabulary
        if validate:
            vocabulary.validate(dim=self.config.text_dim, check_sha=False)
        mask = vocabulary.mask()
        return VocabularyTensors(
            embeddings=vocabulary.embeddings.to(device=p.device, dtype=p.dtype),
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
        mixed = reweight_descriptions(image_embeds[:, 0], self.reweight_scale, vocab.embeddings, vocab.mask)
        return F.relu(self.wordvec_proj(mixed))

    def decode(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Tag (or caption) queries [B, T, decoder_dim] against image tokens -> logits [B, T]."""
        return self.fc(self.decoder(queries, image_embeds)).squeeze(-1)

    def head_logits(
        self,
        image_embeds: torch.Tensor,
        vocabulary: Vocabulary | VocabularyTensors | None = None,
        *,
        tag_chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, C] of a vocabulary for already encoded images.

        Tags never interact, so `tag_chunk_size` bounds peak memory for huge vocabularies without changing
        any score.
        """
        vocab = self._resolve(vocabulary)
        if tag_chunk_size is None or tag_chunk_size >= vocab.num_tags:
            return self.decode(self.tag_queries(image_embeds, vocab), image_embeds)
        parts = []
        for start in range(0, vocab.num_tags, tag_chunk_size):
            stop = start + tag_chunk_size
            chunk = VocabularyTensors(
                vocab.embeddings[start:stop],
                vocab.mask[start:stop] if vocab.mask is not None else None,
                vocab.thresholds[start:stop],
                vocab.vocabulary,
            )
            parts.append(self.decode(self.tag_queries(image_embeds, chunk), image_embeds))
        return torch.cat(parts, dim=1)

    def tag_logits(
        self,
        images: torch.Tensor,
        vocabulary: Vocabulary | VocabularyTensors | None = None,
        *,
        tag_chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Pre-sigmoid logits [B, C] for preprocessed images; the model's own vocabulary by default."""
        return self.head_logits(self.encode_image(images), vocabulary, tag_chunk_size=tag_chunk_size)

    def text_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Image-text alignment logits [B, T] for L2-normalised text embeddings [T, K] (training)."""
        queries = F.relu(self.wordvec_proj(text_embeds.to(image_embeds.dtype)))
        return self.decode(queries.unsqueeze(0).expand(image_embeds.shape[0], -1, -1), image_embeds)
