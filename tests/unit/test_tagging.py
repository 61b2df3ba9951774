"""From logits to tags: thresholds, ordering, top-k, all scores; the Tagger end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ramplus_core
from helpers import random_images
from ramplus_core import Tagger, Vocabulary, select_tags


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.fixture()
def vocab():
    emb = F.normalize(torch.randn(4, 2, 512), dim=-1)
    return Vocabulary.from_embeddings(["cat", "dog", "sofa", "sky"], emb, thresholds=[0.6, 0.6, 0.9, 0.5], name="pets", version="3")


def test_tags_above_their_own_thresholds_score_descending(vocab):
    logits = torch.tensor([[_logit(0.7), _logit(0.95), _logit(0.85), _logit(0.5)]])
    (result,) = select_tags(logits, vocab)
    assert result.names == ["dog", "cat"]  # sofa under its 0.9, sky equal to 0.5 is not above it
    assert result.tags[0].score == pytest.approx(0.95)
    assert result.vocab == "pets@3"
    assert result.scores is None


def test_a_global_threshold_and_top_k(vocab):
    logits = torch.tensor([[_logit(0.7), _logit(0.95), _logit(0.85), _logit(0.2)]])
    (result,) = select_tags(logits, vocab, threshold=0.3, top_k=2)
    assert result.names == ["dog", "sofa"]


def test_all_scores_on_request(vocab):
    (result,) = select_tags(torch.zeros(1, 4), vocab, all_scores=True)
    assert result.scores == {"cat": 0.5, "dog": 0.5, "sofa": 0.5, "sky": 0.5}


def test_logits_of_another_vocabulary_are_refused(vocab):
    with pytest.raises(ValueError, match="do not match a vocabulary of 4 tags"):
        select_tags(torch.zeros(1, 3), vocab)


def test_tagger_closed_and_open_set_through_the_same_call(tiny_official_checkpoint, vocab):
    model = ramplus_core.load_checkpoint(tiny_official_checkpoint)
    tagger = Tagger(model, batch_size=2)
    images = random_images(3)
    closed = tagger.tag(images, threshold=0.0, all_scores=True)
    assert [len(r.scores) for r in closed] == [7, 7, 7]
    opened = tagger.tag(images, vocabulary=vocab, threshold=0.0)
    assert all(r.vocab == "pets@3" and len(r.tags) == 4 for r in opened)
    # the same scores as the raw model
    with torch.inference_mode():
        raw = torch.sigmoid(model.tag_logits(ramplus_core.preprocess(images, 64), vocab))
    assert [t.score for t in opened[0].tags] == pytest.approx(sorted(raw[0].tolist(), reverse=True), abs=1e-6)


def test_bf16_weights_stay_close_to_fp32(tiny_official_checkpoint):
    images = random_images(2, seed=4)
    fp32 = Tagger(ramplus_core.load_checkpoint(tiny_official_checkpoint)).logits(images)
    bf16_tagger = Tagger(ramplus_core.load_checkpoint(tiny_official_checkpoint), precision="bf16")
    assert bf16_tagger.model.vocabulary is not None
    assert next(bf16_tagger.model.parameters()).dtype == torch.bfloat16
    bf16 = bf16_tagger.logits(images)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 0.25 * fp32.abs().max()


def reference_select(logits, vocabulary, *, threshold=None, top_k=None):
    """The per-image loop `select_tags` was until issue 16, kept here as the specification it must equal."""
    scores = torch.sigmoid(logits.float())
    limits = vocabulary.thresholds if threshold is None else torch.full((len(vocabulary),), float(threshold))
    out = []
    for row in scores:
        hits = (row > limits).nonzero().flatten()
        order = hits[row[hits].argsort(descending=True, stable=True)]
        if top_k is not None:
            order = order[:top_k]
        out.append(([vocabulary.tags[i] for i in order.tolist()], [float(row[i]) for i in order.tolist()]))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("options", [{}, {"threshold": 0.3}, {"top_k": 5}, {"threshold": 0.05, "top_k": 40}, {"threshold": 0.999}])
def test_vectorised_selection_equals_the_per_image_loop_ties_included(seed, options):
    gen = torch.Generator().manual_seed(seed)
    tags = 300
    thresholds = torch.rand(tags, generator=gen) * 0.8 + 0.1
    vocabulary = Vocabulary.from_embeddings(
        [f"t{i}" for i in range(tags)], F.normalize(torch.randn(tags, 1, 8, generator=gen), dim=-1), thresholds=thresholds.tolist(),
    )
    logits = torch.randn(7, tags, generator=gen) * 2
    # ties: whole columns and runs within a row share one logit; one row has no hit at all
    logits[:, 10:20] = 1.5
    logits[2, 100:160] = logits[2, 99]
    logits[4] = -20.0
    got = select_tags(logits, vocabulary, all_scores=True, **options)
    expected = reference_select(logits, vocabulary, **options)
    assert [(g.names, g.values) for g in got] == expected
    every = torch.sigmoid(logits).tolist()
    assert all(g.all_scores == row and list(g.scores) == vocabulary.tags for g, row in zip(got, every))
    assert got[4].names == [] or options.get("threshold") == 0.05


def test_selection_is_plain_lists_and_a_zero_hit_batch_costs_no_sort(vocab):
    (none,) = select_tags(torch.full((1, 4), -30.0), vocab)
    assert none.names == [] and none.values == [] and none.tags == []
    with pytest.raises(ValueError, match="top_k"):
        select_tags(torch.zeros(1, 4), vocab, top_k=0)
