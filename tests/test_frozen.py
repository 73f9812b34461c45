"""The frozen directions' two training strategies (sdlora_peft/frozen.py): the low-rank product beside the base layer
and the fold into the base weight compute the same outputs and gradients, with and without recomputation; the fold
is taken where it pays, folded once per optimizer step and freed when unused; recomputation keeps no tokens x R
tensor for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CASE_BY_NAME, put_old_direction, sdlora_layers, train_steps
from peft import PeftModel, get_peft_model
from torch import nn
from torch.nn import functional as F

from sdlora_peft import SDLoraConfig, frozen

VIT_CASE = CASE_BY_NAME["vit"]
STRATEGIES = [("lowrank", True), ("fold", False), ("fold", True)]
"""Compared with the low-rank path without recomputation."""
PRECISIONS = [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)]
"""(model dtype, autocast_adapter_dtype): float32; bfloat16 with float32 adapters (PEFT's default); all bfloat16."""

# ----------------------------------------------------------------------------------------------------------------
# The autograd functions
# ----------------------------------------------------------------------------------------------------------------


def layer_inputs(*leading: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """(x, weight, bias, A, B, column_scales) of a 6 -> 7 layer with 5 frozen columns; x and the scales train."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*leading, 6, generator=generator, dtype=dtype).requires_grad_()
    weight, bias = (
        torch.randn(7, 6, generator=generator, dtype=dtype),
        torch.randn(7, generator=generator, dtype=dtype),
    )
    A, B = torch.randn(5, 6, generator=generator, dtype=dtype), torch.randn(7, 5, generator=generator, dtype=dtype)
    return x, weight, bias, A, B, torch.randn(5, generator=generator, dtype=dtype).requires_grad_()


def low_rank(x, weight, bias, A, B, column_scales, recompute=False):
    """The base layer plus the frozen directions' low-rank product, as a layer computes them unfolded."""
    return F.linear(x, weight, bias) + frozen.FrozenLowRank.apply(x, None, A, B, column_scales, recompute)[0]


def folded(x, weight, bias, A, B, column_scales, recompute=False):
    """The same as one product with the folded weight."""
    weight_folded = frozen.fold(weight, A, B, column_scales)
    return frozen.FoldedLinear.apply(x, None, weight, bias, weight_folded, A, B, column_scales, recompute)


FUNCTIONS = {"lowrank": low_rank, "fold": folded}


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("strategy", ["lowrank", "fold"])
@pytest.mark.parametrize("leading", [(), (4,), (2, 3)])
def test_functions_compute_the_dense_math_with_exact_first_and_second_derivatives(leading, strategy, recompute):
    x, weight, bias, A, B, column_scales = layer_inputs(*leading)
    dense = F.linear(x, weight + B @ torch.diag(column_scales) @ A, bias)
    assert torch.allclose(FUNCTIONS[strategy](x, weight, bias, A, B, column_scales, recompute), dense)

    weight.requires_grad_(strategy == "fold"), bias.requires_grad_(strategy == "fold")  # if the base layer trains

    def function(x, column_scales, weight, bias):
        return FUNCTIONS[strategy](x, weight, bias, A, B, column_scales, recompute)

    inputs = (x, column_scales, weight, bias)
    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)  # e.g. a Hessian of the magnitudes


@pytest.mark.parametrize("strategy", ["lowrank", "fold"])
def test_per_sample_gradients_under_torch_func(strategy):
    x, weight, bias, A, B, column_scales = layer_inputs(4)

    def loss(sample, scales):
        return FUNCTIONS[strategy](sample, weight, bias, A, B, scales).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=1), in_dims=(0, None))(x.detach(), column_scales)
    expected = torch.stack([torch.autograd.grad(loss(sample, column_scales), column_scales)[0] for sample in x])
    torch.testing.assert_close(per_sample, expected)


