"""RanPAC's head (McDonnell et al., NeurIPS 2023): a fixed random ReLU projection, then ridge regression.

Features `x` (D) become `h = relu(x W)` with a fixed Gaussian `W` (D x M, drawn from the seed); the head keeps the
Gram matrix `G = sum h h^T` and the class sums `C_c = sum_{y = c} h` of every sample seen, and scores with
`W_out = (G + lambda I)^-1 C`. The sums make it independent of the order of the classes. `lambda` is chosen as
RanPAC does, by ridge fits on 80% of a task's samples compared by their squared error on the other 20%, over
`10^-8 .. 10^13`; the errors are summed over every task so far. With few samples a task (a fifth of 80 is 16), one
task's choice alone is noise: on MNIST with 40 samples a class, one task picked 0.01 where the others picked
1e4-1e5, and the fit then overfit its last two classes (final accuracy 15% against 86%). Drift compensation does
not apply: the sums are of non-linear features.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Head

RIDGES = tuple(10.0**k for k in range(-8, 14))
RIDGE_SAMPLES = 2000  # at most this many of a task's samples choose its ridge (one thin SVD of them)


class RanPACHead(Head):
    """Random-projection ridge classifier over the classifier-input features (`ranpac`)."""

    name = "ranpac"

    def __init__(self, projection_dim: int = 5000, seed: int = 0) -> None:
        self.projection_dim, self.seed = projection_dim, seed
        self.gram: torch.Tensor | None = None
        self.class_sums: dict[int, torch.Tensor] = {}
        self.ridge = torch.tensor(1.0, dtype=torch.float64)
        self.ridge_errors = torch.zeros(len(RIDGES), dtype=torch.float64)  # held-out errors, summed over tasks
        self._weights: tuple[list[int], torch.Tensor] | None = None
        self._projection: torch.Tensor | None = None

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """`relu(x W)` in float32, with `W` drawn once from the seed (so a checkpoint need not store it)."""
        features = features.float()
        if self._projection is None or self._projection.shape[0] != features.shape[1]:
            generator = torch.Generator().manual_seed(self.seed)
            shape = (features.shape[1], self.projection_dim)
            self._projection = torch.randn(shape, generator=generator)
        return torch.relu(features @ self._projection)

    @torch.no_grad()
    def end_task(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> None:
        hidden = self.project(features)
        gram = (hidden.T @ hidden).double()  # accumulated in float64: the solve needs it
        self.gram = gram if self.gram is None else self.gram + gram
        for label in classes:
            self.class_sums[label] = hidden[labels == label].double().sum(0)
        errors = self._ridge_errors(hidden, labels)
        if errors is not None:
            self.ridge_errors = self.ridge_errors + errors
        # ridges below 1e-8 of the Gram matrix's trace (which bounds its largest eigenvalue) leave G + lambda I too
        # ill-conditioned for the float64 solve: with far fewer samples than features the fit is then noise
        floor = 1e-8 * float(self.gram.trace())
        usable = torch.tensor([ridge >= floor for ridge in RIDGES])
        if usable.any() and self.ridge_errors.any():  # no held-out sample yet: nothing to choose by
            errors_so_far = torch.where(usable, self.ridge_errors, torch.inf)
            self.ridge = torch.tensor(RIDGES[int(errors_so_far.argmin())], dtype=torch.float64)
        self._weights = None

    def _ridge_errors(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Each candidate ridge's held-out mean squared error when fitting 80% of this task's samples (a seeded
        split of at most `RIDGE_SAMPLES` of them; one thin SVD serves every candidate); None with too few samples."""
        seen = sorted(self.class_sums)
        targets = (labels.unsqueeze(1) == torch.tensor(seen).unsqueeze(0)).double()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed + len(seen)))
        order = order[:RIDGE_SAMPLES]
        cut = int(0.8 * len(order))
        fit, held = order[:cut], order[cut:]
        if len(held) == 0:
            return None
        hidden = hidden.double()  # in float32 the smallest ridges' errors are rounding noise
        U, S, Vh = torch.linalg.svd(hidden[fit], full_matrices=False)
        projected_targets = U.T @ targets[fit]
        held_basis = hidden[held] @ Vh.T
        errors = [
            (held_basis @ ((S / (S.square() + ridge)).unsqueeze(1) * projected_targets) - targets[held])
            .square()
            .mean()
            for ridge in RIDGES
        ]
        return torch.stack(errors)

    def scores(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        labels, weights = self._output_weights()
        scores = torch.full_like(logits, float("-inf"), dtype=torch.float32)
        scores[:, labels] = (self.project(features).double() @ weights).float()
        return scores

    def _output_weights(self) -> tuple[list[int], torch.Tensor]:
        """`(classes, (G + lambda I)^-1 C)`, solved in float64 once after each task (Cholesky: G + lambda I is
        positive definite; should rounding make it fail at a tiny ridge, a general solve takes over)."""
        if self._weights is None:
            if self.gram is None:
                raise ValueError("The RanPAC head has no classes yet: call end_task first.")
            labels = sorted(self.class_sums)
            sums = torch.stack([self.class_sums[label] for label in labels], dim=1)
            regularised = self.gram.clone()
            regularised.diagonal().add_(float(self.ridge))  # G + lambda I without a second M x M matrix
            factor, info = torch.linalg.cholesky_ex(regularised)
            solved = torch.cholesky_solve(sums, factor) if info == 0 else torch.linalg.solve(regularised, sums)
            self._weights = (labels, solved)
        return self._weights

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
        tensors = {f"class_sums.{label}": t.contiguous() for label, t in self.class_sums.items()}
        if self.gram is not None:
            tensors["gram"] = self.gram
        return {**tensors, "ridge": self.ridge, "ridge_errors": self.ridge_errors}, {
            "class_sums": list(self.class_sums)
        }

    def load_state(self, tensors: dict[str, torch.Tensor], order: dict[str, list[int]]) -> None:
        self.class_sums = {label: tensors[f"class_sums.{label}"] for label in order["class_sums"]}
        self.gram, self.ridge, self._weights = tensors.get("gram"), tensors["ridge"], None
        self.ridge_errors = tensors.get("ridge_errors", torch.zeros(len(RIDGES), dtype=torch.float64))

    def stored_statistics(self) -> dict:
        return {
            "class_sums": len(self.class_sums),
            "floats_per_class": self.projection_dim,
            "shared_floats": self.projection_dim**2,
        }
