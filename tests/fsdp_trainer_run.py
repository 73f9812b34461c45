"""`ContinualTrainer` with `TrainingArguments(fsdp=True)` on 2 CPU processes (gloo), or without it on 1, run by
`torchrun` from tests/test_fsdp.py: fsdp_run's two tasks, the global batch split across the processes. Rank 0 writes
the accuracy matrix of the saved task folders, the magnitudes logged while training, and the refusal of mid-task
checkpoints into the folder given."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from fsdp_run import TASKS, accuracies, base_model, task_data
from peft import PeftModel, get_peft_model
from transformers import TrainerCallback, TrainingArguments

from sdlora_peft import SDLoraConfig
from sdlora_peft.continual.trainer import ContinualTrainer, task_folder

BATCH, STEPS = 8, 6


class Magnitudes(TrainerCallback):
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append({key: value for key, value in logs.items() if key.startswith("sdlora/magnitude")})


def main(out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    model = get_peft_model(base_model(), SDLoraConfig(r=4, modules_to_save=["classifier"]))
    sharding = {"fsdp": True, "fsdp_config": {"fsdp_version": 2}} if world > 1 else {}
    args = TrainingArguments(
        str(out / "trainer"), max_steps=STEPS, per_device_train_batch_size=BATCH // world, learning_rate=1e-2,
        save_strategy="no", logging_steps=1, use_cpu=True, report_to=[], disable_tqdm=True, seed=7,
        **sharding,
    )  # fmt: skip
    refusal = ""
    try:
        ContinualTrainer(model=model, args=dataclasses.replace(args, save_strategy="steps"))
    except ValueError as error:
        refusal = str(error)
    recorder = Magnitudes()
    trainer = ContinualTrainer(model=model, args=args, callbacks=[recorder])
    tasks = []
    for task, classes in enumerate(TASKS):
        pixels, labels = task_data(classes, seed=task, per_class=8)
        tasks.append(Dataset.from_dict({"pixel_values": pixels.numpy(), "label": labels.numpy()}).with_format("torch"))
    trainer.train_tasks(tasks)
    if trainer.args.process_index == 0:
        folders = [task_folder(args.output_dir, task) for task in range(len(TASKS))]
        matrix = [
            accuracies(PeftModel.from_pretrained(base_model(), f), TASKS[: t + 1]) for t, f in enumerate(folders)
        ]
        (out / "accuracy.json").write_text(json.dumps(matrix))
        (out / "magnitudes.json").write_text(json.dumps(recorder.logged))
        (out / "refusal.txt").write_text(refusal)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
