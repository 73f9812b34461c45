"""Aggregation over seeds, the Markdown and console tables, and atomic results files."""

import json
import math

import numpy as np
import pytest

from sdlora_peft.continual import metrics
from sdlora_peft.continual.report import (
    atomic_write_bytes,
    atomic_write_dir,
    build_summary,
    console_table,
    merge_results,
    results_markdown,
    write_json,
    write_results,
)

N = None  # tasks not yet seen: null in results.json
SIZES = [100, 100, 200]
MATRICES = {
    # seed 0 is test_metrics' hand-computed matrix: final 56.25, AAA 73.75, forgetting 17.5, BWT -17.5.
    # seed 1: A_t = 92, 78, (7000 + 6900 + 10400) / 400 = 60.75; forgetting mean(22, 3) = 12.5; BWT -12.5.
    "sdlora": [
        [[90.0, N, N], [80.0, 70.0, N], [60.0, 65.0, 50.0]],
        [[92.0, N, N], [84.0, 72.0, N], [70.0, 69.0, 52.0]],
    ],
    # both seeds: A_t = 95, 50, (500 + 800 + 17600) / 400 = 47.25; forgetting mean(90, 82) = 86; BWT -86.
    "seq-lora": [[[95.0, N, N], [10.0, 90.0, N], [5.0, 8.0, 88.0]]] * 2,
}
MAGNITUDES = [[1.0], [0.8, 1.1], [0.7, 0.9, 1.2]]


def _run(seed: int, matrix: list, method: str) -> dict:
    lower = [[value if value is not None else math.nan for value in row] for row in matrix]
    return {
        "seed": seed,
        "accuracy_matrix": matrix,
        **metrics.summarize(lower, SIZES),
        "task_aware_final_accuracy": {"sdlora": 80.0 + 2 * seed, "seq-lora": 90.0}[method],
        "train_seconds": 12.0 + 2 * seed,
        "trainable_parameters": 368_650,
        "stored_adapter_parameters": 1_105_920,
        "incremental_accuracies": metrics.incremental_accuracies(lower, SIZES),
        "magnitudes": MAGNITUDES if method == "sdlora" else None,
    }


def make_results() -> dict:
    """2 methods x 2 seeds x 3 tasks with hand-checked numbers; seq-lora's seeds agree (std 0)."""
    methods = {
        name: build_summary([_run(seed, matrix, name) for seed, matrix in enumerate(matrices)])
        for name, matrices in MATRICES.items()
    }
    return {"config": {"dataset": "toy", "num_tasks": 3}, "methods": methods}


def test_build_summary_means_and_sample_std():
    methods = make_results()["methods"]
    spread = 4.5 / math.sqrt(2)  # sample std of (56.25, 60.75)
    assert methods["sdlora"]["final_accuracy"] == pytest.approx({"mean": 58.5, "std": spread})
    assert methods["sdlora"]["average_incremental_accuracy"]["mean"] == pytest.approx((73.75 + 230.75 / 3) / 2)
    assert methods["sdlora"]["forgetting"] == pytest.approx({"mean": 15.0, "std": 5 / math.sqrt(2)})
    assert methods["sdlora"]["bwt"] == pytest.approx({"mean": -15.0, "std": 5 / math.sqrt(2)})
    assert methods["seq-lora"]["final_accuracy"] == pytest.approx({"mean": 47.25, "std": 0.0})
    assert methods["seq-lora"]["forgetting"] == pytest.approx({"mean": 86.0, "std": 0.0})
    assert [run["seed"] for run in methods["sdlora"]["runs"]] == [0, 1]


def test_build_summary_needs_runs():
    with pytest.raises(ValueError, match="at least one run"):
        build_summary([])


def _part(seeds: list[int], methods: list[str]) -> dict:
    """The results one process would write for these seeds and methods."""
    summaries = {name: build_summary([_run(s, MATRICES[name][s], name) for s in seeds]) for name in methods}
    return {"config": {"dataset": "toy", "seeds": ",".join(map(str, seeds)), "output": "a"}, "methods": summaries}


def test_merge_results_equals_one_run_of_every_seed():
    """Seed 0 of both methods in one process, seed 1 of each in two others: merged, the same as one process."""
    merged = merge_results([_part([0], ["sdlora", "seq-lora"]), _part([1], ["sdlora"]), _part([1], ["seq-lora"])])
    assert merged["methods"] == make_results()["methods"]
    assert merged["config"] == {"dataset": "toy", "seeds": "0,1", "output": None}


