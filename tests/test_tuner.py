"""The SD-LoRA math through PEFT: identity at init, exact task boundaries, freezing, merging, adapters, dtypes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    CASE_BY_NAME,
    low_rank_output,
    make_peft,
    output,
    put_old_direction,
    run_tasks,
    sdlora_layers,
    train_steps,
)
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sdlora_peft import SDLoraConfig, SDLoraLayer, lowrank

MLP_CASE, VIT_CASE = CASE_BY_NAME["mlp"], CASE_BY_NAME["vit"]
SHARINGS = ["global", "layer"]


def dense_reference(model, base: nn.Module, inputs) -> torch.Tensor:
    """Outputs of the base model with each adapted weight replaced by
    W0 + sum_k alpha_k s_k B_k A_k + alpha_t B_t A_t, written as a plain loop over tasks (not the fused path)."""
    reference = copy.deepcopy(base)
    modules = dict(reference.named_modules())
    for name, layer in model.base_model.model.named_modules():
        if not hasattr(layer, "sdlora_A") or "default" not in layer.sdlora_A:
            continue
        alpha = layer.magnitude("default").detach().double()
        delta = alpha[-1] * layer.sdlora_B["default"].double() @ layer.sdlora_A["default"].double()
        start = 0
        for k, rank in enumerate(layer.sdlora_frozen_ranks["default"]):
            B_k = layer.sdlora_frozen_B["default"][:, start : start + rank].double()
            A_k = layer.sdlora_frozen_A["default"][start : start + rank].double()
            delta += alpha[k] * layer.sdlora_frozen_scale["default"][k].double() * B_k @ A_k
            start += rank
        target = modules[name]
        weight = target.weight
        weight.data = (weight.double() + (delta.T if layer.fan_in_fan_out else delta)).to(weight.dtype)
    return output(reference, inputs)


def test_identity_at_init(case):
    base, model = make_peft(case)
    inputs = case.inputs()
    assert torch.equal(output(model, inputs), output(base, inputs))


def test_random_init_is_not_the_identity():
    base, model = make_peft(MLP_CASE, init_weights=False)
    inputs = MLP_CASE.inputs()
    assert not torch.allclose(output(model, inputs), output(base, inputs))


@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("norm", ["frobenius", "factor"])
@pytest.mark.parametrize("freeze_scale", ["preserve", "normalized"])
def test_advance_task_keeps_the_function(case, sharing, norm, freeze_scale):
    _, model = make_peft(case, r=3, magnitude_sharing=sharing, direction_norm=norm, freeze_scale=freeze_scale)
    inputs = case.inputs()
    for _ in range(3):
        train_steps(model, inputs)
        before = output(model, inputs)
        model.advance_task()
        assert (output(model, inputs) - before).abs().max() <= 1e-5


@pytest.mark.parametrize("sharing", SHARINGS)
def test_normalized_magnitudes_restart_at_one_and_keep_the_trained_update(sharing):
    _, model = make_peft(VIT_CASE, r=3, magnitude_sharing=sharing, freeze_scale="normalized")
    inputs = VIT_CASE.inputs()
    for task in range(3):
        train_steps(model, inputs)
        trained = model.base_model.task_magnitudes()[task]
        assert trained != pytest.approx(1.0)  # the task's own magnitude moved while it trained
        model.advance_task()
        magnitudes = model.base_model.task_magnitudes()
        assert magnitudes[task] == pytest.approx(1.0)  # ... and restarts at 1, its trained value now in the scale
    layer = next(m for m in model.modules() if isinstance(m, SDLoraLayer))
    assert torch.all(layer.sdlora_frozen_scale["default"] != 1)


@pytest.mark.parametrize("option", [{"freeze_scale": "unit"}, {"reset_magnitudes": True}])
def test_reference_code_options_change_the_function(option):
    _, model = make_peft(VIT_CASE, r=3, **option)
    inputs = VIT_CASE.inputs()
    run_tasks(model, inputs, 1)
    train_steps(model, inputs, steps=4)
    before = output(model, inputs)
    model.advance_task()
    assert (output(model, inputs) - before).abs().max() > 1e-4


@pytest.mark.parametrize("sharing", SHARINGS)
def test_old_directions_frozen_all_magnitudes_train(sharing):
    _, model = make_peft(VIT_CASE, r=3, magnitude_sharing=sharing)
    inputs = VIT_CASE.inputs()
    run_tasks(model, inputs, 2)
    layers = sdlora_layers(model)
    frozen = [(layer.sdlora_frozen_A["default"].clone(), layer.sdlora_frozen_B["default"].clone()) for layer in layers]
    assert all(not layer.sdlora_frozen_A["default"].requires_grad for layer in layers)
    magnitudes_before = [layer.magnitude("default").detach().clone() for layer in layers]
    assert all(m.numel() == 3 for m in magnitudes_before)  # two frozen tasks + the current one

    train_steps(model, inputs, steps=1)  # the current B leaves zero, so alpha_t gets a gradient too
    model.train()
    loss = model(**inputs).logits.pow(2).mean()
    loss.backward()
    for layer in layers:
        grad = layer.magnitude("default").grad
        assert grad is not None and torch.all(grad != 0), "every magnitude, old and new, gets a gradient"
    model.zero_grad()
    train_steps(model, inputs, steps=3)  # Adam with a fresh state moves every parameter with a gradient
    for layer, (A, B), magnitudes in zip(layers, frozen, magnitudes_before):
        assert torch.equal(layer.sdlora_frozen_A["default"], A) and torch.equal(layer.sdlora_frozen_B["default"], B)
        assert torch.all(layer.magnitude("default").detach() != magnitudes)


def test_global_magnitudes_are_one_tensor_shared_by_all_layers():
    _, model = make_peft(VIT_CASE)
    run_tasks(model, VIT_CASE.inputs(), 1)
    magnitudes = {id(layer.magnitude("default")) for layer in sdlora_layers(model)}
    assert magnitudes == {id(model.base_model.sdlora_magnitude["default"])}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "magnitude" in n]
    assert trainable == ["base_model.sdlora_magnitude.default"]


@pytest.mark.parametrize("path", ["lowrank", "fold"])
@pytest.mark.parametrize("sharing", SHARINGS)
def test_fused_forward_matches_dense_math(case, sharing, path):
    base, model = make_peft(case, rank_schedule=[3, 1, 2], magnitude_sharing=sharing, frozen_path=path)
    inputs = case.inputs()
    run_tasks(model, inputs, 3)
    train_steps(model, inputs)
    assert_matches_dense_math(model, base, inputs)


def assert_matches_dense_math(model, base: nn.Module, inputs) -> None:
    """The training path (low-rank or fold, as configured) and the cached weight (inference) both compute the
    per-task sum."""
    expected = dense_reference(model, base, inputs)
    assert torch.allclose(low_rank_output(model, inputs), expected, atol=1e-5)
    assert torch.allclose(output(model, inputs), expected, atol=1e-5)


@pytest.mark.parametrize("path", ["lowrank", "fold"])
@pytest.mark.parametrize("sharing", SHARINGS)
def test_fused_forward_matches_dense_math_after_an_absorbed_task(sharing, path):
    base, model = make_peft(VIT_CASE, r=3, magnitude_sharing=sharing, kd_threshold=9e-4, frozen_path=path)
    inputs = VIT_CASE.inputs()
    run_tasks(model, inputs, 1)
    put_old_direction(model)
    assert model.advance_task().absorbed
    train_steps(model, inputs)  # the fold changed the old magnitudes; training moves them on
    assert not run_tasks(model, inputs, 1)[0].absorbed
    train_steps(model, inputs)
    assert model.peft_config["default"].frozen_ranks == [3, 3]
    assert_matches_dense_math(model, base, inputs)


def test_rank_schedule_rr_follows_the_paper():
    _, model = make_peft(MLP_CASE, r=10, rank_schedule="rr")
    records = run_tasks(model, MLP_CASE.inputs(), 10, steps=1)
    assert [record.rank for record in records] == [10, 10, 10, 10, 8, 8, 8, 8, 6, 6]
    layer = sdlora_layers(model)[0]
    assert layer.sdlora_frozen_ranks["default"] == [10, 10, 10, 10, 8, 8, 8, 8, 6, 6]
    assert layer.sdlora_frozen_A["default"].shape == (84, 6)
    assert layer.r["default"] == 6


@pytest.mark.parametrize("sharing", SHARINGS)
def test_kd_absorbs_a_direction_the_old_ones_reproduce(sharing):
    _, model = make_peft(VIT_CASE, r=3, magnitude_sharing=sharing, kd_threshold=9e-4)
    inputs = VIT_CASE.inputs()
    first = run_tasks(model, inputs, 1)[0]
    assert not first.absorbed and first.residual is None
    put_old_direction(model)
    before = output(model, inputs)
    parameters = sum(p.numel() for p in model.parameters())
    record = model.advance_task()
    assert record.absorbed and record.residual < 1e-5
    assert (output(model, inputs) - before).abs().max() <= 1e-5, "the fold keeps the function"
    assert sum(p.numel() for p in model.parameters()) == parameters, "no parameters added"
    assert all(layer.sdlora_frozen_ranks["default"] == [3] for layer in sdlora_layers(model))


def test_kd_keeps_a_new_direction():
    _, model = make_peft(VIT_CASE, r=3, kd_threshold=9e-4)
    records = run_tasks(model, VIT_CASE.inputs(), 2)
    assert not records[1].absorbed and records[1].residual > 9e-4
    assert model.peft_config["default"].frozen_ranks == [3, 3]


def test_untrained_direction_is_dropped_with_a_warning():
    base, model = make_peft(MLP_CASE, r=3)
    inputs = MLP_CASE.inputs()
    with pytest.warns(UserWarning, match="is zero"):
        record = model.advance_task()
    assert record.absorbed and record.residual == 0.0 and record.task == 0
    assert model.peft_config["default"].frozen_ranks == []
    assert torch.equal(output(model, inputs), output(base, inputs))
    assert model.peft_config["default"].current_task == 1


def test_norms_are_computed_at_freeze_time_only(monkeypatch):
    _, model = make_peft(VIT_CASE, r=3)
    inputs = VIT_CASE.inputs()
    run_tasks(model, inputs, 2)
    calls = []
    for name in ("frobenius_norm", "factor_norm", "gram_matrix"):
        original = getattr(lowrank, name)
        monkeypatch.setattr(lowrank, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    train_steps(model, inputs, steps=3)
    output(model, inputs)
    assert calls == []
    model.advance_task()
    assert calls  # the finished task's norms, once


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return result


@pytest.mark.parametrize("sharing", SHARINGS)
def test_advance_task_never_forms_a_dense_weight(sharing):
    width = 64
    model = get_peft_model(
        nn.Sequential(nn.Linear(width, width), nn.Linear(width, width)),
        SDLoraConfig(r=2, target_modules=["0", "1"], kd_threshold=9e-4, magnitude_sharing=sharing),
    )
    inputs = torch.randn(4, width)
    for _ in range(4):
        train_steps(model, inputs, steps=1)
        with _LargestTensor() as probe:
            model.advance_task()
        assert probe.largest < width * width // 4  # factors are at most width x (sum of ranks) = 64 x 8


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_and_unmerge(case, safe_merge):
    base, model = make_peft(case, rank_schedule=[2, 3])
    inputs = case.inputs()
    run_tasks(model, inputs, 2)
    train_steps(model, inputs)
    expected = output(model, inputs)
    base_weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter(safe_merge=safe_merge)
    assert (output(model, inputs) - expected).abs().max() <= 1e-5
    model.unmerge_adapter()
    assert (output(model, inputs) - expected).abs().max() <= 1e-5
    for name, parameter in model.named_parameters():
        if name in base_weights:
            assert torch.allclose(parameter, base_weights[name], atol=1e-6)
    merged = model.merge_and_unload(safe_merge=safe_merge)
    assert not sdlora_layers(merged)
    assert (output(merged, inputs) - expected).abs().max() <= 1e-5


def test_safe_merge_refuses_non_finite_weights():
    _, model = make_peft(MLP_CASE)
    layer = sdlora_layers(model)[0]
    with torch.no_grad():
        layer.sdlora_B["default"].fill_(float("inf"))
    weight = layer.get_base_layer().weight.clone()
    with pytest.raises(
        ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"
    ):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, weight)


def test_disable_adapter_gives_the_base_model(case):
    base, model = make_peft(case, init_weights=False)
    inputs = case.inputs()
    run_tasks(model, inputs, 1)
    with model.disable_adapter():
        assert torch.allclose(output(model, inputs), output(base, inputs), atol=1e-6)
    assert not torch.allclose(output(model, inputs), output(base, inputs))


def test_several_named_adapters():
    base, model = make_peft(VIT_CASE, r=2, init_weights=False)
    inputs = VIT_CASE.inputs()
    model.add_adapter("other", SDLoraConfig(r=3, init_weights=False, magnitude_sharing="layer"))
    default_out = output(model, inputs)
    model.set_adapter("other")
    other_out = output(model, inputs)
    assert not torch.allclose(default_out, other_out)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)

    record = model.advance_task()  # the active adapter
    assert record.rank == 3 and model.peft_config["default"].task_history == []
    record = model.advance_task("default")
    assert model.peft_config["default"].task_history == [{"task": 0, "rank": 2, "absorbed": False, "residual": None}]

    model.set_adapter("default")
    assert torch.allclose(output(model, inputs), default_out, atol=1e-5)
    model.delete_adapter("other")
    assert "other" not in model.base_model.sdlora_magnitude and all(
        "other" not in layer.sdlora_A for layer in sdlora_layers(model)
    )
    assert torch.allclose(output(model, inputs), default_out, atol=1e-5)
    model.delete_adapter("default")
    assert "default" not in model.base_model.sdlora_magnitude
    assert torch.equal(output(model.base_model.model, inputs), output(base, inputs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_half_precision_models(dtype, autocast_adapter_dtype):
    base = VIT_CASE.build().to(dtype)
    model = get_peft_model(base, SDLoraConfig(r=3), autocast_adapter_dtype=autocast_adapter_dtype)
    inputs = {"pixel_values": VIT_CASE.inputs()["pixel_values"].to(dtype)}
    layer = sdlora_layers(model)[0]
    assert layer.sdlora_A["default"].dtype == (torch.float32 if autocast_adapter_dtype else dtype)
    for _ in range(3):
        # pure half-precision Adam divides by an eps that rounds to zero; SGD is what such a setup can use
        train_steps(model, inputs, steps=2, lr=0.05, optimizer_cls=torch.optim.SGD)
        assert layer.current_norm("default", "frobenius").dtype == torch.float32
        assert not model.advance_task().absorbed
    out = output(model, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert all(torch.isfinite(layer.sdlora_frozen_scale["default"]).all() for layer in sdlora_layers(model))


def test_diverged_direction_is_refused_and_nothing_changes():
    _, model = make_peft(MLP_CASE)
    layer = sdlora_layers(model)[0]
    with torch.no_grad():
        layer.sdlora_B["default"].fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        model.advance_task()
    assert model.peft_config["default"].task_history == [] and "default" not in layer.sdlora_frozen_A


def test_advance_task_errors():
    _, model = make_peft(MLP_CASE)
    with pytest.raises(ValueError, match="Unknown adapter 'nope'"):
        model.advance_task("nope")
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.advance_task()


def test_unsupported_target_module_is_named():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"'0' is a Embedding.*torch.nn.Linear"):
        get_peft_model(model, SDLoraConfig(target_modules=["0", "1"]))


def test_model_type_without_defaults_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(MLP_CASE.build(), SDLoraConfig())


@pytest.mark.parametrize("name", ["vit", "dinov2", "bert", "gpt2", "llama"])
def test_default_targets_are_query_and_value(name):
    _, model = make_peft(CASE_BY_NAME[name])
    targeted = {key.rsplit(".", 1)[-1] for key in model.base_model.targeted_module_names}
    assert targeted in ({"q_proj", "v_proj"}, {"query", "value"}, {"c_attn"})
    assert len(model.base_model.targeted_module_names) == (2 if name == "gpt2" else 4)


def test_all_linear_targets_every_linear_layer_but_the_output_layer():
    """PEFT's "all-linear" shorthand, as a causal LM's users pass it: the tied output layer stays as it is."""
    _, model = make_peft(CASE_BY_NAME["llama"], target_modules="all-linear", task_type="CAUSAL_LM")
    targeted = {key.rsplit(".", 1)[-1] for key in model.base_model.targeted_module_names}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(model.base_model.model.lm_head, SDLoraLayer)


def test_added_adapter_with_global_magnitudes_trains_only_once_active():
    _, model = make_peft(VIT_CASE, r=2)
    model.add_adapter("other", SDLoraConfig(r=3))
    magnitudes = model.base_model.sdlora_magnitude
    assert magnitudes["default"].requires_grad and not magnitudes["other"].requires_grad
    model.set_adapter("other")
    assert magnitudes["other"].requires_grad and not magnitudes["default"].requires_grad
    train_steps(model, VIT_CASE.inputs())
    assert model.advance_task().rank == 3 and magnitudes["other"].numel() == 2


@pytest.mark.parametrize("sharing", SHARINGS)
def test_task_magnitudes_name_each_kept_task(sharing):
    _, model = make_peft(MLP_CASE, magnitude_sharing=sharing)
    inputs = MLP_CASE.inputs()
    run_tasks(model, inputs, 1)
    model.advance_task()  # task 1 is never trained: its direction is dropped and has no magnitude
    train_steps(model, inputs)
    magnitudes = [p.detach() for n, p in model.named_parameters() if "sdlora_magnitude" in n]
    expected = torch.stack(magnitudes).mean(0).tolist()  # one vector, or one per layer

    assert model.task_magnitudes() == {0: expected[0], 2: expected[1]}
    assert model.task_magnitudes("default") == model.task_magnitudes()
