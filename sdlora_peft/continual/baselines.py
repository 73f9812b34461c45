"""The methods compared side by side: SD-LoRA's variants and the peers a user would otherwise pick.

A `Method` decides how the backbone is adapted (`wrap`) and what happens when a task ends (`end_task`); the loop,
the head and the data are the same for all of them (see train.run_sequence). `save` and `restore` checkpoint a
model between tasks, so that an interrupted run continues where it stopped. SD-LoRA is used through PEFT's public
API only, like any other PEFT method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from ..config import SDLoraConfig
from ..layer import SDLoraLayer
from ..model import DEFAULT_TARGET_MODULES
from .heads import classifier_path


@dataclass
class AdapterOptions:
    """Adapter settings shared by every method, so that they differ only in how tasks follow each other."""

    r: int = 10
    target_modules: list[str] | None = None
    layers_to_transform: list[int] | None = None
    sdlora: dict = field(default_factory=dict)  # extra SDLoraConfig fields (magnitude_sharing, freeze_scale, ...)


class Method:
    """A frozen backbone whose classification layer alone trains (`linear`)."""

    name = "linear"
    trains = True

    def __init__(self, options: AdapterOptions) -> None:
        self.options = options

    def wrap(self, model: nn.Module) -> nn.Module:
        head = classifier_path(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith(f"{head}."))
        return model

    def end_task(self, model: nn.Module, is_last: bool) -> nn.Module:
        return model

    def magnitudes(self, model: nn.Module) -> list[float | None] | None:
        return None

    def stored_parameters(self, model: nn.Module) -> int:
        """Parameters stored beyond the pretrained backbone and the classification layer."""
        return 0

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write what `restore` needs to rebuild `model` as it is between two tasks: here its trainable tensors."""
        trained = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        save_file(trained, directory / "trained.safetensors")

    def restore(self, model: nn.Module, directory: Path) -> nn.Module:
        """`model`, as `wrap` receives it, wrapped and brought to the state `save` wrote into `directory`."""
        model = self.wrap(model)
        _load_tensors(model, directory / "trained.safetensors")
        return model


def _load_tensors(model: nn.Module, path: Path) -> None:
    """Load a partial state dict, refusing names the model does not have (a checkpoint of another model)."""
    unexpected = model.load_state_dict(load_file(path), strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path} does not fit the model: it has no tensor named {unexpected[0]!r}.")


def _peft(model: nn.Module) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise TypeError(f"Expected the PeftModel this method wrapped, got a {type(model).__name__}.")
    return model


def _sdlora_config(model: nn.Module) -> SDLoraConfig:
    return cast(SDLoraConfig, _peft(model).peft_config["default"])


class FrozenNCM(Method):
    """SimpleCIL: a frozen backbone and nothing trained; pair it with the `ncm` head."""

    name = "ncm"
    trains = False

    def wrap(self, model: nn.Module) -> nn.Module:
        return model.requires_grad_(False)


class PeftMethod(Method):
    """A method whose model is a PeftModel: checkpoints are PEFT's own adapter files, so that the adapter's structure
    (SD-LoRA's frozen directions) comes back from its config."""

    def save(self, model: nn.Module, directory: Path) -> None:
        _peft(model).save_pretrained(str(directory))

    def restore(self, model: nn.Module, directory: Path) -> nn.Module:
        return PeftModel.from_pretrained(model, directory, is_trainable=True)


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
        merged = _peft(model).merge_and_unload()
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
        _load_tensors(model, directory / "merged.safetensors")
        return model


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
            modules_to_save=[classifier_path(model)],
            **{**self.options.sdlora, **self.variant},
        )
        return get_peft_model(model, config)

    def end_task(self, model: nn.Module, is_last: bool) -> nn.Module:
        _peft(model).advance_task()
        return model

    def magnitudes(self, model: nn.Module) -> list[float | None]:
        """Magnitude of each finished task's direction (the mean over layers with per-layer magnitudes); None for a
        task whose direction was absorbed."""
        by_task = _peft(model).task_magnitudes()
        return [by_task.get(record["task"]) for record in _sdlora_config(model).task_history]

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

    def end_task(self, model: nn.Module, is_last: bool) -> nn.Module:
        if self.mode == "single" or (self.mode == "first" and _sdlora_config(model).current_task > 0):
            return model
        _peft(model).advance_task()
        return self._constrain(model)

    def restore(self, model: nn.Module, directory: Path) -> nn.Module:
        model = super().restore(model, directory)
        return self._constrain(model) if _sdlora_config(model).current_task > 0 else model

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


METHOD_NAMES = (
    "sdlora", "sdlora-rr", "sdlora-kd", "lora-seq", "lora-merge", "ncm", "linear", "joint",
    "ablation-single", "ablation-first", "ablation-fixed",
)  # fmt: skip


def make_method(name: str, options: AdapterOptions) -> Method:
    """The method named `name` (one of METHOD_NAMES)."""
    factories = {
        "sdlora": lambda: SDLoRA(options),
        "sdlora-rr": lambda: SDLoRA(options, "sdlora-rr", rank_schedule="rr"),
        "sdlora-kd": lambda: SDLoRA(options, "sdlora-kd", kd_threshold=9e-4),
        "lora-seq": lambda: SequentialLoRA(options),
        "lora-merge": lambda: MergedLoRA(options),
        "ncm": lambda: FrozenNCM(options),
        "linear": lambda: Method(options),
        "joint": lambda: SequentialLoRA(options, "joint"),
        "ablation-single": lambda: SDLoRAAblation(options, "single"),
        "ablation-first": lambda: SDLoRAAblation(options, "first"),
        "ablation-fixed": lambda: SDLoRAAblation(options, "fixed"),
    }
    if name not in factories:
        raise ValueError(f"Unknown method {name!r}; known methods: {', '.join(METHOD_NAMES)}.")
    return factories[name]()
