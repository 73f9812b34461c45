"""Refusals that leave nothing behind: sdlora-cil checks everything it can before it writes, and a user's error is
one line, `sdlora-cil: error: ...`, with exit status 2 (the traceback only with --debug)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdlora_peft.continual import cli

TINY = ["--model", "tiny-dinov2", "--dataset", "digits", "--image-size", "16", "--epochs", "1", "--ranpac-dim", "256"]
ROOT = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def refuse(argv: list[str], capsys) -> str:
    """Run the command expecting a refusal; return its one line of error output."""
    try:
        status = cli.main(argv)
    except SystemExit as stop:  # argparse's own refusals exit from inside the parser
        status = stop.code
    assert status == 2
    error = capsys.readouterr().err
    assert error.startswith("sdlora-cil: error: ") and error.count("\n") == 1 and "Traceback" not in error
    return error


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--num-tasks", "20"], "cannot split 10 classes into 20 tasks"),
        (["--methods", "sdlora,ewc"], "known methods"),
        (["--label-column", "nope"], "label column 'nope' not found"),
        (["--head", "nope"], "--head: invalid choice"),
        (["--epochs", "0"], "--epochs: must be > 0"),
        (["--seeds", ","], "--seeds needs at least one seed"),
        (["--dataset", "no-such-folder/nowhere"], "no-such-folder/nowhere"),
    ],
    ids=["too-many-tasks", "unknown-method", "label-column", "head", "epochs", "seeds", "dataset"],
)
def test_a_refused_run_leaves_the_folder_byte_for_byte(extra, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("the user's own file\n")
    before = snapshot(output)
    assert says in refuse([*TINY, "--output", str(output), *extra], capsys)
    assert snapshot(output) == before
    # and the next run in that folder needs neither --resume nor --overwrite: nothing of a run was left there
    assert not (output / "config.json").exists()


def test_a_refused_run_creates_no_folder(tmp_path, capsys):
    refuse([*TINY, "--output", str(tmp_path / "new"), "--num-tasks", "20"], capsys)
    assert not (tmp_path / "new").exists()


def test_refusing_to_resume_is_one_line_too(tmp_path, capsys):
    assert "no run to resume" in refuse(["--resume", str(tmp_path)], capsys)


def test_debug_shows_the_error_itself(tmp_path):
    with pytest.raises(ValueError, match="cannot split 10 classes into 20 tasks"):
        cli.main([*TINY, "--output", str(tmp_path), "--num-tasks", "20", "--debug"])


def test_the_command_exits_with_status_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "sdlora_peft.continual.cli", *TINY, "--output", str(tmp_path / "out")]
    done = subprocess.run([*command, "--num-tasks", "20"], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("sdlora-cil: error: cannot split 10 classes")
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
