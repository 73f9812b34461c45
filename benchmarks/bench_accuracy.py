"""Class-incremental accuracy of SD-LoRA and its peers on the offline benchmarks, with one command.

    python benchmarks/bench_accuracy.py                       # every suite and setting, 3 seeds (a GPU run)
    python benchmarks/bench_accuracy.py --suites glyphs --settings slow --jobs 10
    python benchmarks/bench_accuracy.py --merge-only          # rebuild ACCURACY.md from the runs on disk
    python benchmarks/bench_accuracy.py --suites digits --jobs 2 --quick

Every (suite, setting, seed, method) is one small `sdlora-cil` run written to
OUTDIR/<suite>/<setting>/seed_<s>/<method>/, so runs spread over processes and a run cut short keeps what finished;
the runs of a suite and setting are then merged into OUTDIR/<suite>/<setting>/results.json. Every method gets the
same loop, data, seeds and settings (the search budget): each learning-rate setting runs every backbone method, and
the frozen-backbone methods (nothing to tune but the head) run with the first. The summary (OUTDIR/ACCURACY.md)
lists every method with the default head (`aligned`, as `sdlora-cil`), the masked linear head for SD-LoRA and
sequential LoRA, the paper's ablation on one suite, and the headroom: joint training minus a frozen backbone with the
aligned head. Where it is small, adapting the backbone has little to win.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sdlora_peft.continual.report import atomic_write_bytes, build_summary, results_markdown

BACKBONE_METHODS = ("sdlora", "sdlora-rr", "sdlora-kd", "lora-seq", "lora-merge", "inflora", "olora", "joint",
                    "sdlora@linear", "lora-seq@linear")  # fmt: skip
FROZEN_METHODS = ("ncm", "linear")  # no adapter to tune: run once, with the first setting
ABLATION = ("ablation-single", "ablation-first", "ablation-fixed")
ABLATION_SUITE = "mnist"
IMAGE = ["--model", "dinov2-small", "--image-size", "112", "--max-test-per-class", "60"]
SUITES = {
    "fashion-mnist": [*IMAGE, "--dataset", "fashion-mnist", "--num-tasks", "5", "--max-train-per-class", "200"],
    "mnist": [*IMAGE, "--dataset", "mnist", "--num-tasks", "5", "--max-train-per-class", "200"],
    "glyphs": [*IMAGE, "--dataset", "glyphs", "--num-tasks", "6", "--max-train-per-class", "40",
               "--max-test-per-class", "20"],
    "kaomoji": ["--model", "minilm", "--dataset", "kaomoji", "--num-tasks", "4", "--max-train-per-class", "100",
                "--max-test-per-class", "40", "--max-length", "32"],
}  # fmt: skip
SEEDS = (0, 1, 2)
SETTINGS = {  # (adapter lr, head lr): the "slow learner" that limits feature drift (sdlora-cil's default), and plain
    "slow": ["--lr", "1e-4", "--head-lr", "1e-3"],
    "lr1e-3": ["--lr", "1e-3", "--head-lr", "1e-3"],
}
COMMON = ["--epochs", "3", "--batch-size", "64", "--head", "aligned", "--overwrite"]
QUICK = ["--model", "tiny-dinov2", "--image-size", "32", "--epochs", "1", "--max-train-per-class", "20",
         "--max-test-per-class", "10", "--head", "aligned", "--overwrite"]  # fmt: skip


def methods_for(suite: str, setting: str) -> list[str]:
    methods = list(BACKBONE_METHODS)
    if setting == next(iter(SETTINGS)):
        methods += FROZEN_METHODS
        if suite == ABLATION_SUITE:
            methods += ABLATION
    return methods


def run_dir(output: Path, suite: str, setting: str, seed: int, method: str) -> Path:
    return output / suite / setting / f"seed_{seed}" / method.replace("@", "_at_")


def run_one(
    suite: str, setting: str, seed: int, method: str, output: Path, quick: bool, roots: tuple[Path | None, Path | None]
) -> None:
    """One `sdlora-cil` run of one method and seed. Folders `data_root/<suite>` (save_to_disk) and
    `model_root/<model>` (save_pretrained) replace the zoo's dataset and model, e.g. copies carried to a machine
    without the zoo's packages."""
    target = run_dir(output, suite, setting, seed, method)
    suite_args = ["--dataset", suite, "--num-tasks", "3"] if quick else list(SUITES[suite])
    for flag, root in zip(("--dataset", "--model"), roots):
        position = suite_args.index(flag) + 1 if flag in suite_args else None
        if root is not None and position is not None and (root / suite_args[position]).is_dir():
            suite_args[position] = str(root / suite_args[position])
    command = [sys.executable, "-m", "sdlora_peft.continual.cli", *suite_args, *(QUICK if quick else COMMON),
               *SETTINGS[setting], "--seeds", str(seed), "--methods", method, "--output", str(target)]  # fmt: skip
    target.mkdir(parents=True, exist_ok=True)
    with open(target / "run.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)


def merge_runs(folder: Path) -> dict | None:
    """One results dict from the per-method, per-seed runs under `folder` (a suite and setting); None if none."""
    parts = [json.loads(path.read_text()) for path in sorted(folder.glob("seed_*/*/results.json"))]
    if not parts:
        return None
    runs: dict[str, list[dict]] = {}
    for part in parts:
        for name, summary in part["methods"].items():
            runs.setdefault(name, []).extend(summary["runs"])
    order = [m for m in (*BACKBONE_METHODS, *FROZEN_METHODS, *ABLATION) if m in runs]
    order += sorted(set(runs) - set(order))
    seeds = sorted({p["config"]["seeds"] for p in parts}, key=str)
    config = {**parts[0]["config"], "methods": ",".join(order), "seeds": ",".join(map(str, seeds)), "output": None}
    return {"config": config, "methods": {name: build_summary(runs[name]) for name in order}}


def _final(results: dict, method: str) -> float:
    return results["methods"][method]["final_accuracy"]["mean"]


def _frozen_aligned(results: dict) -> str | None:
    """The frozen backbone with the aligned head: `linear` under the aligned default head, else `linear@aligned`."""
    methods = results["methods"]
    if "linear@aligned" in methods:
        return "linear@aligned"
    return "linear" if "linear" in methods and results["config"].get("head") == "aligned" else None


def summary_markdown(merged: dict[tuple[str, str], dict], command: str) -> str:
    lines = ["# Class-incremental accuracy", "", f"Command: `{command}`", ""]
    if "--merge-only" in command:
        lines[2] = (
            "Merged from the runs on disk. Reproduce a section with `python benchmarks/bench_accuracy.py --suites "
            "SUITE --settings SETTING --jobs N`; its results.json holds the exact settings."
        )
    for (suite, setting), results in merged.items():
        config = results["config"]
        lines += [f"## {suite}, {setting}", "", f"`{config['model']}` on {config['dataset']}, {config['num_tasks']} "
                  f"tasks, default head `{config['head']}`, adapter lr {config['lr']:g}, head lr "
                  f"{config['head_lr']:g}.", ""]  # fmt: skip
        frozen_aligned = _frozen_aligned(results)
        if "joint" in results["methods"] and frozen_aligned:
            methods = results["methods"]
            headroom = _final(results, "joint") - _final(results, frozen_aligned)
            best_frozen = max(
                (m for m in methods if m.partition("@")[0] in FROZEN_METHODS), key=lambda m: _final(results, m)
            )
            best_sdlora = max((m for m in methods if m.startswith("sdlora")), key=lambda m: _final(results, m))
            gap = _final(results, best_sdlora) - _final(results, best_frozen)
            lines += [f"Headroom (joint - frozen backbone with aligned head): {headroom:+.2f} points. Best SD-LoRA "
                      f"pipeline `{best_sdlora}` {_final(results, best_sdlora):.2f} vs best frozen method "
                      f"`{best_frozen}` {_final(results, best_frozen):.2f} ({gap:+.2f}).", ""]  # fmt: skip
        lines += [results_markdown(results), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", default=",".join(SUITES))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (e.g. 10 on one GPU)")
    parser.add_argument("--output", default="benchmarks/accuracy")
    parser.add_argument("--quick", action="store_true", help="tiny model and data: a smoke test of the pipeline")
    parser.add_argument("--merge-only", action="store_true", help="only merge the runs already under --output")
    parser.add_argument("--data-root", type=Path, default=None, help="folder of save_to_disk datasets by zoo name")
    parser.add_argument("--model-root", type=Path, default=None, help="folder of checkpoints by zoo model name")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if not args.merge_only:
        runs = [(suite, setting, int(seed), method) for suite in args.suites.split(",")
                for setting in args.settings.split(",") for seed in args.seeds.split(",")
                for method in methods_for(suite, setting)]  # fmt: skip
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda run: run_one(*run, output, args.quick, (args.data_root, args.model_root)), runs))
    merged = {}
    for folder in sorted(p for p in output.glob("*/*") if p.is_dir()):
        results = merge_runs(folder)
        if results is not None:
            atomic_write_bytes(folder / "results.json", json.dumps(results, indent=1).encode())
        elif (folder / "results.json").exists():  # merged earlier, its runs not kept
            results = json.loads((folder / "results.json").read_text())
        if results is not None:
            merged[(folder.parent.name, folder.name)] = results
    command = "python benchmarks/bench_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_bytes(output / "ACCURACY.md", summary_markdown(merged, command.strip()).encode())
    print((output / "ACCURACY.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
