"""SDLoraModel: injects SD-LoRA layers into a model and moves adapters from one task to the next."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.pytorch_utils import Conv1D

from . import lowrank
from .config import SDLoraConfig
from .layer import SDLoraLayer, SDLoraLinear

_VISION_QUERY_VALUE = ["q_proj", "v_proj", "query", "value"]  # transformers >= 5 and < 5 names
_VISION_MODEL_TYPES = (
    "vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit", "swin", "swinv2", "beit", "data2vec-vision",
    "vit_mae", "vit_msn", "vit_hybrid", "yolos", "clip", "clip_vision_model", "siglip", "siglip_vision_model",
    "siglip2", "siglip2_vision_model",
)  # fmt: skip
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{model_type: list(names) for model_type, names in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items()},
    **{model_type: list(_VISION_QUERY_VALUE) for model_type in _VISION_MODEL_TYPES},
}
"""Default `target_modules` by `config.model_type`: the query and value projections, as in the paper."""

EMPTY_NORM = 1e-10
"""A direction whose norm is at most this at `advance_task()` is treated as zero (it changes no weight measurably).
In a float16 adapter or model the floor is float16's smallest normal number instead (see `_zero_norm`)."""


@dataclass(frozen=True)
class TaskRecord:
    """What `advance_task()` did with the finished task's direction.

    `absorbed` is True when the direction was not stored: SD-LoRA-KD folded it into the earlier magnitudes
    (`residual <= kd_threshold`), or it was zero (never trained) and so contributed nothing. `residual` is the
    relative least-squares residual of its fit by the earlier directions, or None when no fit was made.
    """

    task: int
    rank: int
    absorbed: bool
    residual: float | None


