"""Property tests of InfLoRA's subspace math (DualGPM memory, designed down-projections) against its definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdlora_peft.continual.methods.subspace import (
    Subspace,
    design_down_projection,
    empty,
    energy_threshold,
    update,
)


@st.composite
def task_inputs(draw, max_dim: int = 12):
    """Inputs of a few tasks to one layer, each task's in a random subspace of its own rank (as rows)."""
    dim = draw(st.integers(3, max_dim))
    ranks = draw(st.lists(st.integers(1, dim), min_size=1, max_size=4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tasks = []
    for rank in ranks:
        basis = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))[0]
        scales = torch.rand(rank, generator=generator, dtype=torch.float64) + 0.5
        tasks.append((torch.randn(50, rank, generator=generator, dtype=torch.float64) * scales) @ basis.T)
    return tasks


def moment(inputs: torch.Tensor) -> torch.Tensor:
    return inputs.T @ inputs / len(inputs)


def energy_share(covariance: torch.Tensor, basis: torch.Tensor) -> float:
    """The share of `covariance`'s energy (squared singular values) inside the span of `basis`."""
    return float((basis @ (basis.T @ covariance)).square().sum() / covariance.square().sum())


def assert_orthonormal(basis: torch.Tensor) -> None:
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype), atol=1e-9)


@settings(max_examples=80, deadline=None)
@given(task_inputs(), st.floats(0.5, 0.999), st.integers(1, 6))
def test_memory_and_designs_over_a_task_sequence(tasks, threshold, rank):
    """After every task: the memory is orthonormal, at most half the dimension (the other half is the complement),
    holds at least `threshold` of each task's energy, never forgets a protected direction; each designed
    down-projection is orthogonal to it and takes the top directions of what it leaves free."""
    dim = tasks[0].shape[1]
    memory = empty(dim)
    for inputs in tasks:
        covariance = moment(inputs)
        down = design_down_projection(covariance, memory, rank)
        protected_before = memory.protected()
        assert down.shape == (rank, dim)
        assert (down @ protected_before).abs().sum() <= 1e-9
        free = memory.free()
        rows = min(rank, free.shape[1])
        assert torch.allclose(down[:rows] @ down[:rows].T, torch.eye(rows, dtype=down.dtype) / 3, atol=1e-9)
        assert not down[rows:].any()
        # the rows span the top directions of C projected on the free space: no other free direction captures more
        projected = free @ (free.T @ covariance)
        top = torch.linalg.svdvals(projected)[:rows].square().sum()
        assert float((down[:rows] * math.sqrt(3) @ projected).square().sum()) >= float(top) * (1 - 1e-9) - 1e-12

        memory = update(memory, covariance, threshold)
        assert_orthonormal(memory.basis)
        assert memory.basis.shape[1] <= dim / 2  # the protected subspace or, past half, its complement
        protected = memory.protected()
        assert_orthonormal(protected)
        assert energy_share(covariance, protected) >= threshold - 1e-9
        if protected_before.shape[1]:  # nothing protected is let go
            inside = protected @ (protected.T @ protected_before)
            assert torch.allclose(inside, protected_before, atol=1e-8)


@settings(max_examples=60, deadline=None)
@given(task_inputs(), st.floats(0.5, 0.999), st.integers(1, 6), st.integers(0, 2**16))
def test_a_later_branch_changes_earlier_inputs_only_outside_the_memory(tasks, threshold, rank, seed):
    """Interference-free where the memory covers: whatever a later branch's up-projection, the layer's output on the
    part of an earlier task's inputs inside the memory does not change, and on the rest it changes at most by the
    branch's norm times what the memory leaves out."""
    dim = tasks[0].shape[1]
    memory = empty(dim)
    seen: list[torch.Tensor] = []
    up = torch.randn(7, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for inputs in tasks:
        change = up @ design_down_projection(moment(inputs), memory, rank)  # the branch's weight change
        protected = memory.protected()
        for old in seen:
            covered = old @ protected @ protected.T
            assert (covered @ change.T).abs().max() <= 1e-9 * (1 + old.abs().max())
            left_out = (old - covered).norm(dim=1)
            bound = torch.linalg.matrix_norm(change, ord=2) * left_out
            assert ((old @ change.T).norm(dim=1) <= bound + 1e-9).all()
        memory = update(memory, moment(inputs), threshold)
        seen.append(inputs)


def test_inputs_of_balanced_energy_are_covered_completely():
    """A task whose inputs span 3 of 8 dimensions with comparable energies is protected whole: a later branch leaves
    its outputs exactly as they were."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 3, generator=generator, dtype=torch.float64))[0]
    old = torch.randn(100, 3, generator=generator, dtype=torch.float64) @ basis.T
    memory = update(empty(8), moment(old), threshold=0.95)
    assert memory.basis.shape[1] == 3
    new = torch.randn(100, 8, generator=generator, dtype=torch.float64)
    change = torch.randn(5, 4, generator=generator, dtype=torch.float64) @ design_down_projection(
        moment(new), memory, 4
    )
    assert change.abs().max() > 0.1
    assert (old @ change.T).abs().max() < 1e-12


def test_the_first_task_protects_the_fewest_directions_that_reach_the_threshold():
    """Energies (squared singular values of C) 0.5, 0.3, 0.2: a threshold of 0.79 needs two directions, 0.81 three.
    (The reference code's first-task rule counts those strictly below the threshold, one fewer; its rule for later
    tasks and the paper's criterion agree with this.)"""
    energies = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    covariance = basis @ torch.diag(energies.sqrt()) @ basis.T
    for threshold, protected in ((0.49, 1), (0.51, 2), (0.79, 2), (0.81, 3), (0.999, 3)):
        memory = update(empty(7), covariance, threshold)
        assert memory.basis.shape[1] == protected and not memory.complement, threshold


def test_past_half_the_dimension_the_memory_keeps_the_complement():
    covariance = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0, 1e-3, 1e-3], dtype=torch.float64))
    memory = update(empty(6), covariance, threshold=0.99)
    assert memory.complement and memory.basis.shape == (6, 2)  # 4 protected: the 2 free directions are stored
    assert torch.allclose(memory.basis @ memory.basis.T, torch.diag(torch.tensor([0.0] * 4 + [1.0] * 2)).double())
    down = design_down_projection(torch.eye(6, dtype=torch.float64), memory, rank=3)
    assert down[:, :4].abs().max() < 1e-12 and not down[2].any()  # two free directions, the third row stays zero
    later = update(memory, torch.diag(torch.tensor([0.0] * 4 + [1.0, 0.5], dtype=torch.float64)), 0.99)
    assert later.complement and later.basis.shape[1] == 0  # the last free directions taken: nothing left to design
    assert not design_down_projection(torch.eye(6, dtype=torch.float64), later, rank=2).any()


def test_no_new_energy_leaves_the_memory_as_it_is():
    memory = Subspace(torch.eye(5, dtype=torch.float64)[:, :2])
    inside = torch.diag(torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(update(memory, inside, 0.95).basis, memory.basis)
    assert update(memory, torch.zeros(5, 5), 0.95) is memory


@pytest.mark.parametrize(("task", "expected"), [(0, 0.95), (5, 0.975), (9, 0.995)])
def test_threshold_rises_linearly_towards_its_end_value(task, expected):
    assert energy_threshold(task, 10, 0.95, 1.0) == pytest.approx(expected)
