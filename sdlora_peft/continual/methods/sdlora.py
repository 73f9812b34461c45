"""SD-LoRA through PEFT's public API (`advance_task()` after every task), and the paper's ablation of it."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from peft import get_peft_model
from torch import nn

from ... import SDLoraConfig, SDLoraLayer
from .base import AdapterOptions, PeftMethod, as_peft
from .lora import saved_modules


def sdlora_config(model: nn.Module) -> SDLoraConfig:
    return cast(SDLoraConfig, as_peft(model).peft_config["default"])


class SDLoRA(PeftMethod):
    """SD-LoRA through PEFT: `advance_task()` after every task."""

    def __init__(self, options: AdapterOptions, name: str = "sdlora", **variant) -> None:
        super().__init__(options)
        self.name, self.variant = name, variant

    def wrap(self, model: nn.Module) -> nn.Module:
        config = SDLoraConfig(
            r=self.options.r,
            target_modules=self.options.target_modules,
            layers_to_transform=self.options.layers_to_transform,
            modules_to_save=saved_modules(model),
            task_type=self.options.task_type,
            **{**self.options.sdlora, **self.variant},
        )
        return get_peft_model(model, config)

    def end_task(self, model: nn.Module, is_last: bool) -> nn.Module:
        as_peft(model).advance_task()
        return model

    def magnitudes(self, model: nn.Module) -> list[float | None]:
        """Magnitude of each finished task's direction (the mean over layers with per-layer magnitudes); None for a
        task whose direction was absorbed."""
        by_task = as_peft(model).task_magnitudes()
        return [by_task.get(record["task"]) for record in sdlora_config(model).task_history]

    def stored_parameters(self, model: nn.Module) -> int:
        """Frozen factors, their scales, the magnitudes and any trained current factors (an empty slot that
        advance_task() just opened is not counted)."""
        frozen = ("sdlora_frozen_A", "sdlora_frozen_B", "sdlora_frozen_scale")
        buffers = sum(b.numel() for n, b in model.named_buffers() if any(key in n for key in frozen))
        current = sum(
            layer.sdlora_A["default"].numel() + layer.sdlora_B["default"].numel()
            for layer in model.modules()
            if isinstance(layer, SDLoraLayer) and layer.sdlora_B["default"].any()
        )
        empty_slot = 1 if current == 0 else 0
        magnitudes = sum(p.numel() - empty_slot for n, p in model.named_parameters() if "sdlora_magnitude" in n)
        return buffers + current + magnitudes


class SDLoRAAblation(SDLoRA):
    """The paper's ablation of SD-LoRA (its Table 5), to check which part matters:

    - `single`: one decoupled component (direction and magnitude) trained through all tasks, never frozen;
    - `first`: the first task's direction frozen, afterwards only magnitudes train (no new directions);
    - `fixed`: a new direction per task, but old magnitudes stay fixed (old directions are not re-scaled).
    """

    def __init__(self, options: AdapterOptions, mode: str) -> None:
        super().__init__(options, f"ablation-{mode}")
        self.mode = mode
        self.shards = mode != "fixed"  # its gradient hooks sit on the unsharded magnitudes, not on a sharded copy's

    def end_task(self, model: nn.Module, is_last: bool) -> nn.Module:
        if self.mode == "single" or (self.mode == "first" and sdlora_config(model).current_task > 0):
            return model
        as_peft(model).advance_task()
        return self._constrain(model)

    def restore(self, model: nn.Module, directory: Path) -> nn.Module:
        model = super().restore(model, directory)
        return self._constrain(model) if sdlora_config(model).current_task > 0 else model

    def _constrain(self, model: nn.Module) -> nn.Module:
        """What the ablation keeps from training once a first task is done (the trainable tensors are new after
        each `advance_task()`, and after a restore)."""
        for name, parameter in model.named_parameters():
            if self.mode == "first" and ("sdlora_A" in name or "sdlora_B" in name):
                parameter.requires_grad_(False)
            if self.mode == "fixed" and "sdlora_magnitude" in name:
                only_current = torch.zeros_like(parameter)
                only_current[-1] = 1
                parameter.register_hook(lambda grad, mask=only_current: grad * mask)
        return model


class FirstSessionSDLoRA(SDLoRA):
    """First-session adaptation (as in RanPAC and APER): SD-LoRA learns the first task, then the backbone stays as it
    is, so that class statistics taken later never go stale; only the head keeps learning. On the first task SD-LoRA
    is a LoRA with one magnitude, so this is what any LoRA adapted once would give."""

    def __init__(self, options: AdapterOptions) -> None:
        super().__init__(options, "sdlora-fsa")

    def end_task(self, model: nn.Module, is_last: bool) -> nn.Module:
        if sdlora_config(model).current_task > 0:
            return model
        as_peft(model).advance_task()
        return _freeze_adapter(model)

    def restore(self, model: nn.Module, directory: Path) -> nn.Module:
        model = super().restore(model, directory)
        return _freeze_adapter(model) if sdlora_config(model).current_task > 0 else model


def _freeze_adapter(model: nn.Module) -> nn.Module:
    for name, parameter in model.named_parameters():
        if "sdlora_" in name:
            parameter.requires_grad_(False)
    return model
