"""RAM++ (Recognize Anything Plus) as a plain library: load a checkpoint, preprocess, tag.

    import ramplus_core
    model = ramplus_core.load_checkpoint("ram_plus_swin_large_14m.pth")   # variant and size inferred
    x = ramplus_core.preprocess(images, image_size=384)
    logits = model.tag_logits(x)                                         # [B, num_tags], pre-sigmoid

No Kafka, Redis, S3 or Ray in here: those live in `workers`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562): `ramplus_core.errors` or `ramplus_core.configs` alone do not
# pull in torch and timm, so a command line that only needs an error class answers at once.
_EXPORTS = {
    "ramplus_core.checkpoint": ("import_official_vocabulary", "load_checkpoint", "load_official", "load_pretrained", "save_pretrained"),
    "ramplus_core.configs": ("MODEL_CONFIGS", "ModelConfig", "get_config", "list_configs"),
    "ramplus_core.errors": (
        "CheckpointError", "CheckpointLayoutError", "ConfigError", "CorruptImageError", "DescriptionError", "ImageError",
        "ImageTooLargeError", "NotAnImageError", "RamPlusError", "UntrustedCheckpointError", "VocabularyError",
        "WeightsUnavailableError",
    ),
    "ramplus_core.evaluation": (
        "TagMetrics", "average_precision", "calibrate_thresholds", "label_prior_map", "mean_average_precision", "precision_recall_f1",
    ),
    "ramplus_core.model": ("RamPlus", "VocabularyTensors", "reweight_descriptions"),
    "ramplus_core.preprocess": ("FastPreprocessor", "load_image", "preprocess"),
    "ramplus_core.tagger": ("Tagger", "create_model"),
    "ramplus_core.tagging": ("ImageTags", "TagScore", "select_tags"),
    "ramplus_core.vocabulary": ("Vocabulary", "VocabularyMetadata"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from ramplus_core.checkpoint import import_official_vocabulary, load_checkpoint, load_official, load_pretrained, save_pretrained
    from ramplus_core.configs import MODEL_CONFIGS, ModelConfig, get_config, list_configs
    from ramplus_core.errors import (
        CheckpointError, CheckpointLayoutError, ConfigError, CorruptImageError, DescriptionError, ImageError,
        ImageTooLargeError, NotAnImageError, RamPlusError, UntrustedCheckpointError, VocabularyError, WeightsUnavailableError,
    )
    from ramplus_core.evaluation import (
        TagMetrics, average_precision, calibrate_thresholds, label_prior_map, mean_average_precision, precision_recall_f1,
    )
    from ramplus_core.model import RamPlus, VocabularyTensors, reweight_descriptions
    from ramplus_core.preprocess import FastPreprocessor, load_image, preprocess
    from ramplus_core.tagger import Tagger, create_model
    from ramplus_core.tagging import ImageTags, TagScore, select_tags
    from ramplus_core.vocabulary import Vocabulary, VocabularyMetadata


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'ramplus_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once is enough
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])


__all__ = [
    "MODEL_CONFIGS", "CheckpointError", "CheckpointLayoutError", "ConfigError", "CorruptImageError",
    "DescriptionError", "FastPreprocessor", "ImageError", "ImageTags", "ImageTooLargeError", "ModelConfig",
    "NotAnImageError", "RamPlus", "RamPlusError", "TagMetrics", "TagScore", "Tagger",
    "UntrustedCheckpointError", "Vocabulary", "VocabularyError", "VocabularyMetadata", "VocabularyTensors",
    "WeightsUnavailableError", "average_precision", "calibrate_thresholds", "create_model", "get_config",
    "import_official_vocabulary", "label_prior_map", "list_configs", "load_checkpoint", "load_image",
    "load_official", "load_pretrained", "mean_average_precision", "precision_recall_f1", "preprocess",
    "reweight_descriptions", "save_pretrained", "select_tags",
]
__version__ = "0.1.0"
