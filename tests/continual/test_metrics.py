"""Class-incremental metrics: hand-computed matrices, properties, and the `evaluate` module."""

import math
import socket

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdlora_peft.continual import metrics
from sdlora_peft.continual.data import TaskSplit

NAN = float("nan")

# a[t][j]; upper triangle unused. Test sizes: 100, 100, 200 samples.
MATRIX = [
    [90.0, NAN, NAN],
    [80.0, 70.0, NAN],
    [60.0, 65.0, 50.0],
]
SIZES = [100, 100, 200]
# A_0 = 90
# A_1 = (80*100 + 70*100) / 200 = 75
# A_2 = (60*100 + 65*100 + 50*200) / 400 = 22500 / 400 = 56.25
# AAA = (90 + 75 + 56.25) / 3 = 73.75
# forgetting = mean(max(90, 80) - 60, 70 - 65) = mean(30, 5) = 17.5
# BWT = mean(60 - 90, 65 - 70) = -17.5


def test_hand_computed_matrix():
    assert metrics.incremental_accuracies(MATRIX, SIZES) == pytest.approx([90.0, 75.0, 56.25])
    assert metrics.final_accuracy(MATRIX, SIZES) == pytest.approx(56.25)
    assert metrics.average_incremental_accuracy(MATRIX, SIZES) == pytest.approx(73.75)
    assert metrics.forgetting(MATRIX) == pytest.approx(17.5)
    assert metrics.backward_transfer(MATRIX) == pytest.approx(-17.5)
    assert metrics.summarize(MATRIX, SIZES) == pytest.approx(
        {"final_accuracy": 56.25, "average_incremental_accuracy": 73.75, "forgetting": 17.5, "bwt": -17.5}
    )


def test_forgetting_uses_best_earlier_accuracy_and_can_be_negative():
    # Task 0 peaks after task 1 (80), task 1 improves at the end.
    matrix = [
        [50.0, NAN, NAN],
        [80.0, 60.0, NAN],
        [70.0, 70.0, 40.0],
    ]
    # forgetting = mean(max(50, 80) - 70, 60 - 70) = mean(10, -10) = 0
    # BWT = mean(70 - 50, 70 - 60) = 15
    assert metrics.forgetting(matrix) == pytest.approx(0.0)
    assert metrics.backward_transfer(matrix) == pytest.approx(15.0)


def test_upper_triangle_is_ignored():
    filled = np.array(MATRIX)
    filled[np.triu_indices(3, k=1)] = 100.0
    assert metrics.summarize(filled, SIZES) == metrics.summarize(MATRIX, SIZES)


def test_single_task():
    assert metrics.summarize([[42.0]], [7]) == {
        "final_accuracy": 42.0,
        "average_incremental_accuracy": 42.0,
        "forgetting": 0.0,
        "bwt": 0.0,
    }


@pytest.mark.parametrize(
    "matrix, sizes, message",
    [
        ([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [1, 1], "square"),
        ([[1.0], [2.0, 3.0]], [1, 1], "square"),
        ([], [], "square"),
        ([[1.0, NAN], [NAN, 3.0]], [1, 1], r"NaN at \[1\]\[0\]"),
        ([[1.0, NAN], [2.0, 300.0]], [1, 1], r"\[0, 100\]"),
        (MATRIX, [100, 100], "one entry per task"),
        (MATRIX, [100, 0, 100], "positive"),
    ],
)
def test_invalid_input(matrix, sizes, message):
    with pytest.raises(ValueError, match=message):
        metrics.summarize(matrix, sizes)


def test_mean_std():
    # sample std of 1, 2, 3, 4: sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5 / 3)
    assert metrics.mean_std([1, 2, 3, 4]) == pytest.approx({"mean": 2.5, "std": math.sqrt(5 / 3)})
    assert metrics.mean_std([3.5]) == {"mean": 3.5, "std": 0.0}
    with pytest.raises(ValueError, match="non-empty"):
        metrics.mean_std([])


@st.composite
def matrices(draw, max_tasks: int = 6):
    """A random lower-triangular accuracy matrix (NaN above the diagonal) and positive task sizes."""
    n = draw(st.integers(1, max_tasks))
    values = draw(st.lists(st.floats(0, 100), min_size=n * n, max_size=n * n))
    matrix = np.tril(np.array(values).reshape(n, n))
    matrix[np.triu_indices(n, k=1)] = np.nan
    sizes = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n))
    return matrix, sizes


@given(matrices())
def test_aaa_lies_between_incremental_accuracies(case):
    matrix, sizes = case
    accuracies = metrics.incremental_accuracies(matrix, sizes)
    aaa = metrics.average_incremental_accuracy(matrix, sizes)
    assert min(accuracies) - 1e-9 <= aaa <= max(accuracies) + 1e-9
    for t, a_t in enumerate(accuracies):
        assert matrix[t, : t + 1].min() - 1e-9 <= a_t <= matrix[t, : t + 1].max() + 1e-9


@given(matrices())
def test_forgetting_is_at_least_minus_bwt(case):
    # max_{l<N} a[l][j] >= a[j][j], so each task's forgetting >= its negated backward transfer.
    matrix, _ = case
    assert metrics.forgetting(matrix) >= -metrics.backward_transfer(matrix) - 1e-9


