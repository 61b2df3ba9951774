"""Tagging metrics and threshold calibration, checked by hand and against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ramplus_core import Vocabulary, evaluation, select_tags
from ramplus_core.evaluation import (
    average_precision,
    calibrate_thresholds,
    label_prior_map,
    mean_average_precision,
    precision_recall_f1,
)


def _reference_ap(scores: list[float], targets: list[int]) -> float:
    """sum_k (R_k - R_{k-1}) P_k over distinct thresholds, predicting `score >= s_k`: sklearn's definition."""
    npos = sum(targets)
    if npos == 0:
        return math.nan
    ap, last_recall = 0.0, 0.0
    for s in sorted(set(scores), reverse=True):
        kept = [y for x, y in zip(scores, targets) if x >= s]
        precision, recall = sum(kept) / len(kept), sum(kept) / npos
        ap += (recall - last_recall) * precision
        last_recall = recall
    return ap


def _f1(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    tp = int((predicted & truth).sum())
    denominator = int(predicted.sum()) + int(truth.sum())
    return 2 * tp / denominator if denominator else 0.0


def _random_problem(seed: int, n: int = 300, c: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores that carry some signal, rounded to two decimals so that ties are common."""
    g = torch.Generator().manual_seed(seed)
    rates = torch.linspace(0.03, 0.4, c)
    targets = torch.rand(n, c, generator=g) < rates
    scores = (0.35 * targets + 0.65 * torch.rand(n, c, generator=g)).round(decimals=2)
    return scores, targets


# -- average precision ------------------------------------------------------------------------------------


def test_ap_without_ties_is_the_mean_precision_at_each_positive():
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6]])
    targets = torch.tensor([[1], [0], [1], [0]])
    # Positives at ranks 1 and 3: (1/1 + 2/3) / 2.
    assert average_precision(scores, targets).item() == pytest.approx(5 / 6, abs=1e-15)


def test_ap_counts_tied_scores_as_one_block():
    scores = torch.tensor([[0.5], [0.5], [0.5], [0.5]])
    targets = torch.tensor([[1], [0], [1], [0]])
    # One block: recall 0 -> 1 at precision 1/2. Ranking positives first would give 1, last 5/12.
    assert average_precision(scores, targets).item() == pytest.approx(0.5, abs=1e-15)


def test_ap_with_a_tie_between_a_positive_and_a_negative_by_hand():
    scores = torch.tensor([[0.9], [0.5], [0.5], [0.1]])
    targets = torch.tensor([[0], [1], [0], [1]])
    # Blocks {0.9}: R 0; {0.5, 0.5}: P 1/3, R 1/2; {0.1}: P 2/4, R 1.
    assert average_precision(scores, targets).item() == pytest.approx(0.5 * 1 / 3 + 0.5 * 2 / 4, abs=1e-15)


def test_ap_is_nan_for_a_tag_without_positives():
    scores = torch.tensor([[0.9, 0.2], [0.1, 0.8]])
    targets = torch.tensor([[1, 0], [0, 0]])
    ap = average_precision(scores, targets)
    assert ap[0].item() == 1.0 and math.isnan(ap[1].item())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ap_matches_a_brute_force_reference_on_random_data_with_ties(seed):
    scores, targets = _random_problem(seed, n=60, c=6)
    ap = average_precision(scores, targets)
    for c in range(scores.shape[1]):
        expected = _reference_ap(scores[:, c].tolist(), targets[:, c].int().tolist())
        assert ap[c].item() == pytest.approx(expected, abs=1e-12)


def test_ap_does_not_depend_on_the_order_of_rows():
    scores, targets = _random_problem(5)
    perm = torch.randperm(scores.shape[0], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(average_precision(scores[perm], targets[perm]), average_precision(scores, targets))


def test_ap_is_the_same_when_tags_are_processed_in_many_small_blocks(monkeypatch):
    scores, targets = _random_problem(6)
    whole = average_precision(scores, targets)
    monkeypatch.setattr(evaluation, "_BLOCK_ELEMENTS", 2 * scores.shape[0])  # two tags per block
    torch.testing.assert_close(average_precision(scores, targets), whole)


def test_ap_accepts_any_real_scores_such_as_logits():
    logits = torch.tensor([[-3.0], [7.5], [0.0]])
    targets = torch.tensor([[0], [1], [1]])
    assert average_precision(logits, targets).item() == 1.0


# -- mean average precision and the label-prior baseline --------------------------------------------------


def test_map_of_a_perfect_scorer_is_one():
    _, targets = _random_problem(7)
    assert mean_average_precision(targets.float(), targets) == 1.0


def test_map_averages_only_over_tags_with_a_positive():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.8, 0.9, 0.2], [0.1, 0.5, 0.4]])
    targets = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 0]])
    # AP 1 and 1/3; the third tag has no positive and does not count as 0.
    assert mean_average_precision(scores, targets) == pytest.approx((1 + 1 / 3) / 2, abs=1e-15)


def test_label_prior_baseline_by_hand():
    targets = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]])
    # Positive rates 2/4 and 1/4; the tag without positives is left out.
    assert label_prior_map(targets) == pytest.approx((0.5 + 0.25) / 2, abs=1e-15)


def test_a_constant_scorer_gets_exactly_the_label_prior():
    _, targets = _random_problem(8)
    assert mean_average_precision(torch.zeros(targets.shape), targets) == pytest.approx(label_prior_map(targets), abs=1e-12)


def test_map_of_random_scores_is_near_the_label_prior_on_large_n():
    g = torch.Generator().manual_seed(9)
    targets = torch.rand(20_000, 20, generator=g) < torch.linspace(0.05, 0.5, 20)
    scores = torch.rand(targets.shape, generator=g)
    assert mean_average_precision(scores, targets) == pytest.approx(label_prior_map(targets), abs=0.01)


# -- precision, recall, F1 --------------------------------------------------------------------------------


def test_precision_recall_f1_by_hand_with_a_strict_greater_than():
    scores = torch.tensor([[0.5, 0.9], [0.7, 0.2], [0.3, 0.6], [0.8, 0.5]])
    targets = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0]])
    m = precision_recall_f1(scores, targets, 0.5)
    # Tag 0 predicts rows 1 and 3 (0.5 is not above 0.5): tp 1, fp 1, fn 1. Tag 1: rows 0 and 2, tp 2.
    torch.testing.assert_close(m.precision, torch.tensor([0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(m.recall, torch.tensor([0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(m.f1, torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert m.support.tolist() == [2, 2]
    assert (m.micro_precision, m.micro_recall, m.micro_f1) == pytest.approx((0.75, 0.75, 0.75))
    assert (m.macro_precision, m.macro_recall, m.macro_f1) == pytest.approx((0.75, 0.75, 0.75))


def test_per_tag_thresholds_apply_to_their_own_tag():
    scores = torch.tensor([[0.5, 0.5], [0.2, 0.2]])
    targets = torch.tensor([[1, 1], [0, 0]])
    m = precision_recall_f1(scores, targets, torch.tensor([0.4, 0.6]))
    assert m.recall.tolist() == [1.0, 0.0]


def test_zero_over_zero_counts_as_zero_and_tags_without_positives_stay_out_of_macro():
    scores = torch.tensor([[0.1, 0.9], [0.2, 0.1]])
    targets = torch.tensor([[1, 0], [0, 0]])
    m = precision_recall_f1(scores, targets, 0.5)
    # Tag 0 predicts nothing: precision 0/0 := 0. Tag 1 has no positive: recall 0/0 := 0, not in macro.
    assert m.precision.tolist() == [0.0, 0.0] and m.recall.tolist() == [0.0, 0.0] and m.f1.tolist() == [0.0, 0.0]
    assert (m.macro_precision, m.macro_recall, m.macro_f1) == (0.0, 0.0, 0.0)
    assert (m.micro_precision, m.micro_recall, m.micro_f1) == (0.0, 0.0, 0.0)


def test_a_float_threshold_decides_exactly_as_select_tags_does():
    score = torch.tensor([0.1], dtype=torch.float32)  # float32(0.1) is slightly above the double 0.1
    vocab = Vocabulary.from_embeddings(["cat"], F.normalize(torch.randn(1, 1, 8), dim=-1), name="t", version="1")
    (tags,) = select_tags(torch.logit(score)[None], vocab, threshold=0.1)
    m = precision_recall_f1(torch.sigmoid(torch.logit(score))[None], torch.tensor([[1]]), 0.1)
    assert (m.recall.item() == 1.0) == (tags.names == ["cat"])


# -- calibration ------------------------------------------------------------------------------------------


def test_calibration_finds_the_best_split_in_a_constructed_example():
    scores = torch.tensor([[0.9], [0.8], [0.6], [0.4], [0.3]], dtype=torch.float64)
    targets = torch.tensor([[1], [1], [0], [1], [0]])
    # Keeping the top 1..5 gives F1 1/2, 4/5, 2/3, 6/7, 3/4: the best keeps four, cut between 0.4 and 0.3.
    t = calibrate_thresholds(scores, targets)
    assert t.item() == (0.4 + 0.3) / 2
    assert precision_recall_f1(scores, targets, t).f1.item() == pytest.approx(6 / 7)


def test_calibration_cannot_split_tied_scores():
    scores = torch.tensor([[0.9], [0.5], [0.5], [0.1]])
    targets = torch.tensor([[0], [1], [0], [0]])
    # Keeping the positive alone is impossible; keeping its whole block (F1 1/2) is the best there is.
    t = calibrate_thresholds(scores, targets)
    assert t.item() == pytest.approx(0.3)
    assert (scores[:, 0] > t).tolist() == [True, True, True, False]


def test_calibration_prefers_the_higher_threshold_on_equal_f1():
    scores = torch.tensor([[0.9], [0.5], [0.5], [0.5], [0.1]])
    targets = torch.tensor([[1], [1], [0], [0], [0]])
    # Keeping the top one or the top four both give F1 2/3: keep fewer.
    assert calibrate_thresholds(scores, targets).item() == pytest.approx(0.7)


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_calibrated_f1_is_at_least_the_f1_at_one_half_for_every_tag(seed):
    scores, targets = _random_problem(seed)
    calibrated = precision_recall_f1(scores, targets, calibrate_thresholds(scores, targets)).f1
    at_half = precision_recall_f1(scores, targets, 0.5).f1
    assert (calibrated >= at_half).all()


@pytest.mark.parametrize("seed", [13, 14])
def test_calibrated_f1_equals_the_best_f1_over_every_possible_threshold(seed):
    scores, targets = _random_problem(seed, n=80, c=5)
    thresholds = calibrate_thresholds(scores, targets)
    for c in range(scores.shape[1]):
        column, truth = scores[:, c], targets[:, c]
        candidates = [0.0, 1.0, *column.unique().tolist()]  # `> s` for each score covers every split
        best = max(_f1(column > s, truth) for s in candidates)
        assert _f1(column > thresholds[c], truth) == pytest.approx(best, abs=1e-12)


def test_tags_without_positives_get_the_default_threshold():
    scores = torch.tensor([[0.9, 0.3], [0.2, 0.8]])
    targets = torch.tensor([[1, 0], [0, 0]])
    assert calibrate_thresholds(scores, targets, default=0.42)[1].item() == pytest.approx(0.42)


def test_calibrated_thresholds_stay_within_the_allowed_range():
    scores = torch.tensor([[0.05], [0.04], [0.95], [0.01]])
    targets = torch.tensor([[1], [1], [0], [0]])
    # Unconstrained the best cut is 0.025; it must not go below 0.1. Within [0.1, 0.9] only "nothing" or
    # "just the 0.95 negative" are possible.
    t = calibrate_thresholds(scores, targets, min_threshold=0.1, max_threshold=0.9)
    assert 0.1 <= t.item() <= 0.9
    assert calibrate_thresholds(scores, targets).item() == pytest.approx(0.025)


def test_adjacent_float32_scores_are_still_split_exactly():
    # Chosen so that their float64 midpoint rounds (ties to even) up to `high` in float32.
    low = torch.nextafter(torch.tensor(0.3, dtype=torch.float32), torch.tensor(1.0))
    high = torch.nextafter(low, torch.tensor(1.0))
    assert ((low.double() + high.double()) / 2).float() == high
    scores = torch.stack([high, low, torch.tensor(0.1)])[:, None]
    targets = torch.tensor([[1], [0], [0]])
    t = calibrate_thresholds(scores, targets)
    assert t.dtype == torch.float32
    assert (scores[:, 0] > t).tolist() == [True, False, False]


def test_precision_target_picks_the_lowest_threshold_reaching_it():
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4]], dtype=torch.float64)
    targets = torch.tensor([[1], [1], [0], [1], [1], [0]])
    # Precision keeping the top k: 1, 1, 2/3, 3/4, 4/5, 4/6. At least 3/4: keep five, cut at 0.45.
    t = calibrate_thresholds(scores, targets, metric="precision", target_precision=0.75)
    assert t.item() == (0.5 + 0.4) / 2


def test_an_unreachable_precision_target_falls_back_to_the_max_threshold():
    scores = torch.tensor([[0.9], [0.8]])
    targets = torch.tensor([[0], [1]])
    t = calibrate_thresholds(scores, targets, metric="precision", target_precision=1.0, max_threshold=0.85)
    assert t.item() == pytest.approx(0.85)


# -- errors -----------------------------------------------------------------------------------------------


def test_mismatched_shapes_are_refused_with_both_shapes_in_the_message():
    with pytest.raises(ValueError, match=r"scores \(3, 2\) and targets \(3, 4\) differ in shape"):
        average_precision(torch.rand(3, 2), torch.zeros(3, 4))


def test_one_dimensional_inputs_are_refused_with_a_hint():
    with pytest.raises(ValueError, match="unsqueeze"):
        mean_average_precision(torch.rand(5), torch.ones(5))


def test_a_map_with_no_positive_anywhere_is_refused():
    with pytest.raises(ValueError, match="no tag has a positive"):
        mean_average_precision(torch.rand(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="no tag has a positive"):
        label_prior_map(torch.zeros(3, 2))


def test_non_binary_targets_and_nan_scores_are_refused():
    with pytest.raises(ValueError, match="0/1"):
        average_precision(torch.rand(2, 2), torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="NaN"):
        average_precision(torch.tensor([[math.nan], [0.1]]), torch.tensor([[1], [0]]))


def test_a_threshold_per_tag_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="do not match 2 tags"):
        precision_recall_f1(torch.rand(3, 2), torch.ones(3, 2), torch.tensor([0.5, 0.5, 0.5]))


def test_a_precision_target_is_required_for_the_precision_metric():
    with pytest.raises(ValueError, match="target_precision"):
        calibrate_thresholds(torch.rand(3, 2), torch.ones(3, 2), metric="precision")
