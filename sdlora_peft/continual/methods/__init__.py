"""The methods compared side by side: SD-LoRA's variants and the peers a user would otherwise pick.

One method family a file, all through the small protocol of `base.Method`; a new method joins by adding its file and
one entry to `METHODS`, without touching the loop. SD-LoRA is used through PEFT's public API only, like any other
PEFT method.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import AdapterOptions, FrozenNCM, Method, PeftMethod, TaskData
from .lora import MergedLoRA, SequentialLoRA
from .sdlora import SDLoRA, SDLoRAAblation

METHODS: dict[str, Callable[[AdapterOptions], Method]] = {
    "sdlora": SDLoRA,
    "sdlora-rr": lambda options: SDLoRA(options, "sdlora-rr", rank_schedule="rr"),
    "sdlora-kd": lambda options: SDLoRA(options, "sdlora-kd", kd_threshold=9e-4),
    "lora-seq": SequentialLoRA,
    "lora-merge": MergedLoRA,
    "ncm": FrozenNCM,
    "linear": Method,
    "joint": lambda options: SequentialLoRA(options, "joint"),
    "ablation-single": lambda options: SDLoRAAblation(options, "single"),
    "ablation-first": lambda options: SDLoRAAblation(options, "first"),
    "ablation-fixed": lambda options: SDLoRAAblation(options, "fixed"),
}
METHOD_NAMES = tuple(METHODS)


def make_method(name: str, options: AdapterOptions) -> Method:
    """The method named `name` (one of METHOD_NAMES)."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; known methods: {', '.join(METHOD_NAMES)}.")
    return METHODS[name](options)


__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "AdapterOptions",
    "FrozenNCM",
    "Method",
    "MergedLoRA",
    "PeftMethod",
    "SDLoRA",
    "SDLoRAAblation",
    "SequentialLoRA",
    "TaskData",
    "make_method",
]
