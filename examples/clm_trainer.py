"""Continual fine-tuning of a causal LM with SD-LoRA and transformers' Trainer: three generative tasks in a row.

    python examples/clm_trainer.py                        # offline: SmolLM2-135M, adapters on its last 4 blocks
    python examples/clm_trainer.py --model tiny-llama     # a tiny random Llama, seconds

Each task is a dataset of prompt/target pairs; the loss is on the target tokens only. After the last task every
task is scored by ranking its answers by log-likelihood: no task id, no old data.
"""

import argparse

from peft import get_peft_model
from transformers import TrainingArguments

from sdlora_peft import SDLoraConfig
from sdlora_peft.continual import zoo
from sdlora_peft.continual.lm.loop import EncodedTask, evaluate
from sdlora_peft.continual.lm.tasks import load_task
from sdlora_peft.continual.trainer import ContinualTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--tasks", default="yahoo,stackoverflow,20ng")
parser.add_argument("--layers", default="26,27,28,29", help="blocks to adapt (SmolLM2 has 30)")
parser.add_argument("--max-steps", type=int, default=10, help="optimizer steps per task")
parser.add_argument("--per-task", type=int, default=40, help="training and test samples per task")
parser.add_argument("--output", default="runs/clm_trainer")
args = parser.parse_args()

model, tokenizer, _ = zoo.load_causal_lm(args.model)
layers = [int(i) for i in args.layers.split(",") if int(i) < model.config.num_hidden_layers]
config = SDLoraConfig(r=8, target_modules="all-linear", layers_to_transform=layers or None, task_type="CAUSAL_LM")
model = get_peft_model(model, config)  # every linear layer of those blocks learns: see the README's LM table
tasks = [load_task(name, tokenizer, max_train=args.per_task, max_test=args.per_task) for name in args.tasks.split(",")]

training_args = TrainingArguments(
    args.output, max_steps=args.max_steps, per_device_train_batch_size=8, learning_rate=2e-3,
    logging_steps=5, save_strategy="no", report_to="none", use_cpu=True,
)  # fmt: skip
trainer = ContinualTrainer(model=model, args=training_args, processing_class=tokenizer)
trainer.train_tasks([task.train for task in tasks])  # advance_task() between tasks, one adapter folder per task

for task in tasks:
    accuracy, _ = evaluate(trainer.model, EncodedTask.of(task, tokenizer), tokenizer)
    print(f"{task.name}: {accuracy:.1f}% (ranked among {len(task.choices)} answers)")
