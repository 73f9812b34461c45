"""The models that `bench_scaling.py` compares: PEFT's LoRA and DoRA, SD-LoRA at a given task with a given frozen
path, and two references written here (a naive per-task loop, the frozen directions in float32). All share the base
model's weights, so that a dozen variants of one model fit in memory."""

from __future__ import annotations

import copy
import itertools
import types

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

from sdlora_peft import SDLoraConfig, SDLoraLayer, frozen, lowrank

TARGET_MODULES = ["q_proj", "v_proj", "query", "value"]  # ViT's query/value projections: transformers >= 5, < 5


# ----------------------------------------------------------------------------------------------------------------
# The naive reference: SD-LoRA as a per-task loop
# ----------------------------------------------------------------------------------------------------------------


class NaiveSDLoraLinear(nn.Module):
    """SD-LoRA's forward written the way the paper's reference code does it: one term per task, in Python.

    Frozen direction k adds `alpha_k * c_k * B_k (A_k x) / ||B_k A_k||_F`, with the norm recomputed at every forward
    (here through the cheap r x r trace, not a dense `B_k A_k`, so the loop itself is what is measured); the current
    task adds `alpha_t * B_t (A_t x)`. Computes the same function as `SDLoraLinear` at a cost that grows with the
    number of tasks. `magnitude` is one parameter shared by every layer, as SD-LoRA's global magnitudes are.
    """

    def __init__(self, base_layer: nn.Linear, layer: SDLoraLayer, magnitude: nn.Parameter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.magnitude = magnitude
        self.A = nn.Parameter(layer.sdlora_A["default"].detach().clone())
        self.B = nn.Parameter(layer.sdlora_B["default"].detach().clone())
        frozen_A, frozen_B, constants = [], [], []
        if "default" in layer.sdlora_frozen_A:
            ranks = layer.sdlora_frozen_ranks["default"]
            frozen_A = layer.sdlora_frozen_A["default"].split(ranks, dim=0)
            frozen_B = layer.sdlora_frozen_B["default"].split(ranks, dim=1)
            scales = layer.sdlora_frozen_scale["default"].tolist()
            constants = [s * float(lowrank.frobenius_norm(B, A)) for s, A, B in zip(scales, frozen_A, frozen_B)]
        self.frozen_A = nn.ParameterList(nn.Parameter(A.clone(), requires_grad=False) for A in frozen_A)
        self.frozen_B = nn.ParameterList(nn.Parameter(B.clone(), requires_grad=False) for B in frozen_B)
        self.register_buffer("frozen_c", torch.tensor(constants, dtype=self.A.dtype, device=self.A.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.magnitude
        h = x.to(self.A.dtype)  # adapters are float32 (PEFT's autocast) even in a bfloat16 model
        delta = F.linear(F.linear(h, self.A), self.B) * alpha[-1]
        for k, (A_k, B_k) in enumerate(zip(self.frozen_A, self.frozen_B)):
            scale = alpha[k] * self.frozen_c[k] / lowrank.frobenius_norm(B_k, A_k).to(h.dtype)
            delta = delta + F.linear(F.linear(h, A_k), B_k) * scale
        return self.base_layer(x) + delta.to(x.dtype)


def naive_copy(sdlora: PeftModel, base: nn.Module) -> nn.Module:
    """The base model with every adapted layer of `sdlora` replaced by a `NaiveSDLoraLinear` of the same values."""
    model = shared_copy(base)
    modules = dict(model.named_modules())
    magnitude = nn.Parameter(sdlora.base_model.sdlora_magnitude["default"].detach().clone())
    for name, layer in sdlora.base_model.model.named_modules():
        if isinstance(layer, SDLoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, NaiveSDLoraLinear(modules[name], layer, magnitude))
    return model


def upcast_copy(sdlora: PeftModel, base: nn.Module) -> PeftModel:
    """`sdlora` (on the low-rank path) with every layer's frozen directions applied to the float32 copy of the input
    that its current direction uses."""
    model = shared_copy(sdlora, base)
    for layer in model.modules():
        if isinstance(layer, SDLoraLayer):
            layer._frozen_output = types.MethodType(_frozen_output_in_float32, layer)  # type: ignore[method-assign]
    return model


def _frozen_output_in_float32(
    layer: SDLoraLayer, x: torch.Tensor, kept: torch.Tensor, adapter_name: str, magnitude: torch.Tensor
) -> torch.Tensor:
    return SDLoraLayer._frozen_output(layer, kept.float(), kept.float(), adapter_name, magnitude)


# ----------------------------------------------------------------------------------------------------------------
# Building the variants
# ----------------------------------------------------------------------------------------------------------------


def shared_copy(module: nn.Module, base: nn.Module | None = None) -> nn.Module:
    """A deep copy of `module` that shares the parameters and buffers of `base` (default: `module`), so that a dozen
    variants of one model fit in memory. Nothing here writes into a shared tensor (see `merged_copy`)."""
    base = module if base is None else base
    memo = {id(tensor): tensor for tensor in itertools.chain(base.parameters(), base.buffers())}
    return copy.deepcopy(module, memo)


def randomize_current_directions(model: PeftModel) -> None:
    """Give every layer's current `B` random values, as training would, so that `advance_task` stores them."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SDLoraLayer):
                B = layer.sdlora_B["default"]
                B.copy_(torch.randn_like(B) / B.shape[1])


def sdlora_at_task(base: nn.Module, tasks: int, autocast_adapter_dtype: bool = True, **config: object) -> PeftModel:
    """An SD-LoRA model training its `tasks`-th task: `tasks - 1` random directions frozen by `advance_task()`."""
    torch.manual_seed(tasks)
    sdlora_config = SDLoraConfig(target_modules=TARGET_MODULES, **config)
    model = get_peft_model(shared_copy(base), sdlora_config, autocast_adapter_dtype=autocast_adapter_dtype)
    for _ in range(tasks - 1):
        randomize_current_directions(model)
        model.advance_task()
    return model


def with_frozen_path(model: PeftModel, base: nn.Module, path: str, recompute: bool) -> PeftModel:
    """A copy of `model` (own adapter tensors, shared base weights) whose frozen directions take `path`."""
    model = shared_copy(model, base)
    model.peft_config["default"].frozen_path, model.peft_config["default"].frozen_recompute = path, recompute
    for layer in model.modules():
        if isinstance(layer, SDLoraLayer):
            layer.sdlora_frozen_path["default"], layer.sdlora_frozen_recompute["default"] = path, recompute
    return model


def frozen_path_label(model: PeftModel, tokens: int) -> str:
    """How the model's frozen directions run at `tokens` per layer, e.g. "auto: fold+recompute"."""
    config = model.peft_config["default"]
    if not config.frozen_ranks:
        return "-"
    layer = next(module for module in model.modules() if isinstance(module, SDLoraLayer))
    label = config.frozen_path
    if label == "auto":
        folds = frozen.fold_pays(tokens, layer.in_features, layer.out_features, config.frozen_recompute)
        label += ": fold" if folds else ": lowrank"
    return label + ("+recompute" if config.frozen_recompute else "")


def lora(base: nn.Module, rank: int, use_dora: bool, autocast_adapter_dtype: bool = True) -> PeftModel:
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGET_MODULES, use_dora=use_dora)
    return get_peft_model(shared_copy(base), config, autocast_adapter_dtype=autocast_adapter_dtype)


def merged_copy(model: PeftModel, base: nn.Module) -> nn.Module:
    """`merge_and_unload()` on a copy of `model`; the adapted weights are cloned first, since merging writes into
    them and they are shared with every other variant."""
    model = shared_copy(model, base)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base_layer = module.get_base_layer()
            base_layer.weight = nn.Parameter(base_layer.weight.detach().clone(), requires_grad=False)
    return model.merge_and_unload()
