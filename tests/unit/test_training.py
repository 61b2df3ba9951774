"""The training step's pieces: targets, losses that learn, the optimizer's groups and the schedule."""

from __future__ import annotations

import pytest
import torch

from helpers import make_tiny_model
from ramplus_core.training import (
    LossWeights,
    RamPlusTraining,
    build_optimizer,
    caption_targets,
    tag_targets,
    warmup_cosine,
)


def test_targets_mark_each_images_tags_and_every_caption_it_shares():
    t = tag_targets([["a", "c"], ["b", "zzz"]], ["a", "b", "c"])
    assert t.tolist() == [[1, 0, 1], [0, 1, 0]]
    c = caption_targets([["red circle", "a red circle"], ["red circle"], ["blue star"]], ["red circle", "red circle", "blue star"])
    assert c.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_a_few_steps_on_one_batch_lower_every_loss_term():
    torch.manual_seed(0)
    model = make_tiny_model(num_tags=6).train()
    step = RamPlusTraining(model, model.vocabulary, LossWeights(distill=1.0))
    images = torch.randn(4, 3, 64, 64)
    target = (torch.rand(4, 6) > 0.5).float()
    captions = torch.nn.functional.normalize(torch.randn(4, 512), dim=-1)
    teacher = torch.randn(4, 512)
    opt = build_optimizer(model, lr=5e-4)
    first = None
    for _ in range(101):  # a plateau first (all tags look alike at init), then it memorises the batch
        out = step(images, target, captions, torch.eye(4), teacher)
        first = first or {k: float(v.detach()) for k, v in out.items() if k != "tag_logits"}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    last = {k: float(v.detach()) for k, v in out.items() if k != "tag_logits"}
    for term, ratio in (("tag", 0.3), ("text", 0.6), ("distill", 0.95), ("loss", 0.3)):
        assert last[term] < ratio * first[term], (term, first[term], last[term])
    assert out["tag_logits"].shape == (4, 6) and not out["tag_logits"].requires_grad


def test_text_and_distill_terms_are_off_without_their_inputs():
    model = make_tiny_model(num_tags=3)
    step = RamPlusTraining(model, model.vocabulary, LossWeights(distill=1.0))
    out = step(torch.randn(2, 3, 64, 64), torch.zeros(2, 3))
    assert set(out) == {"tag", "loss", "tag_logits"} and torch.equal(out["loss"], out["tag"])
    with pytest.raises(ValueError, match="caption_target"):
        step(torch.randn(2, 3, 64, 64), torch.zeros(2, 3), torch.randn(2, 512))


def test_description_embeddings_made_under_inference_mode_can_train_and_follow_the_model_dtype():
    model = make_tiny_model(num_tags=3)
    with torch.inference_mode():
        emb = torch.nn.functional.normalize(torch.randn(3, 2, 512), dim=-1)
    from ramplus_core import Vocabulary

    step = RamPlusTraining(model, Vocabulary.from_embeddings(["a", "b", "c"], emb))
    step(torch.randn(2, 3, 64, 64), torch.ones(2, 3))["loss"].backward()
    assert model.fc.weight.grad is not None
    step.double()
    assert step.vocab_tensors().embeddings.dtype == torch.float64


def test_no_weight_decay_on_biases_norms_and_the_reweighting_scale():
    model = make_tiny_model()
    decay, no_decay = build_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert "reweight_scale" in {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0


def test_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=14, min_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)
