"""Checkpoint I/O: the official RAM++ `.pth` and our own safetensors format.

Pickle policy. The official checkpoint is a pickle (`{"model": state_dict, "optimizer": ..., "config":
..., "epoch": ...}`). We always read it with `torch.load(weights_only=True)`, which refuses anything but
tensors and plain containers and so cannot run code. If that refusal happens, the file is unpickled fully
only when its sha256 matches a checkpoint in `registry.KNOWN_CHECKPOINTS` or the caller passes
`trust_pickle=True`; otherwise `UntrustedCheckpointError` says what was refused. Our own format
(`save_pretrained`) is safetensors + JSON and never needs pickle.

Mapping. `official_to_ramplus` is one pure function over the state dict, like timm's
`checkpoint_filter_fn`: the Swin keys go through timm's own filter (old-layout downsample at the end of
a stage -> timm's at the start of the next; index and mask buffers dropped, relative-position tables
resized when the window differs), the BERT tagging head's names become the decoder's, and `label_embed`
leaves the weights to become the checkpoint's own `Vocabulary`. Loading is strict: every missing,
unexpected or mis-shaped key is named.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors.torch import load_file, save_file
from timm.models.swin_transformer import checkpoint_filter_fn

from ramplus_core.configs import MODEL_CONFIGS, OFFICIAL_WINDOW, ModelConfig, get_config
from ramplus_core.errors import CheckpointError, CheckpointLayoutError, ConfigError, UntrustedCheckpointError
from ramplus_core.model import RamPlus
from ramplus_core.registry import OFFICIAL_WEIGHTS_HELP, TRUSTED_SHA256, sha256_file
from ramplus_core.vocabulary import Vocabulary, read_tag_list, read_thresholds

log = structlog.get_logger(__name__)

MODEL_FORMAT = "ramplus.model/1"
OFFICIAL_DEFAULT_THRESHOLD = 0.68  # RAM_plus(threshold=0.68) when no per-tag threshold file is given

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80

_HEAD_RENAMES = (
    ("crossattention.self.query.", "cross_attn.q_proj."),
    ("crossattention.self.key.", "cross_attn.k_proj."),
    ("crossattention.self.value.", "cross_attn.v_proj."),
    ("crossattention.output.dense.", "cross_attn.out_proj."),
    ("crossattention.output.LayerNorm.", "attn_norm."),
    ("intermediate.dense.", "fc1."),
    ("output.dense.", "fc2."),
    ("output.LayerNorm.", "ffn_norm."),
)
_PASS_THROUGH = ("image_proj.", "wordvec_proj.", "fc.")


# -- reading the official pickle ---------------------------------------------------------------------------


def read_torch_file(path: str | Path, *, trust_pickle: bool = False, mmap: bool = True) -> Any:
    """`torch.load` under the pickle policy in this module's docstring."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. {OFFICIAL_WEIGHTS_HELP}")
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == _ZIP_MAGIC
    if not is_zip and (not head or head[0] != _PICKLE_PROTO):
        raise CheckpointLayoutError(
            f"{path}: unknown checkpoint format (neither a torch zip archive nor a pickle; "
            "our own format is a directory with config.json and model.safetensors)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as exc:
        refusal = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        if not trust_pickle:
            if sha256_file(path) not in TRUSTED_SHA256:
                raise UntrustedCheckpointError(
                    f"{path} holds Python objects that a safe load refuses ({refusal}). Unpickling it could run "
                    "arbitrary code: only if you trust where it came from, pass trust_pickle=True "
                    "(CLI: --trust-checkpoint)."
                ) from exc
            log.info("checkpoint.trusted_by_checksum", path=str(path))
        log.warning("checkpoint.full_unpickle", path=str(path), reason=refusal)
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): {exc}") from exc


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict inside an official save object (`{"model": sd, ...}`) or a bare state dict."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    raise CheckpointLayoutError(
        f"{source}: no state dict found (expected {{'model': state_dict}} or a bare state dict of tensors)"
    )


# -- what the official state dict says about its model ----------------------------------------------------


