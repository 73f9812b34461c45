"""Aggregate class-incremental runs over seeds and report them as JSON, Markdown and a console table.

``results`` is the dict ``sdlora-cil`` writes to ``results.json``: ``{"config": {...}, "methods": {name:
summary}}``, where each summary holds ``{"mean", "std"}`` of the four headline metrics (percent) and the
per-seed ``runs`` they came from. Methods are reported in the order they appear in ``results["methods"]``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdlora_peft.continual.metrics import mean_std

HEADLINE_METRICS = ("final_accuracy", "average_incremental_accuracy", "forgetting", "bwt")
COLUMNS = (
    "Method",
    "Final acc",
    "AAA",
    "Forgetting",
    "BWT",
    "Task-aware acc",
    "Stored adapter params",
    "Train s",
)
MISSING = "–"


def build_summary(runs: list[dict]) -> dict:
    """One method's entry of ``results["methods"]``: mean and std over seeds of each headline metric, and the runs.

    Each run already holds its own headline numbers (computed from its accuracy matrix by
    ``metrics.summarize``); the spread is the sample std of ``metrics.mean_std``.
    """
    if not runs:
        raise ValueError("build_summary needs at least one run")
    summary: dict[str, Any] = {name: mean_std([run[name] for run in runs]) for name in HEADLINE_METRICS}
    summary["runs"] = runs
    return summary


def merge_results(parts: Sequence[Mapping]) -> dict:
    """One ``results`` from several (runs of other seeds or methods with otherwise the same options, e.g. written
    by separate processes): each method's runs joined in order, its summary rebuilt, the seeds of every part in
    the config. A (method, seed) pair found twice is refused, since one of the two would be silently lost."""
    if not parts:
        raise ValueError("merge_results needs at least one results dict")
    runs: dict[str, list[dict]] = {}
    for part in parts:
        for name, summary in part["methods"].items():
            known = {run["seed"] for run in runs.get(name, [])}
            for run in summary["runs"]:
                if run["seed"] in known:
                    raise ValueError(f"{name} seed {run['seed']} is in two of the results merged; keep one of them.")
                runs.setdefault(name, []).append(run)
    seeds = sorted({int(seed) for part in parts for seed in str(part["config"]["seeds"]).split(",")})
    config = {**parts[0]["config"], "seeds": ",".join(map(str, seeds)), "output": None}
    return {"config": config, "methods": {name: build_summary(method_runs) for name, method_runs in runs.items()}}


def _mean_of(runs: Sequence[Mapping], key: str) -> float | None:
    """Mean over runs of an optional per-run number; None when no run has it."""
    values = [run[key] for run in runs if run.get(key) is not None]
    return float(np.mean(values)) if values else None


def _format(value: float | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def _row(name: str, summary: Mapping) -> list[str]:
    """The table cells of one method, in the order of ``COLUMNS``."""
    runs = summary["runs"]
    headline = [f"{summary[m]['mean']:.2f} ± {summary[m]['std']:.2f}" for m in HEADLINE_METRICS]
    return [
        name,
        *headline,
        _format(_mean_of(runs, "task_aware_final_accuracy"), ".2f"),
        _format(_mean_of(runs, "stored_adapter_parameters"), ",.0f"),
        _format(_mean_of(runs, "train_seconds"), ".1f"),
    ]


def _seeds_line(methods: Mapping[str, Mapping]) -> str:
    """Say over how many seeds the numbers were taken, per method when methods differ."""
    seeds = {name: [run["seed"] for run in summary["runs"]] for name, summary in methods.items()}
    distinct = {tuple(s) for s in seeds.values()}
    if len(distinct) == 1:
        (only,) = distinct
        counted = f"{len(only)} seed{'s' * (len(only) != 1)} ({', '.join(map(str, only))})"
    else:
        counted = "seeds per method: " + ", ".join(f"{name} {len(s)}" for name, s in seeds.items())
    return (
        f"Mean ± sample std over {counted}. Accuracies, forgetting and BWT in %; AAA = average incremental "
        "accuracy; task-aware acc and train time are means over seeds."
    )


def results_markdown(results: Mapping) -> str:
    """A Markdown table of the methods (one row each, in order) followed by the line saying how many seeds."""
    methods = results["methods"]
    align = ["---"] + ["---:"] * (len(COLUMNS) - 1)
    lines = [_markdown_line(COLUMNS), _markdown_line(align)]
    lines += [_markdown_line(_row(name, summary)) for name, summary in methods.items()]
    return "\n".join(lines) + "\n\n" + _seeds_line(methods) + "\n"


def _markdown_line(cells: Sequence[str]) -> str:
    """A table row; a ``|`` inside a method name is escaped so it cannot open a new column."""
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def console_table(results: Mapping) -> str:
    """The Markdown table's content as aligned plain text for a terminal: names left, numbers right."""
    methods = results["methods"]
    rows = [list(COLUMNS)] + [_row(name, summary) for name, summary in methods.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join(cells)

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(rows[0]), rule, *map(line, rows[1:]), "", _seeds_line(methods)]) + "\n"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    A reader, or a run killed mid-write, sees either the old file or the new one, never half of one. The
    temporary file gets the usual permissions (0o666 less the umask), not ``tempfile``'s private 0o600.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Build a directory with ``write(tmp)`` in a temporary sibling and rename it to ``path``.

    Used for whatever a library writes as a directory (``save_pretrained``): a run killed while writing leaves no
    half-written ``path``, only a hidden temporary directory. The files are synced before the rename. An existing
    ``path`` is first moved aside to a hidden name and removed once the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    old = tmp.with_suffix(".old")
    try:
        tmp.mkdir()
        write(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Write ``value`` as strict JSON (see ``_jsonable``), atomically; the directory is created if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(value), indent=2, ensure_ascii=False, allow_nan=False, default=str) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays become Python ones, NaN and infinities become null.

    ``json`` would otherwise write ``NaN``, which strict JSON readers reject.
    """
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(results: Mapping, outdir: str | os.PathLike) -> list[Path]:
    """Write ``results.json`` and ``results.md`` into ``outdir`` (created if needed), each atomically.

    Objects JSON cannot hold (a ``Path`` or dtype in the config) are written as their ``str``.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    return [
        write_json(outdir / "results.json", results),
        atomic_write_bytes(outdir / "results.md", results_markdown(results).encode("utf-8")),
    ]
