"""Test oracle: a literal, plain-PyTorch re-statement of the official RAM++ inference math.

Written from ``/work/shared/docs/ramplus-reference.md`` (sections 2, 3, 4, 5, 8), which describes the
official ``xinyu1205/recognize-anything`` implementation (``RAM_plus.generate_tag`` on top of the vendored
Microsoft Swin Transformer and the vendored BERT ``tagging_head``).

This module is deliberately independent of ``ramplus_core``: it must never import it.  It works purely
functionally over a state dict whose keys and shapes are exactly those of the official
``RAM_plus(...).state_dict()``:

* :func:`make_official_state_dict` builds such a state dict with random (seeded) values,
* :func:`official_image_tokens` is the vendored Swin forward (``visual_encoder(image)`` -> ``[B, 1+HW, C]``),
* :func:`official_tag_logits` is ``generate_tag`` up to (and including) ``fc(...).squeeze(-1)``,
* :func:`official_transform` is ``ram/transform.py::get_transform`` applied to a list of PIL images.

Everything is fp32 and follows the official operation order where that order is observable in fp32
(q pre-scaling in Swin, division after QK^T in BERT, ``(exp(s) * cls) @ E^T``, multiply-then-sum reweighting).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "PATCH_SIZE",
    "MLP_RATIO",
    "TEXT_WIDTH",
    "HIDDEN_SIZE",
    "INTERMEDIATE_SIZE",
    "NUM_HEAD_LAYERS",
    "NUM_HEAD_HEADS",
    "SWIN_LN_EPS",
    "BERT_LN_EPS",
    "SHIFT_MASK_VALUE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFICIAL_VARIANTS",
    "TINY_GEOMETRY",
    "swin_geometry",
    "stage_layout",
    "relative_position_index",
    "shifted_window_attn_mask",
    "official_state_dict_spec",
    "make_official_state_dict",
    "official_image_tokens",
    "official_reweighted_label_embed",
    "official_tagging_head",
    "official_tag_logits",
    "official_transform",
]

# --------------------------------------------------------------------------------------------------
# Constants (reference doc sections 2-5)
# --------------------------------------------------------------------------------------------------
PATCH_SIZE = 4
MLP_RATIO = 4
TEXT_WIDTH = 512          # CLIP text width == label_embed width == image_proj output == encoder_width
HIDDEN_SIZE = 768         # q2l_config hidden_size
INTERMEDIATE_SIZE = 3072  # q2l_config intermediate_size
NUM_HEAD_LAYERS = 2       # q2l_config num_hidden_layers
NUM_HEAD_HEADS = 4        # q2l_config num_attention_heads (head dim 192)
SWIN_LN_EPS = 1e-5
BERT_LN_EPS = 1e-12
SHIFT_MASK_VALUE = -100.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SWIN_L = {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48]}
_SWIN_B = {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]}

OFFICIAL_VARIANTS: dict[str, dict[str, Any]] = {
    "swin_l@384": {**_SWIN_L, "window_size": 12, "image_size": 384},
    "swin_l@224": {**_SWIN_L, "window_size": 7, "image_size": 224},
    "swin_b@384": {**_SWIN_B, "window_size": 12, "image_size": 384},
    "swin_b@224": {**_SWIN_B, "window_size": 7, "image_size": 224},
}

# Tiny geometry for fast tests.  Token grids per stage: 16 / 8 / 4 / 2 with window 4, so
#   stage 0: grid 16 > 4 -> window 4, shift 2, 16 windows, attn_mask on block 1
#   stage 1: grid  8 > 4 -> window 4, shift 2,  4 windows, attn_mask on block 1
#   stage 2: grid  4 <= 4 -> window 4, shift 0 (no mask)
#   stage 3: grid  2 <= 4 -> window clamped to 2 (3x3=9-row bias table), shift 0 (no mask)
TINY_GEOMETRY: dict[str, Any] = {
    "embed_dim": 32,
    "depths": [2, 2, 2, 2],
    "num_heads": [1, 2, 4, 8],
    "window_size": 4,
    "image_size": 64,
}


def swin_geometry(variant: str) -> dict[str, Any]:
    """Geometry kwargs for an official variant name ("swin_l@384", ...) or "tiny"; returns a fresh copy."""
    if variant == "tiny":
        src = TINY_GEOMETRY
    else:
        try:
            src = OFFICIAL_VARIANTS[variant]
        except KeyError:
            raise KeyError(f"unknown variant {variant!r}; known: {sorted(OFFICIAL_VARIANTS)} + ['tiny']") from None
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in src.items()}


def stage_layout(*, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int,
                 image_size: int) -> list[dict[str, int]]:
    """Per-stage facts of the vendored Microsoft Swin (old layout).

    For stage i: dim = embed_dim * 2**i, grid = image_size // 4 // 2**i, and the official block rule
    ``if min(input_resolution) <= window_size: shift_size = 0; window_size = min(input_resolution)``
    (applied identically to every block of the stage; odd blocks otherwise get shift = window // 2).
    """
    if len(depths) != len(num_heads):
        raise ValueError("depths and num_heads must have the same length")
    if image_size % PATCH_SIZE:
        raise ValueError("image_size must be a multiple of the patch size")
    grid0 = image_size // PATCH_SIZE
    out = []
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim = embed_dim * 2 ** i
        grid = grid0 // 2 ** i
        if grid * 2 ** i != grid0:
            raise ValueError(f"token grid {grid0} not divisible by 2**{i}")
        if grid <= window_size:
            win, shift = grid, 0
        else:
            win, shift = window_size, window_size // 2
        if grid % win:
            raise ValueError(f"stage {i}: grid {grid} is not a multiple of window {win} (no padding in the official code)")
        if dim % heads:
            raise ValueError(f"stage {i}: dim {dim} not divisible by heads {heads}")
        out.append({
            "dim": dim, "depth": depth, "heads": heads, "grid": grid, "window": win, "shift": shift,
            "num_windows": (grid // win) ** 2, "has_downsample": int(i < len(depths) - 1),
        })
    return out


# --------------------------------------------------------------------------------------------------
# Swin buffers, computed "the Swin way"
# --------------------------------------------------------------------------------------------------
def relative_position_index(window: int) -> torch.Tensor:
    """[w*w, w*w] int64: index into the (2w-1)^2-row relative bias table (Microsoft Swin formula)."""
    coords_h = torch.arange(window)
    coords_w = torch.arange(window)
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"))      # 2, Wh, Ww
    coords_flat = torch.flatten(coords, 1)                                      # 2, Wh*Ww
    rel = coords_flat[:, :, None] - coords_flat[:, None, :]                     # 2, N, N
    rel = rel.permute(1, 2, 0).contiguous()                                     # N, N, 2
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    return rel.sum(-1).to(torch.int64)


def _window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, window, window, C] (windows in row-major window order)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window, window, c)


def _window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """[B * nW, window, window, C] -> [B, H, W, C]."""
    b = int(windows.shape[0] / (h * w / window / window))
    x = windows.view(b, h // window, w // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def shifted_window_attn_mask(grid: int, window: int, shift: int) -> torch.Tensor:
    """[nW, w*w, w*w] float32 shift mask with -100.0 between tokens of different regions, else 0.0."""
    img_mask = torch.zeros((1, grid, grid, 1))
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    cnt = 0
    for hs in slices:
        for ws in slices:
            img_mask[:, hs, ws, :] = cnt
            cnt += 1
    mask_windows = _window_partition(img_mask, window).view(-1, window * window)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    attn_mask = attn_mask.masked_fill(attn_mask != 0, float(SHIFT_MASK_VALUE)).masked_fill(attn_mask == 0, float(0.0))
    return attn_mask


# --------------------------------------------------------------------------------------------------
# State dict: key set, shapes, random values
# --------------------------------------------------------------------------------------------------
_KIND_LINEAR_W = "linear_w"
_KIND_BIAS = "bias"
_KIND_LN_W = "ln_w"
_KIND_LN_B = "ln_b"
_KIND_CONV_W = "conv_w"
_KIND_REL_TABLE = "rel_table"
_KIND_REL_INDEX = "rel_index"
_KIND_ATTN_MASK = "attn_mask"
_KIND_LABEL_EMBED = "label_embed"
_KIND_REWEIGHT = "reweight_scale"


def _spec_entries(*, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int,
                  image_size: int, num_tags: int, descriptions_per_tag: int = 51):
    """Yield (key, shape, dtype, kind, extra) in the order the official ``state_dict()`` lists them.

    Order follows nn.Module.state_dict(): a module's own params/buffers first (registration order), then
    children in registration order.  RAM_plus registers visual_encoder, tagging_head, label_embed,
    wordvec_proj, fc, image_proj, reweight_scale, so its own params label_embed/reweight_scale come first.
    """
    f32, i64 = torch.float32, torch.int64
    stages = stage_layout(embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                          image_size=image_size)

    yield "label_embed", (num_tags * descriptions_per_tag, TEXT_WIDTH), f32, _KIND_LABEL_EMBED, None
    yield "reweight_scale", (), f32, _KIND_REWEIGHT, None

    ve = "visual_encoder."
    yield ve + "patch_embed.proj.weight", (embed_dim, 3, PATCH_SIZE, PATCH_SIZE), f32, _KIND_CONV_W, 3 * PATCH_SIZE ** 2
    yield ve + "patch_embed.proj.bias", (embed_dim,), f32, _KIND_BIAS, None
    yield ve + "patch_embed.norm.weight", (embed_dim,), f32, _KIND_LN_W, None
    yield ve + "patch_embed.norm.bias", (embed_dim,), f32, _KIND_LN_B, None
    for i, st in enumerate(stages):
        c, h, w = st["dim"], st["heads"], st["window"]
        for j in range(st["depth"]):
            p = f"{ve}layers.{i}.blocks.{j}."
            if st["shift"] > 0 and j % 2 == 1:
                # block's own (persistent) buffer -> listed before its children
                yield p + "attn_mask", (st["num_windows"], w * w, w * w), f32, _KIND_ATTN_MASK, (st["grid"], w, st["shift"])
            yield p + "norm1.weight", (c,), f32, _KIND_LN_W, None
            yield p + "norm1.bias", (c,), f32, _KIND_LN_B, None
            yield p + "attn.relative_position_bias_table", ((2 * w - 1) ** 2, h), f32, _KIND_REL_TABLE, None
            yield p + "attn.relative_position_index", (w * w, w * w), i64, _KIND_REL_INDEX, w
            yield p + "attn.qkv.weight", (3 * c, c), f32, _KIND_LINEAR_W, c
            yield p + "attn.qkv.bias", (3 * c,), f32, _KIND_BIAS, None
            yield p + "attn.proj.weight", (c, c), f32, _KIND_LINEAR_W, c
            yield p + "attn.proj.bias", (c,), f32, _KIND_BIAS, None
            yield p + "norm2.weight", (c,), f32, _KIND_LN_W, None
            yield p + "norm2.bias", (c,), f32, _KIND_LN_B, None
            yield p + "mlp.fc1.weight", (MLP_RATIO * c, c), f32, _KIND_LINEAR_W, c
            yield p + "mlp.fc1.bias", (MLP_RATIO * c,), f32, _KIND_BIAS, None
            yield p + "mlp.fc2.weight", (c, MLP_RATIO * c), f32, _KIND_LINEAR_W, MLP_RATIO * c
            yield p + "mlp.fc2.bias", (c,), f32, _KIND_BIAS, None
        if st["has_downsample"]:
            p = f"{ve}layers.{i}.downsample."
            # PatchMerging registers `reduction` before `norm`
            yield p + "reduction.weight", (2 * c, 4 * c), f32, _KIND_LINEAR_W, 4 * c
            yield p + "norm.weight", (4 * c,), f32, _KIND_LN_W, None
            yield p + "norm.bias", (4 * c,), f32, _KIND_LN_B, None
    c_last = stages[-1]["dim"]
    yield ve + "norm.weight", (c_last,), f32, _KIND_LN_W, None
    yield ve + "norm.bias", (c_last,), f32, _KIND_LN_B, None

    for layer in range(NUM_HEAD_LAYERS):
        p = f"tagging_head.encoder.layer.{layer}."
        for name, out_f, in_f in (
            ("crossattention.self.query", HIDDEN_SIZE, HIDDEN_SIZE),
            ("crossattention.self.key", HIDDEN_SIZE, TEXT_WIDTH),
            ("crossattention.self.value", HIDDEN_SIZE, TEXT_WIDTH),
            ("crossattention.output.dense", HIDDEN_SIZE, HIDDEN_SIZE),
        ):
            yield p + name + ".weight", (out_f, in_f), f32, _KIND_LINEAR_W, in_f
            yield p + name + ".bias", (out_f,), f32, _KIND_BIAS, None
        yield p + "crossattention.output.LayerNorm.weight", (HIDDEN_SIZE,), f32, _KIND_LN_W, None
        yield p + "crossattention.output.LayerNorm.bias", (HIDDEN_SIZE,), f32, _KIND_LN_B, None
        yield p + "intermediate.dense.weight", (INTERMEDIATE_SIZE, HIDDEN_SIZE), f32, _KIND_LINEAR_W, HIDDEN_SIZE
        yield p + "intermediate.dense.bias", (INTERMEDIATE_SIZE,), f32, _KIND_BIAS, None
        yield p + "output.dense.weight", (HIDDEN_SIZE, INTERMEDIATE_SIZE), f32, _KIND_LINEAR_W, INTERMEDIATE_SIZE
        yield p + "output.dense.bias", (HIDDEN_SIZE,), f32, _KIND_BIAS, None
        yield p + "output.LayerNorm.weight", (HIDDEN_SIZE,), f32, _KIND_LN_W, None
        yield p + "output.LayerNorm.bias", (HIDDEN_SIZE,), f32, _KIND_LN_B, None

    # wordvec_proj's inputs are convex combinations of unit vectors (norm < 1), so it gets a larger gain
    # (see make_official_state_dict); tagged "wordvec" instead of a fan-in.
    yield "wordvec_proj.weight", (HIDDEN_SIZE, TEXT_WIDTH), f32, _KIND_LINEAR_W, "wordvec"
    yield "wordvec_proj.bias", (HIDDEN_SIZE,), f32, _KIND_BIAS, None
    yield "fc.weight", (1, HIDDEN_SIZE), f32, _KIND_LINEAR_W, HIDDEN_SIZE
    yield "fc.bias", (1,), f32, _KIND_BIAS, None
    yield "image_proj.weight", (TEXT_WIDTH, c_last), f32, _KIND_LINEAR_W, c_last
    yield "image_proj.bias", (TEXT_WIDTH,), f32, _KIND_BIAS, None


def official_state_dict_spec(*, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int,
                             image_size: int, num_tags: int,
                             descriptions_per_tag: int = 51) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of the official ``RAM_plus(...).state_dict()``, without allocating tensors."""
    return {k: (tuple(shape), dtype) for k, shape, dtype, _, _ in _spec_entries(
        embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size, image_size=image_size,
        num_tags=num_tags, descriptions_per_tag=descriptions_per_tag)}


def make_official_state_dict(*, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int,
                             image_size: int, num_tags: int, descriptions_per_tag: int = 51,
                             seed: int = 0) -> dict[str, torch.Tensor]:
    """Random state dict with exactly the official key set, shapes and dtypes (fp32; int64 index buffers).

    Value scales (chosen so every layer has O(1), non-degenerate activations and a wrong key mapping,
    e.g. swapped key/value or swapped layers, changes the logits visibly):
      * Linear / conv weights ~ N(0, 1/fan_in) (LeCun), except wordvec_proj.weight ~ N(0, 1.5^2): its inputs
        are convex combinations of unit vectors (norm ~0.8, entries ~0.035), so this keeps relu(wordvec_proj)
        at O(1) and clearly tag-dependent;
      * biases ~ N(0, 0.05^2); LayerNorm weight ~ 1 + N(0, 0.1^2), bias ~ N(0, 0.1^2);
      * relative_position_bias_table ~ N(0, 0.1^2) (larger than the 0.02 trunc-normal init so the bias
        gather is clearly observable);
      * label_embed: per tag a random centre plus per-description noise, rows L2-normalised (descriptions of
        one tag are correlated, like CLIP text embeddings, so the reweighted vector is not ~0);
      * reweight_scale = log(1/0.07) (the official init value);
      * relative_position_index / attn_mask: computed exactly as the official Swin computes its buffers.
    """
    gen = torch.Generator().manual_seed(int(seed))
    sd: dict[str, torch.Tensor] = {}
    for key, shape, dtype, kind, extra in _spec_entries(
            embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
            image_size=image_size, num_tags=num_tags, descriptions_per_tag=descriptions_per_tag):
        if kind in (_KIND_LINEAR_W, _KIND_CONV_W):
            if extra == "wordvec":
                # inputs have norm ~0.5-0.9, entries ~0.03: std 1.5 gives pre-activations of O(1)
                std = 1.5
            else:
                std = 1.0 / math.sqrt(extra)
            t = torch.randn(shape, generator=gen) * std
        elif kind == _KIND_BIAS:
            t = torch.randn(shape, generator=gen) * 0.05
        elif kind == _KIND_LN_W:
            t = 1.0 + torch.randn(shape, generator=gen) * 0.1
        elif kind == _KIND_LN_B:
            t = torch.randn(shape, generator=gen) * 0.1
        elif kind == _KIND_REL_TABLE:
            t = torch.randn(shape, generator=gen) * 0.1
        elif kind == _KIND_REL_INDEX:
            t = relative_position_index(extra)
        elif kind == _KIND_ATTN_MASK:
            t = shifted_window_attn_mask(*extra)
        elif kind == _KIND_LABEL_EMBED:
            n_rows, width = shape
            centres = torch.randn((num_tags, 1, width), generator=gen)
            noise = torch.randn((num_tags, descriptions_per_tag, width), generator=gen)
            t = (centres + 0.8 * noise).reshape(n_rows, width)
            t = t / t.norm(dim=-1, keepdim=True)
        elif kind == _KIND_REWEIGHT:
            t = torch.ones([]) * math.log(1 / 0.07)
        else:  # pragma: no cover
            raise AssertionError(kind)
        assert tuple(t.shape) == tuple(shape), (key, t.shape, shape)
        sd[key] = t.to(dtype).contiguous()
    return sd


# --------------------------------------------------------------------------------------------------
# Swin forward (vendored Microsoft Swin, eval mode), functional over the state dict
# --------------------------------------------------------------------------------------------------
def _window_attention(sd: dict[str, torch.Tensor], p: str, x: torch.Tensor, num_heads: int,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """WindowAttention.forward: x [B*nW, N, C]; mask [nW, N, N] or None."""
    b_, n, c = x.shape
    head_dim = c // num_heads
    scale = head_dim ** -0.5
    qkv = F.linear(x, sd[p + "qkv.weight"], sd[p + "qkv.bias"])
    qkv = qkv.reshape(b_, n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * scale
    attn = q @ k.transpose(-2, -1)
    table = sd[p + "relative_position_bias_table"]
    index = sd[p + "relative_position_index"]
    bias = table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()    # nH, N, N
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.view(b_ // nw, nw, num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, n, n)
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b_, n, c)
    return F.linear(out, sd[p + "proj.weight"], sd[p + "proj.bias"])


def _swin_block(sd: dict[str, torch.Tensor], p: str, x: torch.Tensor, grid: int, window: int, shift: int,
                num_heads: int) -> torch.Tensor:
    """SwinTransformerBlock.forward on tokens x [B, L, C] (L = grid*grid, row-major)."""
    b, l, c = x.shape
    assert l == grid * grid, (l, grid)
    shortcut = x
    x = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], SWIN_LN_EPS)
    x = x.view(b, grid, grid, c)
    if shift > 0:
        shifted = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        mask = sd[p + "attn_mask"]
    else:
        shifted = x
        mask = None
        assert p + "attn_mask" not in sd, f"unexpected {p}attn_mask for a non-shifted block"
    windows = _window_partition(shifted, window).view(-1, window * window, c)
    attn_windows = _window_attention(sd, p + "attn.", windows, num_heads, mask)
    attn_windows = attn_windows.view(-1, window, window, c)
    shifted = _window_reverse(attn_windows, window, grid, grid)
    if shift > 0:
        x = torch.roll(shifted, shifts=(shift, shift), dims=(1, 2))
    else:
        x = shifted
    x = x.view(b, grid * grid, c)
    x = shortcut + x
    h = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], SWIN_LN_EPS)
    h = F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
    h = F.gelu(h)  # exact erf GELU (nn.GELU default)
    h = F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x + h


