"""The scaling benchmark runs end to end on a tiny model and reports every variant, with ratios over runs."""

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
    bench.main(["--quick", "--runs", "2", "--dtype", dtype, "--output", str(results), "--plot", str(plot)])

    rows: dict[str, str] = {}  # each variant's first row: the training table's
    for line in results.read_text().splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    last = bench.TASK_GRID[-1]
    expected = {"base", "lora", "dora", f"sdlora-rr-t{last}", f"sdlora-t{last}-recompute"}
    expected |= {f"{kind}-t{tasks}" for kind in ("sdlora", "naive") for tasks in bench.TASK_GRID}
    expected |= {"lora@b8", f"sdlora-t{last}@b8", f"sdlora-t{last}-recompute@b8"}  # the many-token point
    expected |= {"SD-LoRA", f"SD-LoRA-KD (kd_threshold={bench.KD_THRESHOLD})"}  # advance_task timings
    assert expected <= rows.keys()
    # the tiny model's 32 x 32 layers fold from 16 tokens on: the main point (10 tokens) does not, batch 8 (40) does
    assert "auto: lowrank" in rows[f"sdlora-t{last}"] and f"sdlora-t{last}-fold" in rows
    assert "auto: fold" in rows[f"sdlora-t{last}@b8"] and f"sdlora-t{last}-lowrank@b8" in rows
    assert "auto: fold+recompute" in rows[f"sdlora-t{last}-recompute@b8"]
    half = {f"upcast-t{last}", "lora-bf16-adapters", f"sdlora-t{last}-bf16-adapters"}
    assert (half <= rows.keys()) == (dtype == "bfloat16"), "the half-precision references only where they differ"
    assert " (" in rows[f"sdlora-t{last}"], "each ratio's range over the two runs"
    assert plot.stat().st_size > 0
