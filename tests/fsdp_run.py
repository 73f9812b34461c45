"""Two SD-LoRA tasks under FSDP2 on the CPU (gloo), run by `torchrun` from tests/test_fsdp.py with 1 or 2 processes.

Each global batch is split across the processes, so N processes take the steps one process takes; between the
tasks `advance_task_sharded` gathers, advances and re-shards. Rank 0 saves the full adapter (PeftModel's own files)
and the accuracy matrix into the folder given as the only argument.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import ViTConfig, ViTForImageClassification

from sdlora_peft import SDLoraConfig
from sdlora_peft.sharding import advance_task_sharded, shard_sdlora, unsharded_copy

TASKS = [[0, 1, 2], [3, 4, 5]]
BATCH, STEPS = 8, 12


def base_model() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
                       patch_size=8, num_labels=6)  # fmt: skip
    return ViTForImageClassification(config)


def task_data(classes: list[int], seed: int, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(classes).repeat_interleave(per_class)
    pixels = torch.randn(len(labels), 3, 16, 16, generator=generator) + labels.view(-1, 1, 1, 1)
    order = torch.randperm(len(labels), generator=generator)
    return pixels[order], labels[order]


def train_task(model, classes: list[int], task: int, rank: int, world: int) -> None:
    pixels, labels = task_data(classes, seed=task, per_class=8)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mask = torch.full((6,), float("-inf"))
    mask[classes] = 0.0
    model.train()
    for step in range(STEPS):
        start = (step * BATCH) % len(labels)
        batch = slice(start + rank * BATCH // world, start + (rank + 1) * BATCH // world)
        logits = model(pixel_values=pixels[batch]).logits + mask
        loss = torch.nn.functional.cross_entropy(logits, labels[batch])
        loss.backward()  # FSDP averages the gradients over the processes: the mean over the global batch
        optimizer.step()
        optimizer.zero_grad()


def accuracies(model, seen: list[list[int]]) -> list[float]:
    model.eval()
    row = []
    with torch.no_grad():
        for task, classes in enumerate(seen):
            pixels, labels = task_data(classes, seed=100 + task, per_class=6)
            visible = sorted(c for group in seen for c in group)
            logits = model(pixel_values=pixels).logits[:, visible]
            row.append(float((torch.tensor(visible)[logits.argmax(-1)] == labels).float().mean()))
    return row


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = SDLoraConfig(r=4, modules_to_save=["classifier"])
    model = shard_sdlora(get_peft_model(base_model(), config))
    matrix = []
    for task, classes in enumerate(TASKS):
        if task:
            model, _ = advance_task_sharded(model, base_model())
        train_task(model, classes, task, rank, world)
        matrix.append(accuracies(model, TASKS[: task + 1]))
    full = unsharded_copy(model, base_model())  # every rank gathers; rank 0 writes
    if rank == 0:
        full.save_pretrained(out / "adapter")
        (out / "accuracy.json").write_text(json.dumps(matrix))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
