"""The exceptions ramplus_core raises on purpose.

Every message says what went wrong and what to do next; the CLI prints it as one line and exits non-zero.
"""

from __future__ import annotations


class RamPlusError(Exception):
    """Base class of every expected failure in RAMPlus."""


class ConfigError(RamPlusError, ValueError):
    """An unknown model variant, image size or inconsistent configuration."""


class CheckpointError(RamPlusError):
    """A checkpoint file that cannot be read."""


class CheckpointLayoutError(CheckpointError):
    """A checkpoint whose keys or shapes do not fit the model it claims to be."""


class UntrustedCheckpointError(CheckpointError):
    """A pickle that would need arbitrary code execution to load, and nobody said it is trusted."""


class WeightsUnavailableError(RamPlusError):
    """Pretrained weights that cannot be found locally or downloaded."""


class VocabularyError(RamPlusError, ValueError):
    """A vocabulary with the wrong shape, dimension, non-finite values or a bad checksum."""


class ImageError(RamPlusError, ValueError):
    """An image that cannot be used: not an image, corrupt, truncated or too large."""

    kind = "decode"


class NotAnImageError(ImageError):
    kind = "not_image"


class CorruptImageError(ImageError):
    kind = "decode"


class ImageTooLargeError(ImageError):
    kind = "too_large"


class DescriptionError(RamPlusError):
    """The LLM endpoint failed or answered something unusable."""
