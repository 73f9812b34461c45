"""The class-incremental loop on Accelerate: one optimizer per task, masked logits, evaluation after every task.

`run_sequence` learns the tasks of a `TaskSplit` one after the other with one `Method` (SD-LoRA or a peer) and one
`Head`, and returns the accuracy matrix and what the run cost. The same code runs on one CPU process, on several
processes (`accelerate launch` / `torchrun`, gloo on CPU) and on GPUs; after every task it checks that all
processes hold the same model. With `TrainSettings.fsdp`, each task trains a copy of the model sharded with FSDP2
(`sharded_copy`), whose training is gathered back into the unsharded model at the end of the task; the method's
task boundary, the head and the evaluation see the unsharded model, as without it. With a checkpoint directory,
everything needed to go on is saved after every task (see `checkpoint`); frozen lower blocks are computed once per
dataset where that is exact (see `prefix`). `train_task` is also the causal-LM loop's (`lm.loop`): it takes the loss
as a function.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..sharding import gather_trained, shard_sdlora
from .checkpoint import Progress, check_ranks_agree, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import TaskSplit
from .heads import Head, classifier_path, find_classifier, unwrap
from .methods import Method, TaskData
from .metrics import incremental_accuracies, summarize
from .prefix import INDEX_KEY, IndexedDataset, PrefixCache, with_indices

Collate = Callable[[list[dict]], dict[str, torch.Tensor]]
Loss = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]  # (model, inputs, labels)


@dataclass
class TrainSettings:
    """How each task is trained. `head_lr` and `magnitude_lr` (SD-LoRA's magnitudes) default to `lr`; a smaller `lr`
    than `head_lr` is the "slow learner" (SLCA) that limits how far the backbone's features drift from one task to
    the next. `optimizer`: "adamw", or "sgd" with momentum 0.9 (the SD-LoRA reference code's)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    head_lr: float | None = None
    magnitude_lr: float | None = None
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    seed: int = 0
    prefix_cache: bool = True  # cache the frozen lower blocks' output where that is exact (see prefix.PrefixCache)
    fsdp: bool = False  # train each task on an FSDP2-sharded copy (several processes; see `sharded_copy`)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over `classes` only: other logits are masked, so old classes' head rows get no gradient."""
    masked = torch.full_like(logits, float("-inf"))
    masked[:, classes] = logits[:, classes]
    return F.cross_entropy(masked.float(), labels)


def class_loss(
    classes: torch.Tensor, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """The class-incremental training loss: cross-entropy over the current task's `classes`."""
    return masked_cross_entropy(model(**inputs).logits, labels, classes)


OPTIMIZERS = ("adamw", "sgd")


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """One parameter group each for the classification layer, SD-LoRA's magnitudes and everything else trained."""
    head = find_classifier(unwrap(model))  # None for a causal LM
    rates = {
        "head": settings.lr if settings.head_lr is None else settings.head_lr,
        "magnitude": settings.lr if settings.magnitude_lr is None else settings.magnitude_lr,
        "backbone": settings.lr,
    }
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in rates}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            in_head = head is not None and f".{head}." in f".{name}"
            group = "head" if in_head else "magnitude" if "sdlora_magnitude" in name else "backbone"
            groups[group].append(parameter)
    param_groups = [{"params": groups[name], "lr": rate} for name, rate in rates.items() if groups[name]]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(param_groups, momentum=0.9, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, weight_decay=settings.weight_decay)
    raise ValueError(f"Unknown optimizer {settings.optimizer!r}; choose one of {list(OPTIMIZERS)}.")


def train_task(
    accelerator: Accelerator,
    model: nn.Module,
    dataset: Dataset,
    collate: Collate,
    loss_fn: Loss,
    settings: TrainSettings,
    description: str = "",
    penalty: Callable[[], torch.Tensor | None] | None = None,
    cache: PrefixCache | None = None,
    losses: list[float] | None = None,
) -> nn.Module:
    """Train `model` on one task with a fresh optimizer (the trainable set changes between tasks). `loss_fn(model,
    inputs, labels)` is the task's loss; `penalty` gives a term to add to every step's loss (a method's
    regulariser); with an active `cache`, the frozen lower blocks' output comes from it; every step's loss is
    appended to `losses` if given."""
    # the cache replays into the unsharded model's blocks, which a sharded copy does not run
    cache = cache if cache is not None and cache.active and not settings.fsdp else None
    if cache is not None:
        cache.prepare(accelerator, model, dataset, collate, settings.eval_batch_size)
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(
        IndexedDataset(dataset), batch_size=settings.batch_size, shuffle=True, collate_fn=with_indices(collate),
        generator=generator, drop_last=False,
    )  # fmt: skip
    model.zero_grad(set_to_none=True)  # no gradient left from before (the aligned head's alignment leaves some)
    with sharded_copy(model) if settings.fsdp else contextlib.nullcontext(model) as trained:
        optimizer = _optimizer(trained, settings)
        if settings.fsdp:  # sharded already: Accelerate adds mixed precision only, no DDP wrapper
            trained = accelerator.prepare_model(trained, device_placement=False, evaluation_mode=True)
            optimizer, loader = accelerator.prepare(optimizer, loader)
        else:
            trained, optimizer, loader = accelerator.prepare(trained, optimizer, loader)
        trained.train()
        for epoch in range(settings.epochs):
            show = accelerator.is_local_main_process
            batches = tqdm(loader, desc=f"{description} epoch {epoch + 1}", disable=not show)
            for batch in batches:
                with accelerator.accumulate(trained):
                    labels = batch.pop("labels")
                    with _inputs(cache, dataset, collate, batch) as inputs:
                        loss = loss_fn(trained, inputs, labels)
                    extra = penalty() if penalty is not None else None
                    if extra is not None:
                        loss = loss + extra
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                batches.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                if losses is not None:
                    losses.append(loss.item())
    accelerator.free_memory()
    return model.eval()


@contextlib.contextmanager
def sharded_copy(model: nn.Module) -> Iterator[nn.Module]:
    """An FSDP2-sharded copy of `model` to train (every rank holds its share of the parameters, gradients and
    optimizer state); on leaving, what it learned is gathered back into `model`. `model` itself waits on the CPU
    meanwhile, unsharded, with everything a state dict would not carry (non-persistent buffers, a method's hooks)."""
    home = next(model.parameters()).device
    model.to("cpu")
    trained = shard_sdlora(copy.deepcopy(model))  # fully_shard moves each rank's shard to its device
    yield trained
    gather_trained(trained, model)
    model.to(home)


@torch.no_grad()
def extract(
    accelerator: Accelerator,
    model: nn.Module,
    dataset: Dataset,
    collate: Collate,
    batch_size: int,
    cache: PrefixCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (the classification layer's input), logits and labels of every sample of `dataset`, gathered
    from all processes, on the CPU; with an active `cache`, the frozen lower blocks' output comes from it."""
    cache = cache if cache is not None and cache.active else None
    if cache is not None:
        cache.prepare(accelerator, model, dataset, collate, batch_size)
    base = unwrap(model)
    captured: list[torch.Tensor] = []
    hook = base.get_submodule(classifier_path(base)).register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0])
    )
    loader = accelerator.prepare_data_loader(
        DataLoader(IndexedDataset(dataset), batch_size=batch_size, collate_fn=with_indices(collate))
    )
    model.eval().to(accelerator.device)
    features: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in loader:
            batch_labels = batch.pop("labels")
            with _inputs(cache, dataset, collate, batch) as inputs:
                batch_logits = model(**inputs).logits
            batch_features = _pooled(captured.pop(), batch.get("attention_mask"))
            gathered = accelerator.gather_for_metrics((batch_features, batch_logits, batch_labels))
            for store, tensor in zip((features, logits, labels), gathered):
                store.append(tensor.float().cpu() if tensor.is_floating_point() else tensor.cpu())
    finally:
        hook.remove()
    return torch.cat(features), torch.cat(logits), torch.cat(labels)


@contextlib.contextmanager
def _inputs(
    cache: PrefixCache | None, dataset: Dataset, collate: Collate, batch: dict
) -> Iterator[dict[str, torch.Tensor]]:
    """The model's inputs from a batch of `IndexedDataset` rows, replayed from the cache when there is one."""
    if cache is None:
        batch.pop(INDEX_KEY)
        yield batch
        return
    with cache.replaying(dataset, collate, batch) as inputs:
        yield inputs


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
    cache = PrefixCache(model, augmented=getattr(collate, "augment", False)) if settings.prefix_cache else None
    read = partial(extract, accelerator, collate=eval_collate, batch_size=settings.eval_batch_size, cache=cache)
    for task in range(progress.tasks_done, num_tasks):
        classes = split.tasks[task]
        start = time.perf_counter()
        name = f"{method.name} task {task + 1}/{num_tasks}"
        inputs = train_sets[task]
        batches = partial(task_batches, accelerator, inputs, eval_collate, settings.eval_batch_size)
        model = method.begin_task(model, TaskData(task, classes, batches, num_tasks))
        if cache is not None:
            cache.refresh(model)
        before = None
        if head.compensates_drift and method.trains and task > 0:
            before, _, _ = read(model, inputs)
        if method.trains:
            penalty = partial(method.penalty, model)
            loss_fn = partial(class_loss, torch.tensor(classes, device=accelerator.device))
            model = train_task(accelerator, model, inputs, collate, loss_fn, settings, name, penalty, cache)
        with method.observing(model):
            features, logits, labels = read(model, inputs)
        progress.train_accuracy.append(_accuracy(logits, labels, classes))
        if before is not None:
            head.compensate_drift(before, features)
        head.end_task(model, features, labels, classes)
        progress.train_seconds += time.perf_counter() - start
        seen = split.seen_classes(task)
        for seen_task in range(task + 1):
            features, logits, labels = read(model, test_sets[seen_task])
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
        "prefix_cache": cache.describe() if cache is not None else {"used": False, "reason": "turned off"},
    }
    return model, record
