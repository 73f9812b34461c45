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
import torch
from datasets import ClassLabel, Dataset, Image, Value
from PIL import Image as PILImage
from transformers import PreTrainedTokenizerBase

IMAGE_COLUMNS = ("image", "img", "pixel_values")
TEXT_COLUMNS = ("text", "sentence", "content")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        raise ValueError(
            f"cannot split {len(order)} classes into {num_tasks} tasks: need at least one per task; "
            f"use at most {len(order)} tasks (--num-tasks)"
        )
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
    part: str | None = None,
) -> list[Dataset]:
    """One subset of ``dataset`` per task, holding the samples of that task's classes in dataset order.

    Samples of classes outside the split are dropped. With ``max_per_class``, each class keeps at most that
    many samples, drawn with ``seed``. Raises if a class of the split has no sample, since its accuracy could
    not be measured (or learned); the error names ``part`` ("train", "test"; default: the dataset's own split name,
    which datasets loaded from disk lack).
    """
    _label_feature(dataset, label_column)
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be at least 1, got {max_per_class}")
    labels = _labels(dataset, label_column)
    by_class = _indices_by_class(labels)
    empty = [c for c in split.task_of_class if c not in by_class]
    if empty:
        part = part or (str(dataset.split) if dataset.split else None)
        where = f"the {part} split" if part else "the dataset"
        raise ValueError(
            f"classes {sorted(empty)} have no samples in {where}, so they could not be learned or scored; "
            "remove them from the label space or add samples of them to every split"
        )

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


def detect_input(dataset: Dataset, image_column: str | None = None, text_column: str | None = None) -> tuple[str, str]:
    """Return the modality (``"image"`` or ``"text"``: what kind of backbone and preprocessing the dataset needs)
    and the column that holds the inputs.

    An explicit column wins. Otherwise an `Image` feature or a column named like ``image``/``img``/
    ``pixel_values`` means image, and a string column named like ``text``/``sentence``/``content`` means text.
    """
    if image_column is not None and text_column is not None:
        raise ValueError("pass image_column or text_column, not both")
    for column, modality in ((image_column, "image"), (text_column, "text")):
        if column is not None:
            if column not in dataset.features:
                raise ValueError(f"column {column!r} not found; available columns: {dataset.column_names}")
            return modality, column

    features = dataset.features
    images = [n for n, f in features.items() if isinstance(f, Image) or n in IMAGE_COLUMNS]
    texts = [n for n, f in features.items() if n in TEXT_COLUMNS and _is_string(f)]
    if images and texts:
        raise ValueError(f"found image columns {images} and text columns {texts}; pass image_column or text_column")
    if images:
        return "image", images[0]
    if texts:
        return "text", texts[0]
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
        raise ValueError(
            f"label column {label_column!r} not found; available columns: {dataset.column_names}; "
            "pass label_column= (--label-column)"
        )
    feature = dataset.features[label_column]
    if _is_string(feature):
        raise ValueError(
            f"label column {label_column!r} holds strings; encode it first with "
            f"dataset.class_encode_column({label_column!r})"
        )
    if isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))):
        return feature
    raise ValueError(
        f"label column {label_column!r} must be a ClassLabel or integer column, got {feature}; convert it first, "
        f"e.g. dataset.cast_column({label_column!r}, Value('int64')) for whole-number floats"
    )


def _labels(dataset: Dataset, label_column: str) -> np.ndarray:
    # select_columns + a full slice reads the column at once (a lazy column access reads row by row)
    labels = np.asarray(dataset.select_columns(label_column).with_format("numpy")[:][label_column], dtype=np.int64)
    if (labels < 0).any():
        raise ValueError(f"label column {label_column!r} has negative labels (unlabelled samples?); drop them first")
    return labels


def _indices_by_class(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Sample indices of every class present, from one stable sort instead of a scan per class."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return dict(zip(classes.tolist(), np.split(order, starts[1:])))


class ImageCollator:
    """Dataset rows -> a batch `{"pixel_values", "labels"}` for an image classifier.

    Without `augment`, images are resized to `image_size` squared. With `augment`, the paper's transforms:
    RandomResizedCrop(scale 0.05-1) and a horizontal flip for training, resize to `image_size / 0.875` and a
    center crop for evaluation (`train=False`). Grey images become RGB. Normalisation follows the model's image
    processor when it has one, else ImageNet's.
    """

    def __init__(
        self,
        image_column: str,
        label_column: str,
        image_size: int,
        processor: object | None = None,
        augment: bool = False,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        self.image_column, self.label_column, self.image_size = image_column, label_column, image_size
        self.augment, self.train = augment, train
        self.mean = torch.tensor(getattr(processor, "image_mean", None) or IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(getattr(processor, "image_std", None) or IMAGENET_STD).view(1, 3, 1, 1)
        self.rng = np.random.default_rng(seed)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [self._transform(_to_pil(row[self.image_column])) for row in rows]
        pixels = torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) for image in images]))
        pixels = (pixels.permute(0, 3, 1, 2) / 255.0 - self.mean) / self.std
        return {"pixel_values": pixels, "labels": torch.tensor([row[self.label_column] for row in rows])}

    def _transform(self, image: PILImage.Image) -> PILImage.Image:
        size = (self.image_size, self.image_size)
        if not self.augment:
            return image.resize(size, PILImage.Resampling.BILINEAR)
        if not self.train:
            resized = round(self.image_size / 0.875)
            image = image.resize((resized, resized), PILImage.Resampling.BILINEAR)
            offset = (resized - self.image_size) // 2
            return image.crop((offset, offset, offset + self.image_size, offset + self.image_size))
        image = image.resize(size, PILImage.Resampling.BILINEAR, box=self._random_box(image.size))
        return image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT) if self.rng.random() < 0.5 else image

    def _random_box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """A RandomResizedCrop box: area fraction in [0.05, 1], aspect ratio in [3/4, 4/3] (log-uniform)."""
        width, height = size
        for _ in range(10):
            area = width * height * self.rng.uniform(0.05, 1.0)
            aspect = np.exp(self.rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w, h = np.sqrt(area * aspect), np.sqrt(area / aspect)
            if w <= width and h <= height:
                left, top = self.rng.uniform(0, width - w), self.rng.uniform(0, height - h)
                return (left, top, left + w, top + h)
        return (0.0, 0.0, float(width), float(height))


class TextCollator:
    """Dataset rows -> a tokenized, padded batch `{"input_ids", "attention_mask", "labels"}`."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, text_column: str, label_column: str, max_length: int = 64
    ) -> None:
        self.tokenizer, self.text_column, self.label_column = tokenizer, text_column, label_column
        self.max_length = max_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts = [row[self.text_column] for row in rows]
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {**batch, "labels": torch.tensor([row[self.label_column] for row in rows])}


def _to_pil(image: object) -> PILImage.Image:
    """A PIL RGB image from what datasets return for an image column (PIL image, array or nested list)."""
    if not isinstance(image, PILImage.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        image = PILImage.fromarray(array)
    return image.convert("RGB")
