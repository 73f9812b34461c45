"""`sdlora-cil --resume`: a run stopped at any task ends with exactly the results of a run that was never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sdlora_peft.continual import checkpoint, cli, runs, train

# sdlora: SD-LoRA's task history and the aligned head's Gaussians; lora-merge: weights merged into the backbone and
# class means; ablation-fixed: gradient hooks set again; linear: a plain classifier, cosine-wrapped; inflora: folded
# weights and the subspace memory; olora: one PEFT adapter per task; sdlora-fsa: its adapter frozen again, LDA's sums
METHODS = ["sdlora", "lora-merge@ncm", "ablation-fixed", "linear@cosine", "inflora", "olora", "sdlora-fsa@lda"]
ARGS = ["--model", "tiny-dinov2", "--dataset", "digits", "--image-size", "16", "--epochs", "1", "--batch-size", "16",
        "--num-tasks", "3", "--max-train-per-class", "12", "--max-test-per-class", "6", "--augment",
        "--ranpac-dim", "256"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread_no_plots():
    """Bit-exact comparisons with a run in another process need the same float reduction order: one thread.
    Plots have nothing to do with resuming and take seconds: not drawn here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runs, "write_plots", lambda results, output: None)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of every method."""
    output = tmp_path_factory.mktemp("reference") / "out"
    cli.main([*ARGS, "--methods", ",".join(METHODS), "--output", str(output)])
    return output


def assert_same_results(output, reference, methods=METHODS) -> None:
    """Equal accuracy matrices, magnitudes and final adapters, bit for bit; no checkpoint left behind."""
    results, expected = (json.loads((out / "results.json").read_text()) for out in (output, reference))
    for name in methods:
        run, expected_run = results["methods"][name]["runs"][0], expected["methods"][name]["runs"][0]
        for key in (
            "accuracy_matrix",
            "magnitudes",
            "task_aware_final_accuracy",
            "head_statistics",
            "stored_parameters_by_kind",
        ):
            assert run[key] == expected_run[key], (name, key)
        folders = [out / "adapters" / name / "seed_0" for out in (output, reference)]
        files = [sorted(path.relative_to(folder) for path in folder.rglob("*.safetensors")) for folder in folders]
        assert files[0] == files[1] and bool(files[0]) == (name != "linear@cosine")  # linear: no PEFT model
        for file in files[0]:  # every task's adapter for olora
            tensors, expected_tensors = (load_file(folder / file) for folder in folders)
            assert tensors.keys() == expected_tensors.keys()
            assert all(torch.equal(tensors[key], expected_tensors[key]) for key in tensors), (name, file)
    assert not any(path.is_dir() for path in (output / "checkpoints").rglob("*seed_*"))


class Stop(Exception):
    """Stands for a kill right after a checkpoint was written."""


@pytest.mark.parametrize(
    ("methods", "method", "task"),
    [
        ("sdlora,lora-merge@ncm", "lora-merge@ncm", 2),  # the finished sdlora run is not run again
        ("ablation-fixed", "ablation-fixed", 1),
        ("sdlora-fsa@lda", "sdlora-fsa@lda", 2),  # its adapter frozen again after the restore; LDA's sums back
        ("linear@cosine", "linear@cosine", 3),  # stopped after its last task: only the results are left to write
        ("inflora,olora", "inflora", 2),  # the memory of two tasks, the third designed from it
        ("olora", "olora", 1),  # task 2's adapter joins the restored one
    ],
)
def test_stopped_run_resumes_to_the_uninterrupted_results(reference, tmp_path, monkeypatch, methods, method, task):
    """Each run's results are its own (seeded per run), so a run of some of the methods is compared too."""
    output = tmp_path / "out"
    save_checkpoint = checkpoint.save_checkpoint

    def save_then_stop(directory, *args, **kwargs):
        path = save_checkpoint(directory, *args, **kwargs)
        if directory.parent.name == method and path.name == f"task_{task}":
            raise Stop
        return path

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        cli.main([*ARGS, "--methods", methods, "--output", str(output)])
    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    cli.main(["--resume", str(output)])
    assert_same_results(output, reference, methods.split(","))


def test_a_run_cut_short_reports_what_it_finished(reference, tmp_path, monkeypatch):
    """Stopped in lora-merge's second task: its finished sdlora run is reported as the uninterrupted run has it."""
    output = tmp_path / "out"
    save_checkpoint = checkpoint.save_checkpoint

    def save_then_stop(directory, *args, **kwargs):
        path = save_checkpoint(directory, *args, **kwargs)
        if directory.parent.name == "lora-merge@ncm" and path.name == "task_2":
            raise Stop
        return path

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        cli.main([*ARGS, "--methods", "sdlora,lora-merge@ncm", "--output", str(output)])

    results = runs.finished_results(output)
    expected = json.loads((reference / "results.json").read_text())["methods"]["sdlora"]
    assert list(results["methods"]) == ["sdlora"]
    assert results["methods"]["sdlora"]["runs"][0]["accuracy_matrix"] == expected["runs"][0]["accuracy_matrix"]
    assert results["methods"]["sdlora"]["final_accuracy"] == expected["final_accuracy"]
    assert results["config"]["seeds"] == "0" and results["config"]["methods"] == "sdlora,lora-merge@ncm"
    with pytest.raises(ValueError, match="no config.json"):
        runs.finished_results(tmp_path / "elsewhere")


@pytest.mark.parametrize("method", ["sdlora", "inflora"])
def test_killed_process_resumes_to_the_uninterrupted_results(reference, tmp_path, method):
    """The real command, killed (SIGKILL) while it learns the method's second task, then resumed."""
    output, log = tmp_path / "out", tmp_path / "log.txt"
    command = [sys.executable, "-m", "sdlora_peft.continual.cli", *ARGS, "--methods", method, "--output", output]
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=stderr)
        state = output / "checkpoints" / method / "seed_0"
        deadline = time.monotonic() + 300
        while not (state / "task_1").is_dir() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.poll() is None, log.read_text()
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert checkpoint.latest_checkpoint(state).name in ("task_1", "task_2")  # killed in the second task (or the third)
    assert not (output / "results.json").exists()
    cli.main(["--resume", str(output)])
    assert_same_results(output, reference, [method])


def test_resume_keeps_the_saved_options(reference):
    assert cli.parse_args(["--resume", str(reference), "--epochs", "1"]).methods == ",".join(METHODS)
    with pytest.raises(ValueError, match="--epochs is 2 here but 1 in the saved run"):
        cli.parse_args(["--resume", str(reference), "--epochs", "2"])
    with pytest.raises(ValueError, match="--methods is 'sdlora' here"):
        cli.parse_args(["--resume", str(reference), "--methods", "sdlora"])
    with pytest.raises(ValueError, match="no run to resume"):
        cli.parse_args(["--resume", str(reference / "elsewhere")])


def test_a_started_run_is_not_restarted_by_accident(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"--resume {output} to continue it, --overwrite"):
        cli.main([*ARGS, "--methods", "ncm", "--output", str(output), "--debug"])
