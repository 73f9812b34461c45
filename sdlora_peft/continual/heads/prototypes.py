"""Nearest class mean of the adapted features (SimpleCIL), optionally following the features' drift."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import Head


class ClassMeanHead(Head):
    """Nearest class mean (cosine) of the adapted features; means are taken when each class's task ends."""

    name = "ncm"

    def __init__(self, compensates_drift: bool = False) -> None:
        self.means: dict[int, torch.Tensor] = {}
        self.compensates_drift = compensates_drift
        if compensates_drift:
            self.name = f"{self.name}-sdc"

    @torch.no_grad()
    def compensate_drift(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """Move each stored mean by the average drift (`after - before`) of the current task's samples, weighted by
        a Gaussian of their distance to the mean before training. The bandwidth adapts to each class: the median
        squared distance, so the nearest half of the samples carries most of the weight whatever the feature scale.
        Only the current task's samples are used: the run stays rehearsal-free."""
        for label, mean in self.means.items():
            before, drift = before.to(mean.dtype), after.to(mean.dtype) - before.to(mean.dtype)
            squared = (before - mean).pow(2).sum(dim=1)
            weights = torch.softmax(-squared / (2 * squared.median().clamp_min(1e-12)), dim=0)
            self.means[label] = mean + weights @ drift

    def end_task(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> None:
        for label in classes:
            self.means[label] = features[labels == label].float().mean(0)

    def scores(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        scores = torch.full_like(logits, float("-inf"), dtype=torch.float32)
        labels = sorted(self.means)
        prototypes = F.normalize(torch.stack([self.means[c] for c in labels]), dim=-1)
        scores[:, labels] = F.normalize(features.float(), dim=-1) @ prototypes.T
        return scores

    def stored_statistics(self) -> dict:
        dims = next(iter(self.means.values())).numel() if self.means else 0
        return {"class_means": len(self.means), "floats_per_class": dims}
