"""ASL as the official code computes it."""

from __future__ import annotations

import math

import torch

from ramplus_core.losses import AsymmetricLoss, tagging_loss


def test_single_positive_and_negative_by_hand():
    loss = AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05)
    logit = torch.tensor([[0.3, -0.2]])
    target = torch.tensor([[1.0, 0.0]])
    p = 1 / (1 + math.exp(-0.3))
    q = 1 / (1 + math.exp(0.2))
    pos = math.log(p)
    neg_p = min(1 - q + 0.05, 1.0)
    neg = math.log(neg_p) * (1 - neg_p) ** 4
    assert abs(loss(logit, target).item() + pos + neg) < 1e-6


def test_easy_negatives_below_the_clip_cost_nothing():
    loss = tagging_loss()
    assert loss(torch.tensor([[-8.0]]), torch.tensor([[0.0]])).item() == 0.0


def test_it_is_a_sum_and_gradients_flow():
    loss = tagging_loss()
    logits = torch.randn(4, 10, requires_grad=True)
    targets = (torch.rand(4, 10) > 0.7).float()
    total = loss(logits, targets)
    halves = loss(logits[:2], targets[:2]) + loss(logits[2:], targets[2:])
    torch.testing.assert_close(total, halves)
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
