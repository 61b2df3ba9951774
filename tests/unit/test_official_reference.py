"""Self-checks of the official-RAM++ test oracle (tests/official_reference.py).

These tests validate the oracle against independent implementations (timm's Swin, torch's
MultiheadAttention, a vectorised einsum, PIL/torchvision arithmetic) and against the key/shape/parameter-count
facts of the reference doc.  They never import ramplus_core.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests import official_reference as R  # noqa: E402

timm_swin = pytest.importorskip("timm.models.swin_transformer")

TINY = R.TINY_GEOMETRY
TINY_TAGS = 7
VE = "visual_encoder."


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return R.make_official_state_dict(**TINY, num_tags=TINY_TAGS, seed=0)


@pytest.fixture(scope="module")
def tiny_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn((3, 3, TINY["image_size"], TINY["image_size"]), generator=g)


def _timm_model(geometry: dict):
    model = timm_swin.SwinTransformer(
        img_size=geometry["image_size"], patch_size=4, embed_dim=geometry["embed_dim"],
        depths=tuple(geometry["depths"]), num_heads=tuple(geometry["num_heads"]),
        window_size=geometry["window_size"], num_classes=0, drop_path_rate=0.0,
    ).eval()
    for module in model.modules():  # force the explicit (non-SDPA) attention path
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def _load_into_timm(model, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    vsd = {k[len(VE):]: v for k, v in sd.items() if k.startswith(VE)}
    filtered = timm_swin.checkpoint_filter_fn(vsd, model)
    # no silent resizing of bias tables by the filter: tables must already have timm's shapes
    for k, v in filtered.items():
        if k.endswith("relative_position_bias_table"):
            old_k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
            assert torch.equal(v, vsd[old_k]), k
    model.load_state_dict(filtered, strict=True)
    return filtered


def _timm_tokens(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = model.forward_features(images)            # [B, H, W, C] NHWC after the final norm
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)                        # row-major flatten
    return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)


def _count(spec, pattern: str) -> int:
    rx = re.compile(pattern)
    return sum(1 for k in spec if rx.fullmatch(k))


# --------------------------------------------------------------------------------------------------
# geometry / shift rule
# --------------------------------------------------------------------------------------------------
def test_variants_and_geometry_helper():
    assert set(R.OFFICIAL_VARIANTS) == {"swin_l@384", "swin_l@224", "swin_b@384", "swin_b@224"}
    for name, g in R.OFFICIAL_VARIANTS.items():
        assert set(g) == {"embed_dim", "depths", "num_heads", "window_size", "image_size"}
        assert list(g["depths"]) == [2, 2, 18, 2]
        assert g["window_size"] == (12 if g["image_size"] == 384 else 7)
    assert R.OFFICIAL_VARIANTS["swin_l@384"]["embed_dim"] == 192
    assert list(R.OFFICIAL_VARIANTS["swin_l@384"]["num_heads"]) == [6, 12, 24, 48]
    assert R.OFFICIAL_VARIANTS["swin_b@224"]["embed_dim"] == 128
    assert list(R.OFFICIAL_VARIANTS["swin_b@224"]["num_heads"]) == [4, 8, 16, 32]
    g = R.swin_geometry("swin_l@384")
    g["depths"].append(99)  # must be a copy
    assert list(R.OFFICIAL_VARIANTS["swin_l@384"]["depths"]) == [2, 2, 18, 2]
    assert R.swin_geometry("tiny") == TINY
    with pytest.raises(KeyError):
        R.swin_geometry("swin_h@384")


def test_stage_layout_shift_rule():
    tiny = R.stage_layout(**TINY)
    assert [s["grid"] for s in tiny] == [16, 8, 4, 2]
    assert [s["window"] for s in tiny] == [4, 4, 4, 2]
    assert [s["shift"] for s in tiny] == [2, 2, 0, 0]
    l384 = R.stage_layout(**R.OFFICIAL_VARIANTS["swin_l@384"])
    assert [s["grid"] for s in l384] == [96, 48, 24, 12]
    assert [s["num_windows"] for s in l384] == [64, 16, 4, 1]
    assert [s["shift"] for s in l384] == [6, 6, 6, 0]
    assert [s["dim"] for s in l384] == [192, 384, 768, 1536]
    b224 = R.stage_layout(**R.OFFICIAL_VARIANTS["swin_b@224"])
    assert [s["grid"] for s in b224] == [56, 28, 14, 7]
    assert [s["shift"] for s in b224] == [3, 3, 3, 0]
    assert [s["window"] for s in b224] == [7, 7, 7, 7]


# --------------------------------------------------------------------------------------------------
# buffers vs timm
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [2, 4, 7, 12])
def test_relative_position_index_matches_timm(window):
    ours = R.relative_position_index(window)
    assert ours.dtype == torch.int64 and ours.shape == (window ** 2, window ** 2)
    assert torch.equal(ours, timm_swin.get_relative_position_index(window, window).to(torch.int64))
    assert int(ours.min()) == 0 and int(ours.max()) == (2 * window - 1) ** 2 - 1
    # diagonal = zero offset = centre of the table
    assert torch.all(ours.diagonal() == (window - 1) * (2 * window - 1) + (window - 1))


@pytest.mark.parametrize("grid,window,shift", [(16, 4, 2), (8, 4, 2), (96, 12, 6), (24, 12, 6), (56, 7, 3), (14, 7, 3)])
def test_attn_mask_matches_timm(grid, window, shift):
    ours = R.shifted_window_attn_mask(grid, window, shift)
    block = timm_swin.SwinTransformerBlock(dim=8, input_resolution=(grid, grid), num_heads=1,
                                           window_size=window, shift_size=shift)
    ref = block.attn_mask
    assert ref is not None
    assert ours.dtype == torch.float32
    assert ours.shape == ((grid // window) ** 2, window ** 2, window ** 2)
    assert torch.equal(ours, ref.to(torch.float32))
    assert set(torch.unique(ours).tolist()) == {-100.0, 0.0}
    assert torch.all(ours[0] == 0)  # top-left window is never split by the shift


# --------------------------------------------------------------------------------------------------
# state-dict key set / shapes / parameter counts
# --------------------------------------------------------------------------------------------------
def test_tiny_state_dict_keys(tiny_sd):
    spec = R.official_state_dict_spec(**TINY, num_tags=TINY_TAGS)
    assert list(tiny_sd) == list(spec)
    for k, (shape, dtype) in spec.items():
        assert tuple(tiny_sd[k].shape) == shape, k
        assert tiny_sd[k].dtype == dtype, k
        assert torch.isfinite(tiny_sd[k].float()).all(), k
    n_blocks = sum(TINY["depths"])
    # per block 14 tensors (incl. the index buffer), +1 attn_mask on odd blocks of shifted stages
    assert _count(tiny_sd, r"visual_encoder\.layers\.\d+\.blocks\.\d+\..*") == 14 * n_blocks + 2
    assert sorted(k for k in tiny_sd if k.endswith("attn_mask")) == [
        "visual_encoder.layers.0.blocks.1.attn_mask", "visual_encoder.layers.1.blocks.1.attn_mask"]
    assert tiny_sd["visual_encoder.layers.0.blocks.1.attn_mask"].shape == (16, 16, 16)
    assert tiny_sd["visual_encoder.layers.1.blocks.1.attn_mask"].shape == (4, 16, 16)
    assert tiny_sd["visual_encoder.layers.3.blocks.0.attn.relative_position_bias_table"].shape == (9, 8)
    assert tiny_sd["visual_encoder.layers.3.blocks.0.attn.relative_position_index"].shape == (4, 4)
    ds = sorted({k.split(".downsample.")[0] for k in tiny_sd if ".downsample." in k})
    assert ds == [f"visual_encoder.layers.{i}" for i in range(3)]
    assert len(tiny_sd) == 4 + 14 * n_blocks + 2 + 3 * 3 + 2 + 2 * 16 + 2 + 2 + 2 + 2
    # head facts
    le = tiny_sd["label_embed"]
    assert le.shape == (TINY_TAGS * 51, 512)
    assert torch.allclose(le.norm(dim=-1), torch.ones(le.shape[0]), atol=1e-6)
    rs = tiny_sd["reweight_scale"]
    assert rs.dim() == 0 and abs(float(rs) - math.log(1 / 0.07)) < 1e-6
    assert tiny_sd["image_proj.weight"].shape == (512, 256)
    assert tiny_sd["wordvec_proj.weight"].shape == (768, 512)
    assert tiny_sd["fc.weight"].shape == (1, 768)
    assert tiny_sd["tagging_head.encoder.layer.1.crossattention.self.key.weight"].shape == (768, 512)
    assert tiny_sd["tagging_head.encoder.layer.1.intermediate.dense.weight"].shape == (3072, 768)
    assert not any(k.startswith("tagging_head.embeddings") or ".attention." in k or "pooler" in k for k in tiny_sd)


def test_state_dict_values_are_distinct_and_seeded(tiny_sd):
    # LayerNorms are not all identical (a key mix-up must change the output)
    ln_ws = [v for k, v in tiny_sd.items() if k.endswith("norm1.weight")]
    assert not torch.equal(ln_ws[0], ln_ws[1])
    assert not torch.equal(tiny_sd["tagging_head.encoder.layer.0.crossattention.self.key.weight"],
                           tiny_sd["tagging_head.encoder.layer.0.crossattention.self.value.weight"])
    again = R.make_official_state_dict(**TINY, num_tags=TINY_TAGS, seed=0)
    assert all(torch.equal(again[k], v) for k, v in tiny_sd.items())
    other = R.make_official_state_dict(**TINY, num_tags=TINY_TAGS, seed=1)
    assert not torch.equal(other["fc.weight"], tiny_sd["fc.weight"])
    assert torch.equal(other["visual_encoder.layers.0.blocks.1.attn_mask"],
                       tiny_sd["visual_encoder.layers.0.blocks.1.attn_mask"])


@pytest.mark.parametrize("variant", sorted(R.OFFICIAL_VARIANTS))
def test_official_spec_keys(variant):
    g = R.OFFICIAL_VARIANTS[variant]
    spec = R.official_state_dict_spec(**g, num_tags=4585)
    w = g["window_size"]
    masks = sorted(k for k in spec if k.endswith("attn_mask"))
    expected_masks = sorted(f"visual_encoder.layers.{i}.blocks.{j}.attn_mask"
                            for i in range(3) for j in range(g["depths"][i]) if j % 2 == 1)
    assert masks == expected_masks  # odd blocks of stages 0..2 (stage 3 grid == window -> no shift)
    assert len(masks) == 1 + 1 + 9
    grid0 = g["image_size"] // 4
    for i in range(3):
        n_w = (grid0 // 2 ** i // w) ** 2
        assert spec[f"visual_encoder.layers.{i}.blocks.1.attn_mask"] == ((n_w, w * w, w * w), torch.float32)
    assert spec["visual_encoder.layers.3.blocks.1.attn.relative_position_index"] == ((w * w, w * w), torch.int64)
    heads3 = g["num_heads"][3]
    assert spec["visual_encoder.layers.3.blocks.1.attn.relative_position_bias_table"] == (((2 * w - 1) ** 2, heads3),
                                                                                         torch.float32)
    c = g["embed_dim"]
    for i in range(3):
        ci = c * 2 ** i
        assert spec[f"visual_encoder.layers.{i}.downsample.reduction.weight"][0] == (2 * ci, 4 * ci)
        assert spec[f"visual_encoder.layers.{i}.downsample.norm.weight"][0] == (4 * ci,)
        assert f"visual_encoder.layers.{i}.downsample.reduction.bias" not in spec
    assert not any(k.startswith("visual_encoder.layers.3.downsample") for k in spec)
    assert spec["visual_encoder.norm.weight"][0] == (8 * c,)
    assert spec["image_proj.weight"][0] == (512, 8 * c)
    assert spec["label_embed"][0] == (233835, 512)
    assert spec["reweight_scale"][0] == ()
    n_blocks = sum(g["depths"])
    assert len(spec) == 2 + 4 + 14 * n_blocks + len(masks) + 3 * 3 + 2 + 2 * 16 + 2 + 2 + 2


def _numel(spec, pred) -> int:
    return sum(math.prod(shape) for k, (shape, _) in spec.items() if pred(k))


def test_parameter_counts_match_doc():
    def is_param(k):
        return not (k.endswith("relative_position_index") or k.endswith("attn_mask"))

    l384 = R.official_state_dict_spec(**R.OFFICIAL_VARIANTS["swin_l@384"], num_tags=4585)
    b384 = R.official_state_dict_spec(**R.OFFICIAL_VARIANTS["swin_b@384"], num_tags=4585)
    assert _numel(l384, lambda k: k.startswith(VE) and is_param(k)) == 195_198_516
    assert _numel(b384, lambda k: k.startswith(VE) and is_param(k)) == 86_878_584
    assert _numel(l384, lambda k: k.startswith("tagging_head.")) == 13_389_312
    assert _numel(l384, lambda k: k.startswith("wordvec_proj.")) == 393_984
    assert _numel(l384, lambda k: k.startswith("fc.")) == 769
    assert _numel(l384, lambda k: k.startswith("image_proj.")) == 786_944
    assert _numel(l384, lambda k: k == "label_embed") == 119_723_520
    assert _numel(l384, lambda k: is_param(k) and k != "label_embed") == 209_769_526


# --------------------------------------------------------------------------------------------------
# Swin forward vs timm
# --------------------------------------------------------------------------------------------------
def test_tiny_image_tokens_match_timm(tiny_sd, tiny_images):
    model = _timm_model(TINY)
    _load_into_timm(model, tiny_sd)
    ref = _timm_tokens(model, tiny_images)
    with torch.no_grad():
        ours = R.official_image_tokens(tiny_sd, tiny_images, **TINY)
    assert ours.shape == (3, 1 + 4, 256)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # also accepts the bare Swin sub-dict
    bare = {k[len(VE):]: v for k, v in tiny_sd.items() if k.startswith(VE)}
    torch.testing.assert_close(R.official_image_tokens(bare, tiny_images, **TINY), ours, atol=0, rtol=0)


def test_tiny_mask_and_bias_are_observable(tiny_sd, tiny_images):
    base = R.official_image_tokens(tiny_sd, tiny_images, **TINY)
    no_mask = dict(tiny_sd)
    for k in no_mask:
        if k.endswith("attn_mask"):
            no_mask[k] = torch.zeros_like(no_mask[k])
    assert (R.official_image_tokens(no_mask, tiny_images, **TINY) - base).abs().max() > 1e-3
    no_bias = dict(tiny_sd)
    for k in no_bias:
        if k.endswith("relative_position_bias_table"):
            no_bias[k] = torch.zeros_like(no_bias[k])
    assert (R.official_image_tokens(no_bias, tiny_images, **TINY) - base).abs().max() > 1e-3
    # the mean token is the mean of the others
    torch.testing.assert_close(base[:, 0], base[:, 1:].mean(dim=1), atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["swin_b@224", "swin_l@384"])
def test_official_variant_image_tokens_match_timm(variant):
    g = R.swin_geometry(variant)
    sd = R.make_official_state_dict(**g, num_tags=3, seed=0)
    model = _timm_model(g)
    _load_into_timm(model, sd)
    images = torch.randn((1, 3, g["image_size"], g["image_size"]), generator=torch.Generator().manual_seed(7))
    ref = _timm_tokens(model, images)
    del model
    with torch.no_grad():
        ours = R.official_image_tokens(sd, images, **g)
    n = (g["image_size"] // 32) ** 2
    assert ours.shape == (1, 1 + n, 8 * g["embed_dim"])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# head
# --------------------------------------------------------------------------------------------------
def test_reweight_loop_matches_einsum():
    g = torch.Generator().manual_seed(5)
    b, t, d = 3, 6, 51
    le = torch.randn((t * d, 512), generator=g)
    le = le / le.norm(dim=-1, keepdim=True)
    cls = torch.randn((b, 512), generator=g)
    cls = cls / cls.norm(dim=-1, keepdim=True)
    scale = torch.tensor(math.log(1 / 0.07))
    ours = R.official_reweighted_label_embed(cls, le, scale, t)
    w = torch.softmax(torch.einsum("bk,nk->bn", cls, le).mul(scale.exp()).view(b, t, d), dim=-1)
    ref = torch.einsum("btd,tdk->btk", w, le.view(t, d, 512))
    assert ours.shape == (b, t, 512)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # weights really are non-uniform, so the test would see a wrong softmax axis / missing scale
    uniform = le.view(t, d, 512).mean(dim=1).expand(b, t, 512)
    assert (ours - uniform).abs().max() > 1e-3


def test_tagging_head_matches_torch_modules(tiny_sd):
    g = torch.Generator().manual_seed(11)
    queries = torch.relu(torch.randn((2, 5, 768), generator=g))
    image_embeds = torch.randn((2, 9, 512), generator=g)
    ours = R.official_tagging_head(tiny_sd, queries, image_embeds)

    h = queries
    with torch.no_grad():
        for layer in range(2):
            p = f"tagging_head.encoder.layer.{layer}."
            mha = torch.nn.MultiheadAttention(768, 4, kdim=512, vdim=512, batch_first=True).eval()
            mha.q_proj_weight.copy_(tiny_sd[p + "crossattention.self.query.weight"])
            mha.k_proj_weight.copy_(tiny_sd[p + "crossattention.self.key.weight"])
            mha.v_proj_weight.copy_(tiny_sd[p + "crossattention.self.value.weight"])
            mha.in_proj_bias.copy_(torch.cat([tiny_sd[p + f"crossattention.self.{n}.bias"]
                                              for n in ("query", "key", "value")]))
            mha.out_proj.weight.copy_(tiny_sd[p + "crossattention.output.dense.weight"])
            mha.out_proj.bias.copy_(tiny_sd[p + "crossattention.output.dense.bias"])
            attn, _ = mha(h, image_embeds, image_embeds, need_weights=False)
            ln1 = torch.nn.LayerNorm(768, eps=1e-12)
            ln1.weight.copy_(tiny_sd[p + "crossattention.output.LayerNorm.weight"])
            ln1.bias.copy_(tiny_sd[p + "crossattention.output.LayerNorm.bias"])
            a = ln1(attn + h)
            inter = torch.nn.Linear(768, 3072)
            inter.weight.copy_(tiny_sd[p + "intermediate.dense.weight"])
            inter.bias.copy_(tiny_sd[p + "intermediate.dense.bias"])
            out = torch.nn.Linear(3072, 768)
            out.weight.copy_(tiny_sd[p + "output.dense.weight"])
            out.bias.copy_(tiny_sd[p + "output.dense.bias"])
            ln2 = torch.nn.LayerNorm(768, eps=1e-12)
            ln2.weight.copy_(tiny_sd[p + "output.LayerNorm.weight"])
            ln2.bias.copy_(tiny_sd[p + "output.LayerNorm.bias"])
            h = ln2(out(torch.nn.GELU()(inter(a))) + a)
    torch.testing.assert_close(ours, h, atol=1e-5, rtol=0)
    # attention is not degenerate: queries of different tags attend differently
    assert (ours[:, 0] - ours[:, 1]).abs().max() > 1e-2


def test_tiny_tag_logits(tiny_sd, tiny_images):
    with torch.no_grad():
        logits = R.official_tag_logits(tiny_sd, tiny_images, **TINY, num_tags=TINY_TAGS)
    assert logits.shape == (3, TINY_TAGS) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert float(logits.std(dim=1).min()) > 0.05        # not constant across tags
    assert float((logits[0] - logits[1]).abs().max()) > 1e-3  # depends on the image
    # num_tags defaults to label_embed rows // 51
    torch.testing.assert_close(R.official_tag_logits(tiny_sd, tiny_images, **TINY), logits, atol=0, rtol=0)
    # batching does not mix samples (window partition / mask broadcast / per-sample loop)
    single = torch.cat([R.official_tag_logits(tiny_sd, tiny_images[i:i + 1], **TINY, num_tags=TINY_TAGS)
                        for i in range(3)])
    torch.testing.assert_close(single, logits, atol=1e-5, rtol=0)


def test_tiny_tag_logits_decomposition(tiny_sd, tiny_images):
    """official_tag_logits == the doc's steps 1-9 assembled from independently checked pieces."""
    tokens = _timm_tokens(_loaded_tiny_timm(tiny_sd), tiny_images)
    ie = tokens @ tiny_sd["image_proj.weight"].t() + tiny_sd["image_proj.bias"]
    cls = F.normalize(ie[:, 0], dim=-1)
    t, d = TINY_TAGS, 51
    le = tiny_sd["label_embed"]
    w = torch.softmax((math.exp(float(tiny_sd["reweight_scale"])) * cls @ le.t()).view(-1, t, d), dim=-1)
    rew = torch.einsum("btd,tdk->btk", w, le.view(t, d, 512))
    q = torch.relu(rew @ tiny_sd["wordvec_proj.weight"].t() + tiny_sd["wordvec_proj.bias"])
    h = R.official_tagging_head(tiny_sd, q, ie)
    ref = (h @ tiny_sd["fc.weight"].t() + tiny_sd["fc.bias"])[..., 0]
    ours = R.official_tag_logits(tiny_sd, tiny_images, **TINY, num_tags=TINY_TAGS)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # swapping the two tagging-head layers changes the logits (layer order is observable)
    swapped = dict(tiny_sd)
    for k in tiny_sd:
        if k.startswith("tagging_head.encoder.layer.0."):
            k1 = k.replace("layer.0.", "layer.1.")
            swapped[k], swapped[k1] = tiny_sd[k1], tiny_sd[k]
    assert (R.official_tag_logits(swapped, tiny_images, **TINY) - ours).abs().max() > 1e-3


def _loaded_tiny_timm(sd):
    model = _timm_model(TINY)
    _load_into_timm(model, sd)
    return model


# --------------------------------------------------------------------------------------------------
# transform
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,colour", [("RGB", (200, 30, 77)), ("RGBA", (10, 250, 128, 3)), ("L", 90)])
def test_transform_solid_colour(mode, colour):
    img = Image.new(mode, (37, 53), colour)
    out = R.official_transform([img, img], 64)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    rgb = Image.new(mode, (1, 1), colour).convert("RGB").getpixel((0, 0))
    mean = torch.tensor(R.IMAGENET_MEAN)
    std = torch.tensor(R.IMAGENET_STD)
    expected = (torch.tensor(rgb, dtype=torch.float32).div(255) - mean) / std
    assert torch.equal(out, expected.view(1, 3, 1, 1).expand_as(out))


def test_transform_matches_pil_bilinear():
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, size=(41, 70, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    out = R.official_transform([img], 32)
    resized = np.asarray(img.resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(R.IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(R.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)
