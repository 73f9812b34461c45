"""The model's own classification layer: where it is, and the linear layer inside PEFT's and our wrappers."""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.nn import functional as F

CLASSIFIER_NAMES = ("classifier", "score", "head", "fc")


def classifier_path(model: nn.Module) -> str:
    """Dotted name of the model's classification layer (`classifier` for ViT, DINOv2, BERT; `score` for Llama)."""
    names = dict(model.named_modules())
    for name in CLASSIFIER_NAMES:
        if name in names:
            return name
    raise ValueError(
        f"Cannot find the classification layer of {type(model).__name__}: expected a module named one of "
        f"{list(CLASSIFIER_NAMES)}. Use a transformers *ForImageClassification / *ForSequenceClassification model."
    )


def classifier_linear(model: nn.Module) -> nn.Linear:
    """The trainable linear classification layer, looking through PEFT's modules_to_save wrapper."""
    module = model.get_submodule(classifier_path(unwrap(model)))
    if isinstance(module, ModulesToSaveWrapper):
        module = module.modules_to_save[module.active_adapters[0]]
    linear = module.linear if isinstance(module, CosineClassifier) else module
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"The classification layer is a {type(linear).__name__}, not a torch.nn.Linear.")
    return linear


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (any other model as it is)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


class CosineClassifier(nn.Module):
    """Cosine similarity between normalised features and normalised class weights, times a fixed scale."""

    def __init__(self, linear: nn.Linear, scale: float = 16.0) -> None:
        super().__init__()
        self.linear = nn.Linear(linear.in_features, linear.out_features, bias=False)
        self.linear.weight.data.copy_(linear.weight.data)
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=-1), F.normalize(self.linear.weight, dim=-1))
