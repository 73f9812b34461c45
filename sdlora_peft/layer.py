"""SD-LoRA layers: a frozen base layer plus, per adapter, the current task's direction and all frozen ones.

Per adapter a layer holds
- `sdlora_A` / `sdlora_B`: the current task's factors (trainable), applied raw as `alpha_t * B A` so that a
  zero `B` is the identity at init (a unit direction `BA / ||BA||` is 0/0 there);
- `sdlora_frozen_A` / `sdlora_frozen_B`: every frozen direction's factors, concatenated (buffers: never trained);
- `sdlora_frozen_scale`: one float per frozen direction, its `c / ||B A||`, fixed at freeze time, so no norm is
  computed during training;
- the magnitudes `alpha_1..alpha_t`: in `sdlora_magnitude` with per-layer magnitudes, or shared by every layer
  and owned by the `SDLoraModel` with global magnitudes.

All frozen directions cost one extra low-rank product per layer, whatever their number:
`x -> (x A_cat^T) * (alpha * scale)[column's task] -> B_cat`; or, where tokens are many, none: they are folded
into the base weight once per step (`frozen.py` has both strategies).
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from . import frozen, lowrank


class SDLoraLayer(BaseTunerLayer):
    """The adapter state and math shared by all SD-LoRA layer types."""

    adapter_layer_names = ("sdlora_A", "sdlora_B", "sdlora_magnitude")
    other_param_names = (
        "r",
        "sdlora_cache_weight",
        "sdlora_frozen_path",
        "sdlora_frozen_recompute",
        "sdlora_frozen_ranks",
        "sdlora_frozen_A",
        "sdlora_frozen_B",
        "sdlora_frozen_scale",
        "sdlora_frozen_index",
    )
    _shared_magnitude: nn.ParameterDict  # set through __dict__: owned and registered by the SDLoraModel

    def __init__(self, base_layer: nn.Module, shared_magnitude: nn.ParameterDict) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.sdlora_frozen_ranks: dict[str, list[int]] = {}
        self.sdlora_A = nn.ParameterDict({})
        self.sdlora_B = nn.ParameterDict({})
        self.sdlora_magnitude = nn.ParameterDict({})
        self.sdlora_frozen_A = BufferDict({}, persistent=True)
        self.sdlora_frozen_B = BufferDict({}, persistent=True)
        self.sdlora_frozen_scale = BufferDict({}, persistent=True)
        self.sdlora_frozen_index = BufferDict({}, persistent=False)  # column -> frozen direction, rebuilt from ranks
        self.sdlora_cache_weight: dict[str, bool] = {}
        self.sdlora_frozen_path: dict[str, str] = {}
        self.sdlora_frozen_recompute: dict[str, bool] = {}
        self._inference_weight: tuple[tuple, torch.Tensor] | None = None  # (what it was built from, W0 + updates)
        self._folded_weight: tuple[tuple, torch.Tensor] | None = None  # (what it was built from, W0 + frozen)
        # Global magnitudes live on the SDLoraModel; keep a plain reference so they are not registered twice.
        self.__dict__["_shared_magnitude"] = shared_magnitude
        self._disable_adapters = False
        self.merged_adapters = []

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
        else:
            raise TypeError(f"SD-LoRA supports torch.nn.Linear and transformers Conv1D, not {type(base).__name__}.")
        self.fan_in_fan_out = isinstance(base, Conv1D)

    # ----------------------------------------------------------------------------------------------------------
    # Building
    # ----------------------------------------------------------------------------------------------------------

    def update_layer(
        self,
        adapter_name: str,
        rank: int,
        frozen_ranks: list[int],
        magnitude_init: float,
        per_layer_magnitude: bool,
        init_weights: bool,
        cache_inference_weight: bool = True,
        frozen_path: str = "auto",
        frozen_recompute: bool = False,
        inference_mode: bool = False,
    ) -> None:
        """Create the adapter's tensors with the structure its task history describes (values come from training
        or from a checkpoint)."""
        self.sdlora_cache_weight[adapter_name] = cache_inference_weight
        self.sdlora_frozen_path[adapter_name] = frozen_path
        self.sdlora_frozen_recompute[adapter_name] = frozen_recompute
        self._open_direction(adapter_name, rank, init_weights, requires_grad=True)
        if per_layer_magnitude:
            self.sdlora_magnitude[adapter_name] = nn.Parameter(torch.full((len(frozen_ranks) + 1,), magnitude_init))
        if frozen_ranks:
            total = sum(frozen_ranks)
            self.sdlora_frozen_A[adapter_name] = torch.zeros(total, self.in_features)
            self.sdlora_frozen_B[adapter_name] = torch.zeros(self.out_features, total)
            self.sdlora_frozen_scale[adapter_name] = torch.zeros(len(frozen_ranks))
        self._set_frozen_ranks(adapter_name, frozen_ranks)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _open_direction(self, adapter_name: str, rank: int, init_weights: bool, requires_grad: bool) -> None:
        """New factors for the current task: kaiming `A`, zero `B` (identity) or, for tests, random `B`."""
        reference = self.sdlora_A[adapter_name] if adapter_name in self.sdlora_A else None
        factory = {"dtype": reference.dtype, "device": reference.device} if reference is not None else {}
        A = torch.empty(rank, self.in_features, **factory)
        B = torch.empty(self.out_features, rank, **factory)
        nn.init.kaiming_uniform_(A, a=5**0.5)
        if init_weights:
            nn.init.zeros_(B)
        else:
            nn.init.normal_(B, std=1.0 / rank)
        self.r[adapter_name] = rank
        self.sdlora_A[adapter_name] = nn.Parameter(A, requires_grad=requires_grad)
        self.sdlora_B[adapter_name] = nn.Parameter(B, requires_grad=requires_grad)

    def _set_frozen_ranks(self, adapter_name: str, frozen_ranks: list[int]) -> None:
        self.sdlora_frozen_ranks[adapter_name] = list(frozen_ranks)
        if frozen_ranks:
            # the base weight's device: the factors may still be on "meta" while PEFT loads with low_cpu_mem_usage
            device = self._base_weight().device
            index = [direction for direction, rank in enumerate(frozen_ranks) for _ in range(rank)]
            self.sdlora_frozen_index[adapter_name] = torch.tensor(index, device=device)

    # ----------------------------------------------------------------------------------------------------------
    # Math
    # ----------------------------------------------------------------------------------------------------------

    def _base_weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.get_base_layer().weight)

    def magnitude(self, adapter_name: str) -> torch.Tensor:
        """Magnitudes `alpha_1..alpha_t` of the adapter (the last one belongs to the current task)."""
        if adapter_name in self.sdlora_magnitude:
            return self.sdlora_magnitude[adapter_name]
        return self._shared_magnitude[adapter_name]

    def _frozen_column_scales(self, adapter_name: str, magnitude: torch.Tensor) -> torch.Tensor:
        """One factor per frozen column: `alpha_k * c_k / ||B_k A_k||` of the direction the column belongs to."""
        per_direction = magnitude[:-1] * self.sdlora_frozen_scale[adapter_name]
        return per_direction[self.sdlora_frozen_index[adapter_name]]

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        magnitude = self.magnitude(adapter_name)
        kept = self._current_input(x, adapter_name)
        output = self._current_output(kept, adapter_name, magnitude)
        if adapter_name in self.sdlora_frozen_A:
            output = output + self._frozen_output(x, kept, adapter_name, magnitude)
        return output

    def _current_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """`x` in the current factors' dtype: their product keeps it for backward, and so may the frozen path."""
        return self._cast_input_dtype(x, self.sdlora_A[adapter_name].dtype)

    @staticmethod
    def _copy_kept(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor | None:
        """What the frozen path's functions take as the kept input: the copy, or None when it is `x` itself."""
        return None if kept is x else kept

    def _current_output(self, kept: torch.Tensor, adapter_name: str, magnitude: torch.Tensor) -> torch.Tensor:
        A, B = self.sdlora_A[adapter_name], self.sdlora_B[adapter_name]
        return F.linear(F.linear(kept, A) * magnitude[-1].to(A.dtype), B)

    def _frozen_output(
        self, x: torch.Tensor, kept: torch.Tensor, adapter_name: str, magnitude: torch.Tensor
    ) -> torch.Tensor:
        """All frozen directions in one low-rank product, computed in the input's dtype like the base layer: they
        train no factors, so a bfloat16 model need not upcast every token to float32 for them (PEFT keeps the
        trainable factors in float32, and the current direction still runs there)."""
        column_scales = self._frozen_column_scales(adapter_name, magnitude).to(x.dtype)
        A, B = self.sdlora_frozen_A[adapter_name], self.sdlora_frozen_B[adapter_name]
        recompute = self.sdlora_frozen_recompute[adapter_name]
        kept_copy = self._copy_kept(x, kept)
        return cast(torch.Tensor, frozen.FrozenLowRank.apply(x, kept_copy, A, B, column_scales, recompute)[0])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's dense update of the base weight, in float32 and in the base weight's layout."""
        magnitude = self.magnitude(adapter_name).float()
        A, B = self.sdlora_A[adapter_name].float(), self.sdlora_B[adapter_name].float()
        delta = magnitude[-1] * (B @ A)
        if adapter_name in self.sdlora_frozen_A:
            column_scales = self._frozen_column_scales(adapter_name, magnitude)
            frozen_B = self.sdlora_frozen_B[adapter_name].float() * column_scales
            delta = delta + frozen_B @ self.sdlora_frozen_A[adapter_name].float()
        return delta.T if self.fan_in_fan_out else delta

    # ----------------------------------------------------------------------------------------------------------
    # Task boundary (driven by SDLoraModel.advance_task)
    # ----------------------------------------------------------------------------------------------------------

    def current_norm(self, adapter_name: str, kind: str) -> torch.Tensor:
        """Norm of the current task's raw direction `B A` (float32)."""
        return lowrank.direction_norm(self.sdlora_B[adapter_name].detach(), self.sdlora_A[adapter_name].detach(), kind)

    def gram_with_current(self, adapter_name: str, current_scale: float) -> torch.Tensor:
        """Float64 Gram matrix of the frozen directions and the current one, each with its scale."""
        A, B = self.sdlora_A[adapter_name].detach(), self.sdlora_B[adapter_name].detach()
        ranks = self.sdlora_frozen_ranks[adapter_name] + [self.r[adapter_name]]
        scales = torch.tensor([current_scale], dtype=torch.float64, device=A.device)
        if adapter_name in self.sdlora_frozen_A:
            A = torch.cat([self.sdlora_frozen_A[adapter_name], A])
            B = torch.cat([self.sdlora_frozen_B[adapter_name], B], dim=1)
            scales = torch.cat([self.sdlora_frozen_scale[adapter_name].to(torch.float64), scales])
        return lowrank.gram_matrix(B, A, ranks, scales)

    def freeze_current(self, adapter_name: str, scale: float) -> None:
        """Append the current direction to the frozen ones, with its fixed scale."""
        A, B = self.sdlora_A[adapter_name].detach(), self.sdlora_B[adapter_name].detach()
        scale_tensor = torch.tensor([scale], dtype=A.dtype, device=A.device)
        if adapter_name in self.sdlora_frozen_A:  # torch.cat makes new tensors: no copy is shared with A or B
            A = torch.cat([self.sdlora_frozen_A[adapter_name], A])
            B = torch.cat([self.sdlora_frozen_B[adapter_name], B], dim=1)
            scale_tensor = torch.cat([self.sdlora_frozen_scale[adapter_name], scale_tensor])
        else:
            A, B = A.clone(), B.clone()
        self.sdlora_frozen_A[adapter_name] = A
        self.sdlora_frozen_B[adapter_name] = B
        self.sdlora_frozen_scale[adapter_name] = scale_tensor
        self._set_frozen_ranks(adapter_name, self.sdlora_frozen_ranks[adapter_name] + [self.r[adapter_name]])

    def open_task(self, adapter_name: str, rank: int, magnitude: torch.Tensor | None) -> None:
        """Start the next task: fresh factors of `rank` with a zero `B`, so the function does not change; with
        per-layer magnitudes, also the new magnitude vector."""
        requires_grad = self.sdlora_A[adapter_name].requires_grad
        self._open_direction(adapter_name, rank, init_weights=True, requires_grad=requires_grad)
        if magnitude is not None:
            self.sdlora_magnitude[adapter_name] = nn.Parameter(magnitude, requires_grad=requires_grad)

    # ----------------------------------------------------------------------------------------------------------
    # Merging
    # ----------------------------------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active adapters' updates to the base weight (`safe_merge` checks for non-finite values first)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self._base_weight()
        for adapter_name in adapter_names:
            if adapter_name not in self.sdlora_A:
                continue
            delta = self.get_delta_weight(adapter_name)
            with torch.no_grad():
                merged = weight.float() + delta
                if safe_merge and not torch.isfinite(merged).all():
                    # PEFT's own wording, which its tests and users match on; nothing of this adapter was merged
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken "
                        "(non-finite values); it was not merged."
                    )
                weight.data = merged.to(weight.dtype)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's update from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self._base_weight()
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            if adapter_name in self.sdlora_A:
                with torch.no_grad():
                    restored = weight.float() - self.get_delta_weight(adapter_name)
                    weight.data = restored.to(weight.dtype)