def test_merge_results_refuses_a_seed_twice():
    with pytest.raises(ValueError, match="sdlora seed 0 is in two"):
        merge_results([_part([0], ["sdlora"]), _part([0, 1], ["sdlora"])])
    with pytest.raises(ValueError, match="at least one"):
        merge_results([])


def test_markdown_rows_in_method_order_with_mean_and_std():
    text = results_markdown(make_results())
    lines = text.splitlines()
    assert lines[0].startswith("| Method | Final acc | AAA | Forgetting | BWT |")
    assert lines[2] == (
        "| sdlora | 58.50 ± 3.18 | 75.33 ± 2.24 | 15.00 ± 3.54 | -15.00 ± 3.54 | 81.00 | 1,105,920 | 13.0 |"
    )
    assert lines[3] == (
        "| seq-lora | 47.25 ± 0.00 | 64.08 ± 0.00 | 86.00 ± 0.00 | -86.00 ± 0.00 | 90.00 | 1,105,920 | 13.0 |"
    )
    assert "over 2 seeds (0, 1)" in lines[-1]


def test_markdown_keeps_opaque_names_in_one_cell():
    results = make_results()
    results["methods"] = {"sdlora@linear": results["methods"]["sdlora"], "a|b": results["methods"]["seq-lora"]}
    lines = results_markdown(results).splitlines()[:4]
    assert lines[2].startswith("| sdlora@linear |")
    assert lines[3].startswith("| a\\|b |")
    assert len({line.replace("\\|", "").count("|") for line in lines}) == 1


def test_missing_optional_numbers_and_differing_seeds():
    results = make_results()
    results["methods"]["seq-lora"] = build_summary(
        [{**results["methods"]["seq-lora"]["runs"][0], "task_aware_final_accuracy": None}]
    )
    text = results_markdown(results)
    assert "| seq-lora | 47.25 ± 0.00 | 64.08 ± 0.00 | 86.00 ± 0.00 | -86.00 ± 0.00 | – |" in text
    assert "seeds per method: sdlora 2, seq-lora 1" in text


def test_console_table_is_aligned():
    lines = console_table(make_results()).splitlines()
    table = lines[:4]
    assert len({len(line) for line in table}) == 1
    assert set(table[1]) == {"-", " "}
    assert table[2].startswith("sdlora  ") and "58.50 ± 3.18" in table[2] and table[2].endswith("13.0")
    assert table[3].startswith("seq-lora") and "-86.00 ± 0.00" in table[3]
    assert "2 seeds" in lines[-1]


def test_write_results_round_trips(tmp_path):
    results = make_results()
    outdir = tmp_path / "new" / "dir"
    paths = write_results(results, outdir)
    assert [p.name for p in paths] == ["results.json", "results.md"]
    assert json.loads((outdir / "results.json").read_text(encoding="utf-8")) == results
    assert (outdir / "results.md").read_text(encoding="utf-8") == results_markdown(results)
    assert sorted(p.name for p in outdir.iterdir()) == ["results.json", "results.md"]  # no temp files left


def test_write_results_makes_strict_json(tmp_path):
    results = make_results()
    results["config"] = {"lr": np.float32(0.5), "steps": np.int64(3), "bad": math.nan, "out": tmp_path}
    write_results(results, tmp_path)
    text = (tmp_path / "results.json").read_text(encoding="utf-8")
    config = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))["config"]
    assert config == {"lr": 0.5, "steps": 3, "bad": None, "out": str(tmp_path)}


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "missing" / "file.bin", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_atomic_write_dir_replaces_a_directory_whole(tmp_path):
    target = tmp_path / "adapter"

    def write(version: str):
        return lambda directory: (directory / "weights.bin").write_text(version)

    atomic_write_dir(target, write("old"))
    atomic_write_dir(target, write("new"))
    assert (target / "weights.bin").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_write_dir_interrupted_leaves_the_old_directory(tmp_path):
    """A write that fails half-way (as a killed save_pretrained would) changes nothing and leaves no temporary."""
    target = tmp_path / "adapter"
    atomic_write_dir(target, lambda directory: (directory / "weights.bin").write_text("old"))

    def half_written(directory):
        (directory / "weights.bin").write_text("ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_dir(target, half_written)
    assert (target / "weights.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_write_json_creates_the_directory(tmp_path):
    path = write_json(tmp_path / "runs" / "seed_0.json", {"accuracy": np.float32(0.5), "bwt": math.nan})
    assert json.loads(path.read_text()) == {"accuracy": 0.5, "bwt": None}
