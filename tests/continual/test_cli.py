"""`sdlora-cil` end to end on a tiny real model and real offline data, on one and on two processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import datasets
import pytest
import torch
from accelerate.state import AcceleratorState
from peft import PeftConfig
from torch import nn

from sdlora_peft.continual import checkpoint, cli, zoo

# RanPAC at 256 random features: its 5000-wide default solve would take most of a tiny run's time
TINY = ["--model", "tiny-dinov2", "--dataset", "digits", "--image-size", "32", "--epochs", "1", "--batch-size", "16",
        "--ranpac-dim", "256"]  # fmt: skip


def run_cli(tmp_path, *extra: str) -> dict:
    output = tmp_path / "out"
    cli.main([*TINY, "--output", str(output), "--max-train-per-class", "20", "--max-test-per-class", "10", *extra])
    return json.loads((output / "results.json").read_text())


def test_every_method_end_to_end(tmp_path):
    methods = "sdlora,sdlora-rr,sdlora-kd,lora-seq,lora-merge,ncm,linear,joint,sdlora@aligned,lora-seq@linear"
    methods += ",sdlora@aligned-sdc"
    results = run_cli(tmp_path, "--num-tasks", "3", "--methods", methods, "--head", "ncm")
    assert list(results["methods"]) == methods.split(",")
    for name, summary in results["methods"].items():
        (run,) = summary["runs"]
        tasks = 1 if name == "joint" else 3
        assert len(run["accuracy_matrix"]) == tasks and all(len(row) == tasks for row in run["accuracy_matrix"])
        assert all(run["accuracy_matrix"][t][j] is None for t in range(tasks) for j in range(t + 1, tasks))
        assert 0 <= summary["final_accuracy"]["mean"] <= 100
        assert run["final_accuracy"] == summary["final_accuracy"]["mean"]
        assert run["seed"] == 0 and run["train_seconds"] > 0
    sdlora = results["methods"]["sdlora"]["runs"][0]
    assert len(sdlora["magnitudes"]) == 3 and [len(m) for m in sdlora["magnitudes"]] == [1, 2, 3]
    assert results["methods"]["ncm"]["runs"][0]["trainable_parameters"] == 0
    assert results["methods"]["ncm"]["runs"][0]["head_statistics"]["class_means"] == 10
    assert results["methods"]["sdlora@aligned"]["runs"][0]["head_statistics"]["class_covariances"] == 10
    assert results["methods"]["sdlora@aligned-sdc"]["runs"][0]["head"] == "aligned-sdc"
    assert results["methods"]["lora-seq@linear"]["runs"][0]["head"] == "linear"

    output = tmp_path / "out"
    assert "| sdlora |" in (output / "results.md").read_text()
    pngs = {p.name for p in output.glob("*.png")}
    assert {"accuracy_curves.png", "accuracy_matrix_sdlora.png", "magnitudes_sdlora.png"} <= pngs
    config = PeftConfig.from_pretrained(output / "adapters" / "sdlora" / "seed_0")
    assert len(config.task_history) == 3 and config.modules_to_save == ["classifier"]
    card = (output / "adapters" / "sdlora" / "seed_0" / "README.md").read_text()
    assert "model-index" in card and "dataset" in card and f"{sdlora['final_accuracy']:.2f}" in card


def test_bfloat16_mixed_precision_trains_past_the_first_task(tmp_path):
    """Under Accelerate's autocast the frozen directions' products run in bfloat16, their gradients reach the float32
    magnitudes."""
    AcceleratorState._reset_state(reset_partial_state=True)  # one per process: earlier tests made theirs
    try:
        results = run_cli(tmp_path, "--num-tasks", "2", "--methods", "sdlora", "--mixed-precision", "bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # later tests get their own, not this bf16 one
    (run,) = results["methods"]["sdlora"]["runs"]
    assert len(run["accuracy_matrix"]) == 2 and None not in run["accuracy_matrix"][1]
    assert [len(m) for m in run["magnitudes"]] == [1, 2]
    assert all(math.isfinite(value) for value in run["magnitudes"][1])
    assert run["magnitudes"][1][0] != run["magnitudes"][0][0], "task 2 trained task 1's magnitude"


def test_unknown_method_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="known methods: sdlora, sdlora-rr"):
        run_cli(tmp_path, "--methods", "sdlora,ewc", "--debug")


def test_existing_results_are_not_overwritten(tmp_path):
    run_cli(tmp_path, "--num-tasks", "2", "--methods", "ncm")
    with pytest.raises(ValueError, match="--overwrite"):
        run_cli(tmp_path, "--num-tasks", "2", "--methods", "ncm", "--debug")
    run_cli(tmp_path, "--num-tasks", "2", "--methods", "ncm", "--overwrite")


def test_text_dataset_from_a_saved_directory(tmp_path):
    words = ["apple", "banana", "cherry", "grape", "lemon", "mango"]
    rows = {"text": [f"{w} {i}" for i in range(20) for w in words], "label": [i for _ in range(20) for i in range(6)]}
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=words)})
    data = datasets.Dataset.from_dict(rows, features=features).train_test_split(test_size=0.3, seed=0)
    data.save_to_disk(tmp_path / "fruit")
    output = tmp_path / "text"
    cli.main(["--model", "tiny-bert", "--dataset", str(tmp_path / "fruit"), "--num-tasks", "3", "--epochs", "1",
              "--ranpac-dim", "256", "--methods", "sdlora,ncm", "--output", str(output)])  # fmt: skip
    results = json.loads((output / "results.json").read_text())
    assert len(results["methods"]["sdlora"]["runs"][0]["accuracy_matrix"]) == 3


# Run by torchrun in the two-process test: sdlora-cil, with an audit hook that logs every file the process writes
# into OUTDIR and a hash of its SD-LoRA tensors at each end-of-task check.
WATCHED_CLI = """
import atexit, json, os, sys
from sdlora_peft.continual import checkpoint, cli, train

