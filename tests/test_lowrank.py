"""Property tests of the factor-only math against dense references."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdlora_peft import lowrank

dims = st.integers(1, 9)


@st.composite
def factor_sets(draw, max_directions: int = 4):
    """Directions B_k A_k with random shapes, stored concatenated, plus a positive scale for each."""
    out_features, in_features = draw(dims), draw(dims)
    ranks = draw(st.lists(st.integers(1, 4), min_size=1, max_size=max_directions))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    B = torch.randn(out_features, sum(ranks), generator=generator, dtype=torch.float64)
    A = torch.randn(sum(ranks), in_features, generator=generator, dtype=torch.float64)
    scales = torch.rand(len(ranks), generator=generator, dtype=torch.float64) + 0.1
    return B, A, ranks, scales


def dense_directions(B, A, ranks, scales):
    bounds = np.cumsum([0, *ranks])
    return [scales[k] * B[:, bounds[k] : bounds[k + 1]] @ A[bounds[k] : bounds[k + 1]] for k in range(len(ranks))]


@settings(max_examples=60, deadline=None)
@given(factor_sets(max_directions=1))
def test_norms_match_dense(factors):
    B, A, _, _ = factors
    dense = B @ A
    assert torch.allclose(lowrank.frobenius_norm(B, A), torch.linalg.matrix_norm(dense), rtol=1e-9, atol=1e-9)
    assert torch.allclose(lowrank.factor_norm(B, A), B.norm() * A.norm())
    # the factor norm bounds the Frobenius norm from above (why the reference code's normalisation is looser)
    assert lowrank.factor_norm(B, A) >= lowrank.frobenius_norm(B, A) - 1e-9


def test_norm_is_float32_for_half_factors():
    B, A = torch.randn(5, 2, dtype=torch.bfloat16), torch.randn(2, 7, dtype=torch.float16)
    assert lowrank.frobenius_norm(B, A).dtype == torch.float32
    assert lowrank.direction_norm(B, A, "factor").dtype == torch.float32


def test_norm_does_not_overflow_in_half_precision():
    # ||BA||^2 of fp16 factors with entries ~300 overflows fp16 (max 65504) but not float32
    B = torch.full((8, 2), 300.0, dtype=torch.float16)
    A = torch.full((2, 8), 300.0, dtype=torch.float16)
    norm = lowrank.frobenius_norm(B, A)
    assert torch.isfinite(norm)
    assert torch.allclose(norm, torch.tensor(8 * 2 * 300.0 * 300.0), rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(factor_sets())
def test_gram_matrix_matches_dense(factors):
    B, A, ranks, scales = factors
    directions = dense_directions(B, A, ranks, scales)
    expected = torch.tensor([[float((dj * dk).sum()) for dk in directions] for dj in directions], dtype=torch.float64)
    assert torch.allclose(lowrank.gram_matrix(B, A, ranks, scales), expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(factor_sets())
def test_least_squares_fit_matches_dense_lstsq(factors):
    B, A, ranks, scales = factors
    directions = dense_directions(B, A, ranks, scales)
    if len(directions) < 2:
        return
    coefficients, residual = lowrank.least_squares_fit(lowrank.gram_matrix(B, A, ranks, scales))
    design = np.stack([d.flatten().numpy() for d in directions[:-1]], axis=1)
    target = directions[-1].flatten().numpy()
    expected, *_ = np.linalg.lstsq(design, target, rcond=None)
    expected_residual = np.linalg.norm(target - design @ expected) / np.linalg.norm(target)
    # the fitted combinations agree (coefficients may differ when the old directions are dependent)
    assert np.allclose(design @ coefficients.numpy(), design @ expected, atol=1e-6)
    assert abs(residual - expected_residual) < 1e-5


def test_fit_of_a_direction_in_the_span_is_exact():
    generator = torch.Generator().manual_seed(0)
    B = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    A = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    # third direction = 2 * first - 0.5 * second, written as one rank-2 factor pair
    B_all = torch.cat([B[:, :1], B[:, 1:2], torch.cat([2 * B[:, :1], -0.5 * B[:, 1:2]], dim=1)], dim=1)
    A_all = torch.cat([A[:1], A[1:2], A[:2]])
    coefficients, residual = lowrank.least_squares_fit(
        lowrank.gram_matrix(B_all, A_all, [1, 1, 2], torch.ones(3, dtype=torch.float64))
    )
    assert residual < 1e-7
    assert torch.allclose(coefficients, torch.tensor([2.0, -0.5], dtype=torch.float64), atol=1e-9)


def test_zero_target_is_fitted_by_zero():
    B = torch.cat([torch.randn(4, 2, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)], dim=1)
    A = torch.randn(3, 5, dtype=torch.float64)
    coefficients, residual = lowrank.least_squares_fit(lowrank.gram_matrix(B, A, [2, 1], torch.ones(2).double()))
    assert residual == 0.0 and torch.all(coefficients == 0)
