"""Continual fine-tuning of a causal LM on Accelerate: generative tasks one after the other, no old data kept.

`run_lm_sequence` trains the tasks in order with one `Method` (SD-LoRA or a peer, through the same protocol as the
class-incremental loop: `wrap`, `begin_task`, `penalty` on every step, `observing`, `end_task`, `save`/`restore`),
the loss on the target tokens only, and after every task ranks the answers of every task seen so far by
log-likelihood (and, as an option, scores greedy generation by exact match). No task id reaches the model beyond
what its prompt says in words. Checkpoints after every task make a resumed run end bit for bit as an uninterrupted
one (`checkpoint`). Training replays the frozen lower blocks' output from `prefix.PrefixCache` where that is exact
(adapters on the upper blocks only, no dropout below); the ranking runs the whole model, as it reads every layer's
key/value cache of the prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from torch import nn

from ..checkpoint import check_ranks_agree, latest_checkpoint, load_checkpoint, save_checkpoint
from ..methods import Method, TaskData
from ..metrics import incremental_accuracies, summarize
from ..prefix import PrefixCache
from ..train import TrainSettings, task_batches, train_task
from .encode import CausalLMCollator, answer_ids, encode_pairs, prompt_ids, target_loss
from .ranking import choice_log_likelihoods, greedy_answers
from .tasks import LMTask


@dataclass
class EncodedTask:
    """A task as token ids: training pairs, test prompts with the index of their answer, the answers."""

    name: str
    train: datasets.Dataset
    prompts: list[list[int]]
    answers: list[int]
    choices: list[list[int]]
    targets: list[str]

    @classmethod
    def of(cls, task: LMTask, tokenizer) -> EncodedTask:
        index = {choice: i for i, choice in enumerate(task.choices)}
        return cls(
            task.name,
            encode_pairs(task.train, tokenizer),
            [prompt_ids(tokenizer, prompt) for prompt in task.test["prompt"]],
            [index[target] for target in task.test["target"]],
            [answer_ids(tokenizer, choice) for choice in task.choices],
            list(task.test["target"]),
        )


@dataclass
class LMProgress:
    """What a run has measured after `tasks_done` training stages; a checkpoint stores it with the model.
    `accuracy[s][j]`: ranking accuracy (%) on task j after stage s (None where j was not evaluated)."""

    accuracy: list[list[float | None]]
    trainable_parameters: int
    tasks_done: int = 0
    exact_match: list[list[float | None]] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)
    task_seconds: list[float] = field(default_factory=list)
    magnitudes: list[list[float | None] | None] = field(default_factory=list)
    train_seconds: float = 0.0


def evaluate(
    model: nn.Module, task: EncodedTask, tokenizer, exact_match: bool = False, max_rows: int = 256
) -> tuple[float, float | None]:
    """Ranking accuracy (%) of `task`'s answers by log-likelihood, and the exact match (%) of greedy generation
    (stripped of surrounding whitespace) when asked for. `max_rows` (prompt, answer) pairs are scored at once."""
    scores = choice_log_likelihoods(model, task.prompts, task.choices, tokenizer.pad_token_id, max_rows)
    accuracy = 100.0 * (scores.argmax(dim=1) == torch.tensor(task.answers)).float().mean().item()
    if not exact_match:
        return accuracy, None
    longest = max(len(choice) for choice in task.choices)
    generated = greedy_answers(model, task.prompts, tokenizer, longest)
    hits = sum(g.strip() == t.strip() for g, t in zip(generated, task.targets))
    return accuracy, 100.0 * hits / len(task.targets)


def run_lm_sequence(
    accelerator: Accelerator,
    model: nn.Module,
    tokenizer,
    method: Method,
    tasks: list[LMTask],
    settings: TrainSettings,
    *,
    joint: bool = False,
    exact_match: bool = False,
    checkpoints: Path | None = None,
    resume: bool = False,
) -> tuple[nn.Module, dict]:
    """Learn `tasks` in order (with `joint`, all at once: one stage on their union, the upper bound) and evaluate
    every seen task after each; return the final model and the run's record. With `checkpoints`, the main process
    saves a checkpoint there after every task; with `resume`, the run goes on from the latest one found there."""
    encoded = [EncodedTask.of(task, tokenizer) for task in tasks]
    stages = [datasets.concatenate_datasets([t.train for t in encoded])] if joint else [t.train for t in encoded]
    collate = CausalLMCollator(tokenizer.pad_token_id)
    latest = latest_checkpoint(checkpoints) if resume and checkpoints else None
    if latest is None:
        model = method.wrap(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        progress = LMProgress([[None] * len(tasks) for _ in stages], trainable)
    else:
        model, progress = load_checkpoint(latest, model, method, None, (collate,), LMProgress)
    cache = PrefixCache(model) if settings.prefix_cache else None
    evaluated: dict[int, tuple[float, float | None]] = {}  # a method that trains nothing: once per task
    for stage in range(progress.tasks_done, len(stages)):
        name = f"{method.name} task {stage + 1}/{len(stages)}"
        batches = partial(task_batches, accelerator, stages[stage], collate, settings.eval_batch_size)
        model = method.begin_task(model, TaskData(stage, [], batches, len(stages)))
        if cache is not None:
            cache.refresh(model)
        losses: list[float] = []
        start = time.perf_counter()
        if method.trains:
            penalty = partial(method.penalty, model)
            stage_data = stages[stage]
            model = train_task(
                accelerator, model, stage_data, collate, target_loss, settings, name, penalty, cache, losses
            )
        progress.task_seconds.append(time.perf_counter() - start)
        if type(method).observing is not Method.observing:  # a pass over the samples only for a method that reads it
            with method.observing(model), torch.no_grad():
                for batch in batches():
                    model(**batch, logits_to_keep=1)
        steps = len(losses) // max(1, settings.epochs)
        progress.train_loss.append(sum(losses[-steps:]) / steps if steps else None)
        seen = range(len(tasks)) if joint else range(stage + 1)
        if len(progress.exact_match) <= stage:
            progress.exact_match.append([None] * len(tasks))
        for j in seen:
            if j not in evaluated or method.trains:
                evaluated[j] = evaluate(model, encoded[j], tokenizer, exact_match, settings.eval_batch_size)
            progress.accuracy[stage][j], progress.exact_match[stage][j] = evaluated[j]
        start = time.perf_counter()
        model = method.end_task(model, is_last=stage == len(stages) - 1)
        progress.train_seconds += progress.task_seconds[-1] + time.perf_counter() - start
        progress.magnitudes.append(method.magnitudes(model))
        progress.tasks_done = stage + 1
        check_ranks_agree(accelerator, model, f"after {name}")
        if checkpoints is not None and accelerator.is_main_process:
            save_checkpoint(checkpoints, model, method, None, progress, (collate,))
    return model, _record(method, model, progress, encoded, joint, cache)


def _record(
    method: Method, model: nn.Module, progress: LMProgress, tasks: list[EncodedTask], joint: bool,
    cache: PrefixCache | None,
) -> dict:  # fmt: skip
    """The run's results. Tasks count equally (the average accuracy of the LM continual-learning papers); a joint
    run's matrix is its one stage's mean over the tasks, as a class-incremental joint run has one task."""
    final = [a for a in progress.accuracy[-1] if a is not None]
    matrix = [[sum(final) / len(final)]] if joint else progress.accuracy
    weights = [1] * len(matrix)
    exact = [e for e in progress.exact_match[-1] if e is not None] if progress.exact_match else []
    return {
        "accuracy_matrix": matrix,
        **summarize(matrix, weights),
        "incremental_accuracies": incremental_accuracies(matrix, weights),
        "tasks": [task.name for task in tasks],
        "final_task_accuracies": progress.accuracy[-1],
        "exact_match_matrix": progress.exact_match if exact else None,
        "final_exact_match": sum(exact) / len(exact) if exact else None,
        "test_sizes": [len(task.prompts) for task in tasks],
        "train_loss": progress.train_loss,
        "task_seconds": progress.task_seconds,
        "train_seconds": progress.train_seconds,
        "trainable_parameters": progress.trainable_parameters,
        "stored_adapter_parameters": method.stored_parameters(model),
        "magnitudes": progress.magnitudes if any(m is not None for m in progress.magnitudes) else None,
        "prefix_cache": cache.describe() if cache is not None else {"used": False, "reason": "turned off"},
    }