output, log, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
writes, hashes = [], []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
CHANGES = {"os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.symlink"}


def audit(event, args):
    if event == "open" and not args[2] & WRITE_FLAGS or event not in CHANGES | {"open"}:
        return
    paths = [os.fsdecode(a) for a in args if isinstance(a, (str, bytes, os.PathLike))]
    writes.extend(f"{event} {path}" for path in paths if path.startswith(output))


def check_ranks_agree(accelerator, model, when, check=checkpoint.check_ranks_agree):
    hashes.append({n: checkpoint._digest(t) for n, t in model.state_dict().items() if "sdlora_" in n})
    check(accelerator, model, when)


def save_log():
    with open(f"{log}.{os.environ['RANK']}.json", "w") as file:
        json.dump({"writes": writes, "hashes": hashes}, file)


sys.addaudithook(audit)
train.check_ranks_agree = check_ranks_agree  # the name the loop calls
atexit.register(save_log)
cli.main([*argv, "--output", output])
"""


def test_two_processes_give_the_one_process_results(tmp_path):
    """A 2-process CPU run (gloo, torchrun) splits each batch across processes: same steps, same accuracies. After
    every task both processes hold the same SD-LoRA directions and magnitudes, and only the first one writes."""
    args = [*TINY, "--num-tasks", "2", "--methods", "sdlora,lora-seq", "--max-train-per-class", "20",
            "--max-test-per-class", "9"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", zoo.CACHE_ENV: str(tmp_path / "cache")}
    (tmp_path / "watched_cli.py").write_text(WATCHED_CLI)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(tmp_path / "watched_cli.py")]
    subprocess.run([*launch, str(tmp_path / "two"), str(tmp_path / "log"), *args], check=True, env=env, timeout=600)
    one_process = [sys.executable, "-m", "sdlora_peft.continual.cli", *args, "--output", str(tmp_path / "one")]
    subprocess.run(one_process, check=True, env=env, timeout=600)
    one, two = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("one", "two"))
    for name in ("sdlora", "lora-seq"):
        matrix_one = one["methods"][name]["runs"][0]["accuracy_matrix"]
        matrix_two = two["methods"][name]["runs"][0]["accuracy_matrix"]
        for row_one, row_two in zip(matrix_one, matrix_two):
            for a, b in zip(row_one, row_two):
                assert (a is None and b is None) or abs(a - b) <= 5.0  # float reduction order may flip a sample

    main, other = (json.loads((tmp_path / f"log.{rank}.json").read_text()) for rank in (0, 1))
    assert [bool(hashes) for hashes in main["hashes"]] == [True, True, False, False]  # checked after every task
    assert main["hashes"] == other["hashes"]
    assert other["writes"] == []
    assert any(write.endswith("two/results.json") for write in main["writes"])


class OtherProcessHolds:
    """An Accelerator stand-in for two processes, the other one holding `model`."""

    num_processes, device = 2, "cpu"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def gather(self, digests: torch.Tensor) -> torch.Tensor:
        return torch.cat([digests, torch.tensor([checkpoint._digest(t) for t in self.model.state_dict().values()])])


def test_processes_holding_different_models_are_stopped():
    model = nn.Linear(3, 2)
    checkpoint.check_ranks_agree(OtherProcessHolds(model), model, "after task 1")
    other = nn.Linear(3, 2)
    other.bias.data.copy_(model.bias.data)
    with pytest.raises(RuntimeError, match=r"differ after task 1: 1 tensors, e.g. \['weight'\]"):
        checkpoint.check_ranks_agree(OtherProcessHolds(other), model, "after task 1")


def test_paper_protocol_presets_the_options_and_keeps_steps_per_class(tmp_path):
    args = cli.parse_args(["--protocol", "paper", "--epochs", "3"])
    assert (args.head, args.optimizer, args.lr, args.head_lr, args.augment) == ("linear", "sgd", 1e-2, 1e-2, True)
    assert (args.epochs, args.batch_size, args.protocol_overrides) == (3, 128, ["epochs"])  # given options win
    assert cli.parse_args(["--protocol", "paper-adam"]).optimizer == "adamw"
    # digits has at least 139 training images a class; with 20 kept the batch shrinks to keep the steps per class
    output = tmp_path / "out"
    tiny = ["--model", "tiny-dinov2", "--dataset", "digits", "--image-size", "32", "--max-test-per-class", "10",
            "--ranpac-dim", "256"]  # fmt: skip
    cli.main([*tiny, "--protocol", "paper", "--epochs", "1", "--num-tasks", "2", "--methods", "sdlora",
              "--max-train-per-class", "20", "--output", str(output)])  # fmt: skip
    results = json.loads((output / "results.json").read_text())
    config = json.loads((output / "config.json").read_text())
    assert config["batch_size"] == 18 and config["optimizer"] == "sgd"
    run = results["methods"]["sdlora"]["runs"][0]
    assert run["head"] == "linear" and len(run["train_accuracy"]) == 2
    assert all(0 <= accuracy <= 100 for accuracy in run["train_accuracy"])


def test_first_session_adaptation_trains_the_adapter_on_the_first_task_only(tmp_path):
    results = run_cli(tmp_path, "--num-tasks", "3", "--methods", "sdlora-fsa@lda,sdlora@lda", "--lr", "1e-2")
    fsa, sdlora = (results["methods"][name]["runs"][0] for name in ("sdlora-fsa@lda", "sdlora@lda"))
    assert fsa["prefix_cache"]["used"] and fsa["prefix_cache"]["frozen_blocks"] == 2  # all frozen after task 1
    assert sdlora["prefix_cache"]["frozen_blocks"] == 0
    assert fsa["magnitudes"] == [fsa["magnitudes"][0]] * 3  # nothing of the adapter moves after task 1
    assert fsa["stored_adapter_parameters"] < sdlora["stored_adapter_parameters"]
