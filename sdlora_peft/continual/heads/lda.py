"""Linear discriminant analysis over class means and one shared covariance, updated task by task.

Each class arrives with all its samples in one task, so its mean is exact when the task ends, and its samples can be
centred by it there and then. The head keeps, per class, the mean and the count, and for all classes together the
within-class scatter `sum (x - mu_c)(x - mu_c)^T` and the sum of `||x - mu_c||^4`, which Ledoit and Wolf's
shrinkage needs. All of it is sums, so the head does not depend on the order in which classes come; nothing of a
sample is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from .prototypes import ClassMeanHead


def ledoit_wolf(scatter: torch.Tensor, fourth_moment: torch.Tensor, count: int) -> tuple[torch.Tensor, float]:
    """The Ledoit-Wolf shrunk covariance `(1 - s) S + s (tr S / p) I` of centred samples, and `s`, from their
    scatter `X^T X`, the sum of their squared squared norms `sum ||x_i||^4` and their number (`S = X^T X / n`)."""
    p = scatter.shape[0]
    covariance = scatter / count
    trace = covariance.trace()
    mu = trace / p
    delta_ = covariance.square().sum()
    beta = ((fourth_moment / count - delta_) / (p * count)).clamp_min(0)
    delta = (delta_ - 2 * mu * trace + p * mu**2) / p
    shrinkage = 0.0 if delta <= 0 else float(torch.minimum(beta, delta) / delta)
    identity = torch.eye(p, dtype=covariance.dtype, device=covariance.device)
    return (1 - shrinkage) * covariance + shrinkage * mu * identity, shrinkage


class LDAHead(ClassMeanHead):
    """Scores `x^T S^-1 mu_c - mu_c^T S^-1 mu_c / 2` with one covariance `S` shared by all classes (equal priors).

    `shrinkage="auto"` shrinks `S` towards a multiple of the identity by the Ledoit-Wolf amount; a float in [0, 1]
    fixes it. With `compensates_drift`, the stored means follow the features' drift as in `ncm-sdc`; the covariance
    is kept as measured.
    """

    name = "lda"

    def __init__(self, shrinkage: float | str = "auto", compensates_drift: bool = False) -> None:
        super().__init__(compensates_drift)
        if compensates_drift:
            self.name = "lda-sdc"
        self.shrinkage = shrinkage
        self.counts: dict[int, torch.Tensor] = {}
        self.scatter: torch.Tensor | None = None
        self.fourth_moment: torch.Tensor | None = None
        self._discriminant: tuple[list[int], torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def end_task(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> None:
        features = features.double()
        for label in classes:
            own = features[labels == label]
            mean = own.mean(0)
            centred = own - mean
            self.means[label] = mean
            self.counts[label] = torch.tensor(len(own), dtype=torch.float64)
            scatter, fourth = centred.T @ centred, centred.square().sum(1).square().sum()
            self.scatter = scatter if self.scatter is None else self.scatter + scatter
            self.fourth_moment = fourth if self.fourth_moment is None else self.fourth_moment + fourth
        self._discriminant = None

    def compensate_drift(self, before: torch.Tensor, after: torch.Tensor) -> None:
        super().compensate_drift(before, after)
        self._discriminant = None

    def covariance(self) -> torch.Tensor:
        """The shared covariance the scores use."""
        if self.scatter is None or self.fourth_moment is None:
            raise ValueError("The LDA head has no classes yet: call end_task first.")
        count = int(sum(float(n) for n in self.counts.values()))
        if self.shrinkage == "auto":
            return ledoit_wolf(self.scatter, self.fourth_moment, count)[0]
        covariance = self.scatter / count
        identity = torch.eye(len(covariance), dtype=covariance.dtype)
        return (1 - float(self.shrinkage)) * covariance + float(self.shrinkage) * covariance.trace() / len(
            covariance
        ) * identity

    def scores(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        labels, weights, biases = self._linear_form()
        scores = torch.full_like(logits, float("-inf"), dtype=torch.float32)
        scores[:, labels] = (features.double() @ weights + biases).float()
        return scores

    def _linear_form(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """`(classes, S^-1 M^T, -diag(M S^-1 M^T) / 2)`, solved once after each change of the statistics."""
        if self._discriminant is None:
            labels = sorted(self.means)
            means = torch.stack([self.means[label].double() for label in labels])
            weights = torch.linalg.solve(self.covariance(), means.T)
            self._discriminant = (labels, weights, -0.5 * (means * weights.T).sum(1))
        return self._discriminant

    def load_state(self, tensors: dict[str, torch.Tensor], order: dict[str, list[int]]) -> None:
        super().load_state(tensors, order)
        self._discriminant = None

    def stored_statistics(self) -> dict:
        dims = super().stored_statistics()["floats_per_class"]
        return {"class_means": len(self.means), "floats_per_class": dims + 1, "shared_floats": dims * dims + 1}
