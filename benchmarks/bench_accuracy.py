"""Class-incremental accuracy of SD-LoRA and its peers on the offline benchmarks, with one command.

    python benchmarks/bench_accuracy.py                       # every suite, 3 seeds (a GPU run: minutes)
    python benchmarks/bench_accuracy.py --suites glyphs --jobs 2 --quick

Each suite is one `sdlora-cil` run (same loop, data, seeds and budget for every method) written to
OUTDIR/<suite>/<setting>/. Every suite runs once per learning-rate setting (the same search for every method); the
summary (OUTDIR/ACCURACY.md) lists every method with the default head, the masked linear head for SD-LoRA and
sequential LoRA, the paper's ablation, and the headroom (joint training minus a frozen backbone with the aligned
head): where it is small, adapting the backbone has little to win.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sdlora_peft.continual.report import atomic_write_bytes, build_summary, results_markdown

BACKBONE_METHODS = "sdlora,sdlora-rr,sdlora-kd,lora-seq,lora-merge,joint,sdlora@linear,lora-seq@linear,sdlora@aligned"
FROZEN_METHODS = "ncm,linear,linear@aligned"  # no adapter learning rate: run once, with the first setting
ABLATION = "ablation-single,ablation-first,ablation-fixed"
ABLATION_SUITE = "mnist"
SUITES = {
    "fashion-mnist": ["--dataset", "fashion-mnist", "--num-tasks", "5", "--max-train-per-class", "200"],
    "mnist": ["--dataset", "mnist", "--num-tasks", "5", "--max-train-per-class", "200"],
    "glyphs": ["--dataset", "glyphs", "--num-tasks", "6", "--max-train-per-class", "100"],
}
SEEDS = (0, 1, 2)
SETTINGS = {  # (adapter lr, head lr): plain, and the "slow learner" that limits feature drift
    "lr1e-3": ["--lr", "1e-3", "--head-lr", "1e-3"],
    "slow": ["--lr", "1e-4", "--head-lr", "1e-3"],
}
COMMON = [
    "--model", "dinov2-small", "--image-size", "112", "--epochs", "3", "--batch-size", "64",
    "--max-test-per-class", "60", "--head", "ncm", "--overwrite",
]  # fmt: skip
QUICK = [
    "--model", "tiny-dinov2", "--image-size", "32", "--epochs", "1", "--max-test-per-class", "10", "--head", "ncm",
    "--overwrite",
]  # fmt: skip


def methods_for(suite: str, setting: str) -> str:
    methods = [BACKBONE_METHODS]
    if setting == next(iter(SETTINGS)):
        methods.append(FROZEN_METHODS)
        if suite == ABLATION_SUITE:
            methods.append(ABLATION)
    return ",".join(methods)


def run_one(suite: str, setting: str, seed: int, output: Path, quick: bool, data_root: Path | None) -> Path:
    """One `sdlora-cil` run of one seed (runs are small, so they spread over processes); returns results.json.
    A folder `data_root/<suite>` (save_to_disk) replaces the zoo's dataset, e.g. a fixed subsample carried to a
    machine without the zoo's packages."""
    target = output / suite / setting / f"seed_{seed}"
    suite_args = list(SUITES[suite])
    if data_root is not None and (data_root / suite).is_dir():
        suite_args[1] = str(data_root / suite)
    if quick:
        suite_args[-1] = "20"
    command = [sys.executable, "-m", "sdlora_peft.continual.cli", *(QUICK if quick else COMMON), *suite_args,
               *SETTINGS[setting], "--seeds", str(seed), "--methods", methods_for(suite, setting),
               "--output", str(target)]  # fmt: skip
    with open(output / f"{suite}-{setting}-{seed}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return target / "results.json"


def merge_seeds(paths: list[Path]) -> dict:
    """One results dict from the per-seed runs of a suite and setting."""
    parts = [json.loads(path.read_text()) for path in paths]
    methods = {}
    for name in parts[0]["methods"]:
        methods[name] = build_summary([run for part in parts for run in part["methods"][name]["runs"]])
    config = {**parts[0]["config"], "seeds": ",".join(str(p["config"]["seeds"]) for p in parts)}
    return {"config": config, "methods": methods}


def _final(results: dict, method: str) -> float:
    return results["methods"][method]["final_accuracy"]["mean"]


def summary_markdown(merged: dict[tuple[str, str], dict], command: str) -> str:
    lines = ["# Class-incremental accuracy", "", f"Command: `{command}`", ""]
    for (suite, setting), results in merged.items():
        if "joint" not in results["methods"] or "linear@aligned" not in results["methods"]:
            lines += [f"## {suite}, {setting}", "", results_markdown(results), ""]
            continue
        headroom = _final(results, "joint") - _final(results, "linear@aligned")
        best_frozen = max(_final(results, m) for m in FROZEN_METHODS.split(","))
        sdlora = [m for m in results["methods"] if m.startswith("sdlora")]
        best_sdlora = max(sdlora, key=lambda m: _final(results, m))
        lines += [
            f"## {suite}, {setting}",
            "",
            f"Headroom (joint - frozen backbone with aligned head): {headroom:+.2f} points. Best SD-LoRA pipeline "
            f"`{best_sdlora}` {_final(results, best_sdlora):.2f} vs best frozen method {best_frozen:.2f} "
            f"({_final(results, best_sdlora) - best_frozen:+.2f}).",
            "",
            results_markdown(results),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", default=",".join(SUITES))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--jobs", type=int, default=1, help="suites run in parallel (e.g. 3 on one GPU)")
    parser.add_argument("--output", default="benchmarks/accuracy")
    parser.add_argument("--quick", action="store_true", help="tiny model and data: a smoke test of the pipeline")
    parser.add_argument("--data-root", type=Path, default=None, help="folder of save_to_disk datasets by suite name")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    runs = [(su, se, seed) for su in args.suites.split(",") for se in args.settings.split(",") for seed in SEEDS]
    with ThreadPoolExecutor(args.jobs) as pool:
        paths = list(pool.map(lambda run: run_one(*run, output, args.quick, args.data_root), runs))
    merged = {}
    for (suite, setting, _), path in zip(runs, paths):
        merged.setdefault((suite, setting), []).append(path)
    merged = {key: merge_seeds(group) for key, group in merged.items()}
    for (suite, setting), results in merged.items():
        atomic_write_bytes(output / suite / setting / "results.json", json.dumps(results, indent=1).encode())
    command = "python benchmarks/bench_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_bytes(output / "ACCURACY.md", summary_markdown(merged, command.strip()).encode())
    print((output / "ACCURACY.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
