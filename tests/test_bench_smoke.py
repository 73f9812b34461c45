"""The scaling benchmark runs end to end on a tiny model and reports every variant."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quick_benchmark_writes_every_variant(tmp_path, monkeypatch, dtype):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_scaling")
    results, plot = tmp_path / "RESULTS.md", tmp_path / "scaling.png"
    bench.main(["--quick", "--dtype", dtype, "--output", str(results), "--plot", str(plot)])

    rows = {line.split("|")[1].strip() for line in results.read_text().splitlines() if line.startswith("| ")}
    last = bench.TASK_GRID[-1]
    expected = {"base", "lora", "dora", f"sdlora-rr-t{last}"}
    expected |= {f"{kind}-t{tasks}" for kind in ("sdlora", "naive") for tasks in bench.TASK_GRID}
    expected |= {"SD-LoRA", f"SD-LoRA-KD (kd_threshold={bench.KD_THRESHOLD})"}  # advance_task timings
    assert expected <= rows
    assert (f"upcast-t{last}" in rows) == (dtype == "bfloat16"), "the float32 reference only where it differs"
    assert plot.stat().st_size > 0
