"""The protocol of a head, and the paper's masked linear head."""

from __future__ import annotations

import torch
from torch import nn


class Head:
    """The masked linear head; subclasses change how classes are scored at evaluation."""

    name = "linear"
    compensates_drift = False  # whether `compensate_drift` wants the task's features from before its training

    def prepare(self, model: nn.Module) -> None:
        """Adapt the (not yet PEFT-wrapped) model's classification layer before training starts."""

    def compensate_drift(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """Called when a task ends, before `end_task`, with its training samples' features from before and after
        the task's training (only if `compensates_drift`)."""

    def end_task(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> None:
        """Called when a task ends with the adapted features of its training samples."""

    def scores(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Class scores (one column per class of the label space) for evaluation."""
        return logits

    def stored_statistics(self) -> dict:
        """What the head keeps about old classes (for results.json: nothing but statistics)."""
        return {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
        """The head's statistics as flat tensors for a checkpoint, and the order in which their classes came (the
        aligned head samples classes in that order). By default: every attribute that is a tensor, and every dict of
        class id -> tensor (class means, covariances, sums)."""
        tensors = {name: value.contiguous() for name, value in vars(self).items() if isinstance(value, torch.Tensor)}
        stores = {name: value for name, value in vars(self).items() if isinstance(value, dict)}
        for name, store in stores.items():
            tensors.update({f"{name}.{label}": t.contiguous() for label, t in store.items()})
        return tensors, {name: list(store) for name, store in stores.items()}

    def load_state(self, tensors: dict[str, torch.Tensor], order: dict[str, list[int]]) -> None:
        """Set the statistics `state` returned."""
        for name, labels in order.items():
            setattr(self, name, {label: tensors[f"{name}.{label}"] for label in labels})
        for name, tensor in tensors.items():
            if "." not in name:
                setattr(self, name, tensor)
