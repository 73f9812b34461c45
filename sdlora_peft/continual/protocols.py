"""Training protocols as presets of `sdlora-cil`'s options.

`--protocol paper` is the SD-LoRA paper's setting as its reference code runs it: the masked linear head, SGD with
momentum 0.9 at lr 1e-2 for every trained parameter, batch 128, 20 epochs, the paper's augmentation.
`--protocol paper-adam` is the same with the optimizer the paper's text names (Adam, lr 8e-3). Options given on the
command line win over the preset.

A CPU run may shrink the data (`--max-train-per-class`) but should not shrink training: with less data per class
the preset's batch shrinks in proportion (down to 8), so that every class gets as many optimizer steps as with its
full training set.
"""

from __future__ import annotations

import argparse

_PAPER = {"head": "linear", "head_lr": 1e-2, "batch_size": 128, "epochs": 20, "augment": True}
PROTOCOLS: dict[str, dict] = {
    "paper": {**_PAPER, "optimizer": "sgd", "lr": 1e-2},
    "paper-adam": {**_PAPER, "optimizer": "adamw", "lr": 8e-3, "head_lr": 8e-3},
}
MIN_BATCH = 8


def apply_protocol(args: argparse.Namespace, given: set[str]) -> argparse.Namespace:
    """`args` with the preset of `args.protocol` for every option not in `given`."""
    if args.protocol is None:
        return args
    for name, value in PROTOCOLS[args.protocol].items():
        if name not in given:
            setattr(args, name, value)
    return args


def steps_preserving_batch(batch_size: int, kept_per_class: int | None, full_per_class: int) -> int:
    """The batch that gives a class as many optimizer steps with `kept_per_class` samples as `batch_size` gives it
    with `full_per_class`."""
    if kept_per_class is None or kept_per_class >= full_per_class:
        return batch_size
    return max(MIN_BATCH, round(batch_size * kept_per_class / full_per_class))
