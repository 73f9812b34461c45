"""Class-incremental accuracy of SD-LoRA and its peers on the offline benchmarks, with one command.

    python benchmarks/bench_accuracy.py                                  # every suite, setting and seed
    python benchmarks/bench_accuracy.py --suites clinc150 --seeds 0      # one suite, one seed
    python benchmarks/bench_accuracy.py --merge-only                     # rebuild ACCURACY.md from the runs on disk
    python benchmarks/bench_accuracy.py --suites digits --quick          # a smoke test of the pipeline

Every (suite, setting, seed) is one `sdlora-cil` process that runs all its methods, written to
OUTDIR/<suite>/<setting>/seed_<s>/; one process shares the frozen blocks' cached states between its methods, and a
run cut short keeps what finished (`--resume`). Methods asked for after a run finished run on their own, in
seed_<s>.1/ (then .2, ...); what is already on disk is never run again. The per-seed folders are local state; the
merged OUTDIR/<suite>/<setting>/results.json is what the repository keeps, and its runs count as done too, so a fresh
clone adds methods or seeds to the committed table without running the others again.

The search budget is the same for every adapted method: each runs at every setting of `SETTINGS` (learning rates of the
adapters and of the head) under every head of `HEADS`; the frozen-backbone methods, with nothing to tune but their
head, run once ("frozen") with every head. The summary (OUTDIR/ACCURACY.md) gives each method at its best setting and
at the shared default, the headroom (joint training minus the best frozen method) and the best SD-LoRA pipeline against
the best frozen method.

The best setting is chosen by the mean final accuracy over the seeds run, on the test split, in the same way for
every method: the numbers at the best setting are optimistic for all of them alike; the default-setting numbers are
not selected at all.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from sdlora_peft.continual.report import atomic_write_bytes, merge_results, results_markdown

ADAPTED = ("sdlora", "sdlora-rr", "sdlora-kd", "sdlora-fsa", "lora-seq", "lora-merge", "inflora", "olora", "joint")
FROZEN = ("ncm@ncm", "ncm@lda", "ncm@ranpac", "linear@linear", "linear@aligned")
HEADS = ("aligned-sdc", "ranpac")  # the heads the adapted methods are compared under (see the README for why)
TEXT = ["--model", "minilm", "--max-length", "32", "--dropout", "0", "--layers", "4,5"]
IMAGE = ["--model", "dinov2-small", "--image-size", "56", "--layers", "8,9,10,11"]
SUITES = {
    "clinc150": [*TEXT, "--dataset", "clinc150", "--num-tasks", "15", "--max-train-per-class", "40"],
    "banking77": [*TEXT, "--dataset", "banking77", "--num-tasks", "7", "--max-train-per-class", "40"],
    "glyphs": [*IMAGE, "--dataset", "glyphs", "--num-tasks", "6", "--max-train-per-class", "40",
               "--max-test-per-class", "20"],
    "mnist": [*IMAGE, "--dataset", "mnist", "--num-tasks", "5", "--max-train-per-class", "40",
              "--max-test-per-class", "200"],
    "fashion-mnist": [*IMAGE, "--dataset", "fashion-mnist", "--num-tasks", "5", "--max-train-per-class", "100",
                      "--max-test-per-class", "60"],
}  # fmt: skip
SETTINGS = {  # the grid every adapted method gets; "slow" is sdlora-cil's default
    "slow": ["--lr", "1e-4", "--head-lr", "1e-3"],
    "fast": ["--lr", "1e-3", "--head-lr", "1e-2"],
}
DEFAULT_SETTING = "slow"
COMMON = ["--epochs", "3", "--batch-size", "32"]
QUICK = ["--model", "tiny-dinov2", "--image-size", "32", "--epochs", "1", "--max-train-per-class", "20",
         "--max-test-per-class", "10", "--num-tasks", "3", "--ranpac-dim", "256"]  # fmt: skip
SEEDS = (0, 1, 2)


def entries(setting: str, methods: list[str]) -> list[str]:
    """The `--methods` entries of one setting: every adapted method of `methods` under every head."""
    if setting == "frozen":
        return list(FROZEN)
    return [f"{method}@{head}" for method in methods for head in HEADS]


def run_dir(output: Path, suite: str, setting: str, seed: int, part: int = 0) -> Path:
    """Where one seed's run lies; `part` > 0: a later run of methods added after the first one finished."""
    return output / suite / setting / (f"seed_{seed}" if part == 0 else f"seed_{seed}.{part}")


