"""A cosine classifier in place of the classification layer."""

from __future__ import annotations

from torch import nn

from .base import Head
from .classifier import CosineClassifier, classifier_path


class CosineHead(Head):
    name = "cosine"

    def prepare(self, model: nn.Module) -> None:
        path = classifier_path(model)
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, CosineClassifier(getattr(parent, child)))
