"""Any Hub id or local checkpoint, as an image or sequence classifier with a head over the run's classes."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from .base import ModelInfo, model_info


def load_pretrained(
    name_or_path: str, labels: dict, modality: str | None
) -> tuple[PreTrainedModel, object, ModelInfo]:
    """A Hub id or local checkpoint; the head is replaced whenever its size differs from the label space."""
    modality = modality or _config_modality(AutoConfig.from_pretrained(name_or_path))
    processor: object | None
    if modality == "image":
        model = AutoModelForImageClassification.from_pretrained(name_or_path, ignore_mismatched_sizes=True, **labels)
        try:
            processor = AutoImageProcessor.from_pretrained(name_or_path)
        except OSError:  # a checkpoint without preprocessing files: the caller brings its own transforms
            processor = None
    elif modality == "text":
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, ignore_mismatched_sizes=True, **labels
        )
        processor = tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if tokenizer.pad_token is None:  # decoder LMs: batches need a padding token
            tokenizer.pad_token = tokenizer.eos_token
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    return model, processor, model_info(name_or_path, name_or_path, modality, model, pretrained=True)


def _config_modality(config: PretrainedConfig) -> str:
    if config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return "image"
    if config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return "text"
    raise ValueError(f"cannot tell whether a {config.model_type!r} model takes images or text; pass modality=")
