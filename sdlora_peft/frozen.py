"""The frozen directions of an SD-LoRA layer in training: two strategies that compute the same function.

A layer's frozen directions are concatenated factors `A` (R x in) and `B` (out x R) with one scale per column
(`alpha_k c_k / ||B_k A_k||` of the column's task, differentiable in the magnitudes `alpha`). For N tokens:

- low-rank (`FrozenLowRank`): `((x A^T) * s) B^T` beside the base layer. Four products of N x R per step, two
  forward and two backward: about `2 N R (in + out)` multiply-adds.
- fold (`FoldedLinear`): the base layer's own product, with `W0 + B diag(s) A` as its weight. Folding costs
  `R in out` once per step; the scales' gradient still needs `x A^T` and `grad B` (`N R (in + out)`), and the
  input's gradient goes through the folded weight at the base layer's cost. So it pays from about
  `in out / (in + out)` tokens on (`fold_pays` says where `frozen_path="auto"` folds, and the constants why).

Neither forms a dense gradient of the frozen directions: the scales' gradient is `sum over tokens of (grad B) *
(x A^T)`, N x R products only.

Both keep, for backward, either the N x R projection `x A^T` (and the fold its folded weight), or, with
`recompute=True`, nothing but the input that the layer keeps anyway for its current direction: the projection is
then computed again in backward, and the fold sends the input's gradient through `W0` and the factors instead of a
kept weight. That input is `x` itself, or, where the current factors have another dtype than `x` (a bfloat16
model with float32 adapters), its copy in their dtype, passed as `kept` so that no second copy is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

FOLD_BREAK_EVEN = 1.0
"""Tokens from which the fold is the faster path, as a multiple of the operation count's `in * out / (in + out)`.
Measured per layer on a CPU core (forward and backward; 768 x 768 at R = 40 and 190, 768 x 3072, 3072 x 768), the
two paths cost the same at 0.75-1.0 of the count; at twice it the fold saves about 10% of the layer's cost."""

KEPT_WEIGHT_MARGIN = 2.0
"""Without recomputation the fold keeps an `out x in` weight per layer for backward, several times the `tokens x R`
projection the low-rank path keeps near the break-even, for a saving of a few percent of the layer there (under 1%
of a ViT-B training step): `auto` then folds from this many times the break-even on."""


_optimizer_steps = [0]


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _optimizer_steps[0] += 1


# A folded weight kept between the micro-batches of one optimizer step must be folded again after the step. Tensor
# versions do not tell: fused optimizers (AdamW(fused=True), Trainer's default) update parameters without bumping
# `_version`. Every torch optimizer's step runs the global post-step hooks, so a count of steps does.
register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """How many optimizer steps (of any torch optimizer) this process has taken: part of a kept fold's key."""
    return _optimizer_steps[0]


def fold_pays(tokens: int, in_features: int, out_features: int, recompute: bool) -> bool:
    """Whether `frozen_path="auto"` folds a layer's frozen directions for `tokens` (batch x sequence) tokens."""
    factor = FOLD_BREAK_EVEN if recompute else FOLD_BREAK_EVEN * KEPT_WEIGHT_MARGIN
    return tokens * (in_features + out_features) >= factor * in_features * out_features


