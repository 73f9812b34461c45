"""SD-LoRA's cases for PEFT's generic matrices, and the two places where PEFT's expectations meet our decisions."""

from __future__ import annotations

import os

import yaml

from sdlora_peft import SDLoraConfig

SECOND_TASK = {
    "task_history": [{"task": 0, "rank": 2, "absorbed": False, "residual": None}],
    "rank_schedule": [2, 3],
}
"""An adapter that has finished one task: a frozen rank-2 direction next to the current rank-3 one."""

CUSTOM_CASES = [
    ("Vanilla MLP 1 SD-LoRA", "MLP", SDLoraConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 2 SD-LoRA", "MLP", SDLoraConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 3 SD-LoRA regex", "MLP", SDLoraConfig, {"target_modules": r"lin\d"}),
    ("Vanilla MLP 4 SD-LoRA per-layer magnitudes", "MLP", SDLoraConfig,
     {"target_modules": ["lin0", "lin1"], "magnitude_sharing": "layer"}),
    ("Vanilla MLP 5 SD-LoRA modules_to_save", "MLP", SDLoraConfig,
     {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 SD-LoRA exclude_modules", "MLP", SDLoraConfig,
     {"target_modules": r"lin\d", "exclude_modules": ["lin1"]}),
    ("Vanilla MLP 7 SD-LoRA second task", "MLP", SDLoraConfig, {"target_modules": ["lin0", "lin1"], **SECOND_TASK}),
    ("Embedding + transformers Conv1D 1 SD-LoRA", "EmbConv1D", SDLoraConfig, {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 SD-LoRA second task", "EmbConv1D", SDLoraConfig,
     {"target_modules": ["conv1d"], **SECOND_TASK}),
    ("Vanilla MLP 8 SD-LoRA second task folded", "MLP", SDLoraConfig,
     {"target_modules": ["lin0", "lin1"], "frozen_path": "fold", **SECOND_TASK}),
    ("Embedding + transformers Conv1D 3 SD-LoRA second task folded, recomputed", "EmbConv1D", SDLoraConfig,
     {"target_modules": ["conv1d"], "frozen_path": "fold", "frozen_recompute": True, **SECOND_TASK}),
    ("Conv2d 1 SD-LoRA", "Conv2d", SDLoraConfig, {"target_modules": ["lin0"]}),
]  # fmt: skip
"""PEFT's custom models: one target, two, a regex, per-layer magnitudes, modules_to_save, exclude_modules, an adapter
past its first task, and one whose frozen directions are folded into the weight (with and without recomputation).
SD-LoRA adapts `nn.Linear` and transformers' `Conv1D`, so on the Conv2d model it targets the linear layer."""

DECODER_CONFIGS = [
    (SDLoraConfig, {"task_type": "CAUSAL_LM", "r": 8, "target_modules": None}),
    (SDLoraConfig, {"task_type": "CAUSAL_LM", "r": 4, "target_modules": None, "magnitude_sharing": "layer"}),
    (SDLoraConfig, {"task_type": "CAUSAL_LM", "target_modules": None, **SECOND_TASK}),
    (SDLoraConfig, {"task_type": "CAUSAL_LM", "target_modules": None, "frozen_path": "fold", **SECOND_TASK}),
]
"""The decoder matrix on SD-LoRA's default targets (the query/value projections), as PEFT's own configs do, once with
the frozen direction folded into the weight."""

PICKLE_OPT_IN = {"SDLORA_ALLOW_PICKLE": "1"}
"""Decision kept: SD-LoRA loads safetensors only unless the user opts in to pickle files (`SDLORA_ALLOW_PICKLE=1`;
the refusal is tested in test_peft_custom_models.py and tests/test_bad_input.py). PEFT's pickle round trips are
that opt-in, so they run with it."""


def check_modelcard(tmp_dirname: str, model) -> None:
    """PEFT's model-card check, with one decision of ours kept: the card's `base_model` is written only when the
    base model's name is a Hub repository id (the Hub reads it as a link to a repository); for a local folder it is
    left out. PEFT's CI loads Hub ids, where ours writes it too; the tiny models here are local folders."""
    with open(os.path.join(tmp_dirname, "README.md"), encoding="utf-8") as file:
        metadata = yaml.safe_load(file.read().split("---\n")[1])
    assert metadata["library_name"] == "peft"
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if name and not os.path.exists(name):
        assert metadata["base_model"] == name
    else:
        assert "base_model" not in metadata