@pytest.mark.parametrize("strategy", ["lowrank", "fold"])
@pytest.mark.parametrize("precision", ["autocast", "bfloat16 inputs"])
def test_functions_match_autograd_in_low_precision(strategy, precision):
    dtype = torch.bfloat16 if precision == "bfloat16 inputs" else torch.float32
    x, weight, bias, A, B, column_scales = (t.detach().float() for t in layer_inputs(2, 3))
    x, column_scales = x.to(dtype).requires_grad_(), column_scales.to(dtype).requires_grad_()
    weight, bias = weight.to(dtype), bias.to(dtype)  # the base layer in the model's dtype; A, B float32, as PEFT's
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        actual = FUNCTIONS[strategy](x, weight, bias, A, B, column_scales)
        plain = F.linear(x, weight, bias) + F.linear(F.linear(x, A.to(dtype)) * column_scales, B.to(dtype))
    assert actual.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(actual, plain, rtol=0.02, atol=0.05)
    actual_grads = torch.autograd.grad(actual.float().square().sum(), (x, column_scales))
    plain_grads = torch.autograd.grad(plain.float().square().sum(), (x, column_scales))
    for actual_grad, plain_grad in zip(actual_grads, plain_grads):
        assert actual_grad.dtype == dtype  # the inputs' dtype
        scale = plain_grad.abs().max().item()
        torch.testing.assert_close(actual_grad, plain_grad, rtol=0.02, atol=0.02 * scale)


# ----------------------------------------------------------------------------------------------------------------
# Through a model: the strategies agree, in every gradient
# ----------------------------------------------------------------------------------------------------------------


def trained_vit(dtype: torch.dtype, autocast_adapter_dtype: bool, sharing: str) -> tuple[nn.Module, dict]:
    """A tiny ViT with frozen directions of ranks 3 and 1, a KD-absorbed task between them, and a trained current
    direction of rank 2."""
    torch.manual_seed(0)
    config = SDLoraConfig(rank_schedule=[3, 3, 1, 2], magnitude_sharing=sharing, kd_threshold=9e-4)
    model = get_peft_model(VIT_CASE.build().to(dtype), config, autocast_adapter_dtype=autocast_adapter_dtype)
    inputs = {"pixel_values": VIT_CASE.inputs()["pixel_values"].to(dtype)}
    train_steps(model, inputs, steps=2)
    assert not model.advance_task().absorbed
    put_old_direction(model)
    assert model.advance_task().absorbed
    train_steps(model, inputs, steps=2)
    assert not model.advance_task().absorbed
    train_steps(model, inputs, steps=2)
    assert model.peft_config["default"].frozen_ranks == [3, 1]
    return model, inputs


def use_strategy(model: nn.Module, path: str, recompute: bool) -> nn.Module:
    """A copy of `model` whose layers take `path` for their frozen directions."""
    model = copy.deepcopy(model)
    for layer in sdlora_layers(model):
        layer.sdlora_frozen_path["default"], layer.sdlora_frozen_recompute["default"] = path, recompute
    return model


def backward_functions(tensor: torch.Tensor) -> set[str]:
    """The names of every node in `tensor`'s autograd graph."""
    names, seen, pending = set(), set(), [tensor.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        pending.extend(next_node for next_node, _ in node.next_functions)
    return names


def outputs_and_gradients(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], set[str]]:
    """Logits, the gradients of every trainable parameter and of the input, and the autograd graph's node names."""
    model.train()
    pixel_values = inputs["pixel_values"].clone().requires_grad_()
    logits = model(pixel_values=pixel_values).logits
    logits.float().square().mean().backward()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), {**gradients, "input": pixel_values.grad}, backward_functions(logits)


def relative_errors(results: tuple, reference: tuple) -> dict[str, float]:
    """Largest difference of the logits and of each gradient, relative to the reference's largest entry."""
    pairs = {"logits": (results[0], reference[0])} | {
        name: (results[1][name], grad) for name, grad in reference[1].items()
    }
    return {
        name: float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())
        for name, (actual, expected) in pairs.items()
    }


