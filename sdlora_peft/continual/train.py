"""The class-incremental loop on Accelerate: one optimizer per task, masked logits, evaluation after every task.

`run_sequence` learns the tasks of a `TaskSplit` one after the other with one `Method` (SD-LoRA or a peer) and one
`Head`, and returns the accuracy matrix and what the run cost. The same code runs on one CPU process, on several
processes (`accelerate launch` / `torchrun`, gloo on CPU) and on GPUs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .baselines import Method
from .data import TaskSplit
from .heads import Head, classifier_path
from .metrics import incremental_accuracies, summarize

Collate = Callable[[list[dict]], dict[str, torch.Tensor]]


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
    head = classifier_path(model.get_base_model() if hasattr(model, "get_base_model") else model)
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
) -> nn.Module:
    """Train `model` on one task with a fresh optimizer (the trainable set changes between tasks)."""
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(
        dataset, batch_size=settings.batch_size, shuffle=True, collate_fn=collate, generator=generator, drop_last=False
    )
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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    captured: list[torch.Tensor] = []
    hook = base.get_submodule(classifier_path(base)).register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0])
    )
    loader = accelerator.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, collate_fn=collate))
    model.eval().to(accelerator.device)
    features, logits, labels = [], [], []
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
) -> tuple[nn.Module, dict]:
    """Learn the tasks in order and evaluate on every seen task after each; return the final model and the run's
    record (accuracy matrix, summary metrics, task-aware accuracy, magnitudes, parameters, time).

    `collate` makes training batches (possibly augmented); `eval_collate` (default: `collate`) makes the batches
    whose features the head stores and that are evaluated."""
    eval_collate = eval_collate or collate
    head.prepare(model)
    model = method.wrap(model)
    num_tasks = split.num_tasks
    matrix: list[list[float | None]] = [[None] * num_tasks for _ in range(num_tasks)]
    magnitudes, task_aware, train_seconds = [], [], 0.0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for task, classes in enumerate(split.tasks):
        start = time.perf_counter()
        name = f"{method.name} task {task + 1}/{num_tasks}"
        if method.trains:
            model = train_task(accelerator, model, train_sets[task], collate, classes, settings, name)
        features, _, labels = extract(accelerator, model, train_sets[task], eval_collate, settings.eval_batch_size)
        head.end_task(model, features, labels, classes)
        train_seconds += time.perf_counter() - start
        seen = split.seen_classes(task)
        for seen_task in range(task + 1):
            features, logits, labels = extract(
                accelerator, model, test_sets[seen_task], eval_collate, settings.eval_batch_size
            )
            scores = head.scores(features, logits)
            matrix[task][seen_task] = _accuracy(scores, labels, seen)
            if task == num_tasks - 1:  # told the task: predictions among its classes only
                task_aware.append(_accuracy(scores, labels, split.tasks[seen_task]))
        start = time.perf_counter()
        model = method.end_task(model, is_last=task == num_tasks - 1)
        train_seconds += time.perf_counter() - start
        magnitudes.append(method.magnitudes(model))
    sizes = [len(test_set) for test_set in test_sets]
    summary = summarize(matrix, sizes)
    record = {
        "accuracy_matrix": matrix,
        **summary,
        "incremental_accuracies": incremental_accuracies(matrix, sizes),
        "task_sizes": sizes,
        "task_aware_final_accuracy": sum(a * n for a, n in zip(task_aware, sizes)) / sum(sizes),
        "train_seconds": train_seconds,
        "trainable_parameters": trainable,
        "stored_adapter_parameters": method.stored_parameters(model),
        "magnitudes": magnitudes if any(m is not None for m in magnitudes) else None,
        "head_statistics": head.stored_statistics(),
    }
    return model, record
