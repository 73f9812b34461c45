"""O-LoRA (Wang et al., Findings of EMNLP 2023) on PEFT's LoRA: a new LoRA adapter per task, the earlier ones frozen
and still applied, and a loss term that keeps the current down-projection orthogonal to the earlier ones.

Every task's LoRA is a PEFT adapter of its own, all of them active at once (PEFT sums active LoRA adapters): the
first task's is PEFT's `default` adapter, which also holds the classification layer if the model has one (it trains
with every task); task t's is `task_t`. Nothing here assumes a classifier, so causal language models use it too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import cast

import torch
from peft import LoraModel, PeftModel
from torch import nn

from .base import AdapterOptions, TaskData, as_peft
from .lora import SequentialLoRA, lora_factors, lora_layers


def adapter_name(task: int) -> str:
    """PEFT adapter name of the (0-based) task's LoRA."""
    return "default" if task == 0 else f"task_{task + 1}"


class OLoRA(SequentialLoRA):
    """O-LoRA: the loss adds `lambda_1 * sum_{i<t} ||A_i A_t^T||_F^2` (A: r x in down-projections) and
    `lambda_2 * (||A_t||_F^2 + ||B_t||_F^2)`, with `(lambda_1, lambda_2) = AdapterOptions.olora_lambdas`."""

    name = "olora"
    shards = False  # the penalty reads the factors between forward passes, where FSDP holds only shards

    def __init__(self, options: AdapterOptions) -> None:
        super().__init__(options)
        if min(options.olora_lambdas) < 0:
            raise ValueError(f"O-LoRA's lambdas weigh penalties and cannot be negative; got {options.olora_lambdas}.")
        self.orthogonality, self.l2 = options.olora_lambdas
        # per LoRA layer: the layer, its earlier (frozen) down-projections, the current adapter's name
        self._layers: list[tuple[nn.Module, list[torch.Tensor], str]] = []

    def begin_task(self, model: nn.Module, task: TaskData) -> nn.Module:
        """Add the task's adapter (the first task's is the one `wrap` made) and train it alone."""
        peft_model = as_peft(model)
        current = adapter_name(task.index)
        if current not in peft_model.peft_config:
            later = dataclasses.replace(self.config(peft_model.get_base_model()), modules_to_save=None)
            peft_model.add_adapter(current, later)
        _activate(peft_model, task.index + 1)
        old = [adapter_name(t) for t in range(task.index)]
        self._layers = [
            (layer, [lora_factors(layer, name)[0] for name in old], current) for _, layer in lora_layers(model)
        ]
        return model

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """The two terms, summed over the LoRA layers (None where both are zero: the first task, `lambda_2 = 0`)."""
        terms = []
        for layer, old, current in self._layers:
            down, up = lora_factors(layer, current)
            if self.orthogonality and old:
                # the earlier factors are gathered here, not cached, so that they follow the model to its device
                terms.append(self.orthogonality * (torch.cat(old) @ down.T).float().square().sum())
            if self.l2:
                terms.append(self.l2 * (down.float().square().sum() + up.float().square().sum()))
        return torch.stack(terms).sum() if terms else None

    def restore(self, model: nn.Module, directory: Path) -> nn.Module:
        """Every task's adapter: `default` from the directory, `task_t` from its subdirectory (PEFT's layout)."""
        peft_model = PeftModel.from_pretrained(model, directory, is_trainable=True)
        tasks = 1
        while (directory / adapter_name(tasks)).is_dir():
            peft_model.load_adapter(directory / adapter_name(tasks), adapter_name(tasks), is_trainable=True)
            tasks += 1
        _activate(peft_model, tasks)
        return peft_model


def _activate(model: PeftModel, tasks: int) -> None:
    """Apply the first `tasks` adapters together; only the last one trains (and the classifier, in `default`)."""
    names = [adapter_name(t) for t in range(tasks)]
    cast(LoraModel, model.base_model).set_adapter(names)
    for name, parameter in model.named_parameters():
        if any(f".{old}." in name for old in names[:-1]) and "lora_" in name:
            parameter.requires_grad_(False)
