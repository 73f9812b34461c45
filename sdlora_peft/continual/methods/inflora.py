"""InfLoRA (Liang & Li, CVPR 2024) on PEFT's LoRA: per task a branch whose down-projection is designed from the task's
inputs away from the old tasks' input subspace and kept fixed; only the up-projection trains; after the task the
branch is folded into the weights and the subspace memory grows by DualGPM (the math is in `subspace`)."""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.state import GradientState
from safetensors import safe_open
from safetensors.torch import save_file
from torch import distributed, nn

from .base import AdapterOptions, TaskData
from .lora import MergedLoRA, lora_factors, lora_layers
from .subspace import Subspace, design_down_projection, empty, energy_threshold, update

MEMORY_FILE = "subspace_memory.safetensors"


@dataclass
class InputMoments:
    """Uncentred second moments `E[x x^T]` of the LoRA layers' inputs. Layers that receive the very same tensor (the
    query and value projections of one attention block) share one, as InfLoRA keeps one matrix per attention block:
    `owner` maps each layer to the layer whose sums it shares."""

    owner: dict[str, str] = field(default_factory=dict)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, tokens: torch.Tensor) -> None:
        tokens = tokens.detach().float()
        outer = tokens.T @ tokens
        self.sums[name] = self.sums[name] + outer if name in self.sums else outer
        self.counts[name] = self.counts.get(name, 0) + len(tokens)

    def matrix(self, owner: str) -> torch.Tensor:
        return self.sums[owner] / self.counts[owner]

    def reduce_over_processes(self) -> None:
        """Sum every process's share (the loop splits the samples across processes): the design and the memory are
        then those of all the task's samples, the same on every process. (Without it the run would not fail: DDP
        copies the first process's parameters to the others when it wraps the model; but that design would have
        seen the first process's share only, and each process would keep a memory of its own.)"""
        if _world_size() == 1:
            return
        owners = sorted(self.sums)
        for owner in owners:
            distributed.all_reduce(self.sums[owner])
        device = self.sums[owners[0]].device if owners else torch.device("cpu")
        counts = torch.tensor([self.counts[owner] for owner in owners], dtype=torch.float64, device=device)
        distributed.all_reduce(counts)
        self.counts = {owner: int(count) for owner, count in zip(owners, counts.tolist())}


