"""Class-incremental task splits of `datasets.Dataset` objects."""

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from hypothesis import assume, given
from hypothesis import strategies as st

from sdlora_peft.continual import zoo
from sdlora_peft.continual.data import (
    TaskSplit,
    class_order,
    dataset_classes,
    detect_input,
    split_classes,
    split_dataset,
)


def _dataset(labels, split=None, **columns) -> Dataset:
    return Dataset.from_dict({"label": labels, "text": [f"s{i}" for i in range(len(labels))], **columns}, split=split)


def test_class_order_sorted_without_seed():
    assert class_order([3, 1, 2]) == [1, 2, 3]


def test_class_order_seeded_is_deterministic_permutation():
    order = class_order(range(100), seed=1993)
    assert sorted(order) == list(range(100))
    assert order != list(range(100))
    assert order == class_order(reversed(range(100)), seed=1993)  # input order does not matter
    assert order != class_order(range(100), seed=1994)


@pytest.mark.parametrize("classes, message", [([1, 1, 2], "unique"), (["cat", "dog"], "integers")])
def test_class_order_invalid(classes, message):
    with pytest.raises(ValueError, match=message):
        class_order(classes)


def test_split_classes_gives_extra_classes_to_first_tasks():
    assert split_classes(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


@pytest.mark.parametrize("num_classes, num_tasks, message", [(2, 3, "at least one per task"), (5, 0, "at least 1")])
def test_split_classes_invalid(num_classes, num_tasks, message):
    with pytest.raises(ValueError, match=message):
        split_classes(list(range(num_classes)), num_tasks)


@given(st.integers(1, 300), st.integers(1, 50), st.integers(0, 2**32 - 1))
def test_split_classes_covers_every_class_once_with_even_sizes(num_classes, num_tasks, seed):
    assume(num_classes >= num_tasks)
    order = class_order(range(num_classes), seed)
    tasks = split_classes(order, num_tasks)
    sizes = [len(task) for task in tasks]
    assert len(tasks) == num_tasks
    assert [c for task in tasks for c in task] == order  # consecutive chunks of the order
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_task_split_more_than_100_classes():
    # As strings, "100-109" sorts before "20-29"; integer task indices keep arrival order.
    split = TaskSplit.from_classes(range(120), num_tasks=12)
    assert split.num_tasks == 12
    assert split.tasks[2] == list(range(20, 30))
    assert split.tasks[10] == list(range(100, 110))
    assert split.task_of_class[105] == 10 and split.task_of_class[25] == 2
    assert split.seen_classes(1) == list(range(20))


def test_task_split_invalid():
    with pytest.raises(ValueError, match="more than one task"):
        TaskSplit([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="at least one class"):
        TaskSplit([[0], []])
    with pytest.raises(ValueError, match="at least one task"):
        TaskSplit([])
    with pytest.raises(ValueError, match="integers"):
        TaskSplit([["a"]])


def test_dataset_classes():
    assert dataset_classes(_dataset([5, 2, 5, 9])) == [2, 5, 9]
    labelled = _dataset([0, 2]).cast_column("label", ClassLabel(num_classes=4))
    assert dataset_classes(labelled) == [0, 1, 2, 3]  # every ClassLabel id, even absent ones


def test_split_dataset_selects_each_task_in_dataset_order():
    labels = [3, 0, 1, 2, 0, 3, 1, 9]
    dataset = _dataset(labels)
    split = TaskSplit([[3, 1], [0, 2]])
    first, second = split_dataset(dataset, split)
    assert first["label"] == [3, 1, 3, 1]
    assert first["text"] == ["s0", "s2", "s5", "s6"]
    assert second["label"] == [0, 2, 0]  # class 9 is in no task: dropped


def test_split_dataset_more_than_100_classes():
    dataset = _dataset([c for c in range(120) for _ in range(3)])
    split = TaskSplit.from_classes(range(120), num_tasks=12, seed=0)
    subsets = split_dataset(dataset, split)
    for classes, subset in zip(split.tasks, subsets):
        assert sorted(set(subset["label"])) == sorted(classes)
        assert len(subset) == 3 * len(classes)


def test_split_dataset_max_per_class_is_seeded():
    dataset = _dataset([c for c in range(4) for _ in range(10)])
    split = TaskSplit([[0, 1], [2, 3]])
    subsets = split_dataset(dataset, split, max_per_class=3, seed=7)
    for subset in subsets:
        assert len(subset) == 6
        assert all(subset["label"].count(c) == 3 for c in set(subset["label"]))
    again = split_dataset(dataset, split, max_per_class=3, seed=7)
    other = split_dataset(dataset, split, max_per_class=3, seed=8)
    assert [s["text"] for s in again] == [s["text"] for s in subsets]
    assert [s["text"] for s in other] != [s["text"] for s in subsets]
    with pytest.raises(ValueError, match="max_per_class"):
        split_dataset(dataset, split, max_per_class=0)


def test_split_dataset_names_class_without_test_samples():
    split = TaskSplit([[0, 1], [2]])
    with pytest.raises(ValueError, match=r"classes \[2\] have no samples in the test split"):
        split_dataset(_dataset([0, 1, 1], split="test"), split)


def test_split_dataset_reports_empty_class_label():
    dataset = _dataset([0, 1, 3]).cast_column("label", ClassLabel(num_classes=4))
    split = TaskSplit.from_classes(dataset_classes(dataset), num_tasks=2)
    with pytest.raises(ValueError, match=r"classes \[2\] have no samples in the dataset"):
        split_dataset(dataset, split)


@pytest.mark.parametrize(
    "dataset, message",
    [
        (_dataset([0, 1]).rename_column("label", "y"), r"'label' not found; available columns: \['y', 'text'\]"),
        (Dataset.from_dict({"label": ["cat", "dog"]}), r"class_encode_column\('label'\)"),
        (Dataset.from_dict({"label": [0.5, 1.0]}), "ClassLabel or integer"),
        (_dataset([0, -1]), "negative labels"),
    ],
)
def test_split_dataset_invalid_labels(dataset, message):
    with pytest.raises(ValueError, match=message):
        split_dataset(dataset, TaskSplit([[0], [1]]))


def test_detect_input_from_features_and_names():
    images = Dataset.from_dict(
        {"photo": ["a.png"], "label": [0]}, features=Features({"photo": Image(), "label": Value("int64")})
    )
    assert detect_input(images) == ("image", "photo")  # an Image feature under any name
    assert detect_input(Dataset.from_dict({"img": [[0.0]], "label": [0]})) == ("image", "img")
    assert detect_input(Dataset.from_dict({"sentence": ["hi"], "label": [0]})) == ("text", "sentence")
    assert detect_input(_dataset([0]))[0] == "text"


def test_detect_input_explicit_column():
    dataset = Dataset.from_dict({"pixels": [[0.0]], "caption": ["x"]})
    assert detect_input(dataset, image_column="pixels") == ("image", "pixels")
    assert detect_input(dataset, text_column="caption") == ("text", "caption")


@pytest.mark.parametrize(
    "columns, kwargs, message",
    [
        ({"pixels": [[0.0]]}, {}, "pass image_column= or text_column="),
        ({"image": [[0.0]], "text": ["x"]}, {}, r"image columns \['image'\] and text columns \['text'\]"),
        ({"text": ["x"]}, {"image_column": "img"}, r"'img' not found; available columns: \['text'\]"),
        ({"text": ["x"]}, {"image_column": "a", "text_column": "text"}, "not both"),
    ],
)
def test_detect_input_errors(columns, kwargs, message):
    with pytest.raises(ValueError, match=message):
        detect_input(Dataset.from_dict(columns), **kwargs)


# Bad datasets, as the CLI meets them: each error says what is wrong and what to do.


def test_fewer_classes_than_tasks_says_how_many_tasks_fit():
    with pytest.raises(ValueError, match=r"cannot split 3 classes into 5 tasks.*use at most 3 tasks \(--num-tasks\)"):
        TaskSplit.from_classes(dataset_classes(_dataset([0, 1, 2])), num_tasks=5)


@pytest.mark.parametrize(
    "dataset, message",
    [
        (_dataset([0, 1]).rename_column("label", "y"), r"pass label_column= \(--label-column\)"),
        (Dataset.from_dict({"label": [0.0, 1.0]}), r"cast_column\('label', Value\('int64'\)\)"),
        (_dataset([0, 1, 1], split="test"), r"classes \[2\] have no samples .*remove them from the label space"),
    ],
)
def test_split_dataset_errors_say_what_to_do(dataset, message):
    with pytest.raises(ValueError, match=message):
        split_dataset(dataset, TaskSplit([[0, 1], [2]]))


def saved(tmp_path, **splits) -> str:
    DatasetDict({name: Dataset.from_dict(columns) for name, columns in splits.items()}).save_to_disk(tmp_path)
    return str(tmp_path)


def test_saved_dataset_without_a_label_column_is_named(tmp_path):
    path = saved(tmp_path, train={"text": ["a", "b"], "y": [0, 1]}, test={"text": ["c"], "y": [0]})
    with pytest.raises(ValueError, match=r"no label column 'label'.*\['text', 'y'\].*--label-column"):
        zoo.load_dataset(path)
    assert dataset_classes(zoo.load_dataset(path, label_column="y")["train"]) == [0, 1]


def test_saved_dataset_with_unlabelled_samples_is_refused(tmp_path):
    """-1 marks unlabelled samples (e.g. GLUE's test splits); it must not become a class of its own."""
    path = saved(tmp_path, train={"text": ["a", "b"], "label": [0, 1]}, test={"text": ["c"], "label": [-1]})
    with pytest.raises(ValueError, match="negative or missing labels .*drop them first"):
        zoo.load_dataset(path)


def test_saved_dataset_with_string_labels_and_a_class_without_test_samples(tmp_path):
    path = saved(
        tmp_path,
        train={"text": ["a", "b", "c"], "label": ["cat", "dog", "eel"]},
        test={"text": ["d", "e"], "label": ["cat", "dog"]},
    )
    data = zoo.load_dataset(path)  # string labels become one ClassLabel shared by the splits
    split = TaskSplit.from_classes(dataset_classes(data["train"]), num_tasks=3)
    assert len(split_dataset(data["train"], split)) == 3
    with pytest.raises(ValueError, match=r"classes \[2\] have no samples in the test split.*add samples"):
        split_dataset(data["test"], split, part="test")  # a split loaded from disk does not know its name