class SDLoraLinear(nn.Module, SDLoraLayer):
    """SD-LoRA around a `torch.nn.Linear` or a transformers `Conv1D`."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, shared_magnitude: nn.ParameterDict, **kwargs: Any
    ) -> None:
        super().__init__()
        SDLoraLayer.__init__(self, base_layer, shared_magnitude)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        adapter_names = [name for name in self.active_adapters if name in self.sdlora_A]
        if self.merged or not adapter_names:
            return self.base_layer(x, *args, **kwargs)
        if self._use_inference_weight(adapter_names):
            return self._forward_with_weight(x, self._inference_weight_for(adapter_names))
        if self._folds(x, adapter_names):
            return self._folded_forward(x, adapter_names[0])
        if self._folded_weight is not None:
            self._folded_weight = None  # the layer does not fold now: free what it folded for earlier batches
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in adapter_names:
            result = result + self._adapter_output(x, adapter_name).to(result.dtype)
        return result

    def train(self, mode: bool = True) -> SDLoraLinear:
        if mode:
            self._inference_weight = None  # training changes the adapters: free the cached weight
        else:
            self._folded_weight = None  # evaluation does not fold: free the training one
        return super().train(mode)

    def _use_inference_weight(self, adapter_names: list[str]) -> bool:
        """Pure inference (eval mode, no autograd) on a plain Linear/Conv1D: one matrix product with a cached
        `W0 + updates` costs what the base layer costs, whatever the number of frozen directions."""
        return (
            not self.training
            and not torch.is_grad_enabled()
            and type(self.get_base_layer()) in (nn.Linear, Conv1D)
            and all(self.sdlora_cache_weight[name] for name in adapter_names)
            and not torch.compiler.is_compiling()
        )

    def _inference_weight_for(self, adapter_names: list[str]) -> torch.Tensor:
        """`W0 + sum of the adapters' updates`, rebuilt when any tensor it depends on was replaced or modified
        (an optimizer step, a load, advance_task, merge, set_adapter all change the key)."""
        weight = self._base_weight()
        tensors = [weight]
        for name in adapter_names:
            tensors += [self.sdlora_A[name], self.sdlora_B[name], self.magnitude(name)]
            if name in self.sdlora_frozen_A:
                tensors += [self.sdlora_frozen_A[name], self.sdlora_frozen_B[name], self.sdlora_frozen_scale[name]]
        key = (tuple(adapter_names), _state_of(tensors))
        if self._inference_weight is None or not _same_state(self._inference_weight[0], key):
            updated = weight.float()
            for name in adapter_names:
                updated = updated + self.get_delta_weight(name)
            self._inference_weight = (key, updated.to(weight.dtype))
        return self._inference_weight[1]

    def _folds(self, x: torch.Tensor, adapter_names: list[str]) -> bool:
        """Whether this call folds the frozen directions into the base layer's product: one active adapter with
        frozen directions, a plain Linear/Conv1D, and `frozen_path="fold"`, or `"auto"` with enough tokens."""
        if len(adapter_names) != 1 or adapter_names[0] not in self.sdlora_frozen_A:
            return False
        if type(self.get_base_layer()) not in (nn.Linear, Conv1D):
            return False
        path, recompute = self.sdlora_frozen_path[adapter_names[0]], self.sdlora_frozen_recompute[adapter_names[0]]
        if path == "auto":
            return frozen.fold_pays(x.numel() // x.shape[-1], self.in_features, self.out_features, recompute)
        return path == "fold"

    def _folded_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """`x (W0 + B_cat diag(s) A_cat)^T + bias`, one product for the base layer and every frozen direction, plus
        the current direction."""
        magnitude = self.magnitude(adapter_name)
        column_scales = self._frozen_column_scales(adapter_name, magnitude).to(x.dtype)
        A, B = self.sdlora_frozen_A[adapter_name], self.sdlora_frozen_B[adapter_name]
        weight = self._base_weight().T if self.fan_in_fan_out else self._base_weight()  # out x in
        recompute = self.sdlora_frozen_recompute[adapter_name]
        folded = self._folded_weight_for(adapter_name, weight, column_scales, keep=not recompute)
        kept = self._current_input(x, adapter_name)
        bias = self.get_base_layer().bias
        kept_copy = self._copy_kept(x, kept)
        result = frozen.FoldedLinear.apply(x, kept_copy, weight, bias, folded, A, B, column_scales, recompute)
        return result + self._current_output(kept, adapter_name, magnitude).to(result.dtype)

    def _folded_weight_for(
        self, adapter_name: str, weight: torch.Tensor, column_scales: torch.Tensor, keep: bool
    ) -> torch.Tensor:
        """`W0 + B_cat diag(s) A_cat`. With `keep`, folded once per optimizer step, not once per call (micro-batches
        of one step share it), and held until the scales change or the layer stops folding; otherwise, and under
        torch.compile or torch.func, folded for this call only."""
        A, B = self.sdlora_frozen_A[adapter_name], self.sdlora_frozen_B[adapter_name]
        if not keep or torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(column_scales):
            return frozen.fold(weight, A, B, column_scales)
        tensors = [self._base_weight(), A, B, self.sdlora_frozen_scale[adapter_name], self.magnitude(adapter_name)]
        key = (adapter_name, column_scales.dtype, frozen.optimizer_steps(), _state_of(tensors))
        if self._folded_weight is None or not _same_state(self._folded_weight[0], key):
            self._folded_weight = None  # free the stale weight before folding the new one
            self._folded_weight = (key, frozen.fold(weight, A, B, column_scales))
        return self._folded_weight[1]

    def _forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = cast(torch.Tensor | None, self.get_base_layer().bias)
        if not self.fan_in_fan_out:
            return F.linear(x, weight, bias)
        # Conv1D keeps its weight as (in, out) and always has a bias
        output = torch.addmm(cast(torch.Tensor, bias), x.reshape(-1, x.shape[-1]), weight)
        return output.reshape(*x.shape[:-1], weight.shape[-1])

    def __repr__(self) -> str:
        return "sdlora." + super().__repr__()


def _state_of(tensors: list[torch.Tensor]) -> tuple:
    """The tensors themselves and their contents' versions: a replaced tensor, new storage or an in-place change (an
    optimizer step, a load) gives another state. The key holds the tensors so that a freed tensor's id and memory,
    which a new tensor may reuse, cannot make a stale weight look current."""
    return tuple(tensors), tuple((t.data_ptr(), t._version) for t in tensors)


def _same_state(built_from: tuple, key: tuple) -> bool:
    """Whether a cached weight's key (`(..., _state_of(...))`) equals `key`: same names, the very same tensors, at the
    same versions."""
    (*names, (tensors, versions)), (*new_names, (new_tensors, new_versions)) = built_from, key
    return (
        names == new_names
        and versions == new_versions
        and len(tensors) == len(new_tensors)
        and all(a is b for a, b in zip(tensors, new_tensors))
    )
