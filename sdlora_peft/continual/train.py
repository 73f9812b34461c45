"""The class-incremental loop on Accelerate: one optimizer per task, masked logits, evaluation after every task.

`run_sequence` learns the tasks of a `TaskSplit` one after the other with one `Method` (SD-LoRA or a peer) and one
`Head`, and returns the accuracy matrix and what the run cost. The same code runs on one CPU process, on several
processes (`accelerate launch` / `torchrun`, gloo on CPU) and on GPUs; after every task it checks that all
processes hold the same model.

With a checkpoint directory, everything needed to go on is saved after every task (safetensors and JSON, written
atomically): the model through `Method.save`, the head's class statistics, what was measured so far and every random
state. A run resumed from there ends with exactly the results of a run that was never stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import TaskSplit
from .heads import Head, classifier_path, unwrap
from .methods import Method, TaskData
from .metrics import incremental_accuracies, summarize
from .report import atomic_write_dir

Collate = Callable[[list[dict]], dict[str, torch.Tensor]]
CHECKPOINT_FORMAT = 1


@dataclass
class TrainSettings:
    """How each task is trained. `head_lr` defaults to `lr`; a smaller `lr` than `head_lr` is the "slow learner"
    (SLCA) that limits how far the backbone's features drift from one task to the next."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    seed: int = 0


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over `classes` only: other logits are masked, so old classes' head rows get no gradient."""
    masked = torch.full_like(logits, float("-inf"))
    masked[:, classes] = logits[:, classes]
    return F.cross_entropy(masked.float(), labels)


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    head = classifier_path(unwrap(model))
    groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups[f".{head}." in f".{name}"].append(parameter)
    head_lr = settings.lr if settings.head_lr is None else settings.head_lr
    param_groups = [{"params": groups[False], "lr": settings.lr}, {"params": groups[True], "lr": head_lr}]
    return torch.optim.AdamW([g for g in param_groups if g["params"]], weight_decay=settings.weight_decay)


def train_task(
    accelerator: Accelerator,
    model: nn.Module,
    dataset: Dataset,
    collate: Collate,
    classes: list[int],
    settings: TrainSettings,
    description: str = "",
    penalty: Callable[[], torch.Tensor | None] | None = None,
) -> nn.Module:
    """Train `model` on one task with a fresh optimizer (the trainable set changes between tasks); `penalty` gives
    a term to add to every step's loss (a method's regulariser)."""
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(
        dataset, batch_size=settings.batch_size, shuffle=True, collate_fn=collate, generator=generator, drop_last=False
    )
    model.zero_grad(set_to_none=True)  # no gradient left from before (the aligned head's alignment leaves some)
    optimizer = _optimizer(model, settings)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    task_classes = torch.tensor(classes, device=accelerator.device)
    model.train()
    for epoch in range(settings.epochs):
        batches = tqdm(loader, desc=f"{description} epoch {epoch + 1}", disable=not accelerator.is_local_main_process)
        for batch in batches:
            with accelerator.accumulate(model):
                labels = batch.pop("labels")
                loss = masked_cross_entropy(model(**batch).logits, labels, task_classes)
                extra = penalty() if penalty is not None else None
                if extra is not None:
                    loss = loss + extra
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            batches.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return model.eval()


@torch.no_grad()
def extract(
    accelerator: Accelerator, model: nn.Module, dataset: Dataset, collate: Collate, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (the classification layer's input), logits and labels of every sample of `dataset`, gathered
    from all processes, on the CPU."""
    base = unwrap(model)
    captured: list[torch.Tensor] = []
    hook = base.get_submodule(classifier_path(base)).register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0])
    )
    loader = accelerator.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, collate_fn=collate))
    model.eval().to(accelerator.device)
    features: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in loader:
            batch_labels = batch.pop("labels")
            batch_logits = model(**batch).logits
            batch_features = _pooled(captured.pop(), batch.get("attention_mask"))
            gathered = accelerator.gather_for_metrics((batch_features, batch_logits, batch_labels))
            for store, tensor in zip((features, logits, labels), gathered):
                store.append(tensor.float().cpu() if tensor.is_floating_point() else tensor.cpu())
    finally:
        hook.remove()
    return torch.cat(features), torch.cat(logits), torch.cat(labels)


def task_batches(
    accelerator: Accelerator, dataset: Dataset, collate: Collate, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Model-ready batches of `dataset` (labels removed), this process's share of them, on its device."""
    for batch in accelerator.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, collate_fn=collate)):
        batch.pop("labels")
        yield batch


