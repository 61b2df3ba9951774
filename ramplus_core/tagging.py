"""From logits to answers: the tags above their thresholds, score-descending, per image.

Selection runs as tensor ops where the logits are (the GPU in a fleet): one compare against the thresholds,
one stable sort, and only the hits (and, when asked, every score) are copied to the host. An image's answer
is plain lists, not an object per tag: at thousands of tags per image, building one pydantic object per
tag cost more than the model (issue 16). `TagScore` objects are still there for whoever asks (`.tags`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field

from ramplus_core.vocabulary import Vocabulary


class TagScore(BaseModel):
    tag: str
    score: float = Field(description="sigmoid(logit), in [0, 1]")


@dataclass(slots=True)
class ImageTags:
    """One image's answer: the selected tags (positions in the vocabulary) with their scores, score-descending;
    the vocabulary that gave them; and every tag's score when asked for (`all_scores`). Held as CPU tensors:
    names and Python floats are made only when read (`names`, `values`, `tags`, `scores`)."""

    index: torch.Tensor  # int64 [n]
    value: torch.Tensor  # float32 [n]
    vocab: str  # name@version
    vocabulary_tags: Sequence[str]
    every: torch.Tensor | None = None  # float32 [tags], in vocabulary order

    @classmethod
    def of(cls, pairs: Sequence[tuple[str, float]], vocab: str) -> ImageTags:
        """From (tag, score) pairs, already in order (tests, and answers made elsewhere)."""
        return cls(torch.arange(len(pairs)), torch.tensor([s for _, s in pairs], dtype=torch.float32), vocab, [t for t, _ in pairs])

    @property
    def names(self) -> list[str]:
        tags = self.vocabulary_tags
        return [tags[i] for i in self.index.tolist()]

    @property
    def values(self) -> list[float]:
        return self.value.tolist()

    @property
    def tags(self) -> list[TagScore]:
        return [TagScore(tag=n, score=s) for n, s in zip(self.names, self.values)]

    @property
    def all_scores(self) -> list[float] | None:
        return None if self.every is None else self.every.tolist()

    @property
    def scores(self) -> dict[str, float] | None:
        """Every tag's score by name (None unless selected with `all_scores=True`)."""
        return None if self.every is None else dict(zip(self.vocabulary_tags, self.every.tolist()))


def select_tags(
    logits: torch.Tensor,
    vocabulary: Vocabulary,
    *,
    threshold: float | None = None,
    top_k: int | None = None,
    all_scores: bool = False,
) -> list[ImageTags]:
    """Tags whose score is strictly above their threshold (the official `>`), highest score first; equal
    scores in vocabulary order. `threshold` replaces every per-tag threshold; `top_k` keeps at most that
    many tags per image. Runs on the logits' device."""
    if logits.ndim != 2 or logits.shape[1] != len(vocabulary):
        raise ValueError(f"logits {tuple(logits.shape)} do not match a vocabulary of {len(vocabulary)} tags")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    scores = torch.sigmoid(logits.detach().float())
    if threshold is None:
        limits = vocabulary.thresholds.to(scores.device, torch.float32)
    else:
        limits = torch.full((len(vocabulary),), float(threshold), device=scores.device)
    hits = scores > limits
    counts = hits.sum(dim=1)
    if top_k is not None:
        counts = counts.clamp(max=top_k)
    width = int(counts.max()) if len(counts) else 0
    # Misses sort last (-1 is below every score); stable, so equal scores keep the vocabulary's order. Only
    # the first `width` columns (and the counts) come back to the host, in one copy each.
    if width:
        ranked, order = torch.sort(torch.where(hits, scores, -1.0), dim=1, descending=True, stable=True)
        kept_scores, kept_index = ranked[:, :width].cpu(), order[:, :width].cpu()
    else:
        kept_scores = torch.empty(len(counts), 0)
        kept_index = torch.empty(len(counts), 0, dtype=torch.long)
    every = scores.cpu() if all_scores else None
    tags, ref = vocabulary.tags, vocabulary.ref
    return [
        ImageTags(kept_index[i, :n], kept_scores[i, :n], ref, tags, every[i] if every is not None else None)
        for i, n in enumerate(counts.cpu().tolist())
    ]
