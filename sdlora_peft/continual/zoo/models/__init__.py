"""Backbones by short name (offline, from PyPI wheels) or by Hub id / local path."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedModel

from ..files import default_cache_dir
from .base import ModelInfo, label_kwargs
from .causal import CAUSAL_LM_NAMES, load_causal_lm
from .dinov2 import load_dinov2_small
from .gguf import load_smollm2
from .hub import load_pretrained
from .minilm import load_minilm
from .tiny import tiny_causal_lm, tiny_model


def load_model(
    name_or_path: str,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    modality: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, object | None, ModelInfo]:
    """Return ``(model, processor or tokenizer, info)`` with a fresh classification head over `num_labels` classes.

    `name_or_path` is one of `MODEL_NAMES` (``dinov2-small``, ``minilm``, ``smollm2-135m``, ``tiny-dinov2``,
    ``tiny-bert``), or else a Hub id or a local checkpoint, loaded with ``AutoModelForImageClassification`` or
    ``AutoModelForSequenceClassification`` (`modality` ``"image"``/``"text"`` picks one when the config alone does
    not tell). Converted checkpoints are kept under `cache_dir` (default: `default_cache_dir`).
    """
    labels = label_kwargs(num_labels, id2label)
    if name_or_path in _MODELS:
        return _MODELS[name_or_path](labels, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    return load_pretrained(name_or_path, labels, modality)


# The loaders behind the short model names take the label keywords and the cache folder.
_MODELS: dict[str, Callable[[dict, Path], tuple[PreTrainedModel, object, ModelInfo]]] = {
    "dinov2-small": load_dinov2_small,
    "minilm": load_minilm,
    "smollm2-135m": load_smollm2,
    "tiny-dinov2": lambda labels, cache: tiny_model("image", labels["num_labels"], labels["id2label"]),
    "tiny-bert": lambda labels, cache: tiny_model("text", labels["num_labels"], labels["id2label"]),
}
MODEL_NAMES = tuple(_MODELS)

__all__ = [
    "CAUSAL_LM_NAMES",
    "MODEL_NAMES",
    "ModelInfo",
    "load_causal_lm",
    "load_model",
    "tiny_causal_lm",
    "tiny_model",
]
