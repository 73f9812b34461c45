"""Tiny GPT-2, Llama and OPT causal LMs for PEFT's decoder matrix, built from configs and saved locally.

PEFT's matrix loads `peft-internal-testing/tiny-random-*` from the Hub, which is out of reach here; these folders
stand in for them (same architectures and class names, random weights, fixed seeds), each with a small byte-level
BPE tokenizer trained offline.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

from .peft_suite import CACHE

VOCAB = 320
COMMON = {"num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64}
TOKENS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}  # <s>, </s>, <pad> of the tokenizer below
MODELS = {
    "tiny-random-GPT2LMHeadModel": (GPT2LMHeadModel, GPT2Config(vocab_size=VOCAB, n_embd=16, **COMMON, **TOKENS)),
    "tiny-random-LlamaForCausalLM": (
        LlamaForCausalLM,
        LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_key_value_heads=2, **COMMON, **TOKENS),
    ),
    "tiny-random-OPTForCausalLM": (
        OPTForCausalLM,
        OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, word_embed_proj_dim=16, **COMMON, **TOKENS),
    ),
}
CORPUS = ["Tiny models stand in for the Hub's test models.", "A quote a line, short and plain.", "0123456789 abc"]


def tiny_model_ids() -> list[str]:
    """Local folders of the tiny models (built on first use); the folder names carry the class names, which PEFT's
    matrix reads (e.g. to skip methods without Conv1D support on GPT-2)."""
    return [str(_build(name)) for name in MODELS]


def _build(name: str) -> Path:
    folder = CACHE / "models" / name
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    model_class, config = MODELS[name]
    torch.manual_seed(0)
    model = model_class(config)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        model.save_pretrained(scratch)
        _tokenizer().save_pretrained(scratch)
        try:
            os.replace(scratch, folder)  # one rename: another process building the same model races harmlessly
        except OSError:
            if not (folder / "config.json").is_file():
                raise
        os.makedirs(scratch, exist_ok=True)  # TemporaryDirectory removes it on exit
    return folder


def _tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=VOCAB, min_frequency=1, special_tokens=["<s>", "</s>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
