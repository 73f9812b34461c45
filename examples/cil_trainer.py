"""Class-incremental image classification with SD-LoRA and transformers' Trainer.

    python examples/cil_trainer.py                                  # offline: pretrained DINOv2-S on digits,
                                                                    # 5 tasks x 10 steps (a minute or two on a CPU)
    python examples/cil_trainer.py --resume                         # continue an interrupted run
    python examples/cil_trainer.py --model google/vit-base-patch16-224 --dataset DATASET_ID \\
        --num-tasks 10 --image-size 224 --max-steps 2000 --batch-size 128 --report-to tensorboard

Each task is a `datasets.Dataset` of its classes; `ContinualTrainer.train_tasks` trains them in order with the loss
masked to the current task's classes, calls `advance_task()` in between and writes each task's adapter to
`OUTPUT/task_t`. The magnitudes are logged as `sdlora/magnitude/task_k` to whatever `--report-to` names.
"""

import argparse

import torch
from datasets import concatenate_datasets
from peft import get_peft_model
from transformers import TrainingArguments

from sdlora_peft import SDLoraConfig
from sdlora_peft.continual import zoo
from sdlora_peft.continual.data import ImageCollator, TaskSplit, dataset_classes, split_dataset
from sdlora_peft.continual.heads import classifier_path
from sdlora_peft.continual.trainer import ContinualTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="dinov2-small")
parser.add_argument("--dataset", default="digits")
parser.add_argument("--num-tasks", type=int, default=5)
parser.add_argument("--image-size", type=int, default=56)
parser.add_argument("--max-steps", type=int, default=10, help="optimizer steps per task")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--max-per-class", type=int, default=None, help="keep at most this many images per class")
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--report-to", default="none")
parser.add_argument("--output", default="runs/cil_trainer")
parser.add_argument("--resume", action="store_true", help="continue from the last task or checkpoint in --output")
args = parser.parse_args()

data = zoo.load_dataset(args.dataset)
split = TaskSplit.from_classes(dataset_classes(data["train"]), args.num_tasks, seed=0)
train_sets, test_sets = (split_dataset(data[s], split, max_per_class=args.max_per_class) for s in ("train", "test"))
model, processor, _ = zoo.load_model(args.model, num_labels=len(split.task_of_class), modality="image")
model = get_peft_model(model, SDLoraConfig(r=10, modules_to_save=[classifier_path(model)]))

training_args = TrainingArguments(
    args.output,
    max_steps=args.max_steps,
    per_device_train_batch_size=args.batch_size,
    per_device_eval_batch_size=args.batch_size,
    learning_rate=args.lr,
    logging_steps=max(1, args.max_steps // 4),
    save_strategy="no",  # "steps" adds mid-task checkpoints, which --resume picks up too
    remove_unused_columns=False,  # the collator reads the raw image column
    report_to=args.report_to,
)
trainer = ContinualTrainer(
    model=model,
    args=training_args,
    data_collator=ImageCollator("image", "label", args.image_size, processor),
)
trainer.train_tasks(train_sets, task_classes=split.tasks, resume_from_checkpoint=args.resume)

# No task id at test time: predict among all the classes seen.
logits = trainer.predict(concatenate_datasets(test_sets)).predictions
labels = torch.tensor(concatenate_datasets(test_sets)["label"])
accuracy = (torch.from_numpy(logits).argmax(-1) == labels).float().mean().item()
print(f"final accuracy over {len(split.task_of_class)} classes: {100 * accuracy:.1f}%")
