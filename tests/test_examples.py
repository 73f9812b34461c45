"""Every script in examples/ runs, on tiny settings, as a user would run it (a new example needs an entry here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = {
    "quickstart.py": ([], "loaded == trained: True"),
    "cil_vision.py": (
        ["--model", "tiny-dinov2", "--num-tasks", "2", "--image-size", "32", "--epochs", "1", "--head", "ncm"],
        "accuracy matrix",
    ),
    "cil_text.py": (
        [
            "--model",
            "tiny-bert",
            "--num-tasks",
            "2",
            "--max-length",
            "16",
            "--target-modules",
            "query,value",
            "--max-train-per-class",
            "4",
            "--max-test-per-class",
            "4",
            "--methods",
            "sdlora,ncm",
            "--ranpac-dim",
            "256",
        ],
        "sdlora: final accuracy",
    ),  # fmt: skip
    "clm_trainer.py": (
        ["--model", "tiny-llama", "--tasks", "yahoo,stackoverflow", "--max-steps", "2", "--per-task", "8"],
        "(ranked among 20 answers)",
    ),
    "cil_trainer.py": (
        [
            "--model",
            "tiny-dinov2",
            "--num-tasks",
            "2",
            "--image-size",
            "32",
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--max-per-class",
            "4",
        ],
        "final accuracy over 10 classes",
    ),  # fmt: skip
}


def test_every_example_has_tiny_settings():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(TINY_ARGS)


@pytest.mark.parametrize("script", sorted(TINY_ARGS))
def test_example_runs(script, tmp_path):
    args, expected = TINY_ARGS[script]
    if script != "quickstart.py":
        args = [*args, "--output", str(tmp_path / "out")]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
