"""Asymmetric loss (ASL, Ridnik et al. 2021) as RAM++ trains with it.

Tagging uses gamma_neg=7, gamma_pos=0, clip=0.05; image-text alignment gamma_neg=4. As the official
code, the result is the negative *sum* over all elements (not a mean), and the focusing weight is
computed without gradient.
"""

from __future__ import annotations

import torch
from torch import nn


class AsymmetricLoss(nn.Module):
    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8) -> None:
        super().__init__()
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.eps = eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.dtype)
        p = torch.sigmoid(logits)
        p_neg = 1 - p
        if self.clip > 0:
            # Probability shifting: easy negatives (p < clip) stop contributing at all.
            p_neg = (p_neg + self.clip).clamp(max=1)
        loss = targets * torch.log(p.clamp(min=self.eps)) + (1 - targets) * torch.log(p_neg.clamp(min=self.eps))
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            with torch.no_grad():
                pt = p * targets + p_neg * (1 - targets)
                gamma = self.gamma_pos * targets + self.gamma_neg * (1 - targets)
                weight = torch.pow(1 - pt, gamma)
            loss = loss * weight
        return -loss.sum()


def tagging_loss() -> AsymmetricLoss:
    return AsymmetricLoss(gamma_neg=7, gamma_pos=0, clip=0.05)


def alignment_loss() -> AsymmetricLoss:
    return AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05)
