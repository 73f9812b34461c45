"""Bad input is refused with an error that says what is wrong and what to do, and leaves the model and the files as
they were: configs, target modules, saved adapters (config, weights, pickles, other base models), task boundaries."""

from __future__ import annotations

import copy
import json
import sys

import huggingface_hub
import pytest
import torch
from conftest import CASE_BY_NAME, MLP, make_peft, output, sdlora_layers, train_steps
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_save_load import save_three_tasks
from torch import nn

from sdlora_peft import SDLoraConfig, export_lora

VIT_CASE, MLP_CASE = CASE_BY_NAME["vit"], CASE_BY_NAME["mlp"]
HISTORY = {"task": 0, "rank": 2, "absorbed": False, "residual": None}


def snapshot(model: nn.Module) -> dict:
    """Every module's type and every tensor's value: what a refused operation must leave untouched."""
    return {
        "modules": {name: type(module) for name, module in model.named_modules()},
        "state": {name: tensor.clone() for name, tensor in model.state_dict().items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][name], value) for name, value in before["state"].items())


def files(path) -> dict:
    return {item.name: item.read_bytes() for item in sorted(path.iterdir())}


# ------------------------------------------------------------------------------------------------------------------
# Config values
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("r", "10", "positive integer"),
        ("r", True, "positive integer"),
        ("r", None, "positive integer"),
        ("rank_schedule", [2, "3"], "positive integers"),
        ("rank_schedule", [True], "positive integers"),
        ("magnitude_init", float("nan"), "finite number"),
        ("magnitude_init", float("inf"), "finite number"),
        ("magnitude_init", True, "finite number"),
        ("magnitude_init", 0.0, "non-zero: a task starting at 0"),
        ("magnitude_sharing", ["global"], "'global', 'layer'"),
        ("kd_threshold", float("nan"), ">= 0"),
        ("kd_threshold", "9e-4", ">= 0"),
        ("reset_magnitudes", "yes", "True or False"),
        ("init_weights", 1, "True or False"),
        ("cache_inference_weight", "false", "True or False"),
        ("frozen_path", "dense", "'auto', 'lowrank', 'fold'"),
        ("frozen_recompute", 0, "True or False"),
        ("fan_in_fan_out", None, "True or False"),
        ("target_modules", 5, "module name"),
        ("target_modules", ["q_proj", 3], "module name"),
        ("exclude_modules", 3, "module name"),
        ("modules_to_save", "classifier", "list of module names"),
        ("layers_to_transform", ["0"], "int or a list of ints"),
        ("layers_to_transform", 1.5, "int or a list of ints"),
        ("layers_to_transform", -1, "indices >= 0"),
        ("task_history", {"task": 0}, "list of task records"),
        ("task_history", [{**HISTORY, "residual": "small"}], "null or a number >= 0"),
        ("task_history", [{**HISTORY, "residual": -1.0}], "null or a number >= 0"),
        ("task_history", [{**HISTORY, "task": False}], "tasks must be 0, 1, 2"),
        ("task_history", [{**HISTORY, "absorbed": "no"}], "true or false"),
    ],
)
def test_config_values_of_the_wrong_type_or_range_name_the_field(field, value, expected):
    with pytest.raises(ValueError, match=rf"`{field}.*{expected}"):
        SDLoraConfig(**{field: value})


# ------------------------------------------------------------------------------------------------------------------
# Target modules
# ------------------------------------------------------------------------------------------------------------------


def test_target_modules_that_match_nothing_leave_the_model_unchanged():
    model = MLP()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(model, SDLoraConfig(target_modules=["nothing_here"]))
    assert_unchanged(model, before)


@pytest.mark.parametrize("unsupported", [nn.Conv2d(4, 4, 1), nn.Embedding(10, 4)], ids=["conv2d", "embedding"])
def test_unsupported_layer_is_refused_and_earlier_layers_are_unwrapped(unsupported):
    """The Linear before the unsupported layer was already wrapped when the error came: it is put back."""
    model = nn.Sequential(nn.Linear(4, 4), unsupported)
    before = snapshot(model)
    with pytest.raises(TypeError, match=rf"'1' is a {type(unsupported).__name__}.*Change `target_modules`"):
        get_peft_model(model, SDLoraConfig(target_modules=["0", "1"]))
    assert_unchanged(model, before)


