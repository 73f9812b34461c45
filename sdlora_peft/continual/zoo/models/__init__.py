"""Backbones by short name (offline, from PyPI wheels) or by Hub id / local path."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from ..files import default_cache_dir
from .base import ModelInfo, label_kwargs
from .dinov2 import load_dinov2_small
from .gguf import load_smollm2
from .hub import load_pretrained
from .minilm import load_minilm
from .pooling import POOLINGS, PooledClassifier, with_pooling
from .tiny import tiny_model


def load_model(
    name_or_path: str,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    modality: str | None = None,
    *,
    pooling: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[nn.Module, object | None, ModelInfo]:
    """Return ``(model, processor or tokenizer, info)`` with a fresh classification head over `num_labels` classes.

    `name_or_path` is one of `MODEL_NAMES` (``dinov2-small``, ``minilm``, ``smollm2-135m``, ``tiny-dinov2``,
    ``tiny-bert``), or else a Hub id or a local checkpoint, loaded with ``AutoModelForImageClassification`` or
    ``AutoModelForSequenceClassification`` (`modality` ``"image"``/``"text"`` picks one when the config alone does
    not tell). Converted checkpoints are kept under `cache_dir` (default: `default_cache_dir`).

    Text models pool their token states as their architecture's classifier does (BERT: CLS through its pooler;
    decoders: the last token), except where the zoo knows better (`minilm`, a sentence encoder: the mean);
    `pooling` (``"mean"``, ``"cls"``, ``"last"``) overrides it with a `PooledClassifier`.
    """
    labels = label_kwargs(num_labels, id2label)
    if name_or_path in _MODELS:
        model, processor, info = _MODELS[name_or_path](labels, Path(cache_dir) if cache_dir else default_cache_dir())
    else:
        model, processor, info = load_pretrained(name_or_path, labels, modality)
    pooling = pooling or DEFAULT_POOLING.get(name_or_path)
    if pooling is None:
        return model, processor, info
    if info.modality != "text":
        raise ValueError(f"pooling={pooling!r} applies to text models; {name_or_path!r} takes images")
    return with_pooling(model, pooling), processor, replace(info, pooling=pooling)


def set_dropout(model: nn.Module, probability: float) -> None:
    """Set every dropout of `model` to `probability`: its `nn.Dropout` modules and the attention dropout rates that
    transformers' attention modules keep as floats (`attention_dropout`)."""
    if not 0 <= probability < 1:
        raise ValueError(f"dropout must be in [0, 1), got {probability}")
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = probability
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.__dict__["attention_dropout"] = probability  # a plain float attribute, not a submodule


# The loaders behind the short model names take the label keywords and the cache folder.
_MODELS: dict[str, Callable[[dict, Path], tuple[PreTrainedModel, object, ModelInfo]]] = {
    "dinov2-small": load_dinov2_small,
    "minilm": load_minilm,
    "smollm2-135m": load_smollm2,
    "tiny-dinov2": lambda labels, cache: tiny_model("image", labels["num_labels"], labels["id2label"]),
    "tiny-bert": lambda labels, cache: tiny_model("text", labels["num_labels"], labels["id2label"]),
}
MODEL_NAMES = tuple(_MODELS)
DEFAULT_POOLING = {"minilm": "mean"}
"""How the zoo's sentence encoders were trained to be read, where that differs from their architecture's head."""

__all__ = [
    "DEFAULT_POOLING",
    "MODEL_NAMES",
    "POOLINGS",
    "ModelInfo",
    "PooledClassifier",
    "load_model",
    "set_dropout",
    "tiny_model",
]