def _pooled(features: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Decoder classifiers (Llama's `score`) see every token's hidden state and pool their logits at the last real
    token afterwards: take the features there too (the last attended position, whichever side is padded)."""
    if features.dim() == 2:
        return features
    if attention_mask is None:
        return features[:, -1]
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * positions).argmax(dim=1)
    return features[torch.arange(len(features), device=features.device), last]


def _accuracy(scores: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> float:
    """Top-1 accuracy (%) with predictions restricted to `classes`."""
    allowed = torch.tensor(classes)
    predictions = allowed[scores[:, allowed].argmax(dim=1)]
    return 100.0 * (predictions == labels).float().mean().item()


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


def run_sequence(
    accelerator: Accelerator,
    model: nn.Module,
    method: Method,
    head: Head,
    split: TaskSplit,
    train_sets: list[Dataset],
    test_sets: list[Dataset],
    collate: Collate,
    settings: TrainSettings,
    eval_collate: Collate | None = None,
    checkpoints: Path | None = None,
    resume: bool = False,
) -> tuple[nn.Module, dict]:
    """Learn the tasks in order and evaluate on every seen task after each; return the final model and the run's
    record (accuracy matrix, summary metrics, task-aware accuracy, magnitudes, parameters, time).

    `collate` makes training batches (possibly augmented); `eval_collate` (default: `collate`) makes the batches
    whose features the head stores and that are evaluated. With `checkpoints`, the main process saves a checkpoint
    there after every task; with `resume`, the run goes on from the latest one found there (if any)."""
    eval_collate = eval_collate or collate
    collators = (collate, eval_collate)
    head.prepare(model)
    num_tasks = split.num_tasks
    latest = latest_checkpoint(checkpoints) if resume and checkpoints else None
    if latest is None:
        model = method.wrap(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        progress = Progress([[None] * num_tasks for _ in range(num_tasks)], trainable)
    else:
        model, progress = load_checkpoint(latest, model, method, head, collators)
    matrix = progress.accuracy_matrix
    for task in range(progress.tasks_done, num_tasks):
        classes = split.tasks[task]
        start = time.perf_counter()
        name = f"{method.name} task {task + 1}/{num_tasks}"
        inputs = train_sets[task]
        batches = partial(task_batches, accelerator, inputs, eval_collate, settings.eval_batch_size)
        model = method.begin_task(model, TaskData(task, classes, batches, num_tasks))
        before = None
        if head.compensates_drift and method.trains and task > 0:
            before, _, _ = extract(accelerator, model, inputs, eval_collate, settings.eval_batch_size)
        if method.trains:
            penalty = partial(method.penalty, model)
            model = train_task(accelerator, model, inputs, collate, classes, settings, name, penalty)
        with method.observing(model):
            features, logits, labels = extract(accelerator, model, inputs, eval_collate, settings.eval_batch_size)
        progress.train_accuracy.append(_accuracy(logits, labels, classes))
        if before is not None:
            head.compensate_drift(before, features)
        head.end_task(model, features, labels, classes)
        progress.train_seconds += time.perf_counter() - start
        seen = split.seen_classes(task)
        for seen_task in range(task + 1):
            features, logits, labels = extract(
                accelerator, model, test_sets[seen_task], eval_collate, settings.eval_batch_size
            )
            scores = head.scores(features, logits)
            matrix[task][seen_task] = _accuracy(scores, labels, seen)
            if task == num_tasks - 1:  # told the task: predictions among its classes only
                progress.task_aware.append(_accuracy(scores, labels, split.tasks[seen_task]))
        start = time.perf_counter()
        model = method.end_task(model, is_last=task == num_tasks - 1)
        progress.train_seconds += time.perf_counter() - start
        progress.magnitudes.append(method.magnitudes(model))
        progress.tasks_done = task + 1
        check_ranks_agree(accelerator, model, f"after {name}")
        if checkpoints is not None and accelerator.is_main_process:
            save_checkpoint(checkpoints, model, method, head, progress, collators)
    sizes = [len(test_set) for test_set in test_sets]
    summary = summarize(matrix, sizes)
    magnitudes = progress.magnitudes
    record = {
        "accuracy_matrix": matrix,
        **summary,
        "incremental_accuracies": incremental_accuracies(matrix, sizes),
        "task_sizes": sizes,
        "task_aware_final_accuracy": sum(a * n for a, n in zip(progress.task_aware, sizes)) / sum(sizes),
        "train_accuracy": progress.train_accuracy,
        "train_seconds": progress.train_seconds,
        "trainable_parameters": progress.trainable_parameters,
        "stored_adapter_parameters": method.stored_parameters(model),
        "stored_parameters_by_kind": method.stored_by_kind(model),
        "magnitudes": magnitudes if any(m is not None for m in magnitudes) else None,
        "head_statistics": head.stored_statistics(),
    }
    return model, record


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