@given(matrices())
def test_forgetting_is_non_negative_when_accuracy_never_rises(case):
    matrix, _ = case
    n = len(matrix)
    for j in range(n):  # make every column non-increasing over time
        matrix[j:, j] = np.sort(matrix[j:, j])[::-1]
    assert metrics.forgetting(matrix) >= 0.0
    assert metrics.backward_transfer(matrix) <= 0.0


@given(st.integers(1, 8), st.floats(0, 100))
def test_constant_matrix_has_no_forgetting(n, value):
    matrix = np.full((n, n), value)
    assert metrics.forgetting(matrix) == 0.0
    assert metrics.backward_transfer(matrix) == 0.0
    assert metrics.final_accuracy(matrix, [1] * n) == pytest.approx(value)


def _predictions_for(target: np.ndarray, split: TaskSplit, per_class: int):
    """Per-sample predictions whose accuracy on task j after step t is exactly target[t][j] percent."""
    predictions, references, steps = [], [], []
    num_classes = len(split.task_of_class)
    for t in range(len(target)):
        for j in range(t + 1):
            refs = [c for c in split.tasks[j] for _ in range(per_class)]
            correct = round(target[t, j] * len(refs) / 100)
            predictions += [c if i < correct else (c + 1) % num_classes for i, c in enumerate(refs)]
            references += refs
            steps += [t] * len(refs)
    return predictions, references, steps


def _target(num_tasks: int) -> np.ndarray:
    """Distinct integer accuracies per (t, j), so any scrambling of tasks shows."""
    t, j = np.indices((num_tasks, num_tasks))
    target = ((7 * t + 3 * j + 11) % 101).astype(float)
    target[np.triu_indices(num_tasks, k=1)] = np.nan
    return target


def test_accuracy_matrix_more_than_100_classes():
    # 120 classes in 12 tasks of 10; as strings, task "100-109" would sort before "20-29".
    split = TaskSplit.from_classes(range(120), num_tasks=12)
    assert split.tasks[10] == list(range(100, 110)) and split.task_of_class[25] == 2
    target = _target(12)
    predictions, references, steps = _predictions_for(target, split, per_class=10)

    matrix, sizes = metrics.accuracy_matrix(predictions, references, steps, split.task_of_class)
    np.testing.assert_array_equal(matrix, target)
    assert sizes == [100] * 12


def test_accuracy_matrix_rejects_string_task_keys():
    task_of_class = {c: f"{10 * (c // 10)}-{10 * (c // 10) + 9}" for c in range(120)}
    with pytest.raises(ValueError, match="task index must be an integer"):
        metrics.accuracy_matrix([0], [0], [0], task_of_class)


@pytest.mark.parametrize(
    "steps, references, message",
    [
        ([0, 2, 2], [0, 0, 1], "without gaps"),
        ([0, 1], [0, 1], "task 0 has no test samples after step 1"),
        ([0, 1, 1, 1], [0, 0, 0, 1], "different numbers of samples"),
        ([0], [5], r"classes \[5\] are missing"),
    ],
)
def test_accuracy_matrix_invalid(steps, references, message):
    with pytest.raises(ValueError, match=message):
        metrics.accuracy_matrix(references, references, steps, {0: 0, 1: 1})


@given(st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_incremental_accuracy_is_pooled_top1(num_tasks, seed):
    # Sample-weighting the matrix must equal top-1 over all seen test samples at each step.
    rng = np.random.default_rng(seed)
    split = TaskSplit.from_classes(range(2 * num_tasks), num_tasks, seed=seed)
    test_labels = rng.integers(0, 2 * num_tasks, size=40)
    test_labels[: 2 * num_tasks] = np.arange(2 * num_tasks)  # every class has a sample
    predictions, references, steps = [], [], []
    for t in range(num_tasks):
        seen = np.array([c for c in test_labels if split.task_of_class[c] <= t])
        predictions += rng.integers(0, 2 * num_tasks, size=len(seen)).tolist()
        references += seen.tolist()
        steps += [t] * len(seen)

    matrix, sizes = metrics.accuracy_matrix(predictions, references, steps, split.task_of_class)
    predictions, references, steps = map(np.array, (predictions, references, steps))
    pooled = [100 * np.mean(predictions[steps == t] == references[steps == t]) for t in range(num_tasks)]
    assert metrics.incremental_accuracies(matrix, sizes) == pytest.approx(pooled)


def test_evaluate_module_loads_offline_and_matches_summarize(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    metric = metrics.load_cil_metric(keep_in_memory=True)

    split = TaskSplit.from_classes(range(120), num_tasks=12, seed=3)
    target = _target(12)
    predictions, references, steps = _predictions_for(target, split, per_class=2)
    for start in range(0, len(predictions), 500):  # batches cross step boundaries on purpose
        end = start + 500
        metric.add_batch(predictions=predictions[start:end], references=references[start:end], steps=steps[start:end])
    result = metric.compute(task_of_class=split.task_of_class)

    sizes = [20] * 12
    expected_matrix = np.round(target / 5) * 5  # 20 samples per task: accuracies snap to multiples of 5
    for key, value in metrics.summarize(expected_matrix, sizes).items():
        assert result[key] == pytest.approx(value)
    assert result["incremental_accuracies"] == pytest.approx(metrics.incremental_accuracies(expected_matrix, sizes))
    assert result["task_sizes"] == sizes
    np.testing.assert_array_equal(np.array(result["accuracy_matrix"]), expected_matrix)