def _command(target: Path, suite: str, setting: str, seed: int, quick: bool, todo: list[str]) -> list[str]:
    """The `sdlora-cil` options of a new run of the entries `todo`, written to `target`."""
    suite_args = ["--dataset", suite, *QUICK] if quick else [*SUITES[suite], *COMMON]
    rates = SETTINGS.get(setting, SETTINGS[DEFAULT_SETTING])
    return [*suite_args, *rates, "--seeds", str(seed), "--methods", ",".join(todo), "--output", str(target)]


def _sdlora_cil(target: Path, command: list[str]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    with open(target / "run.log", "a") as log:
        subprocess.run([sys.executable, "-m", "sdlora_peft.continual.cli", *command], check=True, stdout=log,
                       stderr=subprocess.STDOUT)  # fmt: skip


def last_merge(folder: Path) -> dict:
    """The merged results.json under `folder` (a suite and setting) as the last merge wrote it; {} if none."""
    merged = folder / "results.json"
    return json.loads(merged.read_text()) if merged.exists() else {}


def run_one(suite: str, setting: str, seed: int, output: Path, quick: bool, methods: list[str]) -> None:
    """Run the entries of one setting and seed that no earlier run of it holds, in one `sdlora-cil` process.

    A run cut short is resumed first. Entries asked for later (a method added to the table) get a run folder of
    their own beside the earlier ones, and the merge joins them; nothing already run is run again."""
    merged = last_merge(output / suite / setting).get("methods", {})
    done = {name for name, summary in merged.items() if any(run["seed"] == seed for run in summary["runs"])}
    part = 0
    while (target := run_dir(output, suite, setting, seed, part)).joinpath("config.json").exists():
        if not (target / "results.json").exists():
            _sdlora_cil(target, ["--resume", str(target)])
        done |= set(json.loads((target / "results.json").read_text())["methods"])
        part += 1
    todo = [entry for entry in entries(setting, methods) if entry not in done]
    if todo:
        _sdlora_cil(target, _command(target, suite, setting, seed, quick, todo))


def merge_runs(folder: Path) -> dict | None:
    """One results dict from the per-seed runs under `folder` (a suite and setting) and the runs of the last merge
    whose seed folders are gone (a fresh clone); a seed folder's run wins over the merged copy. None if neither."""
    parts = [json.loads(path.read_text()) for path in sorted(folder.glob("seed_*/results.json"))]
    on_disk = {(name, run["seed"]) for part in parts for name, summary in part["methods"].items()
               for run in summary["runs"]}  # fmt: skip
    last = last_merge(folder)
    kept = {name: {"runs": runs} for name, summary in last.get("methods", {}).items()
            if (runs := [run for run in summary["runs"] if (name, run["seed"]) not in on_disk])}  # fmt: skip
    if kept:
        seeds = sorted({run["seed"] for summary in kept.values() for run in summary["runs"]})
        parts.insert(0, {"config": {**last["config"], "seeds": ",".join(map(str, seeds))}, "methods": kept})
    return merge_results(parts) if parts else None


def _final(results: dict, entry: str) -> float:
    return results["methods"][entry]["final_accuracy"]["mean"]


def _cell(results: dict, entry: str) -> str:
    summary = results["methods"][entry]
    final, forgetting = summary["final_accuracy"], summary["forgetting"]
    return f"{final['mean']:.2f} ± {final['std']:.2f} / {forgetting['mean']:.1f}"


def suite_summary(suite: str, by_setting: dict[str, dict]) -> list[str]:
    """The suite's section of ACCURACY.md: every adapted method under every head at its best and default setting,
    the frozen methods, the headroom and the best SD-LoRA pipeline against the best frozen method."""
    lines = [f"## {suite}", ""]
    first = next(iter(by_setting.values()))["config"]
    lines += [f"`{first['model']}` on {first['dataset']}, {first['num_tasks']} tasks; the full options are in each "
              "results.json. Cells: final accuracy ± std over seeds / forgetting.", ""]  # fmt: skip
    adapted = {name: results for name, results in by_setting.items() if name != "frozen"}
    best: dict[str, tuple[float, str]] = {}
    if adapted:
        header = "| method | " + " | ".join(f"{h}: best setting" for h in HEADS) + " | "
        header += " | ".join(f"{h}: default ({DEFAULT_SETTING})" for h in HEADS) + " |"
        lines += [header, "|---" * (1 + 2 * len(HEADS)) + "|"]
        for method in ADAPTED:
            cells_best, cells_default = [], []
            for head in HEADS:
                entry = f"{method}@{head}"
                present = {s: r for s, r in adapted.items() if entry in r["methods"]}
                if not present:
                    cells_best.append("-")
                    cells_default.append("-")
                    continue
                setting = max(present, key=lambda s: _final(present[s], entry))
                best[entry] = (_final(present[setting], entry), setting)
                cells_best.append(f"{_cell(present[setting], entry)} ({setting})")
                default = present.get(DEFAULT_SETTING)
                cells_default.append(_cell(default, entry) if default else "-")
            if any(cell != "-" for cell in cells_best):
                lines.append(f"| {method} | " + " | ".join(cells_best + cells_default) + " |")
        lines.append("")
    frozen = by_setting.get("frozen")
    if frozen:
        lines += ["| frozen backbone | final / forgetting |", "|---|---|"]
        lines += [f"| {entry} | {_cell(frozen, entry)} |" for entry in FROZEN if entry in frozen["methods"]]
        lines.append("")
    joint = [value for entry, value in best.items() if entry.startswith("joint@")]
    sdlora = {entry: value for entry, value in best.items() if entry.startswith("sdlora")}
    if frozen and frozen["methods"]:
        best_frozen = max(frozen["methods"], key=lambda entry: _final(frozen, entry))
        bar = _final(frozen, best_frozen)
        if joint:
            lines.append(f"Headroom (best joint - best frozen `{best_frozen}` {bar:.2f}): {max(joint)[0] - bar:+.2f}.")
        if sdlora:
            entry, (value, setting) = max(sdlora.items(), key=lambda item: item[1][0])
            lines.append(f"Best SD-LoRA pipeline `{entry}` ({setting}) {value:.2f}: {value - bar:+.2f} against it.")
        lines.append("")
    return lines


def summary_markdown(merged: dict[tuple[str, str], dict], command: str) -> str:
    origin = f"Last written by `{command}`, from every run here; the README lists the commands that ran them."
    lines = ["# Class-incremental accuracy", "", origin, ""]
    suites: dict[str, dict[str, dict]] = {}
    for (suite, setting), results in merged.items():
        suites.setdefault(suite, {})[setting] = results
    for suite, by_setting in suites.items():
        lines += suite_summary(suite, by_setting)
        for setting, results in by_setting.items():
            lines += [f"### {suite}, {setting}", "", results_markdown(results), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", default=",".join(SUITES))
    parser.add_argument("--settings", default=",".join(["frozen", *SETTINGS]))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--methods", default=",".join(ADAPTED), help="the adapted methods to run (a reduced table)")
    parser.add_argument("--output", default="benchmarks/accuracy")
    parser.add_argument("--quick", action="store_true", help="tiny model and data: a smoke test of the pipeline")
    parser.add_argument("--merge-only", action="store_true", help="only merge the runs already under --output")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    if unknown := sorted(set(methods) - set(ADAPTED)):
        parser.error(f"--methods: unknown {unknown}; choose from {list(ADAPTED)}")
    if not args.merge_only:
        for suite in args.suites.split(","):
            for seed in map(int, args.seeds.split(",")):
                for setting in args.settings.split(","):
                    run_one(suite, setting, seed, output, args.quick, methods)
    merged = {}
    for folder in sorted(p for p in output.glob("*/*") if p.is_dir()):
        results = merge_runs(folder)
        if results is not None:
            atomic_write_bytes(folder / "results.json", json.dumps(results, indent=1).encode())
            merged[(folder.parent.name, folder.name)] = results
    command = "python benchmarks/bench_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_bytes(output / "ACCURACY.md", summary_markdown(merged, command.strip()).encode())
    print((output / "ACCURACY.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