def _require(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointLayoutError(f"not a RAM++ checkpoint: missing {key!r}")
    return sd[key]


def infer_official_config(sd: dict[str, torch.Tensor], image_size: int | None = None) -> ModelConfig:
    """Rebuild the `ModelConfig` of an official-layout state dict from its shapes alone."""
    if "visual_encoder.patch_embed.proj.weight" not in sd:
        sample = ", ".join(list(sd)[:5])
        raise CheckpointLayoutError(
            f"unknown checkpoint layout: no 'visual_encoder.patch_embed.proj.weight' (first keys: {sample}). "
            "Expected the official RAM++ layout or our own format."
        )
    if "reweight_scale" not in sd or sd.get("label_embed", torch.empty(0, 0)).shape[0] == 0:
        raise CheckpointLayoutError(
            "not a RAM++ checkpoint: no 'reweight_scale' or 'label_embed'. A RAM (not ++) or Tag2Text checkpoint "
            "has a different head and cannot be loaded as RAM++."
        )
    patch_w = sd["visual_encoder.patch_embed.proj.weight"]
    embed_dim, patch = patch_w.shape[0], patch_w.shape[-1]
    blocks: dict[int, set[int]] = {}
    for key in sd:
        m = re.match(r"visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise CheckpointLayoutError("unknown checkpoint layout: Swin stages missing or not numbered 0..N")
    depths = tuple(max(blocks[i]) + 1 for i in range(len(blocks)))
    tables = [_require(sd, f"visual_encoder.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(len(blocks))]
    num_heads = tuple(t.shape[1] for t in tables)
    window = (math.isqrt(tables[0].shape[0]) + 1) // 2
    if (2 * window - 1) ** 2 != tables[0].shape[0]:
        raise CheckpointLayoutError(f"relative position table of {tables[0].shape[0]} rows is not (2w-1)^2")
    inferred_size = None
    mask = sd.get("visual_encoder.layers.0.blocks.1.attn_mask")
    if mask is not None and mask.ndim == 3:
        inferred_size = math.isqrt(mask.shape[0]) * window * patch
    if image_size is None:
        image_size = inferred_size
    if image_size is None:
        image_size = {w: size for size, w in OFFICIAL_WINDOW.items()}.get(window)
    if image_size is None:
        raise CheckpointLayoutError("cannot infer the image size from this checkpoint: pass image_size")
    image_proj = _require(sd, "image_proj.weight")
    wordvec = _require(sd, "wordvec_proj.weight")
    layers = {int(m[1]) for k in sd if (m := re.match(r"(?:tagging_head|vision_multi)\.encoder\.layer\.(\d+)\.", k))}
    ffn = next((v.shape[0] for k, v in sd.items() if k.endswith("layer.0.intermediate.dense.weight")), 3072)
    geometry = dict(
        image_size=image_size, patch_size=patch, embed_dim=embed_dim, depths=depths,
        num_heads=num_heads, window_size=window,
    )
    name = next(
        (c.name for c in MODEL_CONFIGS.values() if all(getattr(c, k) == v for k, v in geometry.items())),
        "custom",
    )
    if inferred_size is not None and inferred_size != image_size:
        # Asked for another resolution: keep the family's window rule (12 at 384, 7 at 224) when known.
        known = MODEL_CONFIGS.get(f"{name}@{image_size}")
        geometry["window_size"] = known.window_size if known else window
    try:
        config = ModelConfig(
            name=name, **geometry, text_dim=image_proj.shape[0], decoder_dim=wordvec.shape[0],
            decoder_layers=max(len(layers), 1), decoder_ffn_dim=ffn,
        )
    except (ConfigError, ValueError) as exc:
        raise CheckpointLayoutError(f"checkpoint geometry is not a valid RAM++ config: {exc}") from exc
    if image_proj.shape[1] != config.vision_width:
        raise CheckpointLayoutError(
            f"image_proj expects {image_proj.shape[1]}-d image tokens but the Swin ends at {config.vision_width}"
        )
    return config


def official_to_ramplus(sd: dict[str, torch.Tensor], model: RamPlus) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """Official keys -> ours. Returns (model state dict, label_embed, keys that have no place in RAM++)."""
    visual: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    label_embed = _require(sd, "label_embed")
    for key, value in sd.items():
        key = key.replace("vision_multi", "tagging_head")  # the name in early releases, as the official loader
        if key.startswith("visual_encoder."):
            visual[key[len("visual_encoder."):]] = value
        elif key in ("label_embed",):
            continue
        elif key == "reweight_scale" or key.startswith(_PASS_THROUGH):
            out[key] = value
        elif m := re.match(r"tagging_head\.encoder\.layer\.(\d+)\.(.+)$", key):
            rest = m[2]
            for old, new in _HEAD_RENAMES:
                if rest.startswith(old):
                    out[f"decoder.layers.{m[1]}.{new}{rest[len(old):]}"] = value
                    break
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    swin = model.image_encoder.swin
    if "layers.0.downsample.reduction.weight" not in visual and len(swin.layers) > 1:
        raise CheckpointLayoutError(
            "visual_encoder has no 'layers.0.downsample': not the official (old Microsoft) Swin layout"
        )
    for key, value in checkpoint_filter_fn(visual, swin).items():
        out[f"image_encoder.swin.{key}"] = value
    return out, label_embed, unexpected


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, extra_unexpected: list[str] = (), source: str = "checkpoint") -> None:
    """`load_state_dict(strict=True)` that names every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected)) + list(extra_unexpected)
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{len(items)} {what}: {shown}")
    if problems:
        raise CheckpointLayoutError(f"{source} does not fit RAM++ {getattr(model, 'config', None) and model.config.key}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


# -- the official checkpoint -------------------------------------------------------------------------------


def load_official(
    path: str | Path,
    variant: str | None = None,
    image_size: int | None = None,
    *,
    tag_list: str | Path | list[str] | None = None,
    thresholds: str | Path | list[float] | float | None = None,
    trust_pickle: bool = False,
    mmap: bool = True,
) -> RamPlus:
    """An official-layout `.pth` -> `RamPlus` in eval mode with the checkpoint's own vocabulary set."""
    sd = extract_state_dict(read_torch_file(path, trust_pickle=trust_pickle, mmap=mmap), str(path))
    config = infer_official_config(sd, image_size)
    if variant is not None:
        wanted = get_config(variant, image_size or config.image_size)
        for field in ("embed_dim", "depths", "num_heads"):
            if getattr(wanted, field) != getattr(config, field):
                raise CheckpointLayoutError(
                    f"{path} is a {config.name} checkpoint ({field} {getattr(config, field)}) but variant "
                    f"{wanted.key!r} ({field} {getattr(wanted, field)}) was requested"
                )
        config = config.model_copy(update={"name": wanted.name, "window_size": wanted.window_size, "decoder_heads": wanted.decoder_heads})
    model = RamPlus(config)
    state, label_embed, unexpected = official_to_ramplus(sd, model)
    load_strict(model, state, extra_unexpected=unexpected, source=str(path))
    model.set_vocabulary(official_vocabulary(label_embed, tag_list, thresholds))
    log.info("checkpoint.loaded", path=str(path), config=config.key, layout="official", tags=len(model.vocabulary or []))
    return model.eval()


def official_vocabulary(
    label_embed: torch.Tensor,
    tag_list: str | Path | list[str] | None = None,
    thresholds: str | Path | list[float] | float | None = None,
    num_tags: int | None = None,
) -> Vocabulary:
    """The checkpoint's closed-set vocabulary, named by the official tag list and threshold files.

    Without a tag list the tags are called `tag_0000`.. and need `num_tags` (4,585 for the release: 51
    descriptions each); without thresholds every tag uses the official default 0.68.
    """
    if isinstance(tag_list, (str, Path)):
        tags = read_tag_list(tag_list)
    elif tag_list is not None:
        tags = list(tag_list)
    else:
        if num_tags is None:
            num_tags = label_embed.shape[0] // 51 if label_embed.shape[0] % 51 == 0 else label_embed.shape[0]
        tags = [f"tag_{i:04d}" for i in range(num_tags)]
        log.warning("vocabulary.unnamed_tags", tags=num_tags, hint="pass the official ram_tag_list.txt as tag_list")
    if isinstance(thresholds, (str, Path)):
        values: list[float] | float = read_thresholds(thresholds)
    elif thresholds is None:
        values = OFFICIAL_DEFAULT_THRESHOLD
    else:
        values = thresholds
    # A copy: with mmap=True the tensor is backed by the checkpoint file.
    return Vocabulary.from_official(label_embed.detach().to(torch.float32, copy=True), tags, values)


def import_official_vocabulary(
    checkpoint: str | Path,
    tag_list: str | Path,
    thresholds: str | Path | None = None,
    *,
    trust_pickle: bool = False,
) -> Vocabulary:
    """Only the closed-set vocabulary of an official checkpoint (its `label_embed` + tag and threshold files)."""
    sd = extract_state_dict(read_torch_file(checkpoint, trust_pickle=trust_pickle), str(checkpoint))
    return official_vocabulary(_require(sd, "label_embed"), tag_list, thresholds)


# -- our own format ----------------------------------------------------------------------------------------


def save_pretrained(model: RamPlus, directory: str | Path, *, vocabulary: Vocabulary | None = None, extra: dict[str, Any] | None = None) -> Path:
    """`directory/` <- config.json + model.safetensors (+ vocabulary.safetensors). No pickle."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocabulary = vocabulary or model.vocabulary
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": MODEL_FORMAT})
    if vocabulary is not None:
        vocabulary.save(directory / "vocabulary.safetensors")
    config = {"format": MODEL_FORMAT, "config": model.config.model_dump(mode="json"), **(extra or {})}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_pretrained(directory: str | Path, *, vocabulary: Vocabulary | None = None) -> RamPlus:
    directory = Path(directory)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}: unreadable config.json ({exc})") from exc
    if raw.get("format") != MODEL_FORMAT:
        raise CheckpointLayoutError(f"{directory}: config.json format {raw.get('format')!r}, expected {MODEL_FORMAT!r}")
    try:
        config = ModelConfig.model_validate(raw["config"])
    except (KeyError, ValueError) as exc:
        raise CheckpointLayoutError(f"{directory}: bad model config: {exc}") from exc
    model = RamPlus(config)
    try:
        state = load_file(str(directory / "model.safetensors"))
    except Exception as exc:  # safetensors' own error types
        raise CheckpointError(f"{directory}/model.safetensors: unreadable ({exc})") from exc
    load_strict(model, state, source=str(directory))
    vocab_path = directory / "vocabulary.safetensors"
    if vocabulary is None and vocab_path.is_file():
        vocabulary = Vocabulary.load(vocab_path, dim=config.text_dim)
    if vocabulary is not None:
        model.set_vocabulary(vocabulary)
    log.info("checkpoint.loaded", path=str(directory), config=config.key, layout="ramplus")
    return model.eval()


def load_checkpoint(
    path: str | Path,
    variant: str | None = None,
    image_size: int | None = None,
    *,
    vocabulary: Vocabulary | str | Path | None = None,
    tag_list: str | Path | list[str] | None = None,
    thresholds: str | Path | list[float] | float | None = None,
    trust_pickle: bool = False,
    mmap: bool = True,
) -> RamPlus:
    """Load an official `.pth` or our own directory; `variant` and `image_size` are inferred when omitted.

    The model comes back in eval mode with a vocabulary set: `vocabulary` when given, else the
    checkpoint's own (for official files, named by `tag_list` and `thresholds`).
    """
    path = Path(path)
    if isinstance(vocabulary, (str, Path)):
        vocabulary = Vocabulary.load(vocabulary)
    if path.is_dir():
        model = load_pretrained(path, vocabulary=vocabulary)
        if variant is not None or image_size is not None:
            wanted = get_config(variant or model.config.name, image_size or model.config.image_size)
            if wanted.key != model.config.key:
                raise CheckpointLayoutError(f"{path} holds {model.config.key}, not {wanted.key}")
        return model
    model = load_official(path, variant, image_size, tag_list=tag_list, thresholds=thresholds, trust_pickle=trust_pickle, mmap=mmap)
    if vocabulary is not None:
        model.set_vocabulary(vocabulary)
    return model