class SDLoraModel(BaseTuner):
    """
    Creates an SD-LoRA model (Wu et al., "SD-LoRA: Scalable Decoupled Low-Rank Adaptation for Class Incremental
    Learning", ICLR 2025) from a transformers or plain torch model.

    Use it through `peft.get_peft_model(model, SDLoraConfig(...))` after `import sdlora_peft`. Train a task, call
    `advance_task()`, train the next one.

    Args:
        model ([`torch.nn.Module`]): The model to adapt.
        config ([`SDLoraConfig`]): The SD-LoRA configuration.
        adapter_name (`str`): The adapter's name, `"default"` by default.

    Attributes:
        sdlora_magnitude (`nn.ParameterDict`): Per adapter with global magnitude sharing, the magnitudes of all
            tasks, shared by every adapted layer.
    """

    prefix: str = "sdlora_"
    tuner_layer_cls = SDLoraLayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    uses_shared_state: bool = True  # the global magnitudes

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """Create the adapter's global magnitudes, then let PEFT inject its layers. Runs for the first adapter and
        for each one added later (`add_adapter`, `load_adapter`); an added adapter is not trainable until it is
        activated."""
        config = cast(SDLoraConfig, self.peft_config[adapter_name])
        if not hasattr(self, "sdlora_magnitude"):
            self.sdlora_magnitude = nn.ParameterDict({})
        if config.magnitude_sharing == "global":
            device = next(model.parameters()).device
            values = torch.full((len(config.frozen_ranks) + 1,), float(config.magnitude_init), device=device)
            trainable = adapter_name in self.active_adapters and not config.inference_mode
            self.sdlora_magnitude[adapter_name] = nn.Parameter(values, requires_grad=trainable)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:
            self._discard_adapter(adapter_name)
            raise
        self._match_magnitude_dtype(adapter_name)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's rule for `autocast_adapter_dtype` (True: float16/bfloat16 adapters become float32; False: they keep
        the base layer's dtype), also for the global magnitudes, which live outside the layers PEFT casts. PEFT calls
        this after every injection and every load (`get_peft_model`, `add_adapter`, `load_adapter`,
        `from_pretrained`, with or without `low_cpu_mem_usage`)."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        self._match_magnitude_dtype(adapter_name)

    def _match_magnitude_dtype(self, adapter_name: str) -> None:
        """Give the global magnitudes the dtype of the adapter's factors, which PEFT has set by its rule."""
        layers = self._layers(adapter_name)
        if adapter_name not in self.sdlora_magnitude or not layers:
            return
        dtype = layers[0].sdlora_A[adapter_name].dtype
        magnitude = self.sdlora_magnitude[adapter_name]
        if magnitude.dtype != dtype:
            self.sdlora_magnitude[adapter_name] = nn.Parameter(magnitude.detach().to(dtype), magnitude.requires_grad)

    def _discard_adapter(self, adapter_name: str) -> None:
        """Undo a failed injection or load of `adapter_name`, so that the model is left as it was: with no other
        adapter, every wrapped module is put back; otherwise only this adapter is removed."""
        if set(self.peft_config) <= {adapter_name}:
            self._unload_and_optionally_merge(merge=False)
        elif adapter_name in self.peft_config:
            self.delete_adapter(adapter_name)
        if adapter_name in self.sdlora_magnitude:
            del self.sdlora_magnitude[adapter_name]

    def _prepare_adapter_config(self, peft_config: SDLoraConfig, model_config: dict) -> SDLoraConfig:  # type: ignore[override]
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"SD-LoRA has no default target modules for model type {model_type!r}. Pass "
                    "`target_modules`, e.g. SDLoraConfig(target_modules=['q_proj', 'v_proj'])."
                )
            peft_config.target_modules = set(self.target_module_mapping[model_type])
        return peft_config

    def _create_and_replace(  # type: ignore[override]  # PEFT passes the tuner's own config type
        self,
        config: SDLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        kwargs: dict[str, Any] = {
            "rank": config.rank_for_task(config.current_task),
            "frozen_ranks": config.frozen_ranks,
            "magnitude_init": float(config.magnitude_init),
            "per_layer_magnitude": config.magnitude_sharing == "layer",
            "init_weights": config.init_weights,
            "cache_inference_weight": config.cache_inference_weight,
            "frozen_path": config.frozen_path,
            "frozen_recompute": config.frozen_recompute,
            "inference_mode": config.inference_mode,
        }
        if isinstance(target, SDLoraLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(
                f"Target module {current_key!r} is a {type(base).__name__}; SD-LoRA supports torch.nn.Linear and "
                "transformers Conv1D. Change `target_modules` to select only those."
            )
        config.fan_in_fan_out = isinstance(base, Conv1D)
        new_module = SDLoraLinear(target, adapter_name, self.sdlora_magnitude, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until it is activated
        self._replace_module(parent, target_name, new_module, target)

    # ----------------------------------------------------------------------------------------------------------
    # Adapter bookkeeping for the model-level (global) magnitudes
    # ----------------------------------------------------------------------------------------------------------

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = {adapter_name} if isinstance(adapter_name, str) else set(adapter_name)
        for name, magnitude in self.sdlora_magnitude.items():
            magnitude.requires_grad_(name in active and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.sdlora_magnitude:
            del self.sdlora_magnitude[adapter_name]

    def _layers(self, adapter_name: str) -> list[SDLoraLayer]:
        return [m for m in self.model.modules() if isinstance(m, SDLoraLayer) and adapter_name in m.sdlora_A]

    # ----------------------------------------------------------------------------------------------------------
    # Tasks
    # ----------------------------------------------------------------------------------------------------------

    def advance_task(self, adapter_name: str | None = None) -> TaskRecord:
        """Freeze the current task's direction and open the next task's direction and magnitude.

        With `freeze_scale="preserve"` (default) the model's function is unchanged. With `kd_threshold` set, a
        direction that the earlier ones reproduce up to that relative residual is folded into their magnitudes
        instead of being stored (SD-LoRA-KD). A direction that is still zero (never trained) is dropped with a
        warning. The trainable parameters are new objects afterwards: build a new optimizer for the next task.

        Returns:
            [`TaskRecord`]: the finished task's index, rank, whether it was absorbed, and the fit's residual.
        """
        adapter_name, layers = self._resolve_adapter(adapter_name)
        config = cast(SDLoraConfig, self.peft_config[adapter_name])
        with torch.no_grad():
            record, magnitudes = self._finish_task(adapter_name, config, layers)
            if config.reset_magnitudes:
                magnitudes = torch.full_like(magnitudes, float(config.magnitude_init))
            opened = torch.full((*magnitudes.shape[:-1], 1), float(config.magnitude_init))
            magnitudes = torch.cat([magnitudes, opened], dim=-1)
        config.task_history.append(asdict(record))
        self._open_next_task(adapter_name, config, layers, magnitudes)
        return record

    def task_magnitudes(self, adapter_name: str | None = None) -> dict[int, float]:
        """The magnitude of every kept task's direction and of the current task's, by task index (the mean over
        layers with per-layer magnitudes); a task whose direction was absorbed or dropped has none."""
        adapter_name = adapter_name or self.active_adapters[0]
        config = cast(SDLoraConfig, self.peft_config[adapter_name])
        magnitudes = self._magnitudes(adapter_name, self._layers(adapter_name))
        if magnitudes.dim() == 2:
            magnitudes = magnitudes.mean(0)
        tasks = [record["task"] for record in config.task_history if not record["absorbed"]] + [config.current_task]
        return dict(zip(tasks, magnitudes.tolist()))

    def _resolve_adapter(self, adapter_name: str | None) -> tuple[str, list[SDLoraLayer]]:
        """The adapter `advance_task` acts on and its layers, after checking it can advance."""
        if adapter_name is None:
            if len(self.active_adapters) != 1:
                raise ValueError(
                    f"Several adapters are active ({self.active_adapters}); pass advance_task(adapter_name=...)."
                )
            adapter_name = self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"Unknown adapter {adapter_name!r}; this model has {sorted(self.peft_config)}.")
        if not isinstance(self.peft_config[adapter_name], SDLoraConfig):
            raise ValueError(f"Adapter {adapter_name!r} is not an SD-LoRA adapter.")
        layers = self._layers(adapter_name)
        if not layers:
            raise ValueError(f"Adapter {adapter_name!r} has no SD-LoRA layers in this model.")
        if any(adapter_name in layer.merged_adapters for layer in layers):
            raise ValueError(
                f"Adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() before "
                "advance_task()."
            )
        return adapter_name, layers

    def _magnitudes(self, adapter_name: str, layers: list[SDLoraLayer]) -> torch.Tensor:
        """Current magnitudes on the CPU (where the boundary's small bookkeeping happens): shape (T,) when global,
        (layers, T) when per layer. On an FSDP2-sharded model they are gathered first (a collective)."""
        if adapter_name in self.sdlora_magnitude:
            return _whole(self.sdlora_magnitude[adapter_name]).float().cpu().clone()
        return torch.stack([_whole(layer.sdlora_magnitude[adapter_name]).float().cpu() for layer in layers])

    def _finish_task(
        self, adapter_name: str, config: SDLoraConfig, layers: list[SDLoraLayer]
    ) -> tuple[TaskRecord, torch.Tensor]:
        """Decide what happens to the current direction; return the record and the magnitudes of the kept
        directions (the current one last if it is kept)."""
        task, rank = config.current_task, layers[0].r[adapter_name]
        per_layer = config.magnitude_sharing == "layer"
        magnitudes = self._magnitudes(adapter_name, layers)
        norms = torch.stack([layer.current_norm(adapter_name, config.direction_norm) for layer in layers]).cpu()
        if not torch.isfinite(norms).all():
            raise ValueError(
                f"Task {task}'s direction of adapter {adapter_name!r} has non-finite values (training diverged?); "
                "nothing was changed. Lower the learning rate or train the adapter in float32."
            )
        threshold = _zero_norm(layers[0].sdlora_A[adapter_name].dtype, layers[0]._base_weight().dtype)
        live = norms > threshold
        if not live.any():
            warnings.warn(
                f"Task {task}'s direction of adapter {adapter_name!r} is zero (was it trained?) or below the "
                f"resolution of its dtype (norm <= {threshold:.1e}); it is dropped and adds no parameters.",
                stacklevel=3,
            )
            return TaskRecord(task, rank, absorbed=True, residual=0.0), magnitudes[..., :-1]

        scales, current = self._freeze_scales(config, norms, live, magnitudes[..., -1])
        residual = None
        if config.kd_threshold is not None and layers[0].sdlora_frozen_ranks[adapter_name]:
            coefficients, residual = self._fit_by_frozen(adapter_name, layers, scales, per_layer)
            if residual <= config.kd_threshold:
                old = magnitudes[..., :-1] + current.unsqueeze(-1) * coefficients.to(magnitudes.dtype)
                return TaskRecord(task, rank, absorbed=True, residual=residual), old
        for layer, scale in zip(layers, scales.tolist()):
            layer.freeze_current(adapter_name, scale)
        magnitudes[..., -1] = current
        return TaskRecord(task, rank, absorbed=False, residual=residual), magnitudes

    @staticmethod
    def _freeze_scales(
        config: SDLoraConfig, norms: torch.Tensor, live: torch.Tensor, magnitude: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer scale `c / n` of the frozen direction, and the task's magnitude after freezing.

        "preserve": the frozen update `alpha' * scale * B A` equals the trained `alpha * B A`. With per-layer
        magnitudes each layer's magnitude absorbs its own norm (`c = 1`); with a global one it absorbs the layers'
        root-mean-square norm m, and `c_l = n_l / m` keeps every layer's share. "normalized": the scale is the
        trained alpha itself (`c = alpha n`) and the magnitude becomes 1. "unit": `c = 1` and alpha stays.
        Zero layers get scale 0: their `B A` is zero anyway.
        """
        safe_norms = torch.where(live, norms, torch.ones_like(norms))
        if config.freeze_scale == "normalized":
            return torch.where(live, magnitude.expand_as(norms), 0.0), torch.ones_like(magnitude)
        if config.freeze_scale == "unit":
            return torch.where(live, 1 / safe_norms, 0.0), magnitude
        if config.magnitude_sharing == "layer":
            return torch.where(live, 1 / safe_norms, 0.0), magnitude * torch.where(live, norms, 1.0)
        rms = norms[live].square().mean().sqrt()
        return torch.where(live, 1 / rms, 0.0), magnitude * rms

    @staticmethod
    def _fit_by_frozen(
        adapter_name: str, layers: list[SDLoraLayer], scales: torch.Tensor, per_layer: bool
    ) -> tuple[torch.Tensor, float]:
        """SD-LoRA-KD's least-squares fit of the new direction by the frozen ones, from Gram matrices only.

        Global magnitudes: one joint fit over all layers (one coefficient vector). Per-layer magnitudes: one fit
        per layer; the residual reported is the worst layer's, so either every layer absorbs the task or none.
        """
        grams = [layer.gram_with_current(adapter_name, scale) for layer, scale in zip(layers, scales.tolist())]
        if not per_layer:
            coefficients, residual = lowrank.least_squares_fit(torch.stack(grams).sum(0))
            return coefficients.cpu(), residual
        fits = [lowrank.least_squares_fit(gram) for gram in grams]
        return torch.stack([c.cpu() for c, _ in fits]), max(residual for _, residual in fits)

    def _open_next_task(
        self, adapter_name: str, config: SDLoraConfig, layers: list[SDLoraLayer], magnitudes: torch.Tensor
    ) -> None:
        rank = config.rank_for_task(config.current_task)
        if adapter_name in self.sdlora_magnitude:
            old = self.sdlora_magnitude[adapter_name]
            values = magnitudes.to(device=old.device, dtype=old.dtype)
            self.sdlora_magnitude[adapter_name] = nn.Parameter(values, requires_grad=old.requires_grad)
            for layer in layers:
                layer.open_task(adapter_name, rank, magnitude=None)
            return
        for layer, values in zip(layers, magnitudes):
            old = layer.sdlora_magnitude[adapter_name]
            layer.open_task(adapter_name, rank, values.to(device=old.device, dtype=old.dtype))

    # ----------------------------------------------------------------------------------------------------------
    # Loading
    # ----------------------------------------------------------------------------------------------------------

    @classmethod
    def _remap_adapter_state_dict_for_load(  # type: ignore[override]
        cls, model: nn.Module, config: SDLoraConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model and refuse, before anything is loaded, weights whose shapes or keys
        do not match the adapter's task history, or that hold non-finite values. On refusal the adapter PEFT has
        just injected for them is removed again, so a failed load leaves the model as it was."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        problems = _checkpoint_problems(model.state_dict(), remapped, adapter_name)
        if not problems:
            return remapped
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, SDLoraModel):
            tuner._discard_adapter(adapter_name)
        if problems[0].startswith("non-finite"):
            raise ValueError(
                f"The SD-LoRA weights hold NaN or infinite values (a corrupted file, or training diverged). Nothing "
                f"was loaded. Problems: {problems[:5]}"
            )
        raise ValueError(
            f"The SD-LoRA weights do not match the task history in adapter_config.json "
            f"({len(config.task_history)} finished tasks, frozen ranks {config.frozen_ranks}, current rank "
            f"{config.rank_for_task(config.current_task)}), or were made for another base model. "
            f"Nothing was loaded. First problems: {problems[:5]}"
        )


def _checkpoint_problems(
    model_state: dict[str, torch.Tensor], checkpoint: dict[str, torch.Tensor], adapter_name: str
) -> list[str]:
    """What keeps `checkpoint` from loading into the adapter's tensors: shape problems first, else non-finite
    values."""
    expected = {key: value.shape for key, value in model_state.items() if _is_sdlora_key(key, adapter_name)}
    problems = [f"missing {key}" for key in expected if key not in checkpoint]
    problems += [
        f"{key}: checkpoint {tuple(checkpoint[key].shape)}, expected {tuple(shape)}"
        for key, shape in expected.items()
        if key in checkpoint and checkpoint[key].shape != shape
    ]
    if problems:
        return problems
    return [f"non-finite values in {key}" for key in expected if not torch.isfinite(checkpoint[key]).all()]


def _zero_norm(*dtypes: torch.dtype) -> float:
    """The norm at or below which a direction counts as zero, given the adapter's and the base weight's dtypes. A
    frozen direction is stored with the scale `c / norm` in the adapter's dtype and applied in the model's dtype, so
    a norm below either dtype's smallest normal number (float16: 6e-5) could overflow a scale to infinity; such a
    direction is below that dtype's resolution anyway."""
    return max(EMPTY_NORM, *(torch.finfo(dtype).tiny for dtype in dtypes))


def _is_sdlora_key(key: str, adapter_name: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] == adapter_name and parts[-2].startswith("sdlora_")


def _whole(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter's full value, detached: an FSDP2 shard (a DTensor) is gathered from all ranks."""
    value = parameter.detach()
    return value.full_tensor() if isinstance(value, DTensor) else value