@pytest.mark.parametrize(("dtype", "autocast_adapter_dtype"), PRECISIONS, ids=["float32", "bf16", "bf16-adapters"])
@pytest.mark.parametrize("sharing", ["global", "layer"])
def test_fold_and_recomputation_give_the_low_rank_paths_outputs_and_gradients(sharing, dtype, autocast_adapter_dtype):
    """In float32 the strategies agree to 1e-5. In bfloat16 each is compared with the float32 computation: none is
    further from it than twice the low-rank path's own bfloat16 error, or 10% (the fold rounds `W0 + update` to
    bfloat16 as a merge does, the low-rank path rounds the two terms' sum: a tiny random model's gradients differ
    from float32 by up to ~13% either way)."""
    model, inputs = trained_vit(dtype, autocast_adapter_dtype, sharing)
    low_rank = outputs_and_gradients(use_strategy(model, "lowrank", False), inputs)
    assert "FrozenLowRankBackward" in low_rank[2] and "FoldedLinearBackward" not in low_rank[2]
    assert any("sdlora_magnitude" in name for name in low_rank[1])
    assert all(grad.abs().max() > 0 for grad in low_rank[1].values())  # all of them train, old magnitudes too
    if dtype == torch.float32:
        reference, bounds = low_rank, dict.fromkeys(["logits", *low_rank[1]], 1e-5)
    else:
        exact = use_strategy(model, "lowrank", False).float()
        reference = outputs_and_gradients(exact, {"pixel_values": inputs["pixel_values"].float()})
        bounds = {name: max(2 * error, 0.1) for name, error in relative_errors(low_rank, reference).items()}
    for path, recompute in STRATEGIES:
        results = outputs_and_gradients(use_strategy(model, path, recompute), inputs)
        assert ("FoldedLinearBackward" in results[2]) == (path == "fold") != ("FrozenLowRankBackward" in results[2])
        assert results[1].keys() == low_rank[1].keys()
        for name, error in relative_errors(results, reference).items():
            assert error <= bounds[name], f"{path}, recompute={recompute}: {name} differs by {error:.1e}"


# ----------------------------------------------------------------------------------------------------------------
# One layer: when the fold is taken, how often it is built, what backward keeps
# ----------------------------------------------------------------------------------------------------------------

IN, OUT, RANKS = 40, 24, (3, 2)


def one_layer_model(dtype: torch.dtype = torch.float32, autocast_adapter_dtype: bool = True, **cfg) -> nn.Module:
    """One adapted 40 -> 24 Linear with frozen directions of ranks 3 and 2 and a current one of rank 1."""
    torch.manual_seed(0)
    config = SDLoraConfig(target_modules=["0"], rank_schedule=[*RANKS, 1], **cfg)
    base = nn.Sequential(nn.Linear(IN, OUT)).to(dtype)
    model = get_peft_model(base, config, autocast_adapter_dtype=autocast_adapter_dtype)
    for _ in RANKS:
        train_steps(model, torch.randn(8, IN, dtype=dtype), steps=1)
        model.advance_task()
    train_steps(model, torch.randn(8, IN, dtype=dtype), steps=1)
    return model.train()


@pytest.mark.parametrize("recompute", [False, True])
def test_auto_folds_from_the_break_even_token_count_on(recompute):
    """From the measured break-even on, or, where the fold would keep its weight for backward, from a margin above."""
    model = use_strategy(one_layer_model(), "auto", recompute)
    factor = frozen.FOLD_BREAK_EVEN * (1 if recompute else frozen.KEPT_WEIGHT_MARGIN)
    break_even = factor * IN * OUT / (IN + OUT)
    first_folding = next(tokens for tokens in range(1, 1000) if frozen.fold_pays(tokens, IN, OUT, recompute))
    assert first_folding - 1 < break_even <= first_folding
    for shape, folds in [
        ((first_folding - 1, IN), False),
        ((first_folding, IN), True),
        ((2, first_folding, IN), True),
    ]:
        graph = backward_functions(model(torch.randn(*shape)))
        assert ("FoldedLinearBackward" in graph) == folds, shape
    forced = use_strategy(model, "fold", recompute)
    assert "FoldedLinearBackward" in backward_functions(forced(torch.randn(1, IN)))


@pytest.mark.parametrize("recompute", [False, True])
def test_second_derivatives_of_the_magnitudes_agree(recompute):
    """Double backward through a layer that folds (with its kept folded weight or without) gives the low-rank path's
    Hessian of the magnitudes."""
    x = torch.randn(30, IN, dtype=torch.float64)
    hessians = {}
    for path in ("lowrank", "fold"):
        model = use_strategy(one_layer_model(), path, recompute).double()
        magnitude = sdlora_layers(model)[0].magnitude("default")
        (gradient,) = torch.autograd.grad(model(x).square().sum(), magnitude, create_graph=True)
        hessians[path] = torch.stack([torch.autograd.grad(g, magnitude, retain_graph=True)[0] for g in gradient])
    assert hessians["lowrank"].abs().max() > 0
    torch.testing.assert_close(hessians["fold"], hessians["lowrank"])


