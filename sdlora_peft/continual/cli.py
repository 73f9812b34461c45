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
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from peft import PeftModel

from .. import SDLoraConfig, write_model_card
from ..config import FREEZE_SCALES
from . import zoo
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
from .plots import write_plots
from .protocols import PROTOCOLS, apply_protocol, steps_preserving_batch
from .report import atomic_write_dir, build_summary, console_table, write_json, write_results
from .train import OPTIMIZERS, TrainSettings, run_sequence

DEFAULT_HEAD = "aligned"  # the best SD-LoRA pipeline measured (benchmarks/accuracy/ACCURACY.md)
RUN_STATE = ("config.json", "checkpoints")  # what OUTDIR holds of a started run, besides its results
NOT_CONFIG = ("output", "overwrite", "resume", "debug")  # options that say where to write or how to report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with a `--protocol` preset under the options given; with `--resume OUTDIR`, the options saved in
    OUTDIR, which any option given must agree with."""
    parser = _parser()
    args = parser.parse_args(argv)
    defaults, unset = vars(parser.parse_args([])), object()
    parser.set_defaults(**dict.fromkeys(defaults, unset))  # parse again to tell the options given
    given = {name: value for name, value in vars(parser.parse_args(argv)).items() if value is not unset}
    if args.resume is None:
        args.protocol_overrides = sorted(set(given) & set(PROTOCOLS.get(args.protocol, {})))
        return apply_protocol(args, set(given))
    return _resumed(args.resume, given, defaults)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        """One line, `sdlora-cil: error: ...`, exit status 2 (argparse would print the usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(cast: type) -> Any:
    def parse(text: str):
        value = cast(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = cast.__name__  # argparse names the type in its message
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdlora-cil", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    count, rate = _positive(int), _positive(float)
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
    add("--output", default="runs/cil", help="output directory")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="start afresh in an OUTDIR that holds a run")
    again.add_argument("--resume", metavar="OUTDIR", default=None, help="continue the run saved in OUTDIR from "
                       "its last finished task, with its options")  # fmt: skip
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
    add("--target-modules", default=None, help="comma-separated module names (default: query/value projections)")
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
    add("--debug", action="store_true", help="show the traceback of an error")
    return parser


def _resumed(output: str, given: dict, defaults: dict) -> argparse.Namespace:
    """The options saved in `output` (defaults for any added since); refuse if an option given on the command line
    says otherwise."""
    saved_path = Path(output) / "config.json"
    if not saved_path.is_file():
        raise ValueError(f"--resume {output}: there is no run to resume there (no config.json).")
    saved = {**_config(argparse.Namespace(**defaults)), **json.loads(saved_path.read_text())}
    if given.get("output", output) != output:
        raise ValueError(f"--resume {output} writes into {output}; leave out --output {given['output']}.")
    for name, value in given.items():
        if name not in NOT_CONFIG and value != saved[name]:
            option = "--" + name.replace("_", "-")
            raise ValueError(
                f"--resume {output}: {option} is {value!r} here but {saved[name]!r} in the saved run. Leave it out "
                "to resume with the saved options, or start a new run in another --output."
            )
    return argparse.Namespace(**saved, output=output, overwrite=False, resume=output, debug=given.get("debug", False))


def _csv(value: str, cast: type = str) -> list:
    return [cast(item) for item in value.split(",") if item]


def _optional_csv(value: str | None, cast: type = str) -> list | None:
    return None if value is None else _csv(value, cast)


def _pair(value: str, option: str) -> tuple[float, float]:
    try:
        first, second = (float(item) for item in value.split(","))
    except ValueError:
        raise ValueError(f"{option} takes two comma-separated numbers, e.g. {option} 0.5,0; got {value!r}.") from None
    return first, second


def _method_entries(value: str, default_head: str, options: AdapterOptions) -> list[tuple[str, str, str]]:
    """(result name, method, head) for every entry of --methods; `ncm` always scores with class means."""
    entries = []
    for item in _csv(value):
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


def _start_output(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Refuse to write over an earlier run without --overwrite; with it, forget that run's checkpoints and results,
    so that OUTDIR never mixes two runs. A new run saves its options, which --resume reads back."""
    output = Path(args.output)
    if args.resume:
        return
    started = [name for name in ("results.json", *RUN_STATE) if (output / name).exists()]
    if started and not args.overwrite:
        raise ValueError(
            f"{output} already holds a run ({started[0]}); pass --resume {output} to continue it, --overwrite to "
            "start afresh, or choose another --output."
        )
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if accelerator.is_main_process:
        shutil.rmtree(output / "checkpoints", ignore_errors=True)
        (output / "results.json").unlink(missing_ok=True)
        write_json(output / "config.json", _config(args))


def _config(args: argparse.Namespace) -> dict:
    return {name: value for name, value in vars(args).items() if name not in NOT_CONFIG}


def _run_state(output: Path, name: str, seed: int) -> Path:
    """The checkpoints of one (method, seed) run; beside them, `<that>.json` holds its record once it is finished."""
    return output / "checkpoints" / name / f"seed_{seed}"


def _save_adapter(folder: Path, model: PeftModel, record: dict, dataset: str) -> None:
    """The adapter; an SD-LoRA adapter's model card also gets the run's results."""
    model.save_pretrained(str(folder))
    if isinstance(model.peft_config["default"], SDLoraConfig):
        write_model_card(folder, model, results=record, dataset=dataset)


def _finish(output: Path, name: str, seed: int, model: object, record: dict, dataset: str) -> None:
    """Save a finished (method, seed) run: its adapter, then its record, which tells --resume the run is done,
    then forget its checkpoints."""
    run_state = _run_state(output, name, seed)
    if isinstance(model, PeftModel):
        atomic_write_dir(
            output / "adapters" / name / f"seed_{seed}", lambda tmp: _save_adapter(tmp, model, record, dataset)
        )
    write_json(run_state.with_suffix(".json"), record)
    shutil.rmtree(run_state, ignore_errors=True)


def _several_cpu_processes() -> bool:
    """Whether torchrun / accelerate launch started several processes on a machine without CUDA. Accelerate needs
    to be told (its `cpu` flag) to join them with gloo; otherwise each process would run the whole benchmark alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def run(args: argparse.Namespace) -> dict:
    """Run every method on every seed; write and return the results."""
    output = Path(args.output)
    # split_batches: --batch-size is the global batch, so N processes take the steps one process would
    accelerator = Accelerator(
        cpu=_several_cpu_processes(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    # everything that can be refused is checked before anything is written: a refused run leaves OUTDIR as it was
    data = zoo.load_dataset(args.dataset)
    train_data, test_data = data["train"], data["test"]
    modality, column = detect_input(train_data, args.image_column, args.text_column)
    classes = dataset_classes(train_data, args.label_column)
    options = AdapterOptions(
        r=args.r,
        target_modules=_optional_csv(args.target_modules),
        layers_to_transform=_optional_csv(args.layers, int),
        sdlora={"magnitude_sharing": args.magnitude_sharing, "freeze_scale": args.freeze_scale},
        olora_lambdas=_pair(args.olora_lambdas, "--olora-lambdas"),
        inflora_thresholds=_pair(args.inflora_thresholds, "--inflora-thresholds"),
    )
    entries = _method_entries(args.methods, args.head, options)
    _check_sharding(args.fsdp, accelerator, entries, options)
    seeds = _csv(args.seeds, int)
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
    _start_output(args, accelerator)
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in entries}
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
            run_state = _run_state(output, name, seed)
            if args.resume and run_state.with_suffix(".json").is_file():
                runs[name].append(json.loads(run_state.with_suffix(".json").read_text()))
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
                task_test, collate, settings, eval_collate=eval_collate, checkpoints=run_state,
                resume=bool(args.resume),
            )  # fmt: skip
            record = {"seed": seed, "head": head_name, **record}
            runs[name].append(record)
            accelerator.wait_for_everyone()  # every process has read its checkpoint before they are removed
            if accelerator.is_main_process:
                _finish(output, name, seed, model, record, Path(args.dataset).name)
    results = {
        "config": {**vars(args), "model_info": info.__dict__ if info else None, "rehearsal_free": True},
        "methods": {name: build_summary(method_runs) for name, method_runs in runs.items()},
    }
    if accelerator.is_main_process:
        write_results(results, output)
        write_plots(results, output)
        print(console_table(results))
        print(f"results, plots and adapters: {output}")
    return results


def main(argv: list[str] | None = None) -> int:
    """Run `sdlora-cil`. An error the user causes (options, data, model, OUTDIR) prints one line, `sdlora-cil:
    error: ...`, and returns 2, with nothing written; `--debug` raises it with its traceback instead."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(parse_args(argv))
    except (ValueError, OSError) as error:
        if "--debug" in argv:
            raise
        message = " ".join(str(error).split())  # one line, whatever the message's own line breaks
        print(f"sdlora-cil: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
