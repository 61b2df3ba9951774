"""Model configurations as data.

A RAM++ variant is fully described by a `ModelConfig`: the Swin geometry of the image encoder, the size of
the shared text-embedding space and the alignment decoder's shape. Named configs live in `MODEL_CONFIGS`
under `"<variant>@<image_size>"`; `get_config` resolves a name (or a variant plus a size).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ramplus_core.errors import ConfigError


class ModelConfig(BaseModel):
    """Everything needed to build a RAM++ module, and nothing that is learned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Variant name, e.g. 'swin_l'.")
    image_size: int = Field(gt=0, description="Square input side in pixels.")
    patch_size: int = 4
    embed_dim: int = Field(gt=0, description="Swin stage-0 width; doubles every stage.")
    depths: tuple[int, ...] = Field(description="Swin blocks per stage.")
    num_heads: tuple[int, ...] = Field(description="Swin attention heads per stage.")
    window_size: int = Field(gt=0, description="Swin attention window side, in tokens.")
    mlp_ratio: float = 4.0
    text_dim: int = Field(512, description="Dimension of the CLIP text space the vocabulary lives in.")
    decoder_dim: int = Field(768, description="Width of the alignment decoder.")
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_ffn_dim: int = 3072
    decoder_ln_eps: float = 1e-12

    @model_validator(mode="after")
    def _check_geometry(self) -> ModelConfig:
        if len(self.depths) != len(self.num_heads):
            raise ConfigError(f"{self.name}: {len(self.depths)} depths but {len(self.num_heads)} head counts")
        if self.image_size % (self.patch_size * 2 ** (len(self.depths) - 1)):
            raise ConfigError(
                f"{self.name}: image_size {self.image_size} is not divisible by the total downsampling "
                f"{self.patch_size * 2 ** (len(self.depths) - 1)}"
            )
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"{self.name}: decoder_dim {self.decoder_dim} not divisible by {self.decoder_heads} heads")
        return self

    @property
    def key(self) -> str:
        return f"{self.name}@{self.image_size}"

    @property
    def vision_width(self) -> int:
        """Channels of the last Swin stage, i.e. of the image tokens."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image including the prepended mean token."""
        side = self.image_size // (self.patch_size * 2 ** (len(self.depths) - 1))
        return 1 + side * side


# The official configs use window 12 at 384 px and 7 at 224 px (the ImageNet-22k Swin recipes); checkpoints
# that do not say their image size are read by the inverse.
OFFICIAL_WINDOW = {384: 12, 224: 7}


def _swin(name: str, image_size: int, embed_dim: int, num_heads: tuple[int, ...]) -> ModelConfig:
    return ModelConfig(
        name=name,
        image_size=image_size,
        embed_dim=embed_dim,
        depths=(2, 2, 18, 2),
        num_heads=num_heads,
        window_size=OFFICIAL_WINDOW[image_size],
    )


def _tiny(image_size: int) -> ModelConfig:
    """For tests and CPU benchmarks: real shifted windows in the first stages, seconds to run."""
    return ModelConfig(
        name="tiny", image_size=image_size, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4,
        decoder_dim=64, decoder_heads=4, decoder_ffn_dim=128,
    )


MODEL_CONFIGS: dict[str, ModelConfig] = {
    c.key: c
    for c in (
        _swin("swin_l", 384, 192, (6, 12, 24, 48)),
        _swin("swin_l", 224, 192, (6, 12, 24, 48)),
        _swin("swin_b", 384, 128, (4, 8, 16, 32)),
        _swin("swin_b", 224, 128, (4, 8, 16, 32)),
        _tiny(64),
        _tiny(128),
    )
}

DEFAULT_IMAGE_SIZE = {"swin_l": 384, "swin_b": 384, "tiny": 64}


def list_configs() -> list[str]:
    return sorted(MODEL_CONFIGS)


def get_config(variant: str | ModelConfig, image_size: int | None = None) -> ModelConfig:
    """Resolve `"swin_l"`, `"swin_l@384"` or `("swin_l", 384)` to a `ModelConfig`."""
    if isinstance(variant, ModelConfig):
        if image_size is not None and image_size != variant.image_size:
            raise ConfigError(f"config {variant.key} does not match image_size {image_size}")
        return variant
    name, _, size = variant.partition("@")
    if size:
        if not size.isdigit():
            raise ConfigError(f"bad config name {variant!r}: expected '<variant>@<image_size>'")
        if image_size is not None and int(size) != image_size:
            raise ConfigError(f"config {variant!r} contradicts image_size={image_size}")
        image_size = int(size)
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZE.get(name)
    key = f"{name}@{image_size}"
    if key not in MODEL_CONFIGS:
        raise ConfigError(f"unknown model config {key!r}; known: {', '.join(list_configs())}")
    return MODEL_CONFIGS[key]