def fold(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, column_scales: torch.Tensor) -> torch.Tensor:
    """`weight + B diag(column_scales) A` (weight as out x in), summed in float32 (or float64) and returned in the
    weight's dtype, as a merge would store it; no gradient flows through it."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        update = B.to(dtype) * column_scales.to(dtype)
        return torch.addmm(weight.to(dtype), update, A.to(dtype)).to(weight.dtype)


class FrozenLowRank(torch.autograd.Function):
    """`((x A^T) * column_scales) B^T` with frozen factors `A` (R x in) and `B` (out x R), in `x`'s dtype (or in
    autocast's, under torch.autocast). Returns the result and the projection `x A^T`.

    Plain autograd would keep the copies of `A` and `B` cast to that dtype until the backward pass, in every layer
    (at small batches more memory than the low-rank activations themselves); this keeps the stored factors and casts
    them again there. Gradients flow to `x` and `column_scales` only: the factors are frozen. With `recompute`, the
    function keeps `x` (or `kept`, its copy that the layer keeps anyway; None if there is none) instead of the
    projection, and computes the projection again in backward. The projection is an output of its own so that double
    backward reaches `x` through it; torch.func derives its batching rule.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: torch.Tensor,
        kept: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        column_scales: torch.Tensor,
        recompute: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.linear(x, A.to(x.dtype))
        return F.linear(hidden * column_scales, B.to(x.dtype)), hidden

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, kept, A, B, column_scales, recompute = inputs
        ctx.save_for_backward(_input_to_keep(x, kept) if recompute else output[1], A, B, column_scales)
        ctx.recompute = recompute
        ctx.input_dtype, ctx.dtype = x.dtype, output[1].dtype  # they differ under autocast
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_output: torch.Tensor | None, grad_hidden: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None, None, torch.Tensor | None, None]:
        saved, A, B, column_scales = ctx.saved_tensors
        # the products run in the forward's dtype, the scaling in the scales' dtype (they differ under autocast)
        dtype = ctx.dtype
        grad_x = grad_scales = None
        if grad_output is not None:
            grad_scaled = grad_output.to(dtype) @ B.to(dtype)
            if ctx.needs_input_grad[4]:
                hidden = F.linear(saved.to(dtype), A.to(dtype)) if ctx.recompute else saved
                grad_scales = _scales_gradient(grad_scaled, hidden, column_scales)
            through_scales = (grad_scaled * column_scales).to(dtype)
            grad_hidden = through_scales if grad_hidden is None else grad_hidden.to(dtype) + through_scales
        if ctx.needs_input_grad[0] and grad_hidden is not None:
            grad_x = (grad_hidden @ A.to(dtype)).to(ctx.input_dtype)
        return grad_x, None, None, None, grad_scales, None


class FoldedLinear(torch.autograd.Function):
    """`x W^T + bias` with `W = weight + B diag(column_scales) A` already folded (`folded`, from `fold`): the base
    layer and the frozen directions in one product, in `x`'s dtype (or autocast's).

    Gradients: to `column_scales` from the projections `x A^T`, computed in backward from `x` (or from `kept`, its
    copy that the layer keeps anyway; None if there is none), and `grad B`; to `x` through `folded`, or, with
    `recompute` (the folded weight is not kept) and in double backward, through `weight` and the factors; to
    `weight` and `bias` if they train. No gradient flows through `folded`: it is a function of the other inputs.
    torch.func derives its batching rule.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: torch.Tensor,
        kept: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        folded: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        column_scales: torch.Tensor,
        recompute: bool,
    ) -> torch.Tensor:
        return F.linear(x, folded, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, kept, weight, _, folded, A, B, column_scales, recompute = inputs
        ctx.save_for_backward(_input_to_keep(x, kept), weight, None if recompute else folded, A, B, column_scales)
        ctx.input_dtype, ctx.dtype = x.dtype, output.dtype  # they differ under autocast
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_output: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None, torch.Tensor | None, None, None, None, Any, None]:
        if grad_output is None:
            return None, None, None, None, None, None, None, None, None
        kept, weight, folded, A, B, column_scales = ctx.saved_tensors
        dtype = ctx.dtype
        grad = grad_output.to(dtype)
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        needs_scales = ctx.needs_input_grad[7]
        grad_x = grad_weight = grad_bias = grad_scales = None
        # double backward differentiates these formulas, and the kept folded weight has no history
        through_factors = needs_x and (folded is None or torch.is_grad_enabled())
        if needs_scales or through_factors:
            grad_scaled = grad @ B.to(dtype)
            if needs_scales:
                grad_scales = _scales_gradient(grad_scaled, F.linear(kept.to(dtype), A.to(dtype)), column_scales)
            if through_factors:
                grad_x = grad @ weight.to(dtype) + (grad_scaled * column_scales).to(dtype) @ A.to(dtype)
        if needs_x and not through_factors:
            grad_x = grad @ folded.to(dtype)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.input_dtype)
        if needs_weight:
            tokens = grad.reshape(-1, grad.shape[-1])
            grad_weight = (tokens.T @ kept.reshape(-1, kept.shape[-1]).to(dtype)).to(weight.dtype)
        if needs_bias:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_weight, grad_bias, None, None, None, grad_scales, None


def _input_to_keep(x: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """The layer's input as backward keeps it: the copy the layer keeps anyway if there is one."""
    return x if kept is None else kept


def _scales_gradient(grad_scaled: torch.Tensor, hidden: torch.Tensor, column_scales: torch.Tensor) -> torch.Tensor:
    """`sum over tokens of (grad B) * (x A^T)`, in the scales' dtype."""
    scale_dtype = column_scales.dtype
    products = grad_scaled.to(scale_dtype) * hidden.to(scale_dtype)
    return products.reshape(-1, hidden.shape[-1]).sum(0)
