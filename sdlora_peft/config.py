"""Configuration of SD-LoRA adapters."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from huggingface_hub import constants as hub_constants
from huggingface_hub import file_exists, try_to_load_from_cache
from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open

from .registration import ensure_peft_type

RR_RANK_FRACTIONS = ((4, 1.0), (8, 0.8), (None, 0.6))
"""SD-LoRA-RR: tasks 0-3 use rank r, tasks 4-7 use 0.8 r, later tasks 0.6 r (10, 8, 6 for the paper's r = 10)."""

MAGNITUDE_SHARINGS = ("global", "layer")
DIRECTION_NORMS = ("frobenius", "factor")
FREEZE_SCALES = ("preserve", "normalized", "unit")
FROZEN_PATHS = ("auto", "lowrank", "fold")
ALLOW_PICKLE_ENV = "SDLORA_ALLOW_PICKLE"
"""Set to 1 to load an adapter saved only as a pickle (`adapter_model.bin`); safetensors are required otherwise."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def _check_type(name: str, value: object, accepted: tuple[type, ...], item: type | None, what: str) -> None:
    """`value` must be None, an instance of `accepted`, or a list/set of `item` (bools are not ints here)."""
    if value is None or (isinstance(value, accepted) and not isinstance(value, bool)):
        return
    if item is not None and isinstance(value, (list, set)):
        if all(isinstance(entry, item) and not isinstance(entry, bool) for entry in value):
            return
    raise ValueError(f"`{name}` must be {what}, got {value!r}.")


@dataclass
class SDLoraConfig(PeftConfig):
    """
    Configuration of an [`SDLoraModel`]: SD-LoRA (Wu et al., ICLR 2025), decoupled magnitude/direction low-rank
    adapters for class-incremental learning.

    Each task t trains a low-rank update `B_t A_t` scaled by a magnitude `alpha_t`. `advance_task()` freezes the
    task's direction and opens a new one; all magnitudes, old and new, keep training, so earlier directions are
    re-weighted for later tasks:

        W = W0 + sum_k alpha_k * c_k * (B_k A_k) / ||B_k A_k||

    Args:
        r (`int`):
            Rank of each task's direction (the paper uses 10).
        rank_schedule (`None`, `list[int]` or `"rr"`):
            Rank by task index. `None` uses `r` for every task; a list gives the rank of task i at position i (the
            last entry repeats); `"rr"` is SD-LoRA-RR's schedule r, r, r, r, 0.8r x4, 0.6r, ... (10,...,8,...,6 for
            r = 10).
        target_modules (`Optional[Union[list[str], str]]`):
            Modules to adapt, as in PEFT's LoRA. By default the query and value projections of the model type.
        exclude_modules (`Optional[Union[list[str], str]]`):
            Modules never to adapt.
        layers_to_transform (`Optional[Union[list[int], int]]`):
            Indices of the layers to adapt (default: all).
        layers_pattern (`Optional[Union[list[str], str]]`):
            Name of the `nn.ModuleList` that `layers_to_transform` indexes, when PEFT cannot infer it.
        modules_to_save (`Optional[list[str]]`):
            Modules besides the adapters that are trained and saved, e.g. a classification head.
        magnitude_init (`float`):
            Initial value of every new magnitude (the paper: 1.0; its reference code: 0.8).
        magnitude_sharing (`"global"` or `"layer"`):
            `"global"`: one magnitude per task shared by all adapted layers (the paper). `"layer"`: one per task and
            layer.
        direction_norm (`"frobenius"` or `"factor"`):
            The norm that makes a frozen direction unit: `||BA||_F` (the paper) or `||B||_F * ||A||_F` (the reference
            code's upper bound).
        freeze_scale (`"preserve"`, `"normalized"` or `"unit"`):
            How `advance_task()` stores the frozen direction. `"preserve"` keeps the model's function unchanged: the
            magnitude absorbs the update's norm (with global magnitudes a per-layer constant keeps each layer's share).
            `"normalized"` keeps the function too, but the whole trained update goes into the frozen scale and the
            task's magnitude restarts at 1: every old magnitude then reads as "times its trained update", whatever
            the update's norm, so one learning rate re-weights all tasks alike. `"unit"` rescales every layer's
            update to norm `alpha`, as the reference code does; the function jumps.
        reset_magnitudes (`bool`):
            Reset all magnitudes to `magnitude_init` at every `advance_task()`, as the reference code does (learned
            values are lost and the function changes). Off by default.
        kd_threshold (`Optional[float]`):
            SD-LoRA-KD: when set, a new direction whose least-squares fit by the earlier ones leaves a relative
            residual `<= kd_threshold` is folded into the old magnitudes instead of being stored (the paper: 9e-4).
        fan_in_fan_out (`bool`):
            Set to True for layers that store weights as (in, out), such as GPT-2's `Conv1D`. Set automatically when
            a `Conv1D` is targeted.
        cache_inference_weight (`bool`):
            In pure inference (eval mode under `torch.no_grad()`), keep one `W0 + updates` matrix per adapted layer so
            that the unmerged model costs what the base model costs, whatever the number of tasks. Costs one extra
            copy of each adapted weight while evaluating; it is freed by `model.train()`.
        frozen_path (`"auto"`, `"lowrank"` or `"fold"`):
            How training applies the frozen directions. `"lowrank"`: a low-rank product beside the base layer, whose
            cost grows with the tokens. `"fold"`: folded with their current scales into the base weight once per
            optimizer step (`W0 + B_cat diag(s) A_cat`), so the base layer's product applies them; this costs `R x in
            x out` per step and keeps one extra `out x in` weight per adapted layer. `"auto"` folds a layer when its
            batch has enough tokens for the fold to be the cheaper: from `in * out / (in + out)` tokens on with
            `frozen_recompute`, from twice that without (where the fold keeps its weight for backward). Either way
            the magnitudes' gradients come from low-rank projections, and the function is the same.
        frozen_recompute (`bool`):
            Keep nothing for the frozen directions' backward pass but the layer's input, which the current direction
            keeps anyway: their tokens x R projection is computed again in backward (and the fold keeps no folded
            weight). Less memory for a little more compute.
        init_weights (`bool`):
            True: `B` starts at zero, so the adapter is the identity. False: random `B` (a non-identity start, for
            tests). Directions opened by `advance_task()` always start at zero, so that it keeps the function.
        task_history (`list[dict]`):
            One record per finished task (`task`, `rank`, `absorbed`, `residual`), written by `advance_task()`. It
            defines the adapter's structure, so a saved adapter is rebuilt from `adapter_config.json` alone.
    """

    r: int = field(default=10, metadata={"help": "Rank of each task's direction."})
    rank_schedule: list[int] | str | None = field(
        default=None, metadata={"help": "Rank by task index: None (always r), a list of ranks, or 'rr'."}
    )
    target_modules: list[str] | set[str] | str | None = field(
        default=None, metadata={"help": "Modules to adapt; default: the query/value projections of the model type."}
    )
    exclude_modules: list[str] | set[str] | str | None = field(
        default=None, metadata={"help": "Modules never to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Indices of the layers to adapt."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list that layers_to_transform indexes."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules besides the adapters to train and save (e.g. the head)."}
    )
    magnitude_init: float = field(default=1.0, metadata={"help": "Initial value of each new magnitude."})
    magnitude_sharing: Literal["global", "layer"] = field(
        default="global", metadata={"help": "'global': one magnitude per task for all layers; 'layer': per layer."}
    )
    direction_norm: Literal["frobenius", "factor"] = field(
        default="frobenius", metadata={"help": "'frobenius': ||BA||_F; 'factor': ||B||_F * ||A||_F."}
    )
    freeze_scale: Literal["preserve", "normalized", "unit"] = field(
        default="preserve",
        metadata={
            "help": "'preserve': advance_task keeps the function; 'normalized': keeps it with old magnitudes "
            "restarting at 1; 'unit': reference code's rescaling."
        },
    )
    reset_magnitudes: bool = field(
        default=False, metadata={"help": "Reset all magnitudes at each advance_task (reference code)."}
    )
    kd_threshold: float | None = field(
        default=None, metadata={"help": "SD-LoRA-KD residual threshold (paper: 9e-4); None disables."}
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True for (in, out) weights such as Conv1D."})
    cache_inference_weight: bool = field(
        default=True, metadata={"help": "Eval-mode no-grad forwards use a cached W0 + updates (base-model cost)."}
    )
    frozen_path: Literal["auto", "lowrank", "fold"] = field(
        default="auto", metadata={"help": "'lowrank', 'fold' (into the base weight, once per step) or 'auto'."}
    )
    frozen_recompute: bool = field(
        default=False, metadata={"help": "Recompute the frozen directions' projections in backward (less memory)."}
    )
    init_weights: bool = field(default=True, metadata={"help": "True: identity at init; False: random B."})
    task_history: list[dict] = field(
        default_factory=list, metadata={"help": "Records of finished tasks, written by advance_task()."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        if not _is_positive_int(self.r):
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}.")
        if isinstance(self.rank_schedule, str):
            _check_choice("rank_schedule", self.rank_schedule, ("rr",))
        elif self.rank_schedule is not None:
            if (
                not isinstance(self.rank_schedule, list)
                or not self.rank_schedule
                or not all(_is_positive_int(rank) for rank in self.rank_schedule)
            ):
                raise ValueError(
                    f"`rank_schedule` must be None, 'rr' or a non-empty list of positive integers, "
                    f"got {self.rank_schedule!r}."
                )
        if not (_is_number(self.magnitude_init) and math.isfinite(self.magnitude_init)):
            raise ValueError(f"`magnitude_init` must be a finite number, got {self.magnitude_init!r}.")
        if self.magnitude_init == 0:
            # every task starts at B = 0: with alpha = 0 too, alpha, A and B all get zero gradients and never move
            raise ValueError("`magnitude_init` must be non-zero: a task starting at 0 * B A never trains. Use 1.0.")
        for name in (
            "reset_magnitudes",
            "fan_in_fan_out",
            "cache_inference_weight",
            "frozen_recompute",
            "init_weights",
            "inference_mode",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        self._validate_module_selection()
        _check_choice("magnitude_sharing", self.magnitude_sharing, MAGNITUDE_SHARINGS)
        _check_choice("direction_norm", self.direction_norm, DIRECTION_NORMS)
        _check_choice("freeze_scale", self.freeze_scale, FREEZE_SCALES)
        _check_choice("frozen_path", self.frozen_path, FROZEN_PATHS)
        if self.kd_threshold is not None and not (_is_number(self.kd_threshold) and self.kd_threshold >= 0):
            raise ValueError(f"`kd_threshold` must be None or a number >= 0, got {self.kd_threshold!r}.")
        _check_task_history(self.task_history)

    def _validate_module_selection(self) -> None:
        """Types of the fields that select modules: PEFT would otherwise match a name such as 5 or iterate over the
        characters of a string."""
        names = "a module name, a regex string, or a list of module names"
        _check_type("target_modules", self.target_modules, (str,), str, names)
        _check_type("exclude_modules", self.exclude_modules, (str,), str, names)
        _check_type("modules_to_save", self.modules_to_save, (), str, "a list of module names")
        _check_type("layers_pattern", self.layers_pattern, (str,), str, "a name or a list of names")
        _check_type("layers_to_transform", self.layers_to_transform, (int,), int, "an int or a list of ints")
        indices = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
        if indices is not None and any(index < 0 for index in indices):
            raise ValueError(f"`layers_to_transform` must hold layer indices >= 0, got {self.layers_to_transform!r}.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex string.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform`.")

    def rank_for_task(self, task: int) -> int:
        """The rank of task `task`'s direction (0-based task index)."""
        if self.rank_schedule is None:
            return self.r
        if isinstance(self.rank_schedule, str):  # "rr", the only name _validate lets through
            fraction = next(fraction for end, fraction in RR_RANK_FRACTIONS if end is None or task < end)
            return max(1, round(self.r * fraction))
        return self.rank_schedule[min(task, len(self.rank_schedule) - 1)]

    @property
    def current_task(self) -> int:
        """0-based index of the task being trained now."""
        return len(self.task_history)

    @property
    def frozen_ranks(self) -> list[int]:
        """Ranks of the stored (not absorbed) frozen directions, oldest first."""
        return [record["rank"] for record in self.task_history if not record["absorbed"]]

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> SDLoraConfig:
        """PEFT's `from_pretrained`, plus the checks an SD-LoRA adapter needs before anything is built from it: the
        config file is valid JSON with known fields and valid values (errors name the file), and the weights next to
        it are safetensors with an intact header. An adapter saved only as a pickle (`adapter_model.bin`) is refused
        unless the environment variable `SDLORA_ALLOW_PICKLE=1` is set."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        _check_weights_file(pretrained_model_name_or_path, subfolder, kwargs)
        return config

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict:
        """Read an `adapter_config.json`, refusing invalid JSON, another PEFT method, unknown fields and invalid
        values with an error that names the file. Nothing in the file is imported or executed: values are plain
        JSON and only this dataclass's fields are accepted."""
        try:
            attributes = super().from_json_file(path_json_file, **kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path_json_file} is not valid JSON ({error}). Re-save the adapter with save_pretrained()."
            ) from None
        problem = _config_dict_problem(cls, attributes)
        if problem:
            raise ValueError(f"{path_json_file}: {problem}")
        return attributes