def _patch_merging(sd: dict[str, torch.Tensor], p: str, x: torch.Tensor, grid: int) -> torch.Tensor:
    """PatchMerging.forward: [B, grid*grid, C] -> [B, (grid/2)^2, 2C]."""
    b, l, c = x.shape
    x = x.view(b, grid, grid, c)
    x0 = x[:, 0::2, 0::2, :]   # (row0, col0)
    x1 = x[:, 1::2, 0::2, :]   # (row1, col0)
    x2 = x[:, 0::2, 1::2, :]   # (row0, col1)
    x3 = x[:, 1::2, 1::2, :]   # (row1, col1)
    x = torch.cat([x0, x1, x2, x3], -1).view(b, -1, 4 * c)
    x = F.layer_norm(x, (4 * c,), sd[p + "norm.weight"], sd[p + "norm.bias"], SWIN_LN_EPS)
    return F.linear(x, sd[p + "reduction.weight"])


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def official_image_tokens(state_dict: dict[str, torch.Tensor], images: torch.Tensor, *, embed_dim: int,
                          depths: Sequence[int], num_heads: Sequence[int], window_size: int,
                          image_size: int) -> torch.Tensor:
    """``visual_encoder(images)`` of the official model: [B, 3, S, S] -> [B, 1 + HW, C_last].

    Token 0 is the mean of the final-normed tokens (AdaptiveAvgPool1d), tokens 1.. are row-major.
    Uses the state dict's own ``relative_position_index`` and ``attn_mask`` buffers, as the official code does.
    Accepts either a full RAM++ state dict (``visual_encoder.`` prefix) or the bare Swin sub-dict.
    """
    sd = _strip_prefix(state_dict, "visual_encoder.") if any(
        k.startswith("visual_encoder.") for k in state_dict) else dict(state_dict)
    stages = stage_layout(embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                          image_size=image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, image_size, image_size):
        raise ValueError(f"expected images [B, 3, {image_size}, {image_size}], got {tuple(images.shape)}")
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH_SIZE)
    x = x.flatten(2).transpose(1, 2)                       # B, Ph*Pw, C
    x = F.layer_norm(x, (embed_dim,), sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"], SWIN_LN_EPS)
    for i, st in enumerate(stages):
        for j in range(st["depth"]):
            shift = st["shift"] if j % 2 == 1 else 0
            x = _swin_block(sd, f"layers.{i}.blocks.{j}.", x, st["grid"], st["window"], shift, st["heads"])
        if st["has_downsample"]:
            x = _patch_merging(sd, f"layers.{i}.downsample.", x, st["grid"])
    c_last = stages[-1]["dim"]
    x = F.layer_norm(x, (c_last,), sd["norm.weight"], sd["norm.bias"], SWIN_LN_EPS)   # B, L, C
    x_cls = F.adaptive_avg_pool1d(x.transpose(1, 2), 1)                                 # B, C, 1
    return torch.cat([x_cls.transpose(1, 2), x], dim=1)


# --------------------------------------------------------------------------------------------------
# RAM++ head (generate_tag steps 1-9)
# --------------------------------------------------------------------------------------------------
def official_reweighted_label_embed(cls_normed: torch.Tensor, label_embed: torch.Tensor,
                                    reweight_scale: torch.Tensor, num_tags: int) -> torch.Tensor:
    """Steps 3-6: [B, 512] (L2-normalised cls) -> [B, num_tags, 512], with the official per-sample loop."""
    bs = cls_normed.shape[0]
    des_per_class = int(label_embed.shape[0] / num_tags)
    if des_per_class * num_tags != label_embed.shape[0]:
        raise ValueError(f"label_embed rows {label_embed.shape[0]} not a multiple of num_tags {num_tags}")
    scale = reweight_scale.exp()
    logits_per_image = (scale * cls_normed @ label_embed.t())          # == (scale * cls) @ E^T
    logits_per_image = logits_per_image.view(bs, -1, des_per_class)
    weight_normalized = F.softmax(logits_per_image, dim=2)
    out = torch.empty(bs, num_tags, TEXT_WIDTH, device=cls_normed.device, dtype=cls_normed.dtype)
    for i in range(bs):
        reshaped_value = label_embed.view(-1, des_per_class, TEXT_WIDTH)
        product = weight_normalized[i].unsqueeze(-1) * reshaped_value
        out[i] = product.sum(dim=1)
    return out


def official_tagging_head(state_dict: dict[str, torch.Tensor], queries: torch.Tensor,
                          image_embeds: torch.Tensor) -> torch.Tensor:
    """Vendored BERT in mode='tagging' (cross-attention + FFN only): [B, T, 768] x [B, N, 512] -> [B, T, 768]."""
    h = queries
    bs, n_img = image_embeds.shape[:2]
    head_dim = HIDDEN_SIZE // NUM_HEAD_HEADS
    # HF invert_attention_mask of an all-ones mask -> additive zeros (adds (1-1)*min = -0.0: a no-op)
    ext_mask = torch.zeros(bs, 1, 1, n_img, dtype=h.dtype, device=h.device)

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], NUM_HEAD_HEADS, head_dim).permute(0, 2, 1, 3)

    for layer in range(NUM_HEAD_LAYERS):
        p = f"tagging_head.encoder.layer.{layer}."
        ca = p + "crossattention."
        q = split_heads(F.linear(h, state_dict[ca + "self.query.weight"], state_dict[ca + "self.query.bias"]))
        k = split_heads(F.linear(image_embeds, state_dict[ca + "self.key.weight"], state_dict[ca + "self.key.bias"]))
        v = split_heads(F.linear(image_embeds, state_dict[ca + "self.value.weight"],
                                 state_dict[ca + "self.value.bias"]))
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores / math.sqrt(head_dim)
        scores = scores + ext_mask
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        ctx = ctx.view(ctx.shape[0], ctx.shape[1], HIDDEN_SIZE)
        a = F.linear(ctx, state_dict[ca + "output.dense.weight"], state_dict[ca + "output.dense.bias"])
        a = F.layer_norm(a + h, (HIDDEN_SIZE,), state_dict[ca + "output.LayerNorm.weight"],
                         state_dict[ca + "output.LayerNorm.bias"], BERT_LN_EPS)
        f = F.linear(a, state_dict[p + "intermediate.dense.weight"], state_dict[p + "intermediate.dense.bias"])
        f = F.gelu(f)  # HF ACT2FN["gelu"] = exact erf GELU
        f = F.linear(f, state_dict[p + "output.dense.weight"], state_dict[p + "output.dense.bias"])
        h = F.layer_norm(f + a, (HIDDEN_SIZE,), state_dict[p + "output.LayerNorm.weight"],
                         state_dict[p + "output.LayerNorm.bias"], BERT_LN_EPS)
    return h


