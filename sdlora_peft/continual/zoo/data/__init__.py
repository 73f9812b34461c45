"""Datasets by short name (offline, from installed packages), or a save_to_disk folder, or a Hub id."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import datasets

from ..files import default_cache_dir
from . import bolt, glyphs, images, kaomoji
from .common import normalize


def load_dataset(
    name_or_path: str,
    *,
    seed: int = 0,
    test_size: float = 0.2,
    label_column: str = "label",
    cache_dir: str | os.PathLike | None = None,
    **kwargs,
) -> datasets.DatasetDict:
    """Return a ``DatasetDict`` with ``train`` and ``test`` splits and a ``ClassLabel`` column ``label``.

    `name_or_path` is one of `DATASET_NAMES`, a folder written by ``save_to_disk``, or a Hub id (`kwargs` go to
    ``datasets.load_dataset``). A set without a test split is split stratified by class with `test_size` and `seed`.
    `label_column` names the label column of a folder or Hub dataset. ``glyphs`` takes ``per_class`` and
    ``image_size``, ``kaomoji`` takes ``min_per_class``.
    """
    if name_or_path in _DATASETS:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return _DATASETS[name_or_path](cache=cache, seed=seed, test_size=test_size, **kwargs)
    if Path(name_or_path, "dataset_dict.json").exists() or Path(name_or_path, "state.json").exists():
        loaded = datasets.load_from_disk(name_or_path)
    else:
        loaded = datasets.load_dataset(name_or_path, **kwargs)
    return normalize(loaded, label_column, seed, test_size)


_DATASETS: dict[str, Callable[..., datasets.DatasetDict]] = {
    "digits": images.digits,
    "mnist": images.mnist,
    "fashion-mnist": images.fashion_mnist,
    "glyphs": glyphs.glyphs,
    "kaomoji": kaomoji.kaomoji,
    "clinc150": bolt.clinc150,
    "banking77": bolt.banking77,
}
DATASET_NAMES = tuple(_DATASETS)
