"""`sdlora-cil --fsdp`: 2 CPU processes over gloo train every task on an FSDP2-sharded model and end where one
unsharded process ends; what `--fsdp` cannot do is refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from sdlora_peft.continual import cli, zoo

# Every task's sample count a multiple of the batch: Accelerate pads a short last batch on several processes (its
# `even_batches`), which one process does not do. SGD: Adam would magnify float summation order into whole steps
# (lr * sign) where a gradient is near zero.
ARGS = ["--model", "tiny-dinov2", "--dataset", "digits", "--image-size", "32", "--epochs", "1", "--batch-size", "16",
        "--num-tasks", "3", "--methods", "sdlora,lora-seq,linear", "--max-train-per-class", "16",
        "--max-test-per-class", "9", "--optimizer", "sgd", "--lr", "0.05", "--head-lr", "0.05",
        "--ranpac-dim", "256"]  # fmt: skip


def test_two_sharded_processes_give_the_one_process_results_and_adapters(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", zoo.CACHE_ENV: str(tmp_path / "cache")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command = ["-m", "sdlora_peft.continual.cli", *ARGS]
    subprocess.run([*torchrun, *command, "--fsdp", "--output", str(tmp_path / "two")], check=True, env=env)
    subprocess.run([sys.executable, *command, "--output", str(tmp_path / "one")], check=True, env=env)
    one, two = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("one", "two"))
    assert two["config"]["fsdp"] is True
    for name in ("sdlora", "lora-seq", "linear"):
        (run_one,), (run_two,) = one["methods"][name]["runs"], two["methods"][name]["runs"]
        assert run_two["accuracy_matrix"] == run_one["accuracy_matrix"]
    for name in ("sdlora", "lora-seq"):
        folders = [tmp_path / out / "adapters" / name / "seed_0" for out in ("one", "two")]
        adapter_one, adapter_two = (load_file(folder / "adapter_model.safetensors") for folder in folders)
        assert adapter_one.keys() == adapter_two.keys()
        # the same steps, with the gradients summed in another order across the processes
        assert max((adapter_one[key] - adapter_two[key]).abs().max().item() for key in adapter_one) <= 1e-4
    magnitudes = load_file(tmp_path / "two" / "adapters" / "sdlora" / "seed_0" / "adapter_model.safetensors")
    assert magnitudes["base_model.sdlora_magnitude"].shape == (4,)  # three tasks, and the slot opened after them
    assert not torch.equal(magnitudes["base_model.sdlora_magnitude"][:3], torch.ones(3))  # trained sharded

    base, _, _ = zoo.load_model("tiny-dinov2", num_labels=10)
    loaded = PeftModel.from_pretrained(base, tmp_path / "two" / "adapters" / "sdlora" / "seed_0")
    assert len(loaded.peft_config["default"].task_history) == 3
    state = loaded.state_dict()
    assert torch.equal(state["base_model.sdlora_magnitude.default"], magnitudes["base_model.sdlora_magnitude"])


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ("sdlora", "--fsdp shards the model across processes: launch several"),
        ("sdlora,olora", "--fsdp cannot train olora"),
        ("ablation-fixed", "--fsdp cannot train ablation-fixed"),
    ],
)
def test_what_fsdp_cannot_do_is_refused_before_anything_is_written(tmp_path, capsys, methods, message):
    output = tmp_path / "out"
    code = cli.main([*ARGS[:8], "--methods", methods, "--fsdp", "--output", str(output)])
    assert code == 2 and not output.exists()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("sdlora-cil: error: ") and message in line
