"""`sdlora-cil`: a class-incremental benchmark of SD-LoRA and its peers, side by side.

    sdlora-cil --model dinov2-small --dataset glyphs --num-tasks 6 --methods sdlora,lora-seq,ncm --seeds 0,1,2

Every method runs through the same loop, data, head and seeds; the results go to OUTDIR as results.json,
results.md and PNG plots, with each method's final adapter. With no arguments it runs a short offline demo.
Launch on several processes with `accelerate launch -m sdlora_peft.continual.cli ...` (or torchrun); add `--fsdp`
to train each task on an FSDP2-sharded model (`torchrun --nproc_per_node N -m sdlora_peft.continual.cli --fsdp ...`).

A checkpoint is saved after every task of every (method, seed) run; `sdlora-cil --resume OUTDIR` continues a
stopped run from there, skipping the finished runs, and ends with the results an uninterrupted run gives.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from ..config import FREEZE_SCALES
from . import runs, zoo
from .data import (
    ImageCollator,
    TaskSplit,
    TextCollator,
    dataset_classes,
    detect_input,
    split_dataset,
)
from .heads import HEAD_NAMES, make_head
from .methods import METHOD_NAMES, AdapterOptions, make_method
from .protocols import PROTOCOLS, apply_protocol, steps_preserving_batch
from .runs import csv_list, optional_csv
from .train import OPTIMIZERS, TrainSettings, run_sequence

DEFAULT_HEAD = "ranpac"  # SD-LoRA's best head on most reduced suites (README, "Measured accuracy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with a `--protocol` preset under the options given; with `--resume OUTDIR`, the options saved in
    OUTDIR, which any option given must agree with."""
    return runs.parse_args(_parser(), argv, presets=_with_protocol)


def _with_protocol(args: argparse.Namespace, given: set[str]) -> argparse.Namespace:
    """The `--protocol` preset's options, except those given on the command line (recorded as overrides)."""
    args.protocol_overrides = sorted(given & set(PROTOCOLS.get(args.protocol, {})))
    return apply_protocol(args, given)


