"""The shape every zoo dataset takes (train/test splits, a ClassLabel `label`), and the on-disk cache of builds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from ..files import write_atomically


def normalize(
    loaded: datasets.Dataset | datasets.DatasetDict, label_column: str, seed: int, test_size: float
) -> datasets.DatasetDict:
    """Bring a saved or Hub dataset to the train/test + ClassLabel ``label`` shape."""
    if isinstance(loaded, datasets.DatasetDict):
        test = next((s for s in ("test", "validation") if s in loaded), None)
        loaded = datasets.DatasetDict(train=loaded["train"], test=loaded[test]) if test else loaded["train"]
    if label_column != "label":
        loaded = loaded.rename_column(label_column, "label")
    loaded = _class_labels(loaded)
    return loaded if isinstance(loaded, datasets.DatasetDict) else stratified_split(loaded, test_size, seed)


def _class_labels(loaded: datasets.Dataset | datasets.DatasetDict) -> datasets.Dataset | datasets.DatasetDict:
    """Make ``label`` a ClassLabel, with one class list shared by every split."""
    splits = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for split in splits:
        if "label" not in split.features:
            raise ValueError(
                f"no label column 'label'; available columns: {split.column_names}; "
                "pass label_column= (--label-column)"
            )
    if isinstance(next(iter(splits)).features["label"], datasets.ClassLabel):
        return loaded
    found = {v for split in splits for v in split.unique("label")}
    if None in found or any(isinstance(v, int) and v < 0 for v in found):
        # -1 marks unlabelled samples in many Hub datasets (e.g. GLUE's test splits): it is not a class
        raise ValueError("the label column has negative or missing labels (unlabelled samples?); drop them first")
    values = sorted(found)
    index = {v: i for i, v in enumerate(values)}
    features = next(iter(splits)).features.copy()
    features["label"] = datasets.ClassLabel(names=[str(v) for v in values])
    return loaded.map(lambda batch: {"label": [index[v] for v in batch["label"]]}, batched=True, features=features)


def stratified_split(dataset: datasets.Dataset, test_size: float, seed: int) -> datasets.DatasetDict:
    """A train/test split that takes `test_size` of every class (at least one, if the class has two) at random.

    Reads the label column alone, so it is fast on image sets, unlike ``Dataset.train_test_split``.
    """
    labels = dataset.select_columns("label").with_format("numpy")[:]["label"]
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test.append(members[: min(len(members) - 1, max(1, round(len(members) * test_size)))])
    test_indices = np.sort(np.concatenate(test))
    train_indices = np.setdiff1d(np.arange(len(dataset)), test_indices)
    return datasets.DatasetDict(train=dataset.select(train_indices), test=dataset.select(test_indices))


def image_dataset(images: np.ndarray, labels: np.ndarray, names: list[str] | tuple[str, ...]) -> datasets.Dataset:
    """A dataset of grey uint8 images (``[N, H, W]``) under a datasets ``Image`` feature, with ClassLabel labels."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(image) for image in images], "label": labels.tolist()}, features=features
    )


def cached(folder: Path, build: Callable[[], datasets.DatasetDict]) -> datasets.DatasetDict:
    """Load `folder` when an earlier call saved it there, otherwise build and save it first."""
    if not (folder / "dataset_dict.json").exists():
        write_atomically(folder, lambda tmp: build().save_to_disk(str(tmp)))
    return datasets.load_from_disk(str(folder))
