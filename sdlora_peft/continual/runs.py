"""The output directory of a benchmark command (`sdlora-cil`, `sdlora-clm`): one run per (method, seed).

A new run saves its options in `OUTDIR/config.json`; `--resume OUTDIR` reads them back (any option given again must
agree). Each (method, seed) run keeps its checkpoints in `OUTDIR/checkpoints/<method>/seed_<s>/` while it runs;
once it is finished, `<that>.json` holds its record, its adapter goes to `OUTDIR/adapters/<method>/seed_<s>/`, and
its checkpoints are removed. The commands differ in what a run is; this is what they share.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from peft import PeftModel

from .. import SDLoraConfig, write_model_card
from .plots import write_plots
from .report import atomic_write_dir, build_summary, console_table, write_json, write_results

RUN_STATE = ("config.json", "checkpoints")  # what OUTDIR holds of a started run, besides its results
NOT_CONFIG = ("output", "overwrite", "resume", "debug")  # options that say where to write or how to report


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        """One line, `<prog>: error: ...`, exit status 2 (argparse would print the usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive(cast: type) -> Any:
    """An argparse type: `cast` of the text, refused unless > 0."""

    def parse(text: str):
        value = cast(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = cast.__name__  # argparse names the type in its message
    return parse


def add_output_options(parser: argparse.ArgumentParser, default_output: str) -> None:
    """--output, --overwrite / --resume (which exclude each other) and --debug."""
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--output", default=default_output, help="output directory")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="start afresh in an OUTDIR that holds a run")
    again.add_argument("--resume", metavar="OUTDIR", default=None, help="continue the run saved in OUTDIR from "
                       "its last finished task, with its options")  # fmt: skip


def parse_args(
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
    presets: Callable[[argparse.Namespace, set[str]], argparse.Namespace] | None = None,
) -> argparse.Namespace:
    """The options, passed with the names of those given on the command line through `presets` if any (a preset
    fills in the options not given); with `--resume OUTDIR`, the options saved in OUTDIR, which any option given must
    agree with."""
    args = parser.parse_args(argv)
    defaults, unset = vars(parser.parse_args([])), object()
    parser.set_defaults(**dict.fromkeys(defaults, unset))  # parse again to tell the options given
    given = {name: value for name, value in vars(parser.parse_args(argv)).items() if value is not unset}
    if args.resume is not None:
        return _resumed(args.resume, given, defaults)
    return args if presets is None else presets(args, set(given))


def _resumed(output: str, given: dict, defaults: dict) -> argparse.Namespace:
    """The options saved in `output` (defaults for any added since); refuse if an option given on the command line
    says otherwise."""
    saved_path = Path(output) / "config.json"
    if not saved_path.is_file():
        raise ValueError(f"--resume {output}: there is no run to resume there (no config.json).")
    saved = {**run_config(argparse.Namespace(**defaults)), **json.loads(saved_path.read_text())}
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


def csv_list(value: str, cast: type = str) -> list:
    return [cast(item) for item in value.split(",") if item]


def optional_csv(value: str | None, cast: type = str) -> list | None:
    return None if value is None else csv_list(value, cast)


def target_modules(value: str | None) -> list[str] | str | None:
    """``--target-modules``: comma-separated names, or PEFT's ``all-linear`` (every linear layer but the output)."""
    return value if value == "all-linear" else optional_csv(value)


TARGET_MODULES_HELP = "comma-separated module names, or all-linear (default: query/value projections)"


def run_config(args: argparse.Namespace) -> dict:
    return {name: value for name, value in vars(args).items() if name not in NOT_CONFIG}


def start_output(args: argparse.Namespace, accelerator: Accelerator) -> None:
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
        write_json(output / "config.json", run_config(args))


def run_state(output: Path, name: str, seed: int) -> Path:
    """The checkpoints of one (method, seed) run; beside them, `<that>.json` holds its record once it is finished."""
    return output / "checkpoints" / name / f"seed_{seed}"


def record_path(output: Path, name: str, seed: int) -> Path:
    """Where a finished (method, seed) run's record lies, beside its checkpoints."""
    return run_state(output, name, seed).with_suffix(".json")


def finished_record(args: argparse.Namespace, name: str, seed: int) -> dict | None:
    """The record of a (method, seed) run that a resumed command finished before, if any."""
    path = record_path(Path(args.output), name, seed)
    return json.loads(path.read_text()) if args.resume and path.is_file() else None


def finished_results(output: str | os.PathLike) -> dict:
    """The results of the (method, seed) runs that a started run in `output` has finished, as its command would
    report them had it been run with those seeds alone: what a run cut short has measured, without resuming it."""
    output = Path(output)
    if not (output / "config.json").is_file():
        raise ValueError(f"{output} holds no started run (no config.json); pass the OUTDIR of a sdlora-cil/-clm run.")
    config = json.loads((output / "config.json").read_text())
    methods: dict[str, list[dict]] = {}
    for name in csv_list(config["methods"]):
        for seed in csv_list(str(config["seeds"]), int):
            path = record_path(output, name, seed)
            if path.is_file():
                methods.setdefault(name, []).append(json.loads(path.read_text()))
    if not methods:
        raise ValueError(f"{output}: no (method, seed) run has finished yet; nothing to report.")
    seeds = sorted({run["seed"] for runs in methods.values() for run in runs})
    summaries = {name: build_summary(runs) for name, runs in methods.items()}
    return {"config": {**config, "seeds": ",".join(map(str, seeds)), "output": str(output)}, "methods": summaries}


def _save_adapter(folder: Path, model: PeftModel, record: dict, dataset: str) -> None:
    """The adapter; an SD-LoRA adapter's model card also gets the run's results."""
    model.save_pretrained(str(folder))
    if isinstance(model.peft_config["default"], SDLoraConfig):
        write_model_card(folder, model, results=record, dataset=dataset)


def finish(output: Path, name: str, seed: int, model: object, record: dict, dataset: str) -> None:
    """Save a finished (method, seed) run: its adapter, then its record, which tells --resume the run is done,
    then forget its checkpoints."""
    if isinstance(model, PeftModel):
        atomic_write_dir(
            output / "adapters" / name / f"seed_{seed}", lambda tmp: _save_adapter(tmp, model, record, dataset)
        )
    write_json(record_path(output, name, seed), record)
    shutil.rmtree(run_state(output, name, seed), ignore_errors=True)


def keep_run(
    accelerator: Accelerator, output: Path, by_method: dict[str, list[dict]], name: str, seed: int, model: object,
    record: dict, dataset: str,
) -> None:  # fmt: skip
    """Add a finished run's record to `by_method` and, on the main process, save it (`finish`)."""
    by_method[name].append(record)
    accelerator.wait_for_everyone()  # every process has read its checkpoint before they are removed
    if accelerator.is_main_process:
        finish(output, name, seed, model, record, dataset)


def report_runs(
    accelerator: Accelerator, args: argparse.Namespace, by_method: dict[str, list[dict]], model_info: object
) -> dict:
    """The command's results (its options, each method's summary over seeds); the main process writes them with
    their plots into OUTDIR and prints the table."""
    results = {
        "config": {**vars(args), "model_info": getattr(model_info, "__dict__", None), "rehearsal_free": True},
        "methods": {name: build_summary(method_runs) for name, method_runs in by_method.items()},
    }
    if accelerator.is_main_process:
        write_results(results, args.output)
        write_plots(results, args.output)
        print(console_table(results))
        print(f"results, plots and adapters: {args.output}")
    return results


def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1) -> Accelerator:
    """One Accelerator for the whole command. `split_batches`: --batch-size is the global batch, so N processes take
    the steps one process would. On several CPU processes (torchrun / accelerate launch without CUDA) Accelerate
    must be told (its `cpu` flag) to join them with gloo; otherwise each would run the whole benchmark alone."""
    several_cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=several_cpu_processes,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def run_command(prog: str, run: Callable[[list[str]], object], argv: list[str] | None = None) -> int:
    """Run a command: an error the user causes (options, data, model, OUTDIR) prints one line, `<prog>: error:
    ...`, and returns 2, with nothing written; `--debug` raises it with its traceback instead."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(argv)
    except (ValueError, OSError) as error:
        if "--debug" in argv:
            raise
        message = " ".join(str(error).split())  # one line, whatever the message's own line breaks
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0
