"""`sdlora-clm`: continual fine-tuning of a causal language model, SD-LoRA and its peers side by side.

    sdlora-clm --model smollm2-135m --tasks yahoo,stackoverflow,20ng --layers 26,27,28,29 \\
               --methods sdlora,lora-seq,lora-merge,zero-shot,joint --seeds 0,1,2 --output OUTDIR

Every method learns the same generative tasks in the same order with the same budget (epochs, rate, rank, adapted
blocks); after every task each seen task is scored by ranking its answers by log-likelihood (`--exact-match` adds
greedy generation). The results go to OUTDIR as results.json (accuracy matrix, average accuracy, forgetting, BWT per
method and seed), results.md and PNG plots, with each method's final adapter. `sdlora-clm --resume OUTDIR`
continues a stopped run and ends with the results an uninterrupted run gives.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from accelerate.utils import set_seed

from .. import runs, zoo
from ..methods import AdapterOptions, Frozen, Method, make_method
from ..runs import csv_list, optional_csv
from ..train import TrainSettings
from .loop import run_lm_sequence
from .tasks import ZOO_TASK_NAMES, load_task

LM_METHOD_NAMES = ("sdlora", "sdlora-rr", "sdlora-kd", "lora-seq", "lora-merge", "olora", "zero-shot", "joint")


def make_lm_method(name: str, options: AdapterOptions) -> Method:
    """The method named `name` (one of `LM_METHOD_NAMES`); `zero-shot` is the base model, nothing trained."""
    if name not in LM_METHOD_NAMES:
        raise ValueError(f"Unknown method {name!r} for a language model; known: {', '.join(LM_METHOD_NAMES)}.")
    return Frozen(options, "zero-shot") if name == "zero-shot" else make_method(name, options)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; with `--resume OUTDIR`, the options saved in OUTDIR, which any option given must agree with."""
    return runs.parse_args(_parser(), argv)


def _parser() -> argparse.ArgumentParser:
    parser = runs.Parser(prog="sdlora-clm", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    count, rate = runs.positive(int), runs.positive(float)
    add("--model", default="smollm2-135m", help=f"hub id, local dir, or one of {list(zoo.CAUSAL_LM_NAMES)}")
    add("--tasks", default="yahoo,stackoverflow,20ng", help="comma-separated, in order: save_to_disk folders "
        f"(prompt, target[, choices]) or zoo tasks from {list(ZOO_TASK_NAMES)}")  # fmt: skip
    add("--methods", default="sdlora,lora-seq,lora-merge,zero-shot,joint", help=f"from {list(LM_METHOD_NAMES)}")
    add("--seeds", default="0", help="comma-separated; each fixes the training samples and the initialisation")
    runs.add_output_options(parser, "runs/clm")
    add("--epochs", type=count, default=1)
    add("--batch-size", type=count, default=8)
    add("--lr", type=rate, default=1e-3)
    add("--eval-batch-size", type=count, default=128, help="(prompt, answer) pairs scored in one forward")
    add("--max-train-per-task", type=count, default=200)
    add("--max-test-per-task", type=count, default=100)
    add("--max-text-tokens", type=count, default=48, help="token budget of a zoo task's text, before its question")
    add("--exact-match", action="store_true", help="also score greedy generation by exact match")
    add("--r", type=count, default=8, help="adapter rank (every method)")
    add("--layers", default=None, help="comma-separated block indices to adapt (default: all)")
    add("--target-modules", default=None, help=runs.TARGET_MODULES_HELP)
    add("--magnitude-sharing", default="global", choices=("global", "layer"))
    add("--freeze-scale", default="preserve", choices=("preserve", "unit"))
    add("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    add("--gradient-accumulation-steps", type=count, default=1)
    return parser


def run(args: argparse.Namespace) -> dict:
    """Run every method on every seed; write and return the results."""
    output = Path(args.output)
    accelerator = runs.make_accelerator(args.mixed_precision, args.gradient_accumulation_steps)
    runs.start_output(args, accelerator)
    names, task_names = csv_list(args.methods), csv_list(args.tasks)
    options = AdapterOptions(
        r=args.r,
        target_modules=runs.target_modules(args.target_modules),
        layers_to_transform=optional_csv(args.layers, int),
        sdlora={"magnitude_sharing": args.magnitude_sharing, "freeze_scale": args.freeze_scale},
        task_type="CAUSAL_LM",
    )
    for name in names:
        make_lm_method(name, options)  # fail early on an unknown name
    by_method: dict[str, list[dict]] = {name: [] for name in names}
    info = None
    for seed in csv_list(args.seeds, int):
        set_seed(seed)
        base, tokenizer, info = zoo.load_causal_lm(args.model)
        tasks = [
            load_task(task, tokenizer, max_train=args.max_train_per_task, max_test=args.max_test_per_task,
                      max_text_tokens=args.max_text_tokens, seed=seed)
            for task in task_names
        ]  # fmt: skip
        settings = TrainSettings(
            args.epochs, args.batch_size, args.lr, eval_batch_size=args.eval_batch_size, seed=seed
        )
        for name in names:
            done = runs.finished_record(args, name, seed)
            if done is not None:
                by_method[name].append(done)
                continue
            set_seed(seed)
            model, record = run_lm_sequence(
                accelerator, copy.deepcopy(base), tokenizer, make_lm_method(name, options), tasks, settings,
                joint=name == "joint", exact_match=args.exact_match, checkpoints=runs.run_state(output, name, seed),
                resume=bool(args.resume),
            )  # fmt: skip
            record = {"seed": seed, **record}
            runs.keep_run(
                accelerator, output, by_method, name, seed, model, record, ",".join(task.name for task in tasks)
            )
    return runs.report_runs(accelerator, args, by_method, info)


def main(argv: list[str] | None = None) -> int:
    """Run `sdlora-clm`; an error the user causes prints one line and returns 2 (`--debug`: the traceback)."""
    return runs.run_command("sdlora-clm", lambda given: run(parse_args(given)), argv)


if __name__ == "__main__":
    sys.exit(main())
