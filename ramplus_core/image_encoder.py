"""The image encoder: timm's Swin Transformer, returning the token sequence RAM++ attends to."""

from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from torch import nn

from ramplus_core.configs import ModelConfig


class SwinImageEncoder(nn.Module):
    """timm Swin without a classifier; `forward` gives [B, 1 + H*W, C] with the mean token first.

    The mean token is the plain average of the final-normed tokens, as the official encoder computes it
    (AdaptiveAvgPool1d), and precedes the row-major grid tokens.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swin = SwinTransformer(
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=3,
            num_classes=0,
            embed_dim=config.embed_dim,
            depths=config.depths,
            num_heads=config.num_heads,
            window_size=config.window_size,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=True,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=0.0,
        )
        self.width = config.vision_width

    def set_fused_attention(self, enabled: bool) -> None:
        """Use `scaled_dot_product_attention` in the windows (faster on GPUs, not bit-identical)."""
        for module in self.swin.modules():
            if isinstance(module, WindowAttention):
                module.fused_attn = enabled

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each Swin stage's activations in the backward pass instead of keeping them (training:
        less memory, so larger batches, for about a third more compute)."""
        self.swin.set_grad_checkpointing(enabled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.swin.forward_features(images).flatten(1, 2)  # NHWC -> [B, HW, C], row-major
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
