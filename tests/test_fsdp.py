"""FSDP2 on the CPU: 2 processes over gloo train 2 SD-LoRA tasks sharded, with `advance_task_sharded` between
them, and end where 1 process ends (tests/fsdp_run.py does the work under torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from fsdp_run import base_model
from peft import PeftModel
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def run(processes: int, out: Path) -> tuple[dict[str, torch.Tensor], list[list[float]]]:
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([*command, str(HERE / "fsdp_run.py"), str(out)], check=True, env=env, capture_output=True)
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
