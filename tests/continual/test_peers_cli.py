"""`sdlora-cil --methods inflora,olora` end to end: images, text, two processes, bad options."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import datasets
import pytest
import torch
from peft import PeftConfig
from safetensors.torch import load_file

from sdlora_peft.continual import cli, zoo

TINY = ["--model", "tiny-dinov2", "--dataset", "digits", "--image-size", "16", "--epochs", "1", "--batch-size", "16",
        "--max-train-per-class", "12", "--max-test-per-class", "6", "--ranpac-dim", "256",
        "--methods", "inflora,olora"]  # fmt: skip


def results(output) -> dict:
    return json.loads((output / "results.json").read_text())


def test_peers_on_images(tmp_path):
    output = tmp_path / "out"
    cli.main([*TINY, "--num-tasks", "3", "--output", str(output)])
    runs = {name: summary["runs"][0] for name, summary in results(output)["methods"].items()}
    assert list(runs) == ["inflora", "olora"]
    for run in runs.values():
        assert len(run["accuracy_matrix"]) == 3 and None not in run["accuracy_matrix"][2]
        assert run["train_seconds"] > 0 and 0 <= run["final_accuracy"] <= 100
        assert run["stored_adapter_parameters"] == sum(run["stored_parameters_by_kind"].values())
    # 2 blocks x (query, value) of width 32, rank 10: one LoRA is 4 x 10 x (32 + 32) = 2,560 parameters
    assert runs["olora"]["stored_parameters_by_kind"] == {"adapter": 3 * 2560}
    inflora = runs["inflora"]["stored_parameters_by_kind"]
    assert inflora["adapted_weights"] == 4 * 32 * 32 and inflora["branch"] == 2560
    assert 0 < inflora["subspace_memory"] <= 2 * 32 * 16  # one basis per block, at most half its dimension
    head = 64 * 10 + 10  # DINOv2's classifier reads the CLS token and the mean patch token
    assert runs["inflora"]["trainable_parameters"] == 4 * 10 * 32 + head  # up-projections only
    assert runs["olora"]["trainable_parameters"] == 2560 + head
    adapter = output / "adapters" / "olora" / "seed_0"
    assert PeftConfig.from_pretrained(adapter).modules_to_save == ["classifier"]
    assert PeftConfig.from_pretrained(adapter / "task_3").modules_to_save is None


@pytest.fixture
def fruit(tmp_path):
    """A small text dataset of 4 classes, saved to disk. A task's 60 training samples fill one evaluation batch of
    64 but for 4, so that on 2 processes the second gets 28 of them and 4 repeated to even the batch out."""
    words = ["apple", "banana", "cherry", "grape"]
    rows = {"text": [f"{w} {i}" for i in range(40) for w in words], "label": [i for _ in range(40) for i in range(4)]}
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=words)})
    data = datasets.Dataset.from_dict(rows, features=features).train_test_split(test_size=0.25, seed=0)
    data.save_to_disk(tmp_path / "fruit")
    return ["--model", "tiny-bert", "--dataset", str(tmp_path / "fruit"), "--num-tasks", "2", "--epochs", "1",
            "--ranpac-dim", "256", "--methods", "inflora,olora"]  # fmt: skip


def test_peers_on_text(tmp_path, fruit):
    output = tmp_path / "text"
    cli.main([*fruit, "--olora-lambdas", "1,0.1", "--output", str(output)])
    saved = results(output)
    assert saved["config"]["olora_lambdas"] == "1,0.1"
    for summary in saved["methods"].values():
        assert len(summary["runs"][0]["accuracy_matrix"]) == 2
    assert saved["methods"]["inflora"]["runs"][0]["stored_parameters_by_kind"]["subspace_memory"] > 0


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--olora-lambdas", "0.5"], "--olora-lambdas takes two comma-separated numbers"),
        (["--inflora-thresholds", "0,1"], r"thresholds are energy fractions in \(0, 1\]"),
        (["--olora-lambdas=-1,0"], "cannot be negative"),
    ],
)
def test_bad_peer_options_are_refused(tmp_path, capsys, option, message):
    methods = ["--methods", "inflora,olora"]
    assert cli.main([*TINY, "--num-tasks", "2", *methods, *option, "--output", str(tmp_path / "out")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def designed_subspaces(output) -> dict[str, torch.Tensor]:
    """The projector A^T A onto the rows of each designed down-projection of the last task (its branch is the saved
    adapter); sign-free, unlike A itself."""
    tensors = load_file(output / "adapters" / "inflora" / "seed_0" / "adapter_model.safetensors")
    return {name: 3 * tensor.T @ tensor for name, tensor in tensors.items() if "lora_A" in name}


def test_two_processes_design_the_branches_of_one(tmp_path, fruit):
    """On 2 processes (gloo, torchrun) each sees half of a task's samples. Summed over both, the moments give the
    one-process design, at the second task too (so the memory the first task left is the same); the design from
    one process's half is 0.06 away. Nothing else would catch a missing sum: DDP gives every process the first
    one's parameters when it wraps the model, so the processes' models agree anyway. (Nothing trains, `--lr 0`, so
    that the designs differ only by what the moments saw, not by the float summation order of training.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", zoo.CACHE_ENV: str(tmp_path / "cache")}
    args = [*fruit, "--methods", "inflora", "--lr", "1e-12", "--head-lr", "1e-12"]
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "sdlora_peft.continual.cli",
    ]
    subprocess.run([*launch, *args, "--output", str(tmp_path / "two")], check=True, env=env, timeout=600)
    cli.main([*args, "--output", str(tmp_path / "one")])
    one, two = designed_subspaces(tmp_path / "one"), designed_subspaces(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 4
    for layer, design in one.items():
        assert (two[layer] - design).abs().max() < 1e-4, layer
