"""Split a `datasets.Dataset` into class-incremental tasks.

A run fixes a class order (shuffled per seed, as CIL papers do), cuts it into tasks of nearly equal size and
then selects, for every task, the samples of its classes. Tasks and classes are integers throughout, so no
ordering can depend on how names sort as strings.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Image, Value

IMAGE_COLUMNS = ("image", "img", "pixel_values")
TEXT_COLUMNS = ("text", "sentence", "content")


def class_order(classes: Iterable[int], seed: int | None = None) -> list[int]:
    """Order in which classes arrive: sorted for ``seed=None``, else a permutation fixed by the seed.

    The permutation is drawn from the sorted classes, so it does not depend on the order they are given in.
    """
    ordered = sorted(_class_id(c) for c in classes)
    if len(set(ordered)) != len(ordered):
        raise ValueError("class ids must be unique")
    if seed is None:
        return ordered
    return [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]


def split_classes(order: Sequence[int], num_tasks: int) -> list[list[int]]:
    """Cut a class order into ``num_tasks`` consecutive tasks whose sizes differ by at most one.

    When the classes do not divide evenly, the first tasks get one class more.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
    if len(order) < num_tasks:
        raise ValueError(f"cannot split {len(order)} classes into {num_tasks} tasks: need at least one per task")
    base, extra = divmod(len(order), num_tasks)
    tasks, start = [], 0
    for t in range(num_tasks):
        end = start + base + (t < extra)
        tasks.append([_class_id(c) for c in order[start:end]])
        start = end
    return tasks


@dataclass
class TaskSplit:
    """Which classes each task brings; ``task_of_class`` is derived from ``tasks``."""

    tasks: list[list[int]]
    task_of_class: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.tasks = [[_class_id(c) for c in classes] for classes in self.tasks]
        self.task_of_class = {c: t for t, classes in enumerate(self.tasks) for c in classes}
        if len(self.task_of_class) != sum(len(classes) for classes in self.tasks):
            raise ValueError("a class appears in more than one task")
        if not self.tasks or not all(self.tasks):
            raise ValueError("a split needs at least one task, and every task at least one class")

    @classmethod
    def from_classes(cls, classes: Iterable[int], num_tasks: int, seed: int | None = None) -> TaskSplit:
        """Shuffle ``classes`` with ``seed`` (see `class_order`) and cut them into ``num_tasks`` tasks."""
        return cls(split_classes(class_order(classes, seed), num_tasks))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def seen_classes(self, step: int) -> list[int]:
        """Classes of tasks ``0..step``: the label space a model is evaluated on after task ``step``."""
        return [c for classes in self.tasks[: step + 1] for c in classes]


def dataset_classes(dataset: Dataset, label_column: str = "label") -> list[int]:
    """Class ids of a dataset: every ClassLabel id (even if absent), or the distinct integer labels."""
    feature = _label_feature(dataset, label_column)
    if isinstance(feature, ClassLabel):
        return list(range(feature.num_classes))
    return np.unique(_labels(dataset, label_column)).tolist()


def split_dataset(
    dataset: Dataset,
    split: TaskSplit,
    label_column: str = "label",
    max_per_class: int | None = None,
    seed: int = 0,
) -> list[Dataset]:
    """One subset of ``dataset`` per task, holding the samples of that task's classes in dataset order.

    Samples of classes outside the split are dropped. With ``max_per_class``, each class keeps at most that
    many samples, drawn with ``seed``. Raises if a class of the split has no sample, since its accuracy could
    not be measured (or learned).
    """
    _label_feature(dataset, label_column)
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be at least 1, got {max_per_class}")
    labels = _labels(dataset, label_column)
    by_class = _indices_by_class(labels)
    empty = [c for c in split.task_of_class if c not in by_class]
    if empty:
        where = f"the {dataset.split} split" if dataset.split else "the dataset"
        raise ValueError(f"classes {sorted(empty)} have no samples in {where}")

    rng = np.random.default_rng(seed)
    subsets = []
    for classes in split.tasks:
        picked = []
        for c in classes:
            indices = by_class[c]
            if max_per_class is not None and len(indices) > max_per_class:
                indices = rng.choice(indices, size=max_per_class, replace=False)
            picked.append(indices)
        subsets.append(dataset.select(np.sort(np.concatenate(picked))))
    return subsets


def detect_modality(dataset: Dataset, image_column: str | None = None, text_column: str | None = None) -> str:
    """Return ``"image"`` or ``"text"``: what kind of backbone and preprocessing the dataset needs.

    An explicit column wins. Otherwise an `Image` feature or a column named like ``image``/``img``/
    ``pixel_values`` means image, and a string column named like ``text``/``sentence``/``content`` means text.
    """
    if image_column is not None and text_column is not None:
        raise ValueError("pass image_column or text_column, not both")
    for column, modality in ((image_column, "image"), (text_column, "text")):
        if column is not None:
            if column not in dataset.features:
                raise ValueError(f"column {column!r} not found; available columns: {dataset.column_names}")
            return modality

    features = dataset.features
    images = [n for n, f in features.items() if isinstance(f, Image) or n in IMAGE_COLUMNS]
    texts = [n for n, f in features.items() if n in TEXT_COLUMNS and _is_string(f)]
    if images and texts:
        raise ValueError(f"found image columns {images} and text columns {texts}; pass image_column or text_column")
    if images:
        return "image"
    if texts:
        return "text"
    raise ValueError(
        f"cannot tell whether the dataset holds images or text (features: {features}); "
        "pass image_column= or text_column="
    )


def _class_id(value: Any) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"class ids must be integers, got {value!r}; encode string labels first") from None


def _is_string(feature: object) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _label_feature(dataset: Dataset, label_column: str) -> ClassLabel | Value:
    """The label feature, checked to hold integer class ids."""
    if label_column not in dataset.features:
        raise ValueError(f"label column {label_column!r} not found; available columns: {dataset.column_names}")
    feature = dataset.features[label_column]
    if _is_string(feature):
        raise ValueError(
            f"label column {label_column!r} holds strings; encode it first with "
            f"dataset.class_encode_column({label_column!r})"
        )
    if isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))):
        return feature
    raise ValueError(f"label column {label_column!r} must be a ClassLabel or integer column, got {feature}")


def _labels(dataset: Dataset, label_column: str) -> np.ndarray:
    labels = np.asarray(dataset.with_format("numpy", columns=[label_column])[label_column], dtype=np.int64)
    if (labels < 0).any():
        raise ValueError(f"label column {label_column!r} has negative labels (unlabelled samples?); drop them first")
    return labels


def _indices_by_class(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Sample indices of every class present, from one stable sort instead of a scan per class."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return dict(zip(classes.tolist(), np.split(order, starts[1:])))