def official_tag_logits(state_dict: dict[str, torch.Tensor], images: torch.Tensor, *, embed_dim: int,
                        depths: Sequence[int], num_heads: Sequence[int], window_size: int, image_size: int,
                        num_tags: int | None = None, descriptions_per_tag: int = 51) -> torch.Tensor:
    """``generate_tag`` up to ``logits = fc(tagging_embed[0]).squeeze(-1)``: -> [B, num_tags] fp32.

    ``num_tags`` is the official ``self.num_class``; when omitted it is ``label_embed rows // descriptions_per_tag``.
    """
    label_embed = state_dict["label_embed"]
    if num_tags is None:
        num_tags = label_embed.shape[0] // descriptions_per_tag
    tokens = official_image_tokens(state_dict, images, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                                   window_size=window_size, image_size=image_size)
    image_embeds = F.linear(tokens, state_dict["image_proj.weight"], state_dict["image_proj.bias"])   # B, N, 512
    cls = image_embeds[:, 0, :]
    cls = cls / cls.norm(dim=-1, keepdim=True)
    reweighted = official_reweighted_label_embed(cls, label_embed, state_dict["reweight_scale"], num_tags)
    queries = F.relu(F.linear(reweighted, state_dict["wordvec_proj.weight"], state_dict["wordvec_proj.bias"]))
    tagging_embed = official_tagging_head(state_dict, queries, image_embeds)
    logits = F.linear(tagging_embed, state_dict["fc.weight"], state_dict["fc.bias"]).squeeze(-1)
    return logits


# --------------------------------------------------------------------------------------------------
# Preprocessing (ram/transform.py::get_transform)
# --------------------------------------------------------------------------------------------------
def _convert_rgb(image):
    return image.convert("RGB")


def official_transform(pil_images: Iterable[Any], image_size: int) -> torch.Tensor:
    """Official inference transform per PIL image, stacked: -> [B, 3, S, S] float32."""
    from torchvision import transforms

    transform = transforms.Compose([
        _convert_rgb,
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
    ])
    return torch.stack([transform(im) for im in pil_images])
