"""Checkpoints between tasks, and the check that every process holds the same model.

After every task the main process saves everything needed to go on (safetensors and JSON, written atomically): the
model through `Method.save`, the head's class statistics, what was measured so far and every random state. A run
resumed from there ends with exactly the results of a run that was never stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from .heads import Head
from .methods import Method
from .report import atomic_write_dir

Collate = Callable[[list[dict]], dict[str, torch.Tensor]]
CHECKPOINT_FORMAT = 1


@dataclass
class Progress:
    """What a run has measured after `tasks_done` tasks; a checkpoint stores it with the model."""

    accuracy_matrix: list[list[float | None]]
    trainable_parameters: int
    tasks_done: int = 0
    task_aware: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    magnitudes: list[list[float | None] | None] = field(default_factory=list)
    train_seconds: float = 0.0


def check_ranks_agree(accelerator: Accelerator, model: nn.Module, when: str) -> None:
    """Raise if the processes hold different models: gradients are averaged across them at every step, so the
    adapters (SD-LoRA's directions and magnitudes included) and the head must stay identical. One hash per tensor
    of the state dict is gathered, which names the tensors that differ at the cost of hashing the model once."""
    if accelerator.num_processes == 1:
        return
    state = model.state_dict()
    names = list(state)
    digests = torch.tensor([_digest(t) for t in state.values()], device=accelerator.device)
    gathered = accelerator.gather(digests).view(accelerator.num_processes, -1).cpu()
    differ = [names[i] for i in (gathered != gathered[0]).any(dim=0).nonzero().flatten().tolist()]
    if differ:
        raise RuntimeError(
            f"The processes' models differ {when}: {len(differ)} tensors, e.g. {differ[:3]}. Every process must "
            "run the same code on the same model; check custom hooks, dropout seeds and per-process branches."
        )


def _digest(tensor: torch.Tensor) -> int:
    """A 64-bit hash of a tensor's bytes."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def save_checkpoint(
    directory: Path, model: nn.Module, method: Method, head: Head, progress: Progress, collators: Sequence[Collate]
) -> Path:
    """Save the run after `progress.tasks_done` tasks into `directory/task_<n>` (built aside, then renamed) and
    remove the older checkpoints: the model (`Method.save`), the head's class statistics, the progress and the random
    states of torch, numpy, python and the collators, as the next task will find them."""
    statistics, order = head.state()
    tensors, states = _random_states(collators)

    def write(tmp: Path) -> None:
        (tmp / "model").mkdir()
        method.save(model, tmp / "model")
        save_file(statistics, tmp / "head.safetensors")
        save_file(tensors, tmp / "random.safetensors")
        state = {"format": CHECKPOINT_FORMAT, "progress": asdict(progress), "head_order": order, "random": states}
        (tmp / "state.json").write_text(json.dumps(state))

    path = atomic_write_dir(directory / f"task_{progress.tasks_done}", write)
    for older in _checkpoints(directory)[:-1]:
        shutil.rmtree(older)
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint of the most tasks in `directory`, if any (unfinished ones are hidden temporary folders)."""
    found = _checkpoints(directory)
    return found[-1] if found else None


def _checkpoints(directory: Path) -> list[Path]:
    found = [path for path in directory.glob("task_*") if (path / "state.json").is_file()]
    return sorted(found, key=lambda path: int(path.name.removeprefix("task_")))


def load_checkpoint(
    path: Path, model: nn.Module, method: Method, head: Head, collators: Sequence[Collate]
) -> tuple[nn.Module, Progress]:
    """`model` (prepared by the head, not yet wrapped) and `head` as `save_checkpoint` saved them, with the progress;
    the random states are set last, after restoring the model has drawn its own initialisations."""
    state = json.loads((path / "state.json").read_text())
    if state["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {state['format']}; this version reads {CHECKPOINT_FORMAT}.")
    model = method.restore(model, path / "model")
    head.load_state(load_file(path / "head.safetensors"), state["head_order"])
    _set_random_states(load_file(path / "random.safetensors"), state["random"], collators)
    return model, Progress(**state["progress"])


def _generator(collate: Collate) -> np.random.Generator | None:
    """The generator an image collator draws its augmentations from (text collators have none)."""
    generator = getattr(collate, "rng", None)
    return generator if isinstance(generator, np.random.Generator) else None


def _random_states(collators: Sequence[Collate]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every random state the next tasks draw from: torch's as tensors, the others as JSON values."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    collator_states = [g.bit_generator.state if (g := _generator(c)) else None for c in collators]
    states = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "collators": collator_states,
    }
    return tensors, states


def _set_random_states(tensors: dict[str, torch.Tensor], states: dict, collators: Sequence[Collate]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count())])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    for collate, state in zip(collators, states["collators"]):
        if (generator := _generator(collate)) is not None:
            generator.bit_generator.state = state
