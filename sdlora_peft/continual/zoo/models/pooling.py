"""Text classifiers that pool the encoder's last hidden states the way the backbone was trained to be read.

transformers' `*ForSequenceClassification` classes pool one way per architecture: BERT reads its CLS token through a
tanh pooler, decoders read the last token. A sentence encoder such as all-MiniLM-L6-v2 was trained on the
attention-masked mean of its token states instead; reading it from CLS loses several points of accuracy. A
`PooledClassifier` puts a linear head on the pooling a run asks for:

- `mean`: the mean of the last hidden states over the attended tokens;
- `cls`: the first token's last hidden state (no pooler);
- `last`: the last attended token's state, wherever the padding is.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """One vector per sequence from `hidden` ([batch, tokens, width]) by `pooling` (one of POOLINGS)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        positions = torch.arange(attention_mask.shape[1], device=hidden.device)
        last = (attention_mask * positions).argmax(dim=1)
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


class PooledClassifier(nn.Module):
    """`classifier(dropout(pool(encoder(...).last_hidden_state)))`, with the encoder's config as its own so that
    PEFT finds the default target modules of the encoder's model type."""

    def __init__(self, encoder: PreTrainedModel, pooling: str, num_labels: int, dropout: float = 0.0) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        self.encoder = encoder
        self.config = encoder.config
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        width = encoder.config.get_text_config().hidden_size
        self.classifier = nn.Linear(width, num_labels)
        nn.init.normal_(self.classifier.weight, std=getattr(encoder.config, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        logits = self.classifier(self.dropout(pool(hidden, attention_mask, self.pooling)))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def with_pooling(model: PreTrainedModel, pooling: str) -> PooledClassifier:
    """The encoder inside a transformers sequence classifier `model`, under a fresh head on `pooling`."""
    encoder = getattr(model, model.base_model_prefix)
    if hasattr(encoder, "pooler"):
        encoder.pooler = None  # BERT's tanh pooler reads CLS: unused here, so not computed
    config = model.config
    dropout = getattr(config, "classifier_dropout", None)
    if dropout is None:
        dropout = getattr(config, "hidden_dropout_prob", 0.0)
    return PooledClassifier(encoder, pooling, cast(int, config.num_labels), float(dropout or 0.0))
