"""The alignment decoder: cross-attention-only transformer layers from tag queries to image tokens.

Each layer is the official BERT layer with its self-attention deleted (Query2Label style): tag queries
attend to the image tokens and never to each other, so a tag's logit does not depend on which other tags
are in the vocabulary and the cost is linear in the number of tags. Post-LN with eps 1e-12 and exact GELU,
as the official `q2l_config`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention whose keys and values come from another sequence."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, t, d = queries.shape
        q = self._heads(self.q_proj(queries))
        k = self._heads(self.k_proj(memory))
        v = self._heads(self.v_proj(memory))
        # The official encoder mask is all ones (every image token is valid), i.e. no mask at all.
        context = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(context.transpose(1, 2).reshape(b, t, d))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, kv_dim: int, num_heads: int, ffn_dim: int, ln_eps: float) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(dim, kv_dim, num_heads)
        self.attn_norm = nn.LayerNorm(dim, eps=ln_eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=ln_eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(self.cross_attn(x, memory) + x)
        return self.ffn_norm(self.fc2(F.gelu(self.fc1(x))) + x)


class AlignmentDecoder(nn.Module):
    def __init__(self, dim: int, kv_dim: int, num_layers: int, num_heads: int, ffn_dim: int, ln_eps: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(dim, kv_dim, num_heads, ffn_dim, ln_eps) for _ in range(num_layers)
        )

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = queries
        for layer in self.layers:
            x = layer(x, image_embeds)
        return x
