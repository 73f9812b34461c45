"""export_lora / sdlora-export: an SD-LoRA adapter as a plain PEFT LoRA adapter, exact or rank-k."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CASE_BY_NAME, low_rank_output, make_peft, output, sdlora_layers, train_steps
from peft import AutoPeftModel, AutoPeftModelForCausalLM, LoraConfig, PeftConfig, PeftModel
from safetensors.torch import load_file

from sdlora_peft import export_lora
from sdlora_peft.export import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trained(case_name: str, tasks: int = 3, **cfg):
    """(base model, SD-LoRA model after `tasks` tasks, the last one current), every direction trained."""
    case = CASE_BY_NAME[case_name]
    base, model = make_peft(case, r=3, rank_schedule=[3, 2], **cfg)
    inputs = case.inputs()
    for task in range(tasks):
        train_steps(model, inputs, steps=2, lr=0.05)
        if task < tasks - 1:
            model.advance_task()
    return case, base, model, inputs


@pytest.mark.parametrize("sharing", ["global", "layer"])
@pytest.mark.parametrize("case_name", ["vit", "gpt2", "mlp"])
def test_exact_export_computes_the_sdlora_outputs(case_name, sharing, tmp_path):
    extra = {"modules_to_save": ["classifier"]} if case_name == "vit" else {}
    case, base, model, inputs = trained(case_name, magnitude_sharing=sharing, **extra)
    report = export_lora(model, tmp_path)
    assert report.exact and report.rank == 3 + 2 + 2 and report.tasks == 3 and report.kept_directions == 3
    assert report.max_error == 0.0
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 7
    assert config["modules_to_save"] == extra.get("modules_to_save")
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(lora.peft_config["default"], LoraConfig)
    assert (low_rank_output(lora, inputs) - low_rank_output(model, inputs)).abs().max() <= 1e-5


def test_export_of_a_saved_folder_equals_the_export_of_the_model(tmp_path):
    _, _, model, _ = trained("gpt2")
    model.save_pretrained(tmp_path / "sdlora")
    from_model = export_lora(model, tmp_path / "from-model")
    from_folder = export_lora(tmp_path / "sdlora", tmp_path / "from-folder")
    assert dataclasses.replace(from_model, folder=from_folder.folder) == from_folder
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("from-model", "from-folder"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_rank_k_export_is_the_best_rank_k_approximation_of_every_layer(rank, tmp_path):
    _, _, model, _ = trained("mlp")
    report = export_lora(model, tmp_path, rank=rank)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert not report.exact and report.rank == rank
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == rank
    for name, module in model.base_model.model.named_modules():
        if module not in sdlora_layers(model):
            continue
        delta = module.get_delta_weight("default").detach().double()  # dense, small layers: the reference
        U, S, Vh = torch.linalg.svd(delta)
        best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        exported = (
            weights[f"base_model.model.{name}.lora_B.weight"] @ weights[f"base_model.model.{name}.lora_A.weight"]
        )
        assert (exported.double() - best).abs().max() <= 1e-5 * S[0]
        assert report.errors[name] == pytest.approx(float(S[rank:].norm() / S.norm()), rel=1e-6, abs=1e-9)


def test_rank_at_least_the_full_rank_is_exact(tmp_path):
    _, base, model, inputs = trained("mlp")
    report = export_lora(model, tmp_path, rank=7)
    assert report.exact and report.max_error == pytest.approx(0.0, abs=1e-7)
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert (low_rank_output(lora, inputs) - low_rank_output(model, inputs)).abs().max() <= 1e-5


def test_card_says_exported_after_how_many_tasks_and_the_error(tmp_path):
    _, _, model, _ = trained("mlp")
    export_lora(model, tmp_path / "exact")
    report = export_lora(model, tmp_path / "k", rank=1)
    exact_card = (tmp_path / "exact" / "README.md").read_text()
    card = (tmp_path / "k" / "README.md").read_text()
    assert "exported" in exact_card and "after 3 tasks" in exact_card and "exact" in exact_card
    assert "library_name: peft" in card and "- lora" in card and "after 3 tasks" in card
    assert f"at most {report.max_error:.3g}" in card


def test_plain_peft_loads_the_export_in_a_process_without_sdlora_peft(tmp_path):
    case, base, model, inputs = trained("gpt2")
    base.save_pretrained(tmp_path / "base")
    export_lora(model, tmp_path / "lora")
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "lora")!r}).eval()
        with torch.no_grad():
            logits = model(**torch.load({str(tmp_path / "inputs.pt")!r})).logits
        assert not any(name.startswith("sdlora_peft") for name in sys.modules)
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}  # not even this checkout on the path
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    assert (torch.load(tmp_path / "logits.pt") - output(model, inputs)).abs().max() <= 1e-5


def test_auto_peft_model_loads_the_export(tmp_path):
    case, base, model, inputs = trained("gpt2", task_type="CAUSAL_LM")
    base.save_pretrained(tmp_path / "gpt2")
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "gpt2")
    export_lora(model, tmp_path / "lora")
    assert PeftConfig.from_pretrained(str(tmp_path / "lora")).task_type == "CAUSAL_LM"
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lora")
    assert (output(loaded, inputs) - output(model, inputs)).abs().max() <= 1e-5

    case, base, model, inputs = trained("vit", modules_to_save=["classifier"])  # no task type: AutoPeftModel
    base.save_pretrained(tmp_path / "vit")
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "vit")
    export_lora(model, tmp_path / "vit-lora")
    loaded = AutoPeftModel.from_pretrained(tmp_path / "vit-lora")
    assert (output(loaded, inputs) - output(model, inputs)).abs().max() <= 1e-5


@pytest.mark.parametrize("case_name", ["vit", "gpt2"])
def test_transformers_load_adapter_takes_the_export(case_name, tmp_path):
    case, base, model, inputs = trained(case_name)
    export_lora(model, tmp_path)
    base.load_adapter(str(tmp_path))
    assert (output(base, inputs) - output(model, inputs)).abs().max() <= 1e-5


def test_export_never_overwrites_an_sdlora_adapter_and_checks_the_rank(tmp_path):
    _, _, model, _ = trained("mlp", tasks=1)
    model.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with pytest.raises(ValueError, match="holds an SD-LoRA adapter"):
        export_lora(model, tmp_path)
    with pytest.raises(ValueError, match="positive integer"):
        export_lora(model, tmp_path / "out", rank=0)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_command_line(tmp_path, capsys):
    _, base, model, inputs = trained("mlp")
    model.save_pretrained(tmp_path / "sdlora")
    assert main([str(tmp_path / "sdlora"), str(tmp_path / "lora"), "--rank", "2"]) == 0
    assert "rank 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 2
    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path / "missing"), str(tmp_path / "out")])
    assert refused.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("sdlora-export: error: ") and error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "out").exists()

    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, "-m", "sdlora_peft.export", str(tmp_path / "sdlora"), str(tmp_path / "exact")],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "exact" in done.stdout
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "exact")
    assert (low_rank_output(lora, inputs) - low_rank_output(model, inputs)).abs().max() <= 1e-5