def _parser() -> argparse.ArgumentParser:
    parser = runs.Parser(prog="sdlora-cil", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    count, rate = runs.positive(int), runs.positive(float)
    add("--model", default="dinov2-small", help=f"hub id, local dir, or one of {list(zoo.MODEL_NAMES)}")
    add("--dataset", default="digits", help=f"hub id, save_to_disk dir, or one of {list(zoo.DATASET_NAMES)}")
    add("--num-tasks", type=count, default=5)
    add("--methods", default="sdlora,lora-seq,ncm", help=f"comma-separated, from {list(METHOD_NAMES)}; "
        "append @HEAD to override the head for one entry, e.g. sdlora@linear")  # fmt: skip
    add("--protocol", default=None, choices=tuple(PROTOCOLS), help="a preset of the training options: 'paper' is "
        "the SD-LoRA paper's protocol as its reference code runs it (masked linear head, SGD momentum 0.9 at lr "
        "1e-2, batch 128, 20 epochs, augmentation), 'paper-adam' the same with the paper's Adam at 8e-3; options "
        "given win")  # fmt: skip
    add("--head", default=DEFAULT_HEAD, choices=HEAD_NAMES)
    add("--ranpac-dim", type=count, default=5000, help="random features of the ranpac head (RanPAC: 10,000)")
    add("--epochs", type=count, default=2)
    add("--batch-size", type=count, default=32)
    add("--lr", type=rate, default=1e-4, help="learning rate of the adapters (and of the backbone's peers)")
    add("--head-lr", type=rate, default=1e-3, help="learning rate of the classification layer (a slow learner "
        "backbone, 10x below the head, limits feature drift)")  # fmt: skip
    add("--magnitude-lr", type=rate, default=None, help="learning rate of SD-LoRA's magnitudes (default: --lr)")
    add("--optimizer", default="adamw", choices=OPTIMIZERS, help="adamw, or sgd with momentum 0.9")
    add("--seeds", default="0", help="comma-separated seeds; each fixes the class order and the initialisation")
    runs.add_output_options(parser, "runs/cil")
    add("--max-train-per-class", type=count, default=None)
    add("--max-test-per-class", type=count, default=None)
    add("--image-size", type=count, default=56)
    add("--augment", action="store_true", help="the paper's RandomResizedCrop + flip (and resize + center crop)")
    add("--image-column", default=None)
    add("--text-column", default=None)
    add("--label-column", default="label")
    add("--max-length", type=count, default=64, help="token budget of text samples")
    add("--pooling", default=None, choices=zoo.POOLINGS, help="how a text model's token states become its features "
        "(default: as the model was trained: mean for sentence encoders such as minilm, the architecture's head "
        "otherwise)")  # fmt: skip
    add("--dropout", type=float, default=None, help="set every dropout of the backbone to this (default: its own)")
    add("--prefix-cache", default="auto", choices=("auto", "off"), help="compute the frozen blocks below the "
        "adapters once per dataset where that is exact (auto), or every time (off)")  # fmt: skip
    add("--r", type=count, default=10, help="adapter rank (every method)")
    add("--layers", default=None, help="comma-separated block indices to adapt (default: all)")
    add("--target-modules", default=None, help=runs.TARGET_MODULES_HELP)
    add("--magnitude-sharing", default="global", choices=("global", "layer"))
    add("--freeze-scale", default="preserve", choices=FREEZE_SCALES)
    add("--olora-lambdas", default="0.5,0", help="O-LoRA's lambda_1 (orthogonality to the earlier tasks' LoRAs), "
        "lambda_2 (L2 of the current LoRA)")  # fmt: skip
    add("--inflora-thresholds", default="0.95,1.0", help="InfLoRA's DualGPM energy threshold at the first task, "
        "and the value it rises towards linearly over the tasks")  # fmt: skip
    add("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    add("--gradient-accumulation-steps", type=count, default=1)
    add("--fsdp", action="store_true", help="train each task on a model sharded across the processes with FSDP2 "
        "(torchrun --nproc_per_node N, N > 1); task boundaries and evaluation stay unsharded")  # fmt: skip
    return parser


def _pair(value: str, option: str) -> tuple[float, float]:
    try:
        first, second = (float(item) for item in value.split(","))
    except ValueError:
        raise ValueError(f"{option} takes two comma-separated numbers, e.g. {option} 0.5,0; got {value!r}.") from None
    return first, second


def _method_entries(value: str, default_head: str, options: AdapterOptions) -> list[tuple[str, str, str]]:
    """(result name, method, head) for every entry of --methods; `ncm` always scores with class means."""
    entries = []
    for item in csv_list(value):
        method, _, head = item.partition("@")
        make_method(method, options)  # fail early: an unknown name, options the method refuses
        head = head or ("ncm" if method == "ncm" else default_head)
        entries.append((item, method, head))
    return entries


def _check_sharding(
    fsdp: bool, accelerator: Accelerator, entries: list[tuple[str, str, str]], options: AdapterOptions
) -> None:
    """Refuse what `--fsdp` cannot do, and Accelerate's own FSDP, which would shard the model behind the loop's back
    (a task boundary needs the unsharded model)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("Launch sdlora-cil without Accelerate's FSDP (--use_fsdp); pass --fsdp to shard instead.")
    if not fsdp:
        return
    for name, method, _ in entries:
        if not make_method(method, options).shards:
            raise ValueError(
                f"--fsdp cannot train {name}: it reads the adapters' weights outside the forward pass (a penalty or "
                "gradient hooks), where FSDP holds only shards. Leave it out of --methods or drop --fsdp."
            )
    if accelerator.num_processes == 1:
        raise ValueError(
            "--fsdp shards the model across processes: launch several, e.g. torchrun --nproc_per_node 2 -m "
            "sdlora_peft.continual.cli --fsdp ..."
        )


def _collate(args: argparse.Namespace, modality: str, column: str, processor: Any, train: bool, seed: int):
    if modality == "image":
        return ImageCollator(column, args.label_column, args.image_size, processor, args.augment, train, seed)
    return TextCollator(processor, column, args.label_column, args.max_length)


def run(args: argparse.Namespace) -> dict:
    """Run every method on every seed; write and return the results."""
    output = Path(args.output)
    accelerator = runs.make_accelerator(args.mixed_precision, args.gradient_accumulation_steps)
    # everything that can be refused is checked before anything is written: a refused run leaves OUTDIR as it was
    data = zoo.load_dataset(args.dataset)
    train_data, test_data = data["train"], data["test"]
    modality, column = detect_input(train_data, args.image_column, args.text_column)
    classes = dataset_classes(train_data, args.label_column)
    options = AdapterOptions(
        r=args.r,
        target_modules=runs.target_modules(args.target_modules),
        layers_to_transform=optional_csv(args.layers, int),
        sdlora={"magnitude_sharing": args.magnitude_sharing, "freeze_scale": args.freeze_scale},
        olora_lambdas=_pair(args.olora_lambdas, "--olora-lambdas"),
        inflora_thresholds=_pair(args.inflora_thresholds, "--inflora-thresholds"),
    )
    entries = _method_entries(args.methods, args.head, options)
    _check_sharding(args.fsdp, accelerator, entries, options)
    seeds = csv_list(args.seeds, int)
    if not seeds:
        raise ValueError("--seeds needs at least one seed, e.g. --seeds 0,1,2.")
    splits = {}
    for seed in seeds:
        split = TaskSplit.from_classes(classes, args.num_tasks, seed)
        train_sets = split_dataset(train_data, split, args.label_column, args.max_train_per_class, seed, "train")
        test_sets = split_dataset(test_data, split, args.label_column, args.max_test_per_class, seed, "test")
        splits[seed] = split, train_sets, test_sets
    set_seed(seeds[0])
    if args.protocol is not None and not args.resume and "batch_size" not in args.protocol_overrides:
        full = min(Counter(train_data["label"]).values())
        args.batch_size = steps_preserving_batch(args.batch_size, args.max_train_per_class, full)
    # the first seed's model, loaded before anything is written: a model that cannot load is refused here
    loaded = zoo.load_model(args.model, len(classes), modality=modality, pooling=args.pooling)
    runs.start_output(args, accelerator)
    by_method: dict[str, list[dict]] = {name: [] for name, _, _ in entries}
    info = None
    for seed in seeds:
        split, train_sets, test_sets = splits[seed]
        set_seed(seed)
        if seed != seeds[0]:
            loaded = zoo.load_model(args.model, len(classes), modality=modality, pooling=args.pooling)
        base, processor, info = loaded
        if args.dropout is not None:
            zoo.set_dropout(base, args.dropout)
        settings = TrainSettings(
            args.epochs, args.batch_size, args.lr, args.head_lr, args.magnitude_lr, args.optimizer, seed=seed,
            prefix_cache=args.prefix_cache == "auto", fsdp=args.fsdp,
        )  # fmt: skip
        for name, method_name, head_name in entries:
            done = runs.finished_record(args, name, seed)
            if done is not None:
                by_method[name].append(done)
                continue
            set_seed(seed)
            # collators of its own: a run's augmentations do not depend on which runs came before it
            collate = _collate(args, modality, column, processor, train=True, seed=seed)
            eval_collate = _collate(args, modality, column, processor, train=False, seed=seed)
            method = make_method(method_name, options)
            task_split, task_train, task_test = split, train_sets, test_sets
            if method_name == "joint":
                task_split = TaskSplit([split.seen_classes(split.num_tasks - 1)])
                task_train = [datasets.concatenate_datasets(train_sets)]
                task_test = [datasets.concatenate_datasets(test_sets)]
            head = make_head(head_name, seed, args.ranpac_dim)
            model, record = run_sequence(
                accelerator, copy.deepcopy(base), method, head, task_split, task_train,
                task_test, collate, settings, eval_collate=eval_collate,
                checkpoints=runs.run_state(output, name, seed), resume=bool(args.resume),
            )  # fmt: skip
            record = {"seed": seed, "head": head_name, **record}
            runs.keep_run(accelerator, output, by_method, name, seed, model, record, Path(args.dataset).name)
    return runs.report_runs(accelerator, args, by_method, info)


def main(argv: list[str] | None = None) -> int:
    """Run `sdlora-cil`. An error the user causes (options, data, model, OUTDIR) prints one line, `sdlora-cil:
    error: ...`, and returns 2, with nothing written; `--debug` raises it with its traceback instead."""
    return runs.run_command("sdlora-cil", lambda given: run(parse_args(given)), argv)


if __name__ == "__main__":
    sys.exit(main())