def test_config_chooses_the_strategy():
    layer = sdlora_layers(one_layer_model(frozen_path="lowrank", frozen_recompute=True))[0]
    assert layer.sdlora_frozen_path == {"default": "lowrank"} and layer.sdlora_frozen_recompute == {"default": True}
    assert "FoldedLinearBackward" not in backward_functions(layer(torch.randn(1000, IN)))


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    # a fused step leaves the parameters' `_version` as it was (Trainer's default optimizer is fused AdamW)
    "fused-adamw": lambda params: torch.optim.AdamW(params, lr=0.1, fused=True),
}


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS)
def test_the_weight_is_folded_once_per_optimizer_step_and_freed_when_unused(monkeypatch, make_optimizer):
    """Micro-batches of one step share one folded weight; after the step (of any optimizer, fused ones included) it
    is folded again; evaluation and the low-rank path free it. The accumulated gradients and the trained parameters
    match the low-rank path's."""
    folds = []
    fold = frozen.fold
    monkeypatch.setattr(frozen, "fold", lambda *args: folds.append(1) or fold(*args))
    models = {path: use_strategy(one_layer_model(), path, False) for path in ("lowrank", "fold")}
    micro_batches = [torch.randn(6, IN) for _ in range(3)]
    for path, model in models.items():
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        for step in range(2):
            for x in micro_batches:
                model(x).square().mean().backward()
            assert len(folds) == (step + 1 if path == "fold" else 0)
            optimizer.step()
            optimizer.zero_grad()
    for (name, expected), actual in zip(models["lowrank"].named_parameters(), models["fold"].parameters()):
        torch.testing.assert_close(actual, expected, msg=name)

    layer = sdlora_layers(models["fold"])[0]
    assert layer._folded_weight is not None
    models["fold"].eval()
    assert layer._folded_weight is None
    models["fold"].train()
    layer(torch.randn(2, IN))
    layer.sdlora_frozen_path["default"] = "lowrank"
    layer(torch.randn(2, IN))
    assert layer._folded_weight is None

    folds.clear()
    recomputing = use_strategy(models["fold"], "fold", True)
    for x in micro_batches:
        recomputing(x).sum().backward()
    assert len(folds) == len(micro_batches) and sdlora_layers(recomputing)[0]._folded_weight is None


def saved_for_backward(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        output = model(x)
    output.float().sum().backward()
    return saved


@pytest.mark.parametrize(("dtype", "autocast_adapter_dtype"), PRECISIONS, ids=["float32", "bf16", "bf16-adapters"])
@pytest.mark.parametrize("path", ["lowrank", "fold"])
def test_recomputation_keeps_only_the_input_the_layer_keeps_anyway(path, dtype, autocast_adapter_dtype):
    """Without recomputation backward keeps the tokens x R projection (and the fold its folded weight); with it,
    neither: the frozen path keeps the input that the current direction's product keeps anyway, no copy of it."""
    tokens, frozen_rank = 50, sum(RANKS)
    model = one_layer_model(dtype, autocast_adapter_dtype)
    x = torch.randn(tokens, IN, dtype=dtype, requires_grad=True)
    for recompute in (False, True):
        strategy = use_strategy(model, path, recompute)
        base_weight = sdlora_layers(strategy)[0].base_layer.weight
        saved = saved_for_backward(strategy, x)
        projections = [t for t in saved if t.shape == (tokens, frozen_rank)]
        folded_weights = [t for t in saved if t.shape == (OUT, IN) and t.data_ptr() != base_weight.data_ptr()]
        inputs = {(t.dtype, t.data_ptr()) for t in saved if t.shape == (tokens, IN)}
        assert bool(projections) == (not recompute and path == "lowrank")
        assert bool(folded_weights) == (not recompute and path == "fold")
        assert len(inputs) == 1, "one copy of the input, the current direction's"


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_frozen_factors_are_stored_in_the_adapters_dtype(tmp_path, autocast_adapter_dtype):
    """A bfloat16 model keeps its frozen directions in float32 under PEFT's default autocast, and in bfloat16 with
    `autocast_adapter_dtype=False` (half the memory of the method's state), after training and after a load."""
    expected = torch.float32 if autocast_adapter_dtype else torch.bfloat16
    model, _ = trained_vit(torch.bfloat16, autocast_adapter_dtype, "global")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(
        VIT_CASE.build().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast_adapter_dtype
    )
    for adapted in (model, loaded):
        for layer in sdlora_layers(adapted):
            assert layer.sdlora_A["default"].dtype == expected
            for name in ("sdlora_frozen_A", "sdlora_frozen_B", "sdlora_frozen_scale"):
                assert getattr(layer, name)["default"].dtype == expected, name