def test_added_adapter_with_an_unsupported_target_leaves_the_first_adapter():
    _, model = make_peft(MLP_CASE, r=2, init_weights=False)
    model.base_model.model.extra = nn.Embedding(3, 3)
    inputs = MLP_CASE.inputs()
    expected = output(model, inputs)
    with pytest.raises(TypeError, match="'extra' is a Embedding"):
        model.add_adapter("other", SDLoraConfig(target_modules=["lin1", "extra"]))
    assert "other" not in model.peft_config and "other" not in model.base_model.sdlora_magnitude
    assert all(set(layer.sdlora_A) == {"default"} for layer in sdlora_layers(model))
    assert torch.equal(output(model, inputs), expected)


# ------------------------------------------------------------------------------------------------------------------
# Task boundaries
# ------------------------------------------------------------------------------------------------------------------


def test_advance_task_on_a_merged_model_asks_to_unmerge_and_changes_nothing():
    _, model = make_peft(MLP_CASE, r=2)
    train_steps(model, MLP_CASE.inputs())
    model.merge_adapter()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"merged into the base weights; call unmerge_adapter\(\)"):
        model.advance_task()
    assert_unchanged(model, before)
    assert model.peft_config["default"].task_history == []


# ------------------------------------------------------------------------------------------------------------------
# Saved adapters: adapter_config.json
# ------------------------------------------------------------------------------------------------------------------


def edit_config(path, edit) -> None:
    config_file = path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    edit(saved)
    config_file.write_text(json.dumps(saved))


