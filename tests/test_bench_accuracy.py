"""The accuracy benchmark merges its per-seed runs and reports each method at its best and default setting."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

from sdlora_peft.continual.metrics import incremental_accuracies, summarize
from sdlora_peft.continual.report import build_summary

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _write_run(folder: Path, seed: int, finals: dict[str, float]) -> None:
    """One seed's results.json with a two-task run per entry, ending at the given final accuracy."""
    methods = {}
    for entry, final in finals.items():
        matrix = [[90.0, None], [final + 10.0, final - 10.0]]
        run = {"seed": seed, "accuracy_matrix": matrix, **summarize(matrix, [10, 10])}
        methods[entry] = build_summary([{**run, "incremental_accuracies": incremental_accuracies(matrix, [10, 10])}])
    config = {"model": "m", "dataset": "d", "num_tasks": 2, "seeds": seed, "methods": ",".join(finals)}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"config": config, "methods": methods}))


def test_runs_merge_and_each_method_is_reported_at_its_best_setting(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_accuracy")
    head = bench.HEADS[0]
    per_setting = {
        "slow": {f"sdlora@{head}": (70.0, 74.0), f"joint@{head}": (90.0, 90.0)},
        "fast": {f"sdlora@{head}": (80.0, 82.0), f"joint@{head}": (88.0, 88.0)},
        "frozen": {"ncm@lda": (84.0, 84.0), "ncm@ncm": (50.0, 50.0)},
    }
    for setting, finals in per_setting.items():
        for seed in (0, 1):
            _write_run(bench.run_dir(tmp_path, "suite", setting, seed), seed, {e: v[seed] for e, v in finals.items()})

    bench.main(["--merge-only", "--output", str(tmp_path)])

    merged = json.loads((tmp_path / "suite" / "fast" / "results.json").read_text())
    assert [run["seed"] for run in merged["methods"][f"sdlora@{head}"]["runs"]] == [0, 1]
    assert merged["methods"][f"sdlora@{head}"]["final_accuracy"]["mean"] == 81.0
    summary = (tmp_path / "ACCURACY.md").read_text()
    assert "| sdlora | 81.00 ± 1.41 / -1.0 (fast) |" in summary  # best setting: fast
    assert "| 72.00 ± 2.83 / 8.0 |" in summary  # and at the default (slow)
    assert "| lora-seq |" not in summary  # not run
    assert "Headroom (best joint - best frozen `ncm@lda` 84.00): +6.00." in summary
    assert f"Best SD-LoRA pipeline `sdlora@{head}` (fast) 81.00: -3.00 against it." in summary


def test_merge_script_joins_runs_split_over_processes(tmp_path, monkeypatch):
    """Seeds 0 and 1 written by two processes: merged, one results.json with both seeds, its table and plots."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    merge = importlib.import_module("merge_results")
    for seed in (0, 1):
        _write_run(tmp_path / f"seed{seed}", seed, {"sdlora": 70.0 + 4 * seed, "lora-seq": 60.0})

    assert merge.main([str(tmp_path / "merged"), str(tmp_path / "seed0"), str(tmp_path / "seed1")]) == 0

    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["config"]["seeds"] == "0,1"
    assert merged["methods"]["sdlora"]["final_accuracy"]["mean"] == 72.0
    assert "| sdlora | 72.00 ± 2.83 |" in (tmp_path / "merged" / "results.md").read_text()
    assert (tmp_path / "merged" / "accuracy_curves.png").stat().st_size > 0


def test_a_method_added_later_runs_beside_the_earlier_run(tmp_path, monkeypatch):
    """seed 0 already holds sdlora's entries; asking for sdlora and lora-merge runs only lora-merge, in a folder of
    its own, leaves the first run as it was, and the merge holds all four entries."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_accuracy")
    first = bench.run_dir(tmp_path, "digits", "slow", 0)
    _write_run(first, 0, {f"sdlora@{head}": 70.0 for head in bench.HEADS})
    (first / "config.json").write_text("{}")
    before = (first / "results.json").read_bytes()

    bench.main(["--quick", "--suites", "digits", "--settings", "slow", "--seeds", "0", "--methods",
                "sdlora,lora-merge", "--output", str(tmp_path)])  # fmt: skip

    added = json.loads((bench.run_dir(tmp_path, "digits", "slow", 0, part=1) / "results.json").read_text())
    assert sorted(added["methods"]) == sorted(f"lora-merge@{head}" for head in bench.HEADS)
    assert (first / "results.json").read_bytes() == before
    merged = json.loads((tmp_path / "digits" / "slow" / "results.json").read_text())
    assert sorted(merged["methods"]) == sorted(f"{m}@{head}" for m in ("sdlora", "lora-merge") for head in bench.HEADS)
    bench.main(["--quick", "--suites", "digits", "--settings", "slow", "--seeds", "0", "--methods",
                "sdlora,lora-merge", "--output", str(tmp_path)])  # fmt: skip
    assert not bench.run_dir(tmp_path, "digits", "slow", 0, part=2).exists()  # nothing left to run


def test_a_fresh_clone_adds_a_method_to_the_committed_table_without_running_the_others(tmp_path, monkeypatch):
    """Only the merged results.json is committed: with no seed folders, its runs count as done and stay in the
    merge beside a method run now; a seed folder's own run wins over the merged copy of the same method and seed."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_accuracy")
    for seed in (0, 1):
        finals = {f"sdlora@{head}": 70.0 + seed for head in bench.HEADS}
        _write_run(bench.run_dir(tmp_path, "digits", "slow", seed), seed, finals)
    bench.main(["--merge-only", "--output", str(tmp_path)])
    for seed in (0, 1):  # what a fresh clone lacks
        shutil.rmtree(bench.run_dir(tmp_path, "digits", "slow", seed))

    bench.main(["--quick", "--suites", "digits", "--settings", "slow", "--seeds", "0", "--methods",
                "sdlora,lora-merge", "--output", str(tmp_path)])  # fmt: skip

    added = json.loads((bench.run_dir(tmp_path, "digits", "slow", 0) / "results.json").read_text())
    assert sorted(added["methods"]) == sorted(f"lora-merge@{head}" for head in bench.HEADS)
    merged = json.loads((tmp_path / "digits" / "slow" / "results.json").read_text())
    sdlora = merged["methods"][f"sdlora@{bench.HEADS[0]}"]
    assert [run["seed"] for run in sdlora["runs"]] == [0, 1] and sdlora["final_accuracy"]["mean"] == 70.5
    assert [run["seed"] for run in merged["methods"][f"lora-merge@{bench.HEADS[0]}"]["runs"]] == [0]
    assert merged["config"]["seeds"] == "0,1"

    _write_run(bench.run_dir(tmp_path, "digits", "slow", 1), 1, {f"sdlora@{h}": 80.0 for h in bench.HEADS})
    bench.main(["--merge-only", "--output", str(tmp_path)])
    rerun = json.loads((tmp_path / "digits" / "slow" / "results.json").read_text())["methods"]
    assert rerun[f"sdlora@{bench.HEADS[0]}"]["final_accuracy"]["mean"] == 75.0  # seed 1 from its folder: 80
