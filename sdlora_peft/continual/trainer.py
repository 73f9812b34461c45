"""Continual task sequences with transformers' `Trainer`: class-incremental classifiers and causal LMs.

`ContinualTrainer` is a `Trainer` that learns a list of tasks one after the other:

    trainer = ContinualTrainer(model=peft_model, args=TrainingArguments("out", max_steps=100))
    trainer.train_tasks([task_0, task_1, task_2])             # one datasets.Dataset per task
    trainer.train_tasks(tasks, resume_from_checkpoint=True)   # after a crash: continue where it stopped

A causal language model (``task_type="CAUSAL_LM"``, or a ``*ForCausalLM`` base model) learns tasks of
``prompt``/``target`` pairs, tokenized with ``processing_class``: the loss is on the target tokens only (the prompt's
labels are -100) and no class logits are masked.

Why a `Trainer` subclass and not a `TrainerCallback`: a callback sees the optimizer and the data but cannot replace
them, while a task sequence has to swap the training set, rebuild the optimizer and scheduler for the new trainable
set (`advance_task()` creates a new direction and magnitude) and mask the loss to the current task's classes. A
subclass that adds one method, `train_tasks`, does this the way `Seq2SeqTrainer` extends `Trainer`, and keeps
everything else of `Trainer`: callbacks, reporters (`report_to`), mid-task checkpoints, Accelerate and devices.

With `TrainingArguments(fsdp=True, fsdp_config={"fsdp_version": 2})`, on several processes, each task trains an
FSDP2-sharded copy of the model (`train.sharded_copy`), gathered back into the unsharded model before the task is
saved and the next one advances: Accelerate's FSDP plugin is left out (it would shard the model in place, and a task
boundary needs it whole), on CPUs and GPUs alike.

Layout of `args.output_dir`, one folder per task (0-based, as `TaskRecord.task`):

    task_0/                 the adapter after task 0 (save_pretrained) and task_state.json
    task_0/checkpoint-N/    Trainer's own mid-task checkpoints (if `save_strategy` asks for them)
    task_1/ ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import torch
from datasets import Dataset
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import (
    SaveStrategy,
    TrainOutput,
    enable_full_determinism,
    get_last_checkpoint,
    set_seed,
)

from .. import SDLoraConfig
from .lm.encode import CausalLMCollator, encode_pairs
from .train import masked_cross_entropy, sharded_copy

TASK_STATE_NAME = "task_state.json"
MAGNITUDE_KEY = "sdlora/magnitude/task_{}"


def task_folder(output_dir: str | os.PathLike, task: int) -> Path:
    """The folder of task `task` (0-based) under a run's output directory."""
    return Path(output_dir, f"task_{task}")


def active_config(model: nn.Module | None) -> SDLoraConfig:
    """The config of a PeftModel's active SD-LoRA adapter; its task history says which task the model is at."""
    config = model.peft_config.get(model.active_adapter) if isinstance(model, PeftModel) else None
    if not isinstance(config, SDLoraConfig):
        raise ValueError("ContinualTrainer trains an SD-LoRA PeftModel: get_peft_model(model, SDLoraConfig(...)).")
    return config


def is_causal_lm(model: PeftModel) -> bool:
    """Whether the model learns generative tasks: its adapter says CAUSAL_LM, or its base is a ``*ForCausalLM``."""
    base = model.get_base_model()
    return active_config(model).task_type == "CAUSAL_LM" or type(base).__name__ in set(
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    )


def pairs_digest(dataset: Dataset) -> str:
    """A short digest of a task's prompt/target pairs (or token ids), so that a resumed run checks it goes on with
    the same tasks."""
    columns = [c for c in ("prompt", "target", "input_ids", "labels") if c in dataset.column_names]
    digest = hashlib.blake2b(digest_size=8)
    for column in columns:
        digest.update(json.dumps(list(dataset[column])).encode())
    return digest.hexdigest()


