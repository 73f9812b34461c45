"""Class-incremental image classification with SD-LoRA, on Accelerate, through the library's Python API.

    python examples/cil_vision.py                                   # offline: pretrained DINOv2-S on digits
    accelerate launch examples/cil_vision.py --model google/vit-base-patch16-224 --dataset DATASET_ID \\
        --num-tasks 10 --image-size 224 --augment --batch-size 128 --epochs 30 --lr 8e-3 --head linear

The second line is the paper's ImageNet-R setup (ViT-B/16, rank 10 on query/value, masked linear head) for a
machine with a GPU and the Hub. `sdlora-cil` runs the same loop for several methods and seeds side by side.
"""

import argparse

from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

from sdlora_peft.continual import zoo
from sdlora_peft.continual.data import ImageCollator, TaskSplit, dataset_classes, split_dataset
from sdlora_peft.continual.heads import make_head
from sdlora_peft.continual.methods import AdapterOptions, make_method
from sdlora_peft.continual.metrics import summarize
from sdlora_peft.continual.train import TrainSettings, run_sequence

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="dinov2-small")
parser.add_argument("--dataset", default="digits")
parser.add_argument("--num-tasks", type=int, default=5)
parser.add_argument("--image-size", type=int, default=56)
parser.add_argument("--augment", action="store_true")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--head", default="aligned")
parser.add_argument("--output", default="runs/cil_vision")
args = parser.parse_args()

set_seed(0)
accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))
data = zoo.load_dataset(args.dataset)
split = TaskSplit.from_classes(dataset_classes(data["train"]), args.num_tasks, seed=0)
train_sets, test_sets = split_dataset(data["train"], split), split_dataset(data["test"], split)
model, processor, _ = zoo.load_model(args.model, num_labels=len(split.task_of_class), modality="image")


def collate(train: bool) -> ImageCollator:
    return ImageCollator("image", "label", args.image_size, processor, augment=args.augment, train=train)


model, record = run_sequence(
    accelerator,
    model,
    make_method("sdlora", AdapterOptions(r=10)),  # get_peft_model(model, SDLoraConfig(r=10, ...)) inside
    make_head(args.head),
    split,
    train_sets,
    test_sets,
    collate(train=True),
    TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, head_lr=1e-3),
    eval_collate=collate(train=False),
)
if accelerator.is_main_process:
    print("accuracy matrix:", [[round(a, 1) for a in row if a is not None] for row in record["accuracy_matrix"]])
    print(summarize(record["accuracy_matrix"], record["task_sizes"]))
    model.save_pretrained(args.output)  # every task's direction and magnitude, in one SD-LoRA adapter
