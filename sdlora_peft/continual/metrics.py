"""Class-incremental learning metrics computed from an accuracy matrix.

``matrix[t][j]`` is the top-1 accuracy (percent, 0-100) on the test samples of task ``j``'s classes after
training task ``t``. Only the lower triangle (``j <= t``) is read; the upper triangle may hold anything,
including NaN. ``task_sizes[j]`` is the number of test samples of task ``j``, used to weight tasks the way
a pooled top-1 over all seen classes would.

Tasks are integer positions in the matrix, never string keys: sorting keys such as ``"100-119"`` and
``"20-39"`` as strings would scramble the matrix once there are more than 100 classes.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import evaluate

_CIL_METRIC_PATH = Path(__file__).parent / "cil_metric"

AccuracyMatrix = Sequence[Sequence[float | None]] | np.ndarray
"""`matrix[t][j]`; entries above the diagonal (tasks not yet seen) may be None."""


def _check_matrix(matrix: AccuracyMatrix) -> np.ndarray:
    """Return the matrix as a float array after checking it is square with a complete lower triangle."""
    try:
        array = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"accuracy matrix must be a square table of numbers: {error}") from None
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {array.shape}")
    rows, cols = np.tril_indices(array.shape[0])
    lower = array[rows, cols]
    if np.isnan(lower).any():
        t, j = rows[np.isnan(lower)][0], cols[np.isnan(lower)][0]
        raise ValueError(f"accuracy matrix has NaN at [{t}][{j}]: every entry with j <= t must be measured")
    if (lower < 0).any() or (lower > 100).any():
        raise ValueError("accuracy matrix entries must be percentages in [0, 100]")
    return array


def _check_sizes(task_sizes: Sequence[int], num_tasks: int) -> np.ndarray:
    sizes = np.asarray(task_sizes, dtype=np.float64)
    if sizes.shape != (num_tasks,):
        raise ValueError(f"task_sizes must have one entry per task ({num_tasks}), got shape {sizes.shape}")
    if not (sizes > 0).all():
        raise ValueError(f"task_sizes must be positive sample counts, got {list(task_sizes)}")
    return sizes


def incremental_accuracies(matrix: AccuracyMatrix, task_sizes: Sequence[int]) -> list[float]:
    """Accuracy over all seen classes after each task: ``A_t = sum_{j<=t} n_j a[t][j] / sum_{j<=t} n_j``."""
    array = _check_matrix(matrix)
    sizes = _check_sizes(task_sizes, len(array))
    return [float(array[t, : t + 1] @ sizes[: t + 1] / sizes[: t + 1].sum()) for t in range(len(array))]


def final_accuracy(matrix: AccuracyMatrix, task_sizes: Sequence[int]) -> float:
    """Accuracy over all classes after the last task (``A_N``)."""
    return incremental_accuracies(matrix, task_sizes)[-1]


def average_incremental_accuracy(matrix: AccuracyMatrix, task_sizes: Sequence[int]) -> float:
    """Mean of ``A_t`` over all tasks: rewards methods that stay accurate along the way, not only at the end."""
    return float(np.mean(incremental_accuracies(matrix, task_sizes)))


def forgetting(matrix: AccuracyMatrix) -> float:
    """Mean over old tasks ``j < N`` of ``max_{j <= l < N} a[l][j] - a[N][j]``; 0.0 for a single task.

    Not clipped: it is negative when the final model beats every earlier one on an old task. It is never
    below ``-backward_transfer`` because the maximum includes ``a[j][j]``.
    """
    array = _check_matrix(matrix)
    last = len(array) - 1
    if last == 0:
        return 0.0
    drops = [array[j:last, j].max() - array[last, j] for j in range(last)]
    return float(np.mean(drops))


def backward_transfer(matrix: AccuracyMatrix) -> float:
    """Mean over old tasks ``j < N`` of ``a[N][j] - a[j][j]`` (negative means forgetting); 0.0 for one task."""
    array = _check_matrix(matrix)
    last = len(array) - 1
    if last == 0:
        return 0.0
    return float(np.mean(array[last, :last] - np.diag(array)[:last]))


def summarize(matrix: AccuracyMatrix, task_sizes: Sequence[int]) -> dict[str, float]:
    """The four numbers a class-incremental run is reported with."""
    accuracies = incremental_accuracies(matrix, task_sizes)
    return {
        "final_accuracy": accuracies[-1],
        "average_incremental_accuracy": float(np.mean(accuracies)),
        "forgetting": forgetting(matrix),
        "bwt": backward_transfer(matrix),
    }


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and spread of one metric over runs (e.g. seeds).

    The spread is the sample standard deviation (ddof=1), the usual "mean +- std over 5 seeds" of papers;
    it is 0.0 for a single run, where it is undefined.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"mean_std needs a non-empty list of numbers, got shape {array.shape}")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "std": std}


def _as_int(value: Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def accuracy_matrix(
    predictions: Sequence[int],
    references: Sequence[int],
    steps: Sequence[int],
    task_of_class: Mapping[int, int],
) -> tuple[np.ndarray, list[int]]:
    """Build the accuracy matrix and task sizes from per-sample predictions.

    Each sample is one test prediction made after training task ``steps[i]``; ``task_of_class`` maps a
    class id to the integer index of the task that introduced it. Steps must run 0..N-1 and every step
    must have evaluated the same samples of every seen task. Samples of tasks not yet seen at their step
    fill the upper triangle; those of tasks beyond the last step are ignored.

    Returns ``(matrix, task_sizes)``: an N x N array in percent (NaN where nothing was measured) and the
    number of test samples of each task.
    """
    task_of = {_as_int(c, "class id"): _as_int(t, "task index") for c, t in task_of_class.items()}
    predicted, true, step = (np.asarray(x, dtype=np.int64) for x in (predictions, references, steps))
    if not predicted.shape == true.shape == step.shape or predicted.ndim != 1:
        raise ValueError("predictions, references and steps must be 1-D and of the same length")
    if predicted.size == 0:
        raise ValueError("no samples to evaluate")
    unknown = sorted(set(true.tolist()) - task_of.keys())
    if unknown:
        raise ValueError(f"classes {unknown} are missing from task_of_class")
    task = np.array([task_of[c] for c in true.tolist()], dtype=np.int64)
    if task.min() < 0:
        raise ValueError("task indices in task_of_class must be >= 0")
    num_tasks = int(step.max()) + 1
    if step.min() < 0 or len(np.unique(step)) != num_tasks:
        raise ValueError(f"steps must cover 0..{num_tasks - 1} without gaps, got {np.unique(step).tolist()}")

    keep = task < num_tasks
    cell = step[keep] * num_tasks + task[keep]
    counts = np.bincount(cell, minlength=num_tasks**2).reshape(num_tasks, num_tasks)
    hits = np.bincount(cell, weights=predicted[keep] == true[keep], minlength=num_tasks**2)
    with np.errstate(invalid="ignore"):
        matrix = 100.0 * hits.reshape(num_tasks, num_tasks) / counts
    for j in range(num_tasks):
        seen = counts[j:, j]
        if (seen == 0).any():
            raise ValueError(f"task {j} has no test samples after step {j + int(np.argmin(seen))}")
        if (seen != seen[0]).any():
            raise ValueError(f"task {j} was evaluated on different numbers of samples across steps: {seen.tolist()}")
    return matrix, counts[-1].tolist()


def load_cil_metric(**kwargs) -> evaluate.EvaluationModule:
    """Load the ``evaluate`` module shipped with this package; works offline since it is a local path.

    Keyword arguments go to ``evaluate.load`` (e.g. ``keep_in_memory=True``).
    """
    import evaluate

    return evaluate.load(str(_CIL_METRIC_PATH), **kwargs)
