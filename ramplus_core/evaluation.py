"""Multi-label tagging metrics as the RAM/RAM++ papers report them, and per-tag threshold calibration.

Pure torch; arrays are `scores[N, C]` (N images, C tags) and `targets[N, C]` (0/1 or bool). Ranking
metrics accept any real scores; threshold metrics expect probabilities (sigmoid outputs).

Ties. Tied scores are one block: a ranking can only be cut between distinct scores, so AP is
`sum_k (R_k - R_{k-1}) * P_k` over the distinct scores taken as thresholds (`score >= s_k`), exactly what
sklearn's `average_precision_score` computes. A constant scorer therefore gets AP = positive rate, with
no dependence on how a sort happens to order equal values.

Scores are sorted in their own dtype (a float32 sort is much cheaper, and ties are ties there); all
arithmetic is float64. Work goes a block of tags at a time, so an official-size vocabulary (C = 4,585) on a
10,000-image validation set stays within a few hundred MB; its cost is the per-tag O(N log N) sort.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

# Elements per block of tags: large enough to amortise the sort, small enough (~32 MB a float64 tensor)
# that the handful of temporaries per block never matter.
_BLOCK_ELEMENTS = 1 << 22


# -- helpers ----------------------------------------------------------------------------------------------


def _check_targets(targets: torch.Tensor) -> torch.Tensor:
    """Validate 0/1 (or bool) multi-hot targets [N, C]; return them as bool."""
    if not isinstance(targets, torch.Tensor) or targets.ndim != 2:
        raise ValueError("targets must be a 2-D tensor [N images, C tags]; for a single tag use .unsqueeze(1)")
    if targets.shape[0] == 0:
        raise ValueError("no images to evaluate: targets have N = 0 rows")
    if targets.dtype != torch.bool:
        if not ((targets == 0) | (targets == 1)).all():
            raise ValueError("targets must be 0/1 (or bool): one multi-hot row per image")
        targets = targets != 0
    return targets


def _check(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Validate scores against targets; return the targets as bool."""
    if not isinstance(scores, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("scores and targets must be torch tensors of shape [N images, C tags]")
    if scores.shape != targets.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ in shape:"
            " give one score per (image, tag) target, both [N images, C tags]"
        )
    hits = _check_targets(targets)
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"scores must be real numbers, got {scores.dtype}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: a NaN cannot be ranked; check the model output")
    return hits