def _config_dict_problem(cls: type[SDLoraConfig], attributes: object) -> str | None:
    """Why a loaded config dict cannot make an `SDLoraConfig`, or None."""
    if not isinstance(attributes, dict):
        return f"expected a JSON object, got {type(attributes).__name__}."
    if attributes.get("peft_type") != "SDLORA":
        return f"`peft_type` is {attributes.get('peft_type')!r}, not 'SDLORA': this is not an SD-LoRA adapter."
    unknown = sorted(set(attributes) - {f.name for f in fields(cls)})
    if unknown:
        # An SD-LoRA adapter's structure lives in its config: a field this version does not know could change the
        # function, so it is not silently dropped (PEFT's default).
        return (
            f"unknown fields {unknown}. The adapter was written by a newer sdlora_peft/peft (upgrade them), or the "
            "file was edited (remove those fields)."
        )
    try:
        cls(**{key: value for key, value in attributes.items() if key != "peft_type"})
    except (TypeError, ValueError) as error:
        return f"{error} Fix the value in the file or re-save the adapter."
    return None


def _check_weights_file(model_id: str, subfolder: str | None, hub_kwargs: dict) -> None:
    """Refuse pickle-only adapters (unless opted in) and safetensors files whose header is damaged, before PEFT
    builds layers for them. PEFT's loader takes `adapter_model.safetensors` if it exists and falls back to
    `adapter_model.bin` (read with `torch.load(weights_only=True)`); the same order is checked here."""
    path = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(path):
        safetensors_file = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
        has_safetensors = os.path.isfile(safetensors_file)
        has_pickle = os.path.isfile(os.path.join(path, WEIGHTS_NAME))
    else:
        safetensors_file = None
        has_safetensors = _hub_has(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder, hub_kwargs)
        has_pickle = not has_safetensors and _hub_has(model_id, WEIGHTS_NAME, subfolder, hub_kwargs)
    if has_pickle and not has_safetensors and os.environ.get(ALLOW_PICKLE_ENV) != "1":
        raise ValueError(
            f"{path} holds the adapter weights only as a pickle ({WEIGHTS_NAME}); SD-LoRA loads "
            f"{SAFETENSORS_WEIGHTS_NAME} only, since unpickling a downloaded file can be unsafe. Re-save the adapter "
            f"with save_pretrained() (safetensors is the default), or, if you trust the file, set "
            f"{ALLOW_PICKLE_ENV}=1 to let PEFT read it with torch.load(weights_only=True)."
        )
    if safetensors_file and has_safetensors:
        try:
            with safe_open(safetensors_file, framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{safetensors_file} is truncated or corrupted ({error}); nothing was loaded. Download or save the "
                "adapter again."
            ) from None


