"""torch.compile on SD-LoRA models: same outputs and gradients as eager, and no graph break in an adapted layer.

The backend is "aot_eager": it runs Dynamo's graph capture and AOTAutograd's forward/backward tracing, where
graph breaks and tracing failures show up, without inductor's code generation, which takes minutes on a small CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CASE_BY_NAME, loss_and_grads, make_peft, output, sdlora_layers, train_steps

VIT_CASE = CASE_BY_NAME["vit"]
BACKEND = "aot_eager"
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def trained_vit(tasks: int = 2, magnitude_sharing: str = "global"):
    """A tiny ViT whose SD-LoRA adapter has `tasks` frozen directions and a trained current one."""
    _, model = make_peft(VIT_CASE, r=3, magnitude_sharing=magnitude_sharing)
    inputs = VIT_CASE.inputs()
    for _ in range(tasks):
        train_steps(model, inputs)
        model.advance_task()
    train_steps(model, inputs)
    return model, inputs


@pytest.mark.parametrize(
    ("sharing", "path", "recompute"),
    [("global", "lowrank", False), ("layer", "lowrank", False), ("global", "lowrank", True)]
    + [("global", "fold", False), ("layer", "fold", False), ("global", "fold", True)],
)
def test_adapted_layer_compiles_without_graph_break(sharing, path, recompute):
    """Both strategies of the frozen directions, with and without recomputation."""
    model, _ = trained_vit(magnitude_sharing=sharing)
    layer = sdlora_layers(model)[0]
    layer.sdlora_frozen_path["default"], layer.sdlora_frozen_recompute["default"] = path, recompute
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    compiled = torch.compile(layer, backend=BACKEND, fullgraph=True)  # raises on any graph break
    expected, actual = layer(x), compiled(x)
    assert (actual - expected).abs().max() <= TOLERANCE
    trained = (x, layer.magnitude("default"))  # the old magnitudes' gradients come from the frozen path
    for grad_expected, grad_actual in zip(
        torch.autograd.grad(expected.sum(), trained), torch.autograd.grad(actual.sum(), trained)
    ):
        assert (grad_actual - grad_expected).abs().max() <= TOLERANCE


def test_compiled_model_matches_eager_outputs_and_gradients():
    model, inputs = trained_vit()
    compiled = torch.compile(model, backend=BACKEND)
    assert (output(compiled, inputs) - output(model, inputs)).abs().max() <= TOLERANCE

    model.train()
    eager_loss, eager_grads = loss_and_grads(model, model, inputs)
    compiled_loss, compiled_grads = loss_and_grads(model, compiled, inputs)
    assert (compiled_loss - eager_loss).abs() <= TOLERANCE
    assert "base_model.sdlora_magnitude.default" in eager_grads  # old and new magnitudes train through the graph
    for name, grad in eager_grads.items():
        assert (compiled_grads[name] - grad).abs().max() <= TOLERANCE, name


def test_compiled_model_follows_advance_task():
    """A model compiled before `advance_task()` must not keep running the previous task's graph."""
    model, inputs = trained_vit(tasks=1)
    compiled = torch.compile(model, backend=BACKEND)
    output(compiled, inputs)
    model.advance_task()
    train_steps(model, inputs)
    assert (output(compiled, inputs) - output(model, inputs)).abs().max() <= TOLERANCE