@contextlib.contextmanager
def collecting_inputs(model: nn.Module) -> Iterator[InputMoments]:
    """Accumulate, in float32, the input moments of every LoRA layer of `model` over the forward passes run inside;
    padding tokens (the attention mask of the model call) and the samples Accelerate repeats to even out the last
    batch across processes are left out. Reduced over processes on leaving."""
    moments = InputMoments()
    call: dict = {"mask": None, "seen": [], "rows": None}

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        batch = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
        call["rows"] = None if batch is None else _real_rows(len(batch))
        call["mask"], call["seen"] = kwargs.get("attention_mask"), []

    def on_layer(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs = args[0]
            shared = next((owner for ref, owner in call["seen"] if ref() is inputs), None)
            moments.owner[name] = shared or name
            if shared is None:
                call["seen"].append((weakref.ref(inputs), name))
                rows, mask = call["rows"], call["mask"]
                moments.add(name, _tokens(inputs[:rows], None if mask is None else mask[:rows]))

        return hook

    handles = [model.register_forward_pre_hook(on_call, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(on_layer(name)) for name, layer in lora_layers(model)]
    try:
        yield moments
    finally:
        for handle in handles:
            handle.remove()
    moments.reduce_over_processes()


def _world_size() -> int:
    return distributed.get_world_size() if distributed.is_available() and distributed.is_initialized() else 1


def _real_rows(rows: int) -> int:
    """How many of this process's `rows` samples are real. On several processes Accelerate fills the last batch up
    with samples from the start of the data, and `gather_for_metrics` keeps the first `remainder` rows of the batches
    gathered in process order; the same rows are kept here."""
    state = GradientState() if _world_size() > 1 else None
    if state is None or not state.end_of_dataloader or state.remainder <= 0:
        return rows
    return max(0, min(rows, state.remainder - distributed.get_rank() * rows))


def _tokens(inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The input vectors of a layer call, one a row; those of padding positions dropped."""
    if mask is not None and inputs.dim() == 3 and mask.shape == inputs.shape[:2]:
        return inputs[mask.bool()]
    return inputs.reshape(-1, inputs.shape[-1])


def _fix_down_projections(model: nn.Module) -> nn.Module:
    """Only the up-projection trains; the down-projection is designed in `begin_task`."""
    for name, parameter in model.named_parameters():
        if ".lora_A." in name:
            parameter.requires_grad_(False)
    return model


class InfLoRA(MergedLoRA):
    """InfLoRA: before each task, the branch's down-projection is set to the top singular vectors of the task's input
    moment with the protected subspace removed (scaled by 1/sqrt(3)); after it, the branch is folded into the weights
    (then a fresh branch, as `lora-merge`) and DualGPM adds the task's inputs to the protected subspace, with an
    energy threshold that rises linearly over the tasks (`AdapterOptions.inflora_thresholds`)."""

    name = "inflora"

    def __init__(self, options: AdapterOptions) -> None:
        super().__init__(options)
        if not all(0 < threshold <= 1 for threshold in options.inflora_thresholds):
            raise ValueError(f"InfLoRA's thresholds are energy fractions in (0, 1]; got {options.inflora_thresholds}.")
        self.thresholds = options.inflora_thresholds
        self.memory: dict[str, Subspace] = {}  # per owner layer (see InputMoments)
        self._task: TaskData | None = None
        self._observed: InputMoments | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        return _fix_down_projections(super().wrap(model))

    @torch.no_grad()
    def begin_task(self, model: nn.Module, task: TaskData) -> nn.Module:
        """Design the fresh branch's down-projections from one pass over the task's training samples (the new branch
        is still zero there, so the pass sees the model the earlier tasks left)."""
        self._task = task
        model.eval()
        with collecting_inputs(model) as moments:
            for batch in task.batches():
                model.to(next(iter(batch.values())).device)  # before the first task it may not be there yet
                model(**batch)
        designs: dict[str, torch.Tensor] = {}
        for name, layer in lora_layers(model):
            if name not in moments.owner:
                raise RuntimeError(f"InfLoRA saw no input at {name}; adapt only layers the model runs.")
            owner = moments.owner[name]
            if owner not in designs:
                covariance = moments.matrix(owner)
                memory = self.memory.get(owner, empty(len(covariance)))
                designs[owner] = design_down_projection(covariance.cpu(), memory, self.options.r)
            down, _ = lora_factors(layer, "default")
            down.copy_(designs[owner].to(down.device))
        return model

    def observing(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return self._observe(model)

    @contextlib.contextmanager
    def _observe(self, model: nn.Module) -> Iterator[None]:
        """The inputs after training (the reference's second pass), read while the loop extracts features."""
        with collecting_inputs(model) as moments:
            yield
        self._observed = moments

    def end_task(self, model: nn.Module, is_last: bool) -> nn.Module:
        if self._task is None or self._observed is None:
            raise RuntimeError("InfLoRA.end_task needs begin_task and observing for the same task first.")
        threshold = energy_threshold(self._task.index, self._task.num_tasks, *self.thresholds)
        for owner in self._observed.sums:
            covariance = self._observed.matrix(owner).cpu()
            self.memory[owner] = update(self.memory.get(owner, empty(len(covariance))), covariance, threshold)
        self._observed = None
        return _fix_down_projections(super().end_task(model, is_last))

    def stored_parameters(self, model: nn.Module) -> int:
        return sum(self.stored_by_kind(model).values())

    def stored_by_kind(self, model: nn.Module) -> dict[str, int]:
        """The adapted weights in full (earlier tasks are folded into them), the last task's branch, and the
        subspace memory: one basis per attention block of the protected subspace or of its complement, whichever is
        smaller."""
        return {
            "adapted_weights": super().stored_parameters(model),
            "branch": sum(p.numel() for name, p in model.named_parameters() if "lora_" in name),
            "subspace_memory": sum(subspace.basis.numel() for subspace in self.memory.values()),
        }

    def save(self, model: nn.Module, directory: Path) -> None:
        super().save(model, directory)
        bases = {owner: subspace.basis.contiguous() for owner, subspace in self.memory.items()}
        complements = [owner for owner, subspace in self.memory.items() if subspace.complement]
        save_file(bases, directory / MEMORY_FILE, metadata={"complement": json.dumps(complements)})

    def restore(self, model: nn.Module, directory: Path) -> nn.Module:
        model = _fix_down_projections(super().restore(model, directory))
        with safe_open(directory / MEMORY_FILE, framework="pt") as file:
            complements = set(json.loads((file.metadata() or {}).get("complement", "[]")))
            self.memory = {key: Subspace(file.get_tensor(key), key in complements) for key in file.keys()}  # noqa: SIM118
        return model
