"""The accuracy benchmark merges its per-method, per-seed runs into one table with the headroom line."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from sdlora_peft.continual.metrics import summarize
from sdlora_peft.continual.report import build_summary

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _write_run(folder: Path, method: str, seed: int, final: float) -> None:
    matrix = [[90.0, None], [final + 10.0, final - 10.0]]
    run = {"seed": seed, "accuracy_matrix": matrix, **summarize(matrix, [10, 10])}
    config = {"model": "m", "dataset": "d", "num_tasks": 2, "head": "aligned", "lr": 1e-4, "head_lr": 1e-3,
              "seeds": seed, "methods": method}  # fmt: skip
    folder.mkdir(parents=True)
    results = {"config": config, "methods": {method: build_summary([run])}}
    (folder / "results.json").write_text(json.dumps(results))


def test_runs_merge_per_method_and_report_headroom(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_accuracy")
    finals = {"sdlora": (70.0, 74.0), "joint": (90.0, 90.0), "linear": (80.0, 84.0), "ncm": (50.0, 50.0)}
    for method, per_seed in finals.items():
        for seed, final in enumerate(per_seed):
            _write_run(bench.run_dir(tmp_path, "suite", "slow", seed, method), method, seed, final)

    bench.main(["--merge-only", "--output", str(tmp_path)])

    merged = json.loads((tmp_path / "suite" / "slow" / "results.json").read_text())
    assert list(merged["methods"]) == ["sdlora", "joint", "ncm", "linear"]  # the benchmark's order
    assert [run["seed"] for run in merged["methods"]["sdlora"]["runs"]] == [0, 1]
    assert merged["methods"]["sdlora"]["final_accuracy"]["mean"] == 72.0
    summary = (tmp_path / "ACCURACY.md").read_text()
    assert "Headroom (joint - frozen backbone with aligned head): +8.00 points" in summary
    assert "`sdlora` 72.00 vs best frozen method `linear` 82.00 (-10.00)" in summary
