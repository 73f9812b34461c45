"""PEFT's LoRA as a continual learner: one adapter through all tasks, or merged into the weights after each."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from ...model import DEFAULT_TARGET_MODULES
from ..heads import classifier_path
from .base import AdapterOptions, PeftMethod, as_peft, load_tensors


class SequentialLoRA(PeftMethod):
    """PEFT's LoRA, one adapter trained through all tasks (also the `joint` upper bound on a single task)."""

    name = "lora-seq"

    def __init__(self, options: AdapterOptions, name: str | None = None) -> None:
        super().__init__(options)
        self.name = name or self.name

    def config(self, model: nn.Module) -> LoraConfig:
        return LoraConfig(
            r=self.options.r,
            lora_alpha=self.options.r,  # scaling 1, like SD-LoRA's raw current direction
            # SD-LoRA's default targets (query/value), so that both adapt the same layers
            target_modules=self.options.target_modules
            or DEFAULT_TARGET_MODULES.get(cast(PreTrainedModel, model).config.model_type),
            layers_to_transform=self.options.layers_to_transform,
            modules_to_save=[classifier_path(model)],
        )

    def wrap(self, model: nn.Module) -> nn.Module:
        return get_peft_model(model, self.config(model))

    def stored_parameters(self, model: nn.Module) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


class MergedLoRA(SequentialLoRA):
    """PEFT's LoRA merged into the weights after each task, then a fresh adapter: the recipe PEFT suggests for
    continual fine-tuning. What it stores is every adapted weight matrix in full."""

    name = "lora-merge"

    def end_task(self, model: nn.Module, is_last: bool) -> nn.Module:
        if is_last:
            return model
        merged = as_peft(model).merge_and_unload()
        return get_peft_model(merged, self.config(merged))

    def stored_parameters(self, model: nn.Module) -> int:
        layers = [m for n, m in model.named_modules() if n.endswith("base_layer")]
        return sum(layer.weight.numel() for layer in layers)

    def save(self, model: nn.Module, directory: Path) -> None:
        """The fresh adapter and the adapted layers' weights, into which the earlier tasks were merged."""
        super().save(model, directory)
        merged = {name: t.contiguous() for name, t in model.state_dict().items() if ".base_layer." in name}
        save_file(merged, directory / "merged.safetensors")

    def restore(self, model: nn.Module, directory: Path) -> nn.Module:
        model = super().restore(model, directory)
        load_tensors(model, directory / "merged.safetensors")
        return model
