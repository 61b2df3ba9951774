"""The training step's pieces: targets, losses that learn, the optimizer's groups and the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_tiny_model
from ramplus_core.training import (
    LossWeights,
    RamPlusTraining,
    build_optimizer,
    caption_targets,
    tag_targets,
    StepOptions,
    WarmupCosine,
    fused_for,
    prepare_step,
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


def _groups(optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


def test_no_weight_decay_on_biases_norms_and_the_reweighting_scale():
    model = make_tiny_model()
    groups = _groups(build_optimizer(model, lr=1e-3, weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    assert "reweight_scale" in {names[id(p)] for p in groups["head.no_decay"]["params"]}
    for name in ("head.decay", "encoder.decay"):
        assert all(p.ndim >= 2 for p in groups[name]["params"]) and groups[name]["weight_decay"] == 0.1
    assert groups["head.no_decay"]["weight_decay"] == groups["encoder.no_decay"]["weight_decay"] == 0
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each parameter exactly once


def test_the_encoder_can_learn_slower_than_the_head_or_not_at_all():
    model = make_tiny_model()
    encoder = {id(p) for p in model.image_encoder.parameters()}
    groups = _groups(build_optimizer(model, lr=1e-3, encoder_lr_scale=0.1))
    assert {id(p) for g in ("encoder.decay", "encoder.no_decay") for p in groups[g]["params"]} == encoder
    assert groups["encoder.decay"]["lr"] == pytest.approx(1e-4) and groups["head.decay"]["lr"] == pytest.approx(1e-3)
    sched = warmup_cosine(build_optimizer(model, lr=1e-3, encoder_lr_scale=0.1), warmup_steps=2, total_steps=10)
    assert sched.get_last_lr()[0] / sched.get_last_lr()[2] == pytest.approx(10)  # the schedule keeps the ratio

    frozen = make_tiny_model()
    before = {n: p.detach().clone() for n, p in frozen.image_encoder.named_parameters()}
    opt = build_optimizer(frozen, lr=1e-2, freeze_encoder=True)
    assert set(_groups(opt)) == {"head.decay", "head.no_decay"}
    step = RamPlusTraining(frozen, frozen.vocabulary)
    for _ in range(3):
        opt.zero_grad()
        step(torch.randn(2, 3, 64, 64), torch.ones(2, len(frozen.vocabulary.tags)))["loss"].backward()
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in frozen.image_encoder.named_parameters())
    assert not torch.equal(frozen.fc.weight, make_tiny_model().fc.weight)
    with pytest.raises(ValueError, match="freeze_encoder"):
        build_optimizer(model, lr=1e-3, encoder_lr_scale=0)


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


def test_with_a_time_budget_the_cosine_ends_when_the_time_does():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=1000, min_ratio=0.1, budget_s=60.0)
    lrs = []
    for second in range(0, 61, 10):  # 7 steps, far fewer than total_steps: time runs out first
        sched.step(float(second))
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1.0)  # the end of the warmup
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[3] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # 30 of 60 s: half way
    assert lrs[-1] == pytest.approx(0.1)
    # without seconds (or with a budget far away) the steps drive it, as before
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    steps_only = warmup_cosine(opt2, warmup_steps=2, total_steps=12, min_ratio=0.1, budget_s=1e9)
    for _ in range(12):
        steps_only.step(1.0)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)


def test_the_schedule_resumes_where_it_stopped_also_from_an_older_checkpoint():
    def fresh() -> tuple[torch.optim.Optimizer, WarmupCosine]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, warmup_cosine(opt, warmup_steps=2, total_steps=100, budget_s=100.0)

    opt, sched = fresh()
    for s in range(1, 31):
        sched.step(float(s))
    opt2, sched2 = fresh()
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"]) and sched2.progress() == pytest.approx(0.3)
    sched2.step(5.0)  # a resumed attempt's clock restarts low: seconds never go back
    assert sched2.seconds == 30.0
    opt3, sched3 = fresh()
    sched3.load_state_dict({"last_epoch": 40, "base_lrs": [1.0], "_step_count": 41})  # what LambdaLR saved
    assert sched3.steps == 40 and sched3.progress() == pytest.approx(38 / 98)


@pytest.mark.parametrize("options", [
    StepOptions(channels_last=True), StepOptions(grad_checkpointing=True), StepOptions(fused_optimizer=True),
    StepOptions(channels_last=True, grad_checkpointing=True),
], ids=["channels_last", "grad_checkpointing", "fused", "both"])
def test_step_options_change_the_speed_not_the_step(options):
    """Same loss and the same weights after two steps as the plain step (up to float rounding)."""

    def two_steps(opts: StepOptions) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = make_tiny_model(num_tags=5).train()
        step = RamPlusTraining(model, model.vocabulary)
        prepare_step(step, opts)
        optimizer = build_optimizer(model, lr=1e-3, fused=fused_for(model, opts.fused_optimizer))
        images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        if opts.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        losses, first_grads = [], {}
        for _ in range(2):
            out = step(images, torch.eye(4, 5), torch.nn.functional.normalize(torch.randn(4, 512), dim=-1), torch.eye(4))
            optimizer.zero_grad()
            out["loss"].backward()
            # Gradients that are zero by symmetry (attention key biases; queries and keys of a one-token
            # window, where softmax is 1 whatever they are) come out as rounding noise (~1e-10), which Adam,
            # dividing by sqrt(v), turns into steps of lr with an arbitrary sign: both runs zero them.
            for name, p in model.named_parameters():
                if p.grad is not None:
                    p.grad.masked_fill_(p.grad.abs() < 1e-7, 0.0)
                    first_grads.setdefault(name, p.grad.detach().clone())
            optimizer.step()
            losses.append(float(out["loss"].detach()))
        return losses, first_grads, {k: v.detach().clone() for k, v in model.state_dict().items()}

    plain_losses, plain_grads, plain = two_steps(StepOptions())
    losses, grads, weights = two_steps(options)
    assert losses == pytest.approx(plain_losses, rel=1e-4)
    # The options must not change the gradient: same step, computed another way (up to float rounding).
    assert plain_grads.keys() == grads.keys()
    off = {k: float((grads[k] - plain_grads[k]).abs().max()) for k in grads
           if not torch.allclose(grads[k], plain_grads[k], rtol=1e-3, atol=1e-6)}
    assert not off, off
    if not (options.channels_last or options.grad_checkpointing):
        # Same gradients bit for bit: the fused optimizer must then give the same weights. (With another
        # layout, a gradient of 1e-6 may round to the other sign, and Adam's first step is lr * sign(g)
        # whatever |g|: weights may then differ by lr where the gradients agree to 1e-6; one machine's CPU
        # showed it, CI's did not. Gradients and losses above are the invariant there.)
        differ = {k: float((weights[k] - plain[k]).abs().max()) for k in plain if not torch.allclose(weights[k], plain[k], atol=1e-5)}
        assert not differ, differ
