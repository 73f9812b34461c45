"""Figures of a class-incremental ``results`` dict (see ``report``): accuracy curves, matrices, magnitudes.

Figures are ``matplotlib.figure.Figure`` objects drawn on an Agg canvas, never through ``pyplot``, so
plotting from a notebook or an interactive session neither switches nor disturbs the user's backend.
Tasks are shown 1-based; accuracies on a fixed 0-100 scale so figures of different runs compare by eye.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sdlora_peft.continual.metrics import mean_std
from sdlora_peft.continual.report import atomic_write_bytes

DPI = 120


def _save(figure: Figure, path: Path) -> Path:
    """Render to PNG in memory, then write it atomically."""
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)  # draw on Agg explicitly: pyplot and the user's backend stay untouched
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def _task_axis(axes: Axes, num_tasks: int) -> None:
    """An x axis of 1-based, integer task numbers: the number of tasks learned so far."""
    axes.set_xlabel("Tasks learned")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlim(0.5, num_tasks + 0.5)


def _file_stems(names: list[str]) -> dict[str, str]:
    """A file-name-safe, unique stem per method name (names are free text, e.g. ``sdlora@linear``)."""
    stems: dict[str, str] = {}
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "method"
        while stem in stems.values():
            stem += "_"
        stems[name] = stem
    return stems


def _seed_count(num_seeds: int) -> str:
    return f"{num_seeds} seed{'s' * (num_seeds != 1)}"


def plot_accuracy_curves(results: Mapping, path: str | os.PathLike) -> Path:
    """Accuracy on all seen classes after each task (``A_t``), per method: mean over seeds with a ±std band."""
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    num_tasks = 1
    for name, summary in results["methods"].items():
        curves = [run["incremental_accuracies"] for run in summary["runs"]]
        if len({len(curve) for curve in curves}) != 1:
            raise ValueError(f"runs of method {name!r} have different numbers of tasks")
        stats = [mean_std(column) for column in zip(*curves)]
        mean = np.array([s["mean"] for s in stats])
        std = np.array([s["std"] for s in stats])
        tasks = np.arange(1, len(mean) + 1)
        (line,) = axes.plot(tasks, mean, marker="o", label=f"{name} ({_seed_count(len(curves))})")
        axes.fill_between(tasks, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        num_tasks = max(num_tasks, len(mean))
    _task_axis(axes, num_tasks)
    axes.set_ylim(0, 100)
    axes.set_ylabel("Accuracy on all seen classes (%)")
    axes.set_title("Incremental accuracy $A_t$ (mean ± std over seeds)")
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    return _save(figure, Path(path))


def _mean_matrix(name: str, runs: list) -> np.ndarray:
    """Mean accuracy matrix over seeds; the upper triangle (tasks not yet seen) is NaN."""
    matrices = [np.array(run["accuracy_matrix"], dtype=np.float64) for run in runs]
    if len({m.shape for m in matrices}) != 1:
        raise ValueError(f"runs of method {name!r} have accuracy matrices of different shapes")
    mean = np.mean(matrices, axis=0)
    mean[np.triu_indices(len(mean), k=1)] = np.nan
    return mean


def _plot_matrix(name: str, matrix: np.ndarray, num_seeds: int) -> Figure:
    """A heatmap of the lower triangle, every cell annotated with its value."""
    num_tasks = len(matrix)
    side = max(4.8, 0.5 * num_tasks + 2.5)
    figure = Figure(figsize=(side + 1.0, side))
    axes = figure.add_subplot()
    extent = (0.5, num_tasks + 0.5, num_tasks + 0.5, 0.5)
    image = axes.imshow(matrix, cmap="viridis", vmin=0, vmax=100, extent=extent)
    figure.colorbar(image, ax=axes, label="Accuracy (%)", fraction=0.046, pad=0.04)
    digits, size = (1, 10) if num_tasks <= 8 else (0, 8)  # from 9 tasks on a cell is about half an inch wide
    for t, j in zip(*np.tril_indices(num_tasks)):
        value = matrix[t, j]
        color = "white" if value < 50 else "black"
        axes.text(int(j) + 1, int(t) + 1, f"{value:.{digits}f}", ha="center", va="center", color=color, fontsize=size)
    axes.set_xlabel("Evaluated on the classes of task j")
    axes.set_ylabel("After learning task t")
    axes.set_xticks(range(1, num_tasks + 1))
    axes.set_yticks(range(1, num_tasks + 1))
    axes.set_title(f"{name}\naccuracy per task (%), mean of {_seed_count(num_seeds)}")
    return figure


def plot_accuracy_matrices(results: Mapping, outdir: str | os.PathLike) -> list[Path]:
    """One heatmap per method of the accuracy matrix ``a[t][j]`` averaged over seeds: where forgetting happens."""
    methods = results["methods"]
    stems = _file_stems(list(methods))
    paths = []
    for name, summary in methods.items():
        figure = _plot_matrix(name, _mean_matrix(name, summary["runs"]), len(summary["runs"]))
        paths.append(_save(figure, Path(outdir) / f"accuracy_matrix_{stems[name]}.png"))
    return paths


def _plot_magnitude_run(name: str, run: Mapping) -> Figure:
    """One line per task direction: its magnitude after each task, from the task that introduced it on.

    ``magnitudes[t][k]`` is direction ``k``'s magnitude after task ``t``; a null entry (a direction no longer
    kept) leaves a gap.
    """
    magnitudes = run["magnitudes"]
    num_tasks = len(magnitudes)
    num_directions = max(len(row) for row in magnitudes)
    table = np.full((num_tasks, num_directions), np.nan)
    for t, row in enumerate(magnitudes):
        table[t, : len(row)] = np.array(row, dtype=np.float64)
    figure = Figure(figsize=(7.2, 4.2))
    axes = figure.add_subplot()
    tasks = np.arange(1, num_tasks + 1)
    colors = colormaps["viridis"](np.linspace(0, 0.9, num_directions))
    for k in range(num_directions):
        axes.plot(tasks, table[:, k], marker="o", markersize=3, color=colors[k], label=f"task {k + 1}")
    _task_axis(axes, num_tasks)
    axes.set_ylabel("Magnitude α (mean over layers if per-layer)")
    axes.set_title(f"{name}: magnitude of each task's direction (seed {run['seed']})")
    axes.grid(alpha=0.3)
    axes.legend(title="direction of", loc="upper left", bbox_to_anchor=(1.01, 1), ncols=1 + num_directions // 16)
    return figure


def plot_magnitudes(results: Mapping, outdir: str | os.PathLike) -> list[Path]:
    """For each method that records magnitudes, how every task direction's magnitude moves as tasks arrive.

    The first run with magnitudes is drawn (its seed is in the title): a mean over seeds would blur how
    single directions are re-weighted, which is what the plot is for.
    """
    methods = results["methods"]
    stems = _file_stems(list(methods))
    paths = []
    for name, summary in methods.items():
        run = next((run for run in summary["runs"] if any(run.get("magnitudes") or [])), None)  # a kept direction
        if run is not None:
            paths.append(_save(_plot_magnitude_run(name, run), Path(outdir) / f"magnitudes_{stems[name]}.png"))
    return paths


def write_plots(results: Mapping, outdir: str | os.PathLike) -> list[Path]:
    """Write every figure as PNG into ``outdir`` (created if needed) and return their paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    return [
        plot_accuracy_curves(results, outdir / "accuracy_curves.png"),
        *plot_accuracy_matrices(results, outdir),
        *plot_magnitudes(results, outdir),
    ]
