"""The protocol every class-incremental method follows, and the simplest methods: a frozen backbone.

A `Method` decides how the backbone is adapted (`wrap`), what happens around each task (`begin_task`, `end_task`),
what it adds to the training loss (`penalty`) and what it observes while the loop reads the task's samples after
training (`observing`); the loop, the head and the data are the same for all of them (see `train.run_sequence`).
`save` and `restore` checkpoint a model between tasks, so that an interrupted run continues where it stopped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from ..heads import classifier_path


@dataclass
class AdapterOptions:
    """Adapter settings shared by every method, so that they differ only in how tasks follow each other."""

    r: int = 10
    target_modules: list[str] | str | None = None  # names, or PEFT's "all-linear"
    layers_to_transform: list[int] | None = None
    sdlora: dict = field(default_factory=dict)  # extra SDLoraConfig fields (magnitude_sharing, freeze_scale, ...)
    task_type: str | None = None  # PEFT's task type; "CAUSAL_LM": a language model, no classification layer
    olora_lambdas: tuple[float, float] = (0.5, 0.0)  # O-LoRA's orthogonality and L2 weights (the paper's 0.5, 0)
    inflora_thresholds: tuple[float, float] = (0.95, 1.0)  # InfLoRA's DualGPM energy threshold, first task to beyond


@dataclass
class TaskData:
    """What a method may look at around a task: its index, its classes (empty for a generative task), and its
    training samples as model-ready batches (the evaluation preprocessing, no augmentation, labels removed, on the
    model's device; on several processes each gets its share). `num_tasks` is the length of the sequence (InfLoRA's
    schedule depends on it)."""

    index: int
    classes: list[int]
    batches: Callable[[], Iterator[dict[str, torch.Tensor]]]
    num_tasks: int


class Method:
    """A frozen backbone whose classification layer alone trains (`linear`)."""

    name = "linear"
    trains = True
    shards = True  # trains under `--fsdp`: nothing it does during training reads the parameters outside the forward

    def __init__(self, options: AdapterOptions) -> None:
        self.options = options

    def wrap(self, model: nn.Module) -> nn.Module:
        """Prepare the (head-prepared) model before the first task."""
        head = classifier_path(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith(f"{head}."))
        return model

    def begin_task(self, model: nn.Module, task: TaskData) -> nn.Module:
        """Called before each task is trained (InfLoRA designs its new branch from the task's inputs here)."""
        return model

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to every training step's loss (O-LoRA's orthogonality), or None."""
        return None

    def observing(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """A context the loop holds while it reads the task's training samples once more after training, so that a
        method can collect statistics of them without a pass of its own."""
        return contextlib.nullcontext()

    def end_task(self, model: nn.Module, is_last: bool) -> nn.Module:
        """Called after each task has been trained, evaluated and its class statistics stored."""
        return model

    def magnitudes(self, model: nn.Module) -> list[float | None] | None:
        return None

    def stored_parameters(self, model: nn.Module) -> int:
        """Parameters stored beyond the pretrained backbone and the classification layer."""
        return 0

    def stored_by_kind(self, model: nn.Module) -> dict[str, int]:
        """`stored_parameters` by what they are: adapter weights, and what else a method keeps (InfLoRA's subspace
        memory)."""
        return {"adapter": self.stored_parameters(model)}

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write what `restore` needs to rebuild `model` as it is between two tasks: here its trainable tensors."""
        trained = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        save_file(trained, directory / "trained.safetensors")

    def restore(self, model: nn.Module, directory: Path) -> nn.Module:
        """`model`, as `wrap` receives it, wrapped and brought to the state `save` wrote into `directory`."""
        model = self.wrap(model)
        load_tensors(model, directory / "trained.safetensors")
        return model


def load_tensors(model: nn.Module, path: Path) -> None:
    """Load a partial state dict, refusing names the model does not have (a checkpoint of another model)."""
    unexpected = model.load_state_dict(load_file(path), strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path} does not fit the model: it has no tensor named {unexpected[0]!r}.")


def as_peft(model: nn.Module) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise TypeError(f"Expected the PeftModel this method wrapped, got a {type(model).__name__}.")
    return model


class Frozen(Method):
    """A frozen backbone and nothing trained: SimpleCIL with a head of class statistics (`ncm`, `lda`), or a language
    model's `zero-shot` baseline."""

    name = "ncm"
    trains = False

    def __init__(self, options: AdapterOptions, name: str | None = None) -> None:
        super().__init__(options)
        self.name = name or self.name

    def wrap(self, model: nn.Module) -> nn.Module:
        return model.requires_grad_(False)


class PeftMethod(Method):
    """A method whose model is a PeftModel: checkpoints are PEFT's own adapter files, so that the adapter's structure
    (SD-LoRA's frozen directions) comes back from its config."""

    def save(self, model: nn.Module, directory: Path) -> None:
        as_peft(model).save_pretrained(str(directory))

    def restore(self, model: nn.Module, directory: Path) -> nn.Module:
        return PeftModel.from_pretrained(model, directory, is_trainable=True)
