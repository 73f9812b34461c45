"""Half precision and near-zero directions: norms and Gram matrices never overflow, long fp16/bf16 sequences stay
finite, and a direction too small for its dtype is dropped as a zero one instead of getting an infinite scale."""

from __future__ import annotations

import pytest
import torch
from conftest import CASE_BY_NAME, output, sdlora_layers, train_steps
from peft import PeftModel, get_peft_model

from sdlora_peft import SDLoraConfig, lowrank

MLP_CASE, VIT_CASE = CASE_BY_NAME["mlp"], CASE_BY_NAME["vit"]
HALF = [torch.float16, torch.bfloat16]


def big_factors(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors whose product has entries ~600 and `||B A||_F^2` ~ 5e7, far above float16's 65504."""
    B = torch.full((12, 2), 300.0, dtype=dtype)
    A = torch.ones(2, 12, dtype=dtype)
    return B, A


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["frobenius", "factor"])
def test_norms_of_large_half_precision_factors_are_finite_and_exact(dtype, kind):
    B, A = big_factors(dtype)
    dense = B.double() @ A.double()
    expected = dense.norm() if kind == "frobenius" else B.double().norm() * A.double().norm()
    norm = lowrank.direction_norm(B, A, kind)
    assert norm.dtype == torch.float32 and (dense.square().sum() > torch.finfo(torch.float16).max)
    assert torch.isclose(norm.double(), expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", HALF)
def test_kd_gram_matrix_of_large_half_precision_factors_is_exact(dtype):
    B, A = big_factors(dtype)
    B_cat, A_cat = torch.cat([B, 0.5 * B], dim=1), torch.cat([A, A.flip(1)])
    scales = torch.tensor([1.0, 2.0], dtype=torch.float64)
    directions = [(B.double() @ A.double()), 0.5 * B.double() @ A.flip(1).double()]
    expected = torch.tensor(
        [[(s * d * t * e).sum() for t, e in zip(scales, directions)] for s, d in zip(scales, directions)]
    )
    gram = lowrank.gram_matrix(B_cat, A_cat, [2, 2], scales)
    assert gram.dtype == torch.float64 and torch.allclose(gram, expected.double(), rtol=1e-12)
    coefficients, residual = lowrank.least_squares_fit(gram)
    assert torch.isfinite(coefficients).all() and 0 <= residual <= 1


def half_mlp(dtype: torch.dtype, **cfg) -> tuple[torch.nn.Module, torch.Tensor]:
    """The MLP in `dtype` with adapters in `dtype` too (no float32 autocast): the hardest case for the scales."""
    config = SDLoraConfig(target_modules=["lin0", "lin1"], **cfg)
    model = get_peft_model(MLP_CASE.build().to(dtype), config, autocast_adapter_dtype=False)
    return model, MLP_CASE.inputs().to(dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("sharing", ["global", "layer"])
def test_advance_task_with_a_large_half_precision_direction(dtype, sharing):
    model, inputs = half_mlp(dtype, r=2, magnitude_sharing=sharing)
    inputs = inputs * 1e-3  # keeps the forward in float16's range; the norms' squares are not (~1e5 and ~3e5)
    for layer in sdlora_layers(model):
        B, A = big_factors(dtype)
        with torch.no_grad():
            layer.sdlora_B["default"].copy_(B[: layer.out_features] / 10)
            layer.sdlora_A["default"].copy_(A[:, : layer.in_features])
        assert layer.get_delta_weight("default").square().sum() > torch.finfo(torch.float16).max
    before = output(model, inputs)
    record = model.advance_task()
    after = output(model, inputs)
    assert not record.absorbed and torch.isfinite(after).all()
    for layer in sdlora_layers(model):
        assert torch.isfinite(layer.sdlora_frozen_scale["default"]).all()
        assert torch.isfinite(layer.magnitude("default")).all()
    assert (after.float() - before.float()).abs().max() <= 2e-2 * before.float().abs().max()


@pytest.mark.parametrize(
    ("dtype", "autocast_adapter_dtype"), [(torch.float16, True), (torch.float16, False), (torch.bfloat16, False)]
)
def test_twenty_half_precision_tasks_stay_finite(dtype, autocast_adapter_dtype):
    base = VIT_CASE.build().to(dtype)
    config = SDLoraConfig(r=2, kd_threshold=9e-4, modules_to_save=["classifier"])
    model = get_peft_model(base, config, autocast_adapter_dtype=autocast_adapter_dtype)
    inputs = {"pixel_values": VIT_CASE.inputs()["pixel_values"].to(dtype)}
    for _ in range(20):
        train_steps(model, inputs, steps=1, lr=0.05, optimizer_cls=torch.optim.SGD)
        before = output(model, inputs)
        model.advance_task()
        after = output(model, inputs)
        assert torch.isfinite(after).all()
        assert (after.float() - before.float()).abs().max() <= 2e-2 * max(1.0, before.float().abs().max())
    assert model.peft_config["default"].current_task == 20
    for layer in sdlora_layers(model):
        assert torch.isfinite(layer.sdlora_frozen_scale["default"]).all()
        assert torch.isfinite(layer.sdlora_frozen_B["default"]).all()
        assert torch.isfinite(layer.magnitude("default")).all()


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_global_magnitudes_follow_peft_autocast_rule(autocast_adapter_dtype, low_cpu_mem_usage, tmp_path):
    """PEFT's rule for every adapter tensor, the model-level magnitudes included: float32 with
    `autocast_adapter_dtype=True`, the base layer's dtype (bfloat16 here) without, through every way in."""
    expected = torch.float32 if autocast_adapter_dtype else torch.bfloat16
    config = SDLoraConfig(r=2, task_history=[{"task": 0, "rank": 2, "absorbed": False, "residual": None}])
    model = get_peft_model(VIT_CASE.build().to(torch.bfloat16), config, autocast_adapter_dtype=autocast_adapter_dtype)
    model.add_adapter("other", config, autocast_adapter_dtype=autocast_adapter_dtype)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(
        VIT_CASE.build().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )  # fmt: skip
    loaded.load_adapter(
        tmp_path / "other", "other", autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
    )
    for peft_model in (model, loaded):
        magnitudes = peft_model.base_model.sdlora_magnitude
        assert sorted(magnitudes) == ["default", "other"]
        assert {p.dtype for n, p in peft_model.named_parameters() if "sdlora_" in n} == {expected}


@pytest.mark.parametrize("value", [0.0, 1e-30, 1e-40, 1e-20], ids=["zero", "1e-30", "denormal", "1e-20"])
def test_near_zero_float32_direction_is_dropped_like_a_zero_one(value):
    model = get_peft_model(MLP_CASE.build(), SDLoraConfig(r=2, target_modules=["lin0", "lin1"]))
    inputs = MLP_CASE.inputs()
    for layer in sdlora_layers(model):
        with torch.no_grad():
            layer.sdlora_B["default"].fill_(value)
    expected = output(model, inputs)
    with pytest.warns(UserWarning, match="is zero"):
        record = model.advance_task()
    assert record.absorbed and record.residual == 0.0
    assert model.peft_config["default"].frozen_ranks == []
    assert torch.equal(output(model, inputs), expected)


@pytest.mark.parametrize("sharing", ["global", "layer"])
def test_direction_below_float16_resolution_is_dropped_not_scaled_to_infinity(sharing):
    """Norm ~5e-6: above the float32 zero threshold, but its scale 1/norm does not fit in float16 (max 65504)."""
    model, inputs = half_mlp(torch.float16, r=2, magnitude_sharing=sharing)
    for layer in sdlora_layers(model):
        with torch.no_grad():
            layer.sdlora_B["default"].fill_(1e-6)
    before = output(model, inputs)
    with pytest.warns(UserWarning, match="is zero"):
        record = model.advance_task()
    assert record.absorbed and record.residual == 0.0
    assert torch.equal(output(model, inputs), before)


def test_float16_layer_below_resolution_is_dropped_in_that_layer_only():
    model, inputs = half_mlp(torch.float16, r=2)
    first, second = sdlora_layers(model)
    with torch.no_grad():
        first.sdlora_B["default"].fill_(1e-6)
        second.sdlora_B["default"].fill_(1e-2)
    before = output(model, inputs)
    record = model.advance_task()
    assert not record.absorbed
    assert (
        first.sdlora_frozen_scale["default"].item() == 0
        and torch.isfinite(second.sdlora_frozen_scale["default"]).all()
    )
    after = output(model, inputs)
    assert torch.isfinite(after).all() and (after - before).abs().max() <= 1e-2


@pytest.mark.parametrize("freeze_scale", ["preserve", "unit"])
def test_float16_model_with_float32_adapters_drops_a_direction_below_float16_resolution(freeze_scale):
    """PEFT's default autocast keeps the adapters in float32, but the frozen directions run in the model's float16:
    with `freeze_scale="unit"` a scale `alpha / norm` above 65504 would overflow there."""
    model = get_peft_model(
        MLP_CASE.build().half(), SDLoraConfig(r=2, target_modules=["lin0", "lin1"], freeze_scale=freeze_scale)
    )
    inputs = MLP_CASE.inputs().half()
    for layer in sdlora_layers(model):
        with torch.no_grad():
            layer.sdlora_B["default"].fill_(1e-6)
    before = output(model, inputs)
    with pytest.warns(UserWarning, match="below the resolution"):
        assert model.advance_task().absorbed
    assert torch.equal(output(model, inputs), before)


def test_float16_model_with_float32_adapters_keeps_a_small_direction_above_float16_resolution():
    model = get_peft_model(
        MLP_CASE.build().half(), SDLoraConfig(r=2, target_modules=["lin0", "lin1"], freeze_scale="unit")
    )
    for layer in sdlora_layers(model):
        with torch.no_grad():
            layer.sdlora_B["default"].fill_(1e-3)
    assert not model.advance_task().absorbed
    assert torch.isfinite(output(model, MLP_CASE.inputs().half())).all()
