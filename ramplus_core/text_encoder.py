"""The CLIP text encoder that puts tag descriptions into RAM++'s 512-d space (open_clip).

The official vocabularies were embedded with OpenAI CLIP ViT-B/16 (`clip.tokenize(truncate=True)`,
`encode_text`, L2-normalised rows); open_clip's `ViT-B-16` with the `openai` weights is the same network
and tokenizer. `pretrained` may be an open_clip tag (downloaded once into the cache) or a local file;
`None` builds a randomly initialised encoder, for tests only: its id ends in `/random` so vocabularies
made with it are never mistaken for real ones.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import open_clip
import structlog
import torch
from torch import nn

from ramplus_core.errors import WeightsUnavailableError

log = structlog.get_logger(__name__)


class _OpenClipRandomInit(logging.Filter):
    """open_clip's own line for random weights (a root-logger warning): ours says it once, with the seed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _without_open_clip_random_init_warning() -> Iterator[None]:
    drop = _OpenClipRandomInit()
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)

# Ships with the package: a 2-layer text tower in the same 512-d space, for tests and demos.
open_clip.add_model_config(Path(__file__).parent / "text_configs")

DEFAULT_TEXT_MODEL = "ViT-B-16"
DEFAULT_TEXT_WEIGHTS = "openai"


class TextEncoder:
    """`encode(texts) -> [N, dim]` L2-normalised float32 embeddings."""

    def __init__(
        self,
        model_name: str = DEFAULT_TEXT_MODEL,
        pretrained: str | None = DEFAULT_TEXT_WEIGHTS,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        cache_dir: str | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        if model_name not in open_clip.list_models():
            raise WeightsUnavailableError(f"unknown open_clip model {model_name!r}")
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.seed = seed
        if pretrained is not None and _looks_like_path(pretrained) and not Path(pretrained).expanduser().is_file():
            raise WeightsUnavailableError(
                f"text encoder weights file not found: {pretrained}. Download open_clip {model_name} weights "
                "(for ViT-B-16 the 'openai' ones) and pass their local path."
            )
        # Random weights (tests, synthetic data) come from `seed`, so that every process that builds this
        # encoder (the vocabulary builder, each training worker) embeds a text the same way.
        with torch.random.fork_rng(devices=[]), _without_open_clip_random_init_warning():
            torch.manual_seed(seed)
            model = self._create(model_name, pretrained, precision, cache_dir)
        if pretrained is None:
            log.warning("text_encoder.random_weights", model=model_name, seed=seed)
        model.visual = nn.Identity()  # only the text tower is used; free the image tower
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.dim = int(model.text_projection.shape[1]) if model.text_projection is not None else int(model.ln_final.weight.shape[0])

    def _create(self, model_name: str, pretrained: str | None, precision: str, cache_dir: str | None) -> nn.Module:
        try:
            return open_clip.create_model(
                model_name,
                pretrained=pretrained,
                device=self.device,
                precision=precision,
                cache_dir=cache_dir,
                require_pretrained=pretrained is not None,
                pretrained_text=False,
            )
        except Exception as exc:  # open_clip surfaces hub, HTTP and file errors with many types
            where = "the file" if pretrained and Path(pretrained).exists() else f"the {pretrained!r} weights"
            raise WeightsUnavailableError(
                f"cannot load {where} for text encoder {model_name}: {type(exc).__name__}: {exc}. "
                "Without network, download the weights elsewhere (open_clip ViT-B-16 'openai', "
                "open_clip_pytorch_model.bin) and pass the local file path as the text-encoder weights "
                "(RAMPLUS_TRAIN__TEXT_WEIGHTS)."
            ) from exc

    @property
    def id(self) -> str:
        """Recorded in every vocabulary it builds, e.g. `open_clip:ViT-B-16/openai`."""
        weights = f"random-seed{self.seed}" if self.pretrained is None else (Path(self.pretrained).name if "/" in self.pretrained else self.pretrained)
        return f"open_clip:{self.model_name}/{weights}"

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        out = []
        for start in range(0, len(texts), self.batch_size):
            # open_clip's tokenizer truncates at 77 tokens and keeps the end-of-text token, like
            # clip.tokenize(truncate=True): the long LLM answers rely on that.
            tokens = self.tokenizer(texts[start : start + self.batch_size]).to(self.device)
            features = self.model.encode_text(tokens).float()
            out.append(features / features.norm(dim=-1, keepdim=True))
        return torch.cat(out).cpu()

    __call__ = encode


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith((".bin", ".pt", ".pth", ".safetensors"))
