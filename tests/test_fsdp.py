"""FSDP2 on the CPU: 2 processes over gloo train 2 SD-LoRA tasks sharded, with `advance_task_sharded` between
them (tests/fsdp_run.py), or through `ContinualTrainer` with `TrainingArguments(fsdp=True)`
(tests/fsdp_trainer_run.py), and end where 1 process ends. `sdlora-cil --fsdp` is tested in
tests/continual/test_sharded.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_run import base_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import TrainingArguments

from sdlora_peft import SDLoraConfig
from sdlora_peft.continual.trainer import ContinualTrainer, task_folder

HERE = Path(__file__).resolve().parent


def launch(script: str, processes: int, out: Path) -> None:
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([*command, str(HERE / script), str(out)], check=True, env=env, capture_output=True)


def run(processes: int, out: Path) -> tuple[dict[str, torch.Tensor], list[list[float]]]:
    launch("fsdp_run.py", processes, out)
    return load_file(out / "adapter" / "adapter_model.safetensors"), json.loads((out / "accuracy.json").read_text())


def test_two_fsdp2_processes_give_the_one_process_adapter_and_accuracies(tmp_path):
    one, one_matrix = run(1, tmp_path / "one")
    two, two_matrix = run(2, tmp_path / "two")
    assert two_matrix == one_matrix and len(two_matrix) == 2
    assert one.keys() == two.keys()
    assert "base_model.sdlora_magnitude" in two and two["base_model.sdlora_magnitude"].shape == (2,)
    # the same steps, with gradients summed in another order across the processes
    assert max((one[key] - two[key]).abs().max().item() for key in one) <= 1e-4
    assert not torch.equal(two["base_model.sdlora_magnitude"], torch.ones(2))  # the magnitudes trained sharded

    loaded = PeftModel.from_pretrained(base_model(), tmp_path / "two" / "adapter")
    assert loaded.peft_config["default"].current_task == 1
    state = loaded.state_dict()
    assert torch.equal(state["base_model.sdlora_magnitude.default"], two["base_model.sdlora_magnitude"])


def test_continual_trainer_with_fsdp_on_two_processes_gives_the_one_process_tasks(tmp_path):
    for processes, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        launch("fsdp_trainer_run.py", processes, out)
    one, two = (json.loads((tmp_path / out / "accuracy.json").read_text()) for out in ("one", "two"))
    assert two == one and len(two) == 2
    for task in range(2):
        adapters = [load_file(task_folder(tmp_path / out / "trainer", task) / "adapter_model.safetensors")
                    for out in ("one", "two")]  # fmt: skip
        assert adapters[0].keys() == adapters[1].keys()
        assert max((adapters[0][key] - adapters[1][key]).abs().max().item() for key in adapters[0]) <= 1e-4
    # the magnitudes logged at every step while the model is sharded are gathered: the one-process values
    logged_one, logged_two = (json.loads((tmp_path / out / "magnitudes.json").read_text()) for out in ("one", "two"))
    assert len(logged_two) == len(logged_one) and logged_two[-1].keys() == {
        f"sdlora/magnitude/task_{t}" for t in (0, 1)
    }
    for entry_one, entry_two in zip(logged_one, logged_two):
        assert entry_two == pytest.approx(entry_one, abs=1e-5)
    assert "pass save_strategy='no'" in (tmp_path / "two" / "refusal.txt").read_text()
    loaded = PeftModel.from_pretrained(base_model(), task_folder(tmp_path / "two" / "trainer", 1))
    assert loaded.peft_config["default"].current_task == 1


def test_continual_trainer_with_fsdp_on_one_process_is_refused(tmp_path):
    peft_model = get_peft_model(base_model(), SDLoraConfig(r=4))
    args = TrainingArguments(str(tmp_path), fsdp=True, fsdp_config={"fsdp_version": 2}, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="distributed"):
        ContinualTrainer(model=peft_model, args=args)