def _tag_blocks(scores: torch.Tensor, hits: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Per block of tags: (tag slice, scores sorted descending [c, N], hits in that order [c, N] bool)."""
    n, c = scores.shape
    step = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, c, step):
        cols = slice(start, min(start + step, c))
        values, order = scores[:, cols].T.contiguous().sort(dim=1, descending=True)
        yield cols, values, hits[:, cols].T.contiguous().gather(1, order)


def _block_ends(values: torch.Tensor) -> torch.Tensor:
    """True at the last position of each run of equal scores: the only places a ranking can be cut."""
    ends = torch.ones_like(values, dtype=torch.bool)
    ends[:, :-1] = values[:, :-1] != values[:, 1:]
    return ends


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0/0 := 0 (no predictions -> precision 0, no positives -> recall 0)."""
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def _positives(targets: torch.Tensor) -> torch.Tensor:
    return targets.sum(dim=0)


def _require_a_positive(support: torch.Tensor) -> torch.Tensor:
    """Mask of tags with a positive (support > 0, or a bool mask already); raise if there is none."""
    has = support if support.dtype == torch.bool else support > 0
    if not has.any():
        raise ValueError(
            "no tag has a positive target, so there is nothing to average over: evaluate on images that carry"
            " at least one of the tags"
        )
    return has


# -- ranking metrics --------------------------------------------------------------------------------------


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-tag non-interpolated average precision, float64 [C]; NaN for tags with no positive.

    AP = sum over distinct scores s_k (descending) of (R_k - R_{k-1}) * P_k, where P_k and R_k are the
    precision and recall of `score >= s_k`. Without ties this is the mean, over positives, of the precision
    at each positive's rank; tied scores count as one block (see the module docstring).
    """
    hits_all = _check(scores, targets)
    out = torch.empty(scores.shape[1], dtype=torch.float64, device=scores.device)
    ranks = torch.arange(1, scores.shape[0] + 1, dtype=torch.float64, device=scores.device)
    for cols, values, hits in _tag_blocks(scores, hits_all):
        ends = _block_ends(values)
        tp = hits.cumsum(dim=1, dtype=torch.int32)  # counts < 2**31; int32 is ~4x faster
        # tp at the previous block end: tp only grows, so a running max over block ends carries it forward.
        at_ends = torch.where(ends, tp, 0).cummax(dim=1).values
        previous = torch.nn.functional.pad(at_ends[:, :-1], (1, 0))
        gained = torch.where(ends, tp - previous, 0)  # positives in the block that ends here
        npos = tp[:, -1]
        ap = (gained.to(torch.float64) * tp / ranks).sum(dim=1) / npos
        out[cols] = torch.where(npos > 0, ap, float("nan"))
    return out


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP: the mean of `average_precision` over the tags with at least one positive."""
    ap = average_precision(scores, targets)
    _require_a_positive(~ap.isnan())
    return float(ap.nanmean())


def label_prior_map(targets: torch.Tensor) -> float:
    """The label-prior baseline: the mAP of a scorer that knows nothing about the image.

    Per tag this is its positive rate, averaged over tags with a positive. A constant scorer gets exactly
    this (all images tie, one block), and a random ranking gets it in expectation up to O(log N / N). A
    trained model's mAP means something only by how far it is above this number.
    """
    hits = _check_targets(targets)
    support = _positives(hits)
    has = _require_a_positive(support)
    rate = support.to(torch.float64) / hits.shape[0]
    return float(rate[has].mean())


# -- threshold metrics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TagMetrics:
    """Precision, recall and F1 of thresholded predictions (`score > threshold`).

    Per-tag tensors are float64 [C]. Micro averages pool every (image, tag) decision; macro averages are
    means of the per-tag values over the tags with at least one positive (the same tags mAP averages), so
    tags absent from the evaluation set do not count as zero recall. 0/0 is 0 everywhere.
    """

    precision: torch.Tensor
    recall: torch.Tensor
    f1: torch.Tensor
    support: torch.Tensor  # positives per tag, int64 [C]
    micro_precision: float
    micro_recall: float
    micro_f1: float
    macro_precision: float
    macro_recall: float
    macro_f1: float


def _as_thresholds(thresholds: float | torch.Tensor, num_tags: int, device: torch.device) -> float | torch.Tensor:
    if isinstance(thresholds, torch.Tensor):
        if thresholds.ndim == 0:
            return thresholds.to(device)
        if thresholds.shape != (num_tags,):
            raise ValueError(
                f"thresholds {tuple(thresholds.shape)} do not match {num_tags} tags: give one per tag or a single number"
            )
        return thresholds.to(device)
    return float(thresholds)


def precision_recall_f1(scores: torch.Tensor, targets: torch.Tensor, thresholds: float | torch.Tensor) -> TagMetrics:
    """Precision/recall/F1 per tag and averaged, predicting a tag when `score > threshold` (strictly).

    The comparison is torch's own `scores > thresholds`, as `select_tags` does it: a Python float is
    compared in the scores' dtype, a threshold tensor by ordinary type promotion.
    """
    hits = _check(scores, targets)
    predicted = scores > _as_thresholds(thresholds, scores.shape[1], scores.device)
    tp = (predicted & hits).sum(dim=0).to(torch.float64)
    fp = (predicted & ~hits).sum(dim=0).to(torch.float64)
    fn = (~predicted & hits).sum(dim=0).to(torch.float64)
    support = _positives(hits)
    has = _require_a_positive(support)
    precision, recall, f1 = _ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(2 * tp, 2 * tp + fp + fn)
    all_tp, all_fp, all_fn = tp.sum(), fp.sum(), fn.sum()
    return TagMetrics(
        precision=precision,
        recall=recall,
        f1=f1,
        support=support,
        micro_precision=float(_ratio(all_tp, all_tp + all_fp)),
        micro_recall=float(_ratio(all_tp, all_tp + all_fn)),
        micro_f1=float(_ratio(2 * all_tp, 2 * all_tp + all_fp + all_fn)),
        macro_precision=float(precision[has].mean()),
        macro_recall=float(recall[has].mean()),
        macro_f1=float(f1[has].mean()),
    )


# -- calibration ------------------------------------------------------------------------------------------


def calibrate_thresholds(
    scores: torch.Tensor,
    targets: torch.Tensor,
    *,
    metric: Literal["f1", "precision"] = "f1",
    target_precision: float | None = None,
    min_threshold: float = 0.0,
    max_threshold: float = 1.0,
    default: float = 0.5,
) -> torch.Tensor:
    """Per-tag thresholds, chosen on a validation set, for use with `score > threshold`.

    Every split of a tag's images that some threshold in [min_threshold, max_threshold] can make is
    considered: the midpoint between consecutive distinct scores (clamped into the range), plus the range's
    ends. `metric="f1"` takes the split with the best F1 (on equal F1, the highest threshold);
    `metric="precision"` takes the lowest threshold whose precision reaches `target_precision`, or
    `max_threshold` if none does. Tags with no positive get `default`.

    The result is float32 (float64 for float64 scores), which is what vocabularies store, and each value
    is nudged, if rounding requires, to stay strictly below the lowest score it keeps and at or above the
    highest it drops: `scores > thresholds` reproduces the chosen split exactly.
    """
    hits_all = _check(scores, targets)
    if metric not in ("f1", "precision"):
        raise ValueError(f"metric must be 'f1' or 'precision', got {metric!r}")
    if metric == "precision" and (target_precision is None or not 0.0 < target_precision <= 1.0):
        raise ValueError("metric='precision' needs target_precision in (0, 1]")
    if not min_threshold <= max_threshold:
        raise ValueError(f"min_threshold {min_threshold} is above max_threshold {max_threshold}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite probabilities to calibrate thresholds on")
    out_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    lo, hi, inf = float(min_threshold), float(max_threshold), float("inf")
    out = torch.full((scores.shape[1],), float(default), dtype=out_dtype, device=scores.device)
    n = scores.shape[0]
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=scores.device)
    for cols, values, hits in _tag_blocks(scores, hits_all):
        v = values.to(torch.float64)
        tp = hits.cumsum(dim=1, dtype=torch.int32)
        npos = tp[:, -1:]
        # A cut after position i keeps v[:, :i+1]. Some t in [lo, hi] makes it iff it ends a block of
        # ties and v[:, i+1] <= t < v[:, i] (after the last image, v[:, i+1] is -inf).
        feasible = _block_ends(values) & (v > lo)
        feasible[:, :-1] &= v[:, 1:] <= hi
        if metric == "f1":
            objective = torch.where(feasible, 2 * tp / (npos + ranks), -1.0)
        else:
            # Among cuts reaching the target precision, the one keeping the most (the lowest threshold).
            objective = torch.where(feasible & (tp / ranks >= target_precision), ranks, -1.0)
        best_value, best = objective.max(dim=1, keepdim=True)  # first maximum: on equal F1, fewest kept
        upper = v.gather(1, best)
        below = torch.where(best + 1 < n, v.gather(1, (best + 1).clamp(max=n - 1)), -inf)
        cut = ((upper + below) / 2).clamp(lo, hi)  # -inf (keep everything) clamps to lo
        # The empty cut (t = hi) is F1 0, so it wins only when nothing scores better and it is possible;
        # for a precision target it is the fallback when no cut reaches it.
        top = v[:, :1]
        empty = ((top <= hi) & (best_value <= 0)) if metric == "f1" else best_value < 0
        t = torch.where(empty, hi, cut).to(out_dtype)
        low = torch.where(empty, torch.where(top <= hi, top, -inf), below).to(out_dtype)
        high = torch.where(empty, inf, upper).to(out_dtype)
        # Rounding to out_dtype must not move t across a score it separates: keep low <= t < high.
        t = torch.minimum(torch.maximum(t, low), torch.nextafter(high, torch.full_like(high, -inf)))
        out[cols] = torch.where(npos[:, 0] > 0, t[:, 0], out[cols])
    return out


def group_average_precision(tag_ap: dict[str, float | None], groups: dict[str, list[str]]) -> dict[str, float | None]:
    """Mean AP per group of tags (e.g. colour, shape, background), over the group's tags that have an AP."""
    out: dict[str, float | None] = {}
    for name, tags in groups.items():
        values = [tag_ap[t] for t in tags if tag_ap.get(t) is not None]
        out[name] = sum(values) / len(values) if values else None  # type: ignore[arg-type]
    return out