def _hub_has(repo_id: str, filename: str, subfolder: str | None, hub_kwargs: dict) -> bool:
    """Whether a Hub repository has `filename`: asked online, looked up in the local cache when offline."""
    filename = f"{subfolder}/{filename}" if subfolder else filename
    revision, repo_type = hub_kwargs.get("revision"), hub_kwargs.get("repo_type")
    if hub_constants.HF_HUB_OFFLINE:
        cached = try_to_load_from_cache(
            repo_id, filename, cache_dir=hub_kwargs.get("cache_dir"), revision=revision, repo_type=repo_type
        )
        return isinstance(cached, str)
    return file_exists(repo_id, filename, revision=revision, repo_type=repo_type, token=hub_kwargs.get("token"))


_TASK_RECORD_KEYS = {"task", "rank", "absorbed", "residual"}


def _check_task_history(history: object) -> None:
    """Reject a task history that cannot describe an adapter, before any layer is built from it."""
    if not isinstance(history, list):
        raise ValueError(f"`task_history` must be a list of task records, got {type(history).__name__}.")
    for index, record in enumerate(history):
        if not isinstance(record, dict) or set(record) != _TASK_RECORD_KEYS:
            raise ValueError(
                f"`task_history[{index}]` must be a dict with exactly the keys {sorted(_TASK_RECORD_KEYS)}, "
                f"got {record!r}."
            )
        if not _is_number(record["task"]) or record["task"] != index:
            raise ValueError(f"`task_history[{index}]` has task index {record['task']!r}; tasks must be 0, 1, 2, ...")
        if not _is_positive_int(record["rank"]):
            raise ValueError(f"`task_history[{index}]['rank']` must be a positive integer, got {record['rank']!r}.")
        if not isinstance(record["absorbed"], bool):
            raise ValueError(f"`task_history[{index}]['absorbed']` must be true or false, got {record['absorbed']!r}.")
        residual = record["residual"]
        if residual is not None and not (_is_number(residual) and math.isfinite(residual) and residual >= 0):
            raise ValueError(f"`task_history[{index}]['residual']` must be null or a number >= 0, got {residual!r}.")
