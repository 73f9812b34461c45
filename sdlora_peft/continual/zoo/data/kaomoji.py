"""Kaomoji strings labelled by category, from the kaomoji-dataset package."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets

from ..files import require
from .common import cached, stratified_split


def kaomoji(*, cache: Path, seed: int, test_size: float, min_per_class: int = 100) -> datasets.DatasetDict:
    """Kaomoji strings labelled by category: the categories with at least `min_per_class` strings (44 at 100).

    ``uncategorized`` is dropped, and a string listed twice keeps its first category. Parsing the package's
    82,109 entries takes seconds, so the result is cached.
    """
    require("kaomoji_dataset", "pip install kaomoji-dataset")

    def build() -> datasets.DatasetDict:
        import kaomoji_dataset

        categories: dict[str, str] = {}
        for entry in kaomoji_dataset.all():
            if entry.get("category") and entry["category"] != "uncategorized":
                categories.setdefault(entry["text"], entry["category"])
        counts = Counter(categories.values())
        names = sorted(c for c, n in counts.items() if n >= min_per_class)
        index = {name: i for i, name in enumerate(names)}
        kept = {text: index[c] for text, c in categories.items() if c in index}
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
        dataset = datasets.Dataset.from_dict({"text": list(kept), "label": list(kept.values())}, features)
        return stratified_split(dataset, test_size, seed)

    return cached(cache / "datasets" / f"kaomoji-min{min_per_class}-seed{seed}-test{test_size}", build)
