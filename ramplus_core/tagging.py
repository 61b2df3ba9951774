"""From logits to answers: the tags above their thresholds, score-descending, per image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, Field

from ramplus_core.vocabulary import Vocabulary


class TagScore(BaseModel):
    tag: str
    score: float = Field(description="sigmoid(logit), in [0, 1]")


class ImageTags(BaseModel):
    """One image's answer. `scores` holds every tag's score when asked for (all_scores=True)."""

    tags: list[TagScore]
    vocab: str = Field(description="name@version of the vocabulary that produced it")
    scores: dict[str, float] | None = None

    @property
    def names(self) -> list[str]:
        return [t.tag for t in self.tags]


def select_tags(
    logits: torch.Tensor,
    vocabulary: Vocabulary,
    *,
    threshold: float | None = None,
    top_k: int | None = None,
    all_scores: bool = False,
) -> list[ImageTags]:
    """Tags whose score is strictly above their threshold (the official `>`), highest score first.

    `threshold` replaces every per-tag threshold; `top_k` keeps at most that many tags per image.
    """
    scores = torch.sigmoid(logits.detach().float()).cpu()
    if scores.ndim != 2 or scores.shape[1] != len(vocabulary):
        raise ValueError(f"logits {tuple(scores.shape)} do not match a vocabulary of {len(vocabulary)} tags")
    limits = vocabulary.thresholds if threshold is None else torch.full((len(vocabulary),), float(threshold))
    tags: Sequence[str] = vocabulary.tags
    results = []
    for row in scores:
        hits = (row > limits).nonzero().flatten()
        order = hits[row[hits].argsort(descending=True, stable=True)]
        if top_k is not None:
            order = order[:top_k]
        results.append(
            ImageTags(
                tags=[TagScore(tag=tags[i], score=float(row[i])) for i in order.tolist()],
                vocab=vocabulary.ref,
                scores={t: float(s) for t, s in zip(tags, row.tolist())} if all_scores else None,
            )
        )
    return results
