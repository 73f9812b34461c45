"""Classifier alignment: the classification layer re-trained on features sampled from per-class Gaussians."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .classifier import classifier_linear
from .prototypes import ClassMeanHead


class AlignedHead(ClassMeanHead):
    """Classifier alignment: re-train the classification layer on features sampled from per-class Gaussians."""

    name = "aligned"

    def __init__(
        self,
        samples_per_class: int = 256,
        epochs: int = 5,
        lr: float = 0.01,
        seed: int = 0,
        compensates_drift: bool = False,
    ) -> None:
        super().__init__(compensates_drift)
        self.covariances: dict[int, torch.Tensor] = {}
        self.samples_per_class, self.epochs, self.lr, self.seed = samples_per_class, epochs, lr, seed

    def end_task(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> None:
        super().end_task(model, features, labels, classes)
        for label in classes:
            own = features[labels == label].float()
            centred = own - self.means[label]
            self.covariances[label] = centred.T @ centred / max(len(own) - 1, 1)
        self._align(classifier_linear(model))

    def scores(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits

    @torch.no_grad()
    def _sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels = [], []
        for label, mean in self.means.items():
            dims = mean.numel()
            covariance = self.covariances[label] + 1e-4 * torch.eye(dims)  # shrinkage: few samples, many dims
            cholesky = torch.linalg.cholesky(covariance)
            noise = torch.randn(self.samples_per_class, dims, generator=generator)
            features.append(mean + noise @ cholesky.T)
            labels.append(torch.full((self.samples_per_class,), label))
        return torch.cat(features), torch.cat(labels)

    def _align(self, linear: nn.Linear) -> None:
        """A few epochs of SGD on sampled features of all seen classes, only on the seen classes' logits."""
        generator = torch.Generator().manual_seed(self.seed + len(self.means))
        features, labels = self._sample(generator)
        seen = torch.tensor(sorted(self.means))
        device, dtype = linear.weight.device, linear.weight.dtype
        optimizer = torch.optim.SGD(linear.parameters(), lr=self.lr, momentum=0.9)
        for _ in range(self.epochs):
            order = torch.randperm(len(labels), generator=generator)
            for batch in order.split(64):
                logits = linear(features[batch].to(device, dtype))
                masked = torch.full_like(logits, float("-inf"))
                masked[:, seen] = logits[:, seen]
                loss = F.cross_entropy(masked, labels[batch].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    def stored_statistics(self) -> dict:
        dims = super().stored_statistics()["floats_per_class"]
        return {
            "class_means": len(self.means),
            "class_covariances": len(self.covariances),
            "floats_per_class": dims + dims**2,
        }
