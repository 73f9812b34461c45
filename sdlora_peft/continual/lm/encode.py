"""Prompt/target pairs as token ids with the loss on the target only, and the batches a causal LM trains on.

A pair becomes ``prompt ids + target ids + end-of-sequence``: the prompt is tokenized with the tokenizer's special
tokens (a BOS where the model wants one), the target without, and the end-of-sequence token closes it so that the
model learns where an answer stops (and a ranked answer that is a prefix of another is not favoured). Labels are
-100 on every prompt token, so the loss is on the target tokens alone.

Batches are padded on the left: every row then ends with its target, which lets the loss keep the logits of the
last positions only (`target_loss`), and the positions are counted from each row's first real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100  # labels with this value carry no loss (the prompt, the padding)


def end_token(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token; set tokenizer.eos_token before training.")
    return tokenizer.eos_token_id


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def answer_ids(tokenizer, target: str) -> list[int]:
    """The tokens of an answer as it follows a prompt, closed by the end-of-sequence token."""
    return tokenizer(target, add_special_tokens=False)["input_ids"] + [end_token(tokenizer)]


def encode_pair(tokenizer, prompt: str, target: str) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one pair; the labels of the prompt tokens are `IGNORE_INDEX`."""
    question, answer = prompt_ids(tokenizer, prompt), answer_ids(tokenizer, target)
    return {"input_ids": question + answer, "labels": [IGNORE_INDEX] * len(question) + answer}


def encode_pairs(dataset: datasets.Dataset, tokenizer) -> datasets.Dataset:
    """A dataset of ``prompt``/``target`` pairs as ``input_ids``/``labels`` (other columns dropped)."""
    return dataset.map(
        lambda row: encode_pair(tokenizer, row["prompt"], row["target"]), remove_columns=dataset.column_names
    )


@dataclass
class CausalLMCollator:
    """Left-pads rows of ``input_ids`` (and ``labels``, with -100) into a batch with ``attention_mask`` and
    ``position_ids`` that count from each row's first real token."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        batch = {"input_ids": self._pad([row["input_ids"] for row in rows], length, self.pad_token_id)}
        batch["attention_mask"] = self._pad([[1] * len(row["input_ids"]) for row in rows], length, 0)
        batch["position_ids"] = positions(batch["attention_mask"])
        if "labels" in rows[0]:
            batch["labels"] = self._pad([row["labels"] for row in rows], length, IGNORE_INDEX)
        return batch

    @staticmethod
    def _pad(rows: list, length: int, value: int) -> torch.Tensor:
        return torch.tensor([[value] * (length - len(row)) + list(row) for row in rows], dtype=torch.long)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first attended token (left padding gets 0)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def target_loss(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the target tokens (`labels` not -100) of a left-padded batch. Only the last
    positions' logits are computed (``logits_to_keep``): the targets sit at the end of every row, and the output
    layer over a large vocabulary is the costliest layer of a small LM."""
    span = int((labels != IGNORE_INDEX).sum(dim=1).max().clamp(max=labels.shape[1] - 1))
    logits = model(**inputs, logits_to_keep=span + 1).logits[:, :-1]  # position i predicts token i + 1
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, -span:].flatten(), ignore_index=IGNORE_INDEX)
