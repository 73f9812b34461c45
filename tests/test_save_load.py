"""Registration with PEFT, configs, and save/load round trips through PEFT's own entry points."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from conftest import CASE_BY_NAME, make_peft, output, put_old_direction, sdlora_layers, train_steps
from peft import AutoPeftModelForSequenceClassification, PeftConfig, PeftModel, PeftType, get_peft_model
from safetensors.torch import load_file, save_file

import sdlora_peft
from sdlora_peft import SDLoraConfig, SDLoraModel

VIT_CASE = CASE_BY_NAME["vit"]


def test_registration_is_idempotent():
    assert PeftType.SDLORA == "SDLORA" and PeftType("SDLORA") is PeftType.SDLORA
    member = PeftType.SDLORA
    importlib.reload(sdlora_peft.registration)
    importlib.reload(sdlora_peft)
    sdlora_peft.register()
    assert PeftType.SDLORA is member
    assert list(PeftType).count(PeftType.SDLORA) == 1
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING["SDLORA"].__name__ == "SDLoraModel"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SDLORA"].__name__ == "SDLoraConfig"


def test_uses_an_existing_enum_member(monkeypatch):
    """A future peft that ships PeftType.SDLORA itself: the plugin takes that member instead of adding one."""
    assert sdlora_peft.registration.ensure_peft_type() is PeftType.SDLORA
    assert len([m for m in PeftType if m.value == "SDLORA"]) == 1


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("r", 0, "positive integer"),
        ("r", 2.5, "positive integer"),
        ("rank_schedule", "paper", "'rr'"),
        ("rank_schedule", [4, 0], "positive integers"),
        ("rank_schedule", [], "positive integers"),
        ("magnitude_init", "one", "number"),
        ("magnitude_sharing", "task", "'global', 'layer'"),
        ("direction_norm", "spectral", "'frobenius', 'factor'"),
        ("freeze_scale", "keep", "'preserve', 'normalized', 'unit'"),
        ("kd_threshold", -1.0, ">= 0"),
        ("task_history", [{"task": 0, "rank": 4}], "exactly the keys"),
        ("task_history", [{"task": 1, "rank": 4, "absorbed": False, "residual": None}], "tasks must be 0, 1, 2"),
        ("task_history", [{"task": 0, "rank": -4, "absorbed": False, "residual": None}], "positive integer"),
    ],
)
def test_invalid_config_values_name_the_field(field, value, allowed):
    with pytest.raises(ValueError, match=rf"`{field}.*{allowed}"):
        SDLoraConfig(**{field: value})


def test_rank_for_task():
    assert [SDLoraConfig(r=4).rank_for_task(t) for t in (0, 9)] == [4, 4]
    assert [SDLoraConfig(rank_schedule=[6, 3]).rank_for_task(t) for t in (0, 1, 5)] == [6, 3, 3]
    assert [SDLoraConfig(r=20, rank_schedule="rr").rank_for_task(t) for t in (3, 4, 7, 8, 30)] == [20, 16, 16, 12, 12]


def three_tasks(model, inputs, absorb_second: bool) -> list:
    """Three tasks, the second one absorbed by SD-LoRA-KD if asked, then some training of the fourth."""
    records = []
    for task in range(3):
        train_steps(model, inputs)
        if task == 1 and absorb_second:
            put_old_direction(model)
        records.append(model.advance_task())
    train_steps(model, inputs)
    return records


@pytest.mark.parametrize("sharing", ["global", "layer"])
def test_round_trip_after_three_tasks_with_mixed_ranks_and_an_absorbed_task(tmp_path, sharing):
    base, model = make_peft(
        VIT_CASE,
        rank_schedule=[3, 4, 2, 5],
        kd_threshold=9e-4,
        magnitude_sharing=sharing,
        modules_to_save=["classifier"],
    )
    inputs = VIT_CASE.inputs()
    records = three_tasks(model, inputs, absorb_second=True)
    assert [r.absorbed for r in records] == [False, True, False]
    expected = output(model, inputs)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SDLORA"
    assert [t["rank"] for t in saved["task_history"]] == [3, 4, 2]
    assert [t["absorbed"] for t in saved["task_history"]] == [False, True, False]

    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, SDLoraConfig) and config.frozen_ranks == [3, 2] and config.current_task == 3

    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(again.base_model, SDLoraModel)
    assert torch.equal(output(again, inputs), expected)
    layer = sdlora_layers(again)[0]
    assert layer.sdlora_frozen_ranks["default"] == [3, 2] and layer.r["default"] == 5
    assert not any(p.requires_grad for p in again.parameters())

    merged = again.merge_and_unload()
    assert (output(merged, inputs) - expected).abs().max() <= 1e-5


def test_loaded_adapter_keeps_learning(tmp_path):
    base, model = make_peft(VIT_CASE, r=2)
    inputs = VIT_CASE.inputs()
    three_tasks(model, inputs, absorb_second=False)
    model.save_pretrained(tmp_path)

    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    trainable = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    train_steps(again, inputs)
    before = output(again, inputs)
    record = again.advance_task()
    assert record.task == 3 and not record.absorbed
    assert (output(again, inputs) - before).abs().max() <= 1e-5
    assert again.peft_config["default"].frozen_ranks == [2, 2, 2, 2]


def test_auto_peft_model_loads_an_sdlora_adapter(tmp_path):
    case = CASE_BY_NAME["bert"]
    base = case.build()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(copy.deepcopy(base), SDLoraConfig(r=2, task_type="SEQ_CLS"))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    inputs = case.inputs()
    three_tasks(model, inputs, absorb_second=False)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert torch.allclose(output(loaded, inputs), output(model, inputs), atol=1e-6)


def save_three_tasks(path) -> torch.nn.Module:
    """Save a 3-task rank-2 ViT adapter to `path`; return a fresh copy of its base model."""
    base, model = make_peft(VIT_CASE, r=2)
    three_tasks(model, VIT_CASE.inputs(), absorb_second=False)
    model.save_pretrained(path)
    return copy.deepcopy(base)


def test_weights_that_do_not_match_the_task_history_are_refused(tmp_path):
    base = save_three_tasks(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["task_history"] = saved["task_history"][:2]  # claims two finished tasks, the weights hold three
    config_path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="do not match the task history.*Nothing was loaded"):
        PeftModel.from_pretrained(base, tmp_path)


def test_missing_weights_are_refused(tmp_path):
    base = save_three_tasks(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "frozen_A" not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="missing .*sdlora_frozen_A"):
        PeftModel.from_pretrained(base, tmp_path)


def test_adapter_for_another_base_model_is_refused(tmp_path):
    save_three_tasks(tmp_path)
    other = copy.deepcopy(CASE_BY_NAME["dinov2"].build())
    with pytest.raises(ValueError, match="another base model"):
        PeftModel.from_pretrained(other, tmp_path)


@pytest.mark.parametrize("sharing", ["global", "layer"])
def test_low_cpu_mem_usage_loading(tmp_path, sharing):
    """PEFT's meta-device loading path: tensors are created empty, then assigned from the checkpoint."""
    base, model = make_peft(VIT_CASE, r=2, magnitude_sharing=sharing)
    inputs = VIT_CASE.inputs()
    three_tasks(model, inputs, absorb_second=False)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(output(loaded, inputs), output(model, inputs))
    assert {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]} == {"cpu"}
