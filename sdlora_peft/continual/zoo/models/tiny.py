"""Small randomly initialised models for fast tests and the offline smoke runs."""

from __future__ import annotations

import string

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BitImageProcessorPil,
    Dinov2Config,
    Dinov2ForImageClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from .base import ModelInfo, label_kwargs, model_info
from .dinov2 import dinov2_processor


def tiny_model(
    modality: str, num_labels: int, id2label: dict[int, str] | None = None, seed: int = 0
) -> tuple[PreTrainedModel, object, ModelInfo]:
    """A small randomly initialised Dinov2 (32 px images) or Bert (character vocabulary) classifier.

    Same return value as `load_model`, so tests and the offline demo swap it in for a real backbone. The
    weights depend on `seed` only; the global torch random state is left untouched.
    """
    builders = {"image": _tiny_dinov2, "text": _tiny_bert}
    if modality not in builders:
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = builders[modality](label_kwargs(num_labels, id2label))
    return model, processor, model_info(f"tiny-{model.config.model_type}", "random init", modality, model, False)


def _tiny_dinov2(labels: dict) -> tuple[PreTrainedModel, BitImageProcessorPil]:
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8,
        use_mask_token=False, **labels,
    )  # fmt: skip
    return Dinov2ForImageClassification(config), dinov2_processor(32, 32)


def _tiny_bert(labels: dict) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = _char_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, **labels,
    )  # fmt: skip
    return BertForSequenceClassification(config), tokenizer


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """A Bert-style WordPiece tokenizer over printable ASCII characters, built in memory (no files, no Hub)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [c for c in string.printable if not c.isspace()]
    vocab = {token: i for i, token in enumerate(specials + chars + [f"##{c}" for c in chars])}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(t, vocab[t]) for t in ("[CLS]", "[SEP]")],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )  # fmt: skip
