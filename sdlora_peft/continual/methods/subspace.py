"""InfLoRA's linear algebra: the old tasks' input subspace of a layer (DualGPM) and the down-projection it leaves.

Pure math on a layer's input second-moment matrix `C = E[x x^T]` (d x d); no module, no model. InfLoRA (Liang & Li,
CVPR 2024) designs each task's down-projection from the part of `C` outside the subspace that earlier tasks' inputs
occupy, so that the new branch changes the layer's output as little as possible on those inputs, and grows that
subspace with DualGPM (Liang & Li, 2023) after each task. Energies are squared singular values of `C`, as in their
code. Everything runs in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Subspace:
    """Orthonormal columns `basis` (d x k), float64. DualGPM keeps whichever of the protected subspace and its
    complement is smaller: `complement=False` ("remove" in their code) means `basis` spans the old tasks' inputs,
    `complement=True` ("retain") means it spans the space left free for new branches."""

    basis: torch.Tensor
    complement: bool = False

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    def free(self) -> torch.Tensor:
        """An orthonormal basis (d x m) of the directions not yet protected."""
        return self.basis if self.complement else _orthogonal_complement(self.basis)

    def protected(self) -> torch.Tensor:
        """An orthonormal basis (d x k) of the old tasks' input subspace."""
        return _orthogonal_complement(self.basis) if self.complement else self.basis


def empty(dim: int) -> Subspace:
    """The memory before the first task: nothing protected."""
    return Subspace(torch.zeros(dim, 0, dtype=torch.float64))


def energy_threshold(task: int, num_tasks: int, first: float, last: float) -> float:
    """DualGPM's threshold for (0-based) `task`: linear in the task index from `first`; `last` would be reached one
    task after the last (their code: `lamb + (lame - lamb) * t / T`)."""
    return first + (last - first) * task / num_tasks


def design_down_projection(covariance: torch.Tensor, memory: Subspace, rank: int) -> torch.Tensor:
    """The new branch's down-projection (rank x d): the top left singular vectors of `C` projected on the free
    directions, scaled by 1/sqrt(3) as in their code. Its rows lie in the free space by construction, also where
    that space is degenerate; if it has fewer than `rank` dimensions the remaining rows are zero."""
    free = memory.free()
    directions = torch.linalg.svd(free.T @ covariance.double(), full_matrices=False)[0]
    used = min(rank, directions.shape[1])
    down = torch.zeros(rank, memory.dim, dtype=torch.float64)
    down[:used] = (free @ directions[:, :used]).T / math.sqrt(3)
    return down


def update(memory: Subspace, covariance: torch.Tensor, threshold: float) -> Subspace:
    """DualGPM's update after a task whose inputs have second moment `C`: protect the fewest new directions of `C`
    for the protected subspace to hold at least `threshold` of `C`'s energy; then keep whichever of the subspace
    and its complement is at most half the dimension."""
    covariance = covariance.double()
    total = covariance.square().sum()
    if total == 0:
        return memory
    if memory.complement:
        memory = _shrink_free(memory, covariance, total, threshold)
    else:
        memory = _grow_protected(memory, covariance, total, threshold)
    if not memory.complement and memory.basis.shape[1] > memory.dim / 2:
        memory = Subspace(_orthogonal_complement(memory.basis), complement=True)
    return memory


def _grow_protected(memory: Subspace, covariance: torch.Tensor, total: torch.Tensor, threshold: float) -> Subspace:
    """'remove': add the top directions of the part of `C` outside the protected subspace until the protected part
    of the energy reaches `threshold`."""
    basis = memory.basis
    outside, energies = _directions(covariance - basis @ (basis.T @ covariance))
    captured = 1 - energies.sum() / total
    before_each = captured + _exclusive_cumsum(energies / total)
    new = min(int((before_each < threshold).sum()), outside.shape[1], memory.dim - basis.shape[1])
    if new == 0:
        return memory
    return Subspace(torch.cat([basis, outside[:, :new]], dim=1))


def _shrink_free(memory: Subspace, covariance: torch.Tensor, total: torch.Tensor, threshold: float) -> Subspace:
    """'retain': take the top directions of the part of `C` inside the free space out of it until the free part of
    the energy is below `1 - threshold`."""
    free = memory.basis
    inside, energies = _directions(free @ (free.T @ covariance))
    left = energies.sum() / total
    before_each = left - _exclusive_cumsum(energies / total)
    taken = min(int((before_each >= 1 - threshold).sum()), inside.shape[1], free.shape[1])
    if taken == 0:
        return memory
    kept = free - inside[:, :taken] @ (inside[:, :taken].T @ free)
    remaining = torch.linalg.svd(kept, full_matrices=False)[0][:, : free.shape[1] - taken]
    return Subspace(remaining, complement=True)


def _directions(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors of `matrix` with a numerically non-zero singular value, and their energies (squared
    singular values). Directions of a zero singular value are arbitrary (possibly inside the other subspace): left
    out."""
    left, values, _ = torch.linalg.svd(matrix, full_matrices=False)
    tolerance = values.max() * max(matrix.shape) * torch.finfo(values.dtype).eps if values.numel() else 0.0
    kept = int((values > tolerance).sum())
    return left[:, :kept], values[:kept].square()


def _exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    """`[0, v0, v0 + v1, ...]`: what has accumulated before each entry."""
    return torch.cumsum(values, dim=0) - values


def _orthogonal_complement(basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the complement of `basis`'s (orthonormal) columns."""
    if basis.shape[1] == 0:
        return torch.eye(basis.shape[0], dtype=basis.dtype)
    return torch.linalg.svd(basis, full_matrices=True)[0][:, basis.shape[1] :]