def test_invalid_json_names_the_file(tmp_path):
    save_three_tasks(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "SDLORA", "r": 2,')
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON .*save_pretrained"):
        SDLoraConfig.from_pretrained(tmp_path)


def test_invalid_json_through_peft_model_from_pretrained(tmp_path):
    """Documented limitation: PeftModel.from_pretrained reads adapter_config.json with PeftConfig's own reader to
    learn the method before SD-LoRA's checks can run, so invalid JSON gives PEFT's bare JSONDecodeError there (no
    clean place names the file without patching PEFT). SD-LoRA's own readers name it."""
    base = save_three_tasks(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "SDLORA", "r": 2,')
    with pytest.raises(json.JSONDecodeError):
        PeftModel.from_pretrained(base, tmp_path)
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON"):
        export_lora(tmp_path, tmp_path / "lora")


def test_a_json_value_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="adapter_config.json: expected a JSON object, got list"):
        SDLoraConfig.from_pretrained(tmp_path)


def test_invalid_value_in_the_file_names_file_and_field(tmp_path):
    base = save_three_tasks(tmp_path)
    edit_config(tmp_path, lambda saved: saved.update(r="2"))
    with pytest.raises(ValueError, match=r"adapter_config.json: `r` must be a positive integer, got '2'.*Fix"):
        PeftModel.from_pretrained(base, tmp_path)


def test_another_peft_method_is_not_read_as_sdlora(tmp_path):
    save_three_tasks(tmp_path)
    edit_config(tmp_path, lambda saved: saved.update(peft_type="LORA"))
    with pytest.raises(ValueError, match="`peft_type` is 'LORA', not 'SDLORA'"):
        SDLoraConfig.from_pretrained(tmp_path)


def _misspell_a_field(saved: dict) -> None:
    saved["magnitude_sharng"] = "layer"


@pytest.mark.parametrize(
    "edit, message",
    [
        # PEFT drops unknown fields with a warning; a misspelt SD-LoRA field would silently change the adapter
        (_misspell_a_field, r"adapter_config.json: unknown fields \['magnitude_sharng'\].*upgrade"),
        (lambda saved: saved.pop("task_history"), r"do not match the task history.*\(0 finished tasks.*Nothing was"),
        (lambda saved: saved["task_history"].pop(), "do not match the task history"),
    ],
    ids=["unknown-field", "missing-task-history", "shorter-task-history"],
)
def test_config_that_does_not_describe_the_weights_is_refused_and_nothing_changes(tmp_path, edit, message):
    base = save_three_tasks(tmp_path)
    edit_config(tmp_path, edit)
    before = snapshot(base)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


def test_hostile_config_values_import_and_run_nothing(tmp_path, monkeypatch):
    """Config values are plain data: a module named in them is never imported, and an unknown key is refused."""
    (tmp_path / "planted_module.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = save_three_tasks(tmp_path / "adapter")
    hostile = {
        "task_type": "planted_module",
        "base_model_name_or_path": "planted_module",
        "target_modules": "__import__('planted_module')",
        "auto_mapping": {"base_model_class": "Model", "parent_library": "planted_module"},
    }
    edit_config(tmp_path / "adapter", lambda saved: saved.update(hostile))
    with pytest.raises(ValueError):  # the regex matches no module: PEFT's own error
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    edit_config(tmp_path / "adapter", lambda saved: saved.update(__class__="planted_module.Model"))
    with pytest.raises(ValueError, match="unknown fields"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    assert "planted_module" not in sys.modules and not (tmp_path / "ran").exists()


# ------------------------------------------------------------------------------------------------------------------
# Saved adapters: weights
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_safetensors_are_refused_before_anything_is_built(tmp_path, damage):
    base = save_three_tasks(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
    saved, before = files(tmp_path), snapshot(base)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is truncated or corrupted .*save the adapter"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)
    assert files(tmp_path) == saved


def test_non_finite_weights_are_refused(tmp_path):
    base = save_three_tasks(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    key = next(key for key in weights if "frozen_B" in key)
    weights[key][0, 0] = float("nan")
    save_file(weights, tmp_path / "adapter_model.safetensors")
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"NaN or infinite values .*Nothing was loaded.*frozen_B"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_adapter_for_another_base_model_leaves_that_model_unchanged(tmp_path, low_cpu_mem_usage):
    save_three_tasks(tmp_path)
    other = CASE_BY_NAME["dinov2"].build()
    before = snapshot(other)
    with pytest.raises(ValueError, match="another base model"):
        PeftModel.from_pretrained(other, tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert_unchanged(other, before)


def test_failed_load_adapter_keeps_the_loaded_one(tmp_path):
    save_three_tasks(tmp_path)
    edit_config(tmp_path, lambda saved: saved["task_history"].pop())
    _, model = make_peft(VIT_CASE, r=3, init_weights=False)
    inputs = VIT_CASE.inputs()
    expected, before = output(model, inputs), snapshot(model)
    with pytest.raises(ValueError, match="do not match the task history"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert set(model.peft_config) == {"default"} and model.active_adapters == ["default"]
    assert_unchanged(model, before)
    assert torch.equal(output(model, inputs), expected)


# ------------------------------------------------------------------------------------------------------------------
# Pickled weights
# ------------------------------------------------------------------------------------------------------------------


def pickle_only(path) -> None:
    """Replace the saved safetensors by the same weights in PEFT's pickle format."""
    weights = load_file(path / "adapter_model.safetensors")
    torch.save(weights, path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()


def test_pickle_only_adapter_is_refused_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("SDLORA_ALLOW_PICKLE", raising=False)
    base = save_three_tasks(tmp_path)
    pickle_only(tmp_path)
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"only as a pickle \(adapter_model.bin\).*SDLORA_ALLOW_PICKLE=1"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


def test_pickle_only_adapter_loads_when_the_user_opts_in(tmp_path, monkeypatch):
    base, model = make_peft(VIT_CASE, r=2)
    inputs = VIT_CASE.inputs()
    train_steps(model, inputs)
    model.advance_task()
    model.save_pretrained(tmp_path)
    pickle_only(tmp_path)
    monkeypatch.setenv("SDLORA_ALLOW_PICKLE", "1")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(output(loaded, inputs), output(model, inputs))


def test_pickle_only_hub_adapter_is_refused_offline(tmp_path, monkeypatch):
    """A Hub id resolved from the local cache (offline) goes through the same check as a local folder."""
    monkeypatch.delenv("SDLORA_ALLOW_PICKLE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--someone--adapter"
    save_three_tasks(repo / "snapshots" / ("a" * 40))
    pickle_only(repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    with pytest.raises(ValueError, match=r"someone/adapter holds the adapter weights only as a pickle"):
        SDLoraConfig.from_pretrained("someone/adapter", cache_dir=str(tmp_path))


def test_failed_load_with_modules_to_save_unwraps_the_head(tmp_path):
    base, model = make_peft(VIT_CASE, r=2, modules_to_save=["classifier"])
    train_steps(model, VIT_CASE.inputs())
    model.advance_task()
    model.save_pretrained(tmp_path)
    edit_config(tmp_path, lambda saved: saved["task_history"].pop())
    before = snapshot(base)
    with pytest.raises(ValueError, match="do not match the task history"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)
