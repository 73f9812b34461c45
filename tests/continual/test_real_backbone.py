"""The pretrained offline DINOv2-S through `sdlora-cil` (slow: real weights, real images)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from sdlora_peft.continual import cli, zoo

pytestmark = pytest.mark.slow


def test_dinov2_small_on_digits(tmp_path):
    output = tmp_path / "run"
    cli.main(["--model", "dinov2-small", "--dataset", "digits", "--num-tasks", "2", "--epochs", "1",
              "--image-size", "56", "--max-train-per-class", "30", "--max-test-per-class", "10",
              "--methods", "sdlora,lora-seq,ncm", "--output", str(output)])  # fmt: skip
    results = json.loads((output / "results.json").read_text())
    assert results["config"]["model_info"]["pretrained"] is True
    # pretrained features separate digits far above chance (10 %), whatever the method
    assert all(m["final_accuracy"]["mean"] > 40 for m in results["methods"].values())
    base, _, _ = zoo.load_model("dinov2-small", num_labels=10)
    adapter = PeftModel.from_pretrained(base, output / "adapters" / "sdlora" / "seed_0")
    assert len(adapter.peft_config["default"].task_history) == 2
    assert torch.isfinite(adapter(pixel_values=torch.randn(1, 3, 56, 56)).logits).all()
