"""The adapted layers' forward paths: the cached inference weight, the dtype the frozen directions run in, what
autograd keeps for backward, gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CASE_BY_NAME, loss_and_grads, make_peft, output, run_tasks, sdlora_layers, train_steps
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from sdlora_peft import SDLoraConfig

VIT_CASE = CASE_BY_NAME["vit"]


def outputs_with_grad_enabled(model, inputs) -> torch.Tensor:
    """The low-rank path: autograd on, so the cached inference weight is not used."""
    out = model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs)
    return (out if isinstance(out, torch.Tensor) else out.logits).detach()


def test_cached_inference_weight_matches_the_low_rank_path(case):
    _, model = make_peft(case, rank_schedule=[2, 3])
    inputs = case.inputs()
    run_tasks(model, inputs, 2)
    train_steps(model, inputs)
    cached = output(model, inputs)
    assert all(layer._inference_weight is not None for layer in sdlora_layers(model))
    assert (cached - outputs_with_grad_enabled(model, inputs)).abs().max() <= 1e-5


def test_cached_inference_weight_follows_every_change():
    _, model = make_peft(VIT_CASE, r=2, init_weights=False)
    inputs = VIT_CASE.inputs()
    model.add_adapter("other", SDLoraConfig(r=2, init_weights=False))

    def assert_fresh():
        assert (output(model, inputs) - outputs_with_grad_enabled(model, inputs)).abs().max() <= 1e-5

    assert_fresh()
    train_steps(model, inputs)  # optimizer steps modify A, B and the magnitudes in place
    assert_fresh()
    with torch.no_grad():
        model.base_model.sdlora_magnitude["default"].mul_(3)
    assert_fresh()
    model.advance_task()
    assert_fresh()
    model.set_adapter("other")
    assert_fresh()
    model.set_adapter("default")
    model.merge_adapter()
    assert_fresh()
    model.unmerge_adapter()
    assert_fresh()
    model.train()
    assert all(layer._inference_weight is None for layer in sdlora_layers(model)), "train() frees the cache"


def test_cache_can_be_turned_off():
    _, model = make_peft(VIT_CASE, r=2, cache_inference_weight=False)
    output(model, VIT_CASE.inputs())
    assert all(layer._inference_weight is None for layer in sdlora_layers(model))


class _ProductDtypes(TorchDispatchMode):
    """The dtypes of the matrix products that have an operand with `size` rows or columns."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.dtypes = size, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            if any(isinstance(arg, torch.Tensor) and self.size in arg.shape for arg in args):
                self.dtypes.add(args[-1].dtype)
        return func(*args, **(kwargs or {}))


def bfloat16_vit_after_two_tasks(frozen_path: str = "lowrank"):
    """A bfloat16 ViT whose adapter (float32, PEFT's default) froze two trained rank-7 directions."""
    torch.manual_seed(0)
    config = SDLoraConfig(r=7, frozen_path=frozen_path)
    model = get_peft_model(VIT_CASE.build().to(torch.bfloat16), config)
    inputs = {"pixel_values": VIT_CASE.inputs()["pixel_values"].to(torch.bfloat16)}
    for _ in range(2):
        train_steps(model, inputs, steps=2, lr=0.05, optimizer_cls=torch.optim.SGD)
        model.advance_task()
    return model, inputs


def test_frozen_directions_run_in_the_models_dtype():
    model, inputs = bfloat16_vit_after_two_tasks()
    train_steps(model, inputs, steps=2, lr=0.05, optimizer_cls=torch.optim.SGD)
    reference = copy.deepcopy(model).float()

    with _ProductDtypes(size=14) as probe:  # the two frozen directions' 7 + 7 columns
        logits = model(**inputs).logits
        logits.float().sum().backward()
    assert probe.dtypes == {torch.bfloat16}
    magnitude = model.base_model.sdlora_magnitude["default"]
    assert magnitude.grad.dtype == torch.float32 and (magnitude.grad[:-1] != 0).all()
    torch.testing.assert_close(logits.float(), reference(pixel_values=inputs["pixel_values"].float()).logits,
                               rtol=0.05, atol=0.05)  # fmt: skip


@pytest.mark.parametrize("path", ["lowrank", "fold"])
def test_no_half_precision_copy_of_the_frozen_factors_waits_for_backward(path):
    model, inputs = bfloat16_vit_after_two_tasks(path)
    layer = sdlora_layers(model)[0]
    factor_shapes = {layer.sdlora_frozen_A["default"].shape, layer.sdlora_frozen_B["default"].shape}
    saved = []

    def record(tensor):
        saved.append((tensor.shape, tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        model(**inputs).logits.float().sum().backward()
    saved_factors = {dtype for shape, dtype in saved if shape in factor_shapes}
    assert saved_factors == {torch.float32}, "only the stored float32 factors are kept, no bfloat16 copies"


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    _, model = make_peft(VIT_CASE, r=3)
    inputs = VIT_CASE.inputs()
    run_tasks(model, inputs, 2)
    train_steps(model, inputs)
    model.train()
    forwards = []
    sdlora_layers(model)[0].register_forward_hook(lambda *_: forwards.append(1))

    _, expected = loss_and_grads(model, model, inputs)
    assert len(forwards) == 1
    model.base_model.model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    # reentrant checkpoints pass gradients only to inputs that require them (the embeddings are frozen)
    if use_reentrant:
        model.enable_input_require_grads()
    forwards.clear()
    _, actual = loss_and_grads(model, model, inputs)
    assert len(forwards) == 2, "the checkpointed layer ran again in backward"
    assert actual.keys() == expected.keys() and any("sdlora_magnitude" in name for name in actual)
    for name, gradient in expected.items():
        torch.testing.assert_close(actual[name], gradient, msg=name)
