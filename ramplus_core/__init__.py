"""RAM++ (Recognize Anything Plus) as a plain library: load a checkpoint, preprocess, tag.

    import ramplus_core
    model = ramplus_core.load_checkpoint("ram_plus_swin_large_14m.pth")   # variant and size inferred
    x = ramplus_core.preprocess(images, image_size=384)
    logits = model.tag_logits(x)                                         # [B, num_tags], pre-sigmoid

No Kafka, Redis, S3 or Ray in here: those live in `workers`.
"""

from ramplus_core.checkpoint import (
    import_official_vocabulary,
    load_checkpoint,
    load_official,
    load_pretrained,
    save_pretrained,
)
from ramplus_core.configs import MODEL_CONFIGS, ModelConfig, get_config, list_configs
from ramplus_core.errors import (
    CheckpointError,
    CheckpointLayoutError,
    ConfigError,
    CorruptImageError,
    DescriptionError,
    ImageError,
    ImageTooLargeError,
    NotAnImageError,
    RamPlusError,
    UntrustedCheckpointError,
    VocabularyError,
    WeightsUnavailableError,
)
from ramplus_core.evaluation import (
    TagMetrics,
    average_precision,
    calibrate_thresholds,
    label_prior_map,
    mean_average_precision,
    precision_recall_f1,
)
from ramplus_core.model import RamPlus, VocabularyTensors, reweight_descriptions
from ramplus_core.preprocess import FastPreprocessor, load_image, preprocess
from ramplus_core.tagger import Tagger, create_model
from ramplus_core.tagging import ImageTags, TagScore, select_tags
from ramplus_core.vocabulary import Vocabulary, VocabularyMetadata

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
