"""Low-rank math of SD-LoRA on factors, without ever forming a dense out x in matrix.

A direction is a product `B @ A` with `B: out x r` and `A: r x in`. Several directions are kept side by side as
concatenated factors (`B: out x R`, `A: R x in`, `R` the sum of their ranks). Every quantity here goes through
`r x r` (or `R x R`) products: `<B_j A_j, B_k A_k>_F = trace((B_j^T B_k)(A_k A_j^T))`.
"""

from __future__ import annotations

import torch


def frobenius_norm(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """`||B @ A||_F` in float32 (or float64 if given), via `trace((B^T B)(A A^T))`."""
    B, A = _upcast(B), _upcast(A)
    squared = ((B.T @ B) * (A @ A.T)).sum()
    return squared.clamp_min(0).sqrt()


def factor_norm(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """`||B||_F * ||A||_F`, the reference code's upper bound of `||B @ A||_F`."""
    return torch.linalg.vector_norm(_upcast(B)) * torch.linalg.vector_norm(_upcast(A))


def direction_norm(B: torch.Tensor, A: torch.Tensor, kind: str) -> torch.Tensor:
    """The norm named by `SDLoraConfig.direction_norm`: "frobenius" or "factor"."""
    if kind == "frobenius":
        return frobenius_norm(B, A)
    if kind == "factor":
        return factor_norm(B, A)
    raise ValueError(f"Unknown direction norm {kind!r}; use 'frobenius' or 'factor'.")


def gram_matrix(B: torch.Tensor, A: torch.Tensor, ranks: list[int], scales: torch.Tensor) -> torch.Tensor:
    """Gram matrix `G_jk = <s_j B_j A_j, s_k B_k A_k>_F` of directions stored as concatenated factors.

    `ranks[k]` is the number of columns of `B` (rows of `A`) that belong to direction k; `scales[k]` is `s_k`.
    Computed in the dtype of `scales` (pass float64 for least-squares fits near a threshold).
    """
    dtype = scales.dtype
    B, A = B.to(dtype), A.to(dtype)
    entrywise = (B.T @ B) * (A @ A.T)  # R x R; A A^T is symmetric, so this is P_ab * Q_ba
    membership = _membership(ranks, dtype, B.device)  # R x T
    return (membership.T @ entrywise @ membership) * torch.outer(scales, scales)


def least_squares_fit(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Fit the last direction by the others: `c = argmin ||D_T - sum_k c_k D_k||_F`, from their Gram matrix alone.

    Returns the coefficients (one per earlier direction) and the residual norm relative to `||D_T||_F`, which is
    the paper's residual when the directions have unit norm. The pseudo-inverse copes with dependent or zero
    directions. A zero target is fitted exactly by zero coefficients.
    """
    old, cross, target = gram[:-1, :-1], gram[:-1, -1], gram[-1, -1]
    # A Gram matrix squares condition numbers: eigenvalues below 1e-10 of the largest are dependence, not signal.
    coefficients = torch.linalg.pinv(old, hermitian=True, rtol=1e-10) @ cross
    if target <= 0:
        return torch.zeros_like(cross), 0.0
    residual_squared = (target - cross @ coefficients).clamp_min(0)
    return coefficients, float((residual_squared / target).sqrt())


def _membership(ranks: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`R x T` indicator: column k is 1 on the rows that belong to direction k."""
    owner = torch.repeat_interleave(torch.arange(len(ranks), device=device), torch.tensor(ranks, device=device))
    return torch.nn.functional.one_hot(owner, num_classes=len(ranks)).to(dtype)


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def truncate(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` approximation `B_k @ A_k` of `B @ A` (Eckart-Young), from the factors alone.

    QR of `B` and `A^T` leaves a small core `R_B R_A^T` (at most `R x R`) whose SVD gives the singular values of
    `B @ A`; no `out x in` matrix is formed. The singular values are split evenly between the two factors. Returns
    `B_k` (out x rank), `A_k` (rank x in), zero-padded when `B @ A` has a lower rank, and the relative Frobenius
    error `||B A - B_k A_k||_F / ||B A||_F` (0.0 for a zero product). Computed in the inputs' dtype (pass float64).
    """
    Q_B, R_B = torch.linalg.qr(B)
    Q_A, R_A = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T)
    kept = min(rank, S.numel())
    root = S[:kept].sqrt()
    B_k = B.new_zeros(B.shape[0], rank)
    A_k = A.new_zeros(rank, A.shape[1])
    B_k[:, :kept] = Q_B @ (U[:, :kept] * root)
    A_k[:kept] = (root.unsqueeze(1) * Vh[:kept]) @ Q_A.T
    total = S.square().sum()
    error = float((S[kept:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return B_k, A_k, error