class ContinualTrainer(Trainer):
    """A `Trainer` for a sequence of class-incremental tasks on an SD-LoRA `PeftModel`.

    `train_tasks` trains task t on its own dataset with the loss restricted to task t's classes (the logits of other
    classes are masked, so old classes' head rows get no gradient), calls `advance_task()` between tasks, builds a
    fresh optimizer and scheduler for each task, and saves each task's adapter in `output_dir/task_t`. Every log
    entry carries the current magnitudes as `sdlora/magnitude/task_k`, so they reach the reporters of `report_to`
    and every callback's `on_log`. Evaluation losses use every class seen so far.

    A causal LM's tasks are datasets of ``prompt``/``target`` pairs (or already tokenized ``input_ids``/``labels``):
    each is tokenized with ``processing_class`` (`prepare_task_dataset`), batches are left-padded
    (`lm.encode.CausalLMCollator`, unless a ``data_collator`` is given) and the loss is the model's own, on the target
    tokens.

    Each task starts from the seed `args.seed + t`, so a sequence resumed in a new process draws the same random
    numbers (new directions, shuffling, dropout) as an uninterrupted one. `args.max_steps` / `num_train_epochs` are
    per task. Pass optimizer settings through `optimizer_cls_and_kwargs` or `args`, not as optimizer instances:
    the trainable parameters are new objects at every task.
    """

    lm_collator = True  # a causal LM without a data_collator gets `CausalLMCollator`

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        active_config(self.model)  # fails early for a model without an active SD-LoRA adapter
        self.shards_tasks = bool(self.args.fsdp)  # Trainer refuses FSDP on one process already
        if self.is_fsdp_enabled:
            raise ValueError(
                "Launch without Accelerate's FSDP (--use_fsdp): ContinualTrainer shards each task itself, with "
                "TrainingArguments(fsdp=True, fsdp_config={'fsdp_version': 2})."
            )
        if self.shards_tasks and self.args.save_strategy != SaveStrategy.NO:
            raise ValueError(
                "With fsdp, ContinualTrainer saves each finished task, unsharded, but no mid-task checkpoint: pass "
                "save_strategy='no'."
            )
        self.causal_lm = is_causal_lm(self.peft_model)
        # masked_cross_entropy is a per-batch mean; a causal LM's own loss follows Trainer's rule
        self.loss_is_scaled_for_ga = None if self.causal_lm else False
        if self.causal_lm and self.lm_collator and kwargs.get("data_collator") is None:
            if self.processing_class is None:
                raise ValueError("A causal LM's tasks are prompt/target pairs: pass processing_class=tokenizer.")
            self.data_collator = CausalLMCollator(cast(PreTrainedTokenizerBase, self.processing_class).pad_token_id)
        if self.optimizer is not None or self.lr_scheduler is not None:
            raise ValueError(
                "ContinualTrainer builds a new optimizer for each task (the trainable parameters change); pass "
                "`optimizer_cls_and_kwargs=(cls, kwargs)` instead of `optimizers=(optimizer, scheduler)`."
            )
        self.task: int | None = None
        self.task_classes: list[int | str] = []  # a causal LM's task: the digest of its pairs
        self.seen_classes: list[int | str] = []

    def train_tasks(
        self,
        tasks: Sequence[Dataset],
        task_classes: Sequence[Sequence[int]] | None = None,
        resume_from_checkpoint: str | os.PathLike | bool | None = None,
    ) -> list[TrainOutput]:
        """Train the tasks in order; return each trained task's `TrainOutput`.

        Args:
            tasks: One training set per task; `tasks[t]` is task t.
            task_classes: The classes of each task. Default: the distinct values of each dataset's `labels` or
                `label` column. Not used for a causal LM.
            resume_from_checkpoint: `True` continues after the last checkpoint in `args.output_dir` (a finished
                task's folder, or a later Trainer checkpoint inside the next task's folder); a path names one of
                those folders. The model passed to the trainer is rebuilt from it, so it can be a fresh one.
        """
        classes: list[list[int | str]]
        if self.causal_lm:
            classes = [[pairs_digest(t)] for t in tasks]  # what a resumed run checks: the same pairs
        elif task_classes is not None:
            classes = [list(c) for c in task_classes]
        else:
            classes = [list(_classes(t)) for t in tasks]
        if len(classes) != len(tasks):
            raise ValueError(f"Got {len(tasks)} tasks but classes for {len(classes)}.")
        start, checkpoint = 0, None
        if resume_from_checkpoint:
            folder = self._resume(resume_from_checkpoint, classes)
            if _is_task_folder(folder):  # a finished task: go on with the next one
                start = active_config(self.model).current_task + 1
            else:  # a Trainer checkpoint: finish its task first
                start, checkpoint = active_config(self.model).current_task, folder
        outputs = []
        for task in range(start, len(tasks)):
            outputs.append(self._train_task(task, tasks[task], classes, checkpoint if task == start else None))
        return outputs

    def _train_task(
        self, task: int, dataset: Dataset, classes: list[list[int | str]], checkpoint: str | None
    ) -> TrainOutput:
        self._seed(task)
        config = active_config(self.model)
        if config.current_task == task - 1:  # the model holds the trained previous task
            self.peft_model.advance_task()
        elif config.current_task != task:
            raise ValueError(
                f"The model's adapter is at task {config.current_task}; it cannot train task {task}. To continue a "
                "sequence, pass resume_from_checkpoint."
            )
        self.task, self.task_classes = task, classes[task]
        self.seen_classes = [c for task_classes in classes[: task + 1] for c in task_classes]
        self.train_dataset = self.prepare_task_dataset(dataset)
        # train() builds the optimizer, the scheduler and any DDP wrapper again, for the new trainable set
        self.optimizer, self.lr_scheduler, self.model_wrapped = None, None, self.peft_model
        with self._sharded() if self.shards_tasks else contextlib.nullcontext():
            output = self.train(resume_from_checkpoint=checkpoint)
        self._save_task(task)
        return output

    @contextlib.contextmanager
    def _sharded(self) -> Iterator[None]:
        """Train an FSDP2-sharded copy of the model in its place, then put the unsharded model back, holding what
        the copy learned. Trainer treats the copy as a model sharded at load time: it builds the optimizer on the
        shards and adds mixed precision, but no DDP wrapper."""
        plain = self.peft_model
        with sharded_copy(plain) as sharded:
            self.model = self.model_wrapped = sharded
            self.is_distributed_loading_by_transformers = True
            try:
                yield
            finally:
                self.model = self.model_wrapped = self.callback_handler.model = plain
                self.is_distributed_loading_by_transformers = False

    def create_accelerator_and_postprocess(self) -> None:
        """Trainer's Accelerator, without the FSDP plugin that `args.fsdp` asks for: each task is sharded by
        `_sharded` instead."""
        plugin_args, self.args.fsdp_plugin_args = self.args.fsdp_plugin_args, None
        try:
            super().create_accelerator_and_postprocess()
        finally:
            self.args.fsdp_plugin_args = plugin_args

    def prepare_task_dataset(self, dataset: Dataset) -> Dataset:
        """A task's training set as the model reads it: a causal LM's prompt/target pairs become token ids with the
        labels of the prompt at -100; anything else is used as given. A subclass (e.g. for TRL's SFTTrainer) may
        prepare it its own way."""
        if self.causal_lm and {"prompt", "target"} <= set(dataset.column_names):
            return encode_pairs(dataset, self.processing_class)
        return dataset

    def _seed(self, task: int) -> None:
        seed = self.args.seed + task
        enable_full_determinism(seed) if self.args.full_determinism else set_seed(seed)

    @property
    def peft_model(self) -> PeftModel:
        """The SD-LoRA `PeftModel` being trained (`self.model`, which a resume replaces)."""
        return cast(PeftModel, self.model)  # checked by __init__, and loaded as one by _resume

    def _save_task(self, task: int) -> None:
        """The adapter after this task, and what a resumed run checks it continues the same sequence with."""
        folder = task_folder(str(self.args.output_dir), task)
        self.save_model(str(folder))
        if self.args.should_save:
            state = {"task": task, "classes": self.task_classes, "seed": self.args.seed + task}
            (folder / TASK_STATE_NAME).write_text(json.dumps(state, indent=2))
            self.state.save_to_json(str(folder / "trainer_state.json"))

    def _resume(self, checkpoint: str | os.PathLike | bool, classes: list[list[int | str]]) -> str:
        """Rebuild the model from `checkpoint` (found in `output_dir` for `True`) and return its folder."""
        folder = _last_checkpoint(str(self.args.output_dir)) if checkpoint is True else str(checkpoint)
        if folder is None:
            raise ValueError(f"No task folder or checkpoint found in {self.args.output_dir}.")
        if _is_task_folder(folder):
            state = json.loads(Path(folder, TASK_STATE_NAME).read_text())
            now = classes[state["task"]] if state["task"] < len(classes) else None
            if state["classes"] != now and self.causal_lm:
                raise ValueError(
                    f"{folder} was trained on other prompt/target pairs than task {state['task']} has now: pass the "
                    "same task sequence to resume."
                )
            if state["classes"] != now:
                raise ValueError(
                    f"{folder} was trained on classes {state['classes']}, but task {state['task']} now has classes "
                    f"{now}: pass the same task sequence to resume."
                )
        # A finished task's adapter or a Trainer checkpoint: either way its config holds the adapter's structure.
        model = self.peft_model
        self.model = PeftModel.from_pretrained(model.unload(), folder, model.active_adapter, is_trainable=True)
        self.model_wrapped = self.callback_handler.model = self.model
        return folder

    def _get_output_dir(self, trial: object) -> str:
        """Trainer's mid-task checkpoints go into the task's folder: steps restart at 0 with every task."""
        run_dir = super()._get_output_dir(trial)
        return run_dir if self.task is None else str(task_folder(run_dir, self.task))

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, object]:
        """Cross-entropy over the current task's classes while training, over all seen classes when evaluating; a
        causal LM's own loss (on its target tokens)."""
        if self.causal_lm:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        classes = (self.task_classes if model.training else self.seen_classes) or list(range(outputs.logits.shape[-1]))
        loss = masked_cross_entropy(outputs.logits, labels, torch.tensor(classes, device=labels.device))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the task index and the magnitudes to every log entry (training and evaluation alike)."""
        extra = {MAGNITUDE_KEY.format(task): value for task, value in self.peft_model.task_magnitudes().items()}
        if self.task is not None:
            extra["sdlora/task"] = self.task
        super().log({**logs, **extra}, start_time)


def _classes(dataset: Dataset) -> list[int]:
    column = next((c for c in ("labels", "label") if c in dataset.column_names), None)
    if column is None:
        raise ValueError(f"No `labels` or `label` column in {dataset.column_names}; pass task_classes=.")
    return sorted(int(c) for c in dataset.unique(column))


def _is_task_folder(folder: str | os.PathLike | None) -> bool:
    return folder is not None and Path(folder, TASK_STATE_NAME).is_file()


def _last_checkpoint(output_dir: str) -> str | None:
    """The newest resumable state: a Trainer checkpoint inside the first unfinished task, else the last finished
    task's folder."""
    if not os.path.isdir(output_dir):
        return None
    names = (re.fullmatch(r"task_(\d+)", name) for name in os.listdir(output_dir))
    tasks = [int(match[1]) for match in names if match]
    finished = max((t for t in tasks if _is_task_folder(task_folder(output_dir, t))), default=-1)
    next_task = task_folder(output_dir, finished + 1)
    if next_task.is_dir() and get_last_checkpoint(next_task) is not None:
        return get_last_checkpoint(next_task)
    return str(task_folder(output_dir, finished)) if finished >= 0 else None
