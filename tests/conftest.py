"""Tiny real models (transformers models built from small configs, plain torch MLPs) and helpers for the tests."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

# Nothing loads from the Hub at test time: set before huggingface_hub and datasets read the variables at import, so
# a test that would reach the Hub fails at once instead of retrying a network it cannot have (subprocesses inherit it)
os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
from hypothesis import settings
from peft import get_peft_model
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

import sdlora_peft  # noqa: F401  (registers SD-LoRA with peft)
from sdlora_peft import SDLoraConfig

# PEFT's own generic matrices run on SD-LoRA: they fetch peft's sdist and take minutes, so only `make conformance`
# (which names the folder) runs them, not the default suite
collect_ignore = ["conformance"]

# CI replays the same examples every run, so that a red build is reproducible; locally hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


class MLP(nn.Module):
    """A plain torch model: no transformers config, so target modules are named explicitly."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, width)
        self.lin1 = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _vit() -> nn.Module:
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
        patch_size=8, num_labels=5,
    )  # fmt: skip
    return ViTForImageClassification(config)


def _dinov2() -> nn.Module:
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=16, patch_size=8,
        num_labels=5,
    )  # fmt: skip
    return Dinov2ForImageClassification(config)


def _bert() -> nn.Module:
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, num_labels=4,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def _llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _image_inputs(batch: int = 3) -> dict:
    return {"pixel_values": torch.randn(batch, 3, 16, 16)}


def _token_inputs(batch: int = 3) -> dict:
    return {"input_ids": torch.randint(0, 50, (batch, 7))}


def _output(model: nn.Module, inputs: dict | torch.Tensor) -> torch.Tensor:
    out = model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


class Case:
    """A tiny model, its inputs and the SD-LoRA config keywords it needs."""

    def __init__(self, name: str, build: Callable[[], nn.Module], inputs: Callable[[], dict | torch.Tensor], **cfg):
        self.name, self._build, self._inputs, self.cfg = name, build, inputs, cfg

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return self._build().eval()

    def inputs(self) -> dict | torch.Tensor:
        torch.manual_seed(1)
        return self._inputs()

    def __repr__(self) -> str:
        return self.name


CASES = [
    Case("vit", _vit, _image_inputs),
    Case("dinov2", _dinov2, _image_inputs),
    Case("bert", _bert, _token_inputs),
    Case("gpt2", _gpt2, _token_inputs),
    Case("llama", _llama, _token_inputs),
    Case("mlp", MLP, lambda: torch.randn(4, 6), target_modules=["lin0", "lin1"]),
]
CASE_BY_NAME = {case.name: case for case in CASES}


@pytest.fixture(params=CASES, ids=repr)
def case(request) -> Case:
    return request.param


def output(model: nn.Module, inputs: dict | torch.Tensor) -> torch.Tensor:
    """The model's main output tensor (logits for transformers models)."""
    with torch.no_grad():
        return _output(model, inputs)


def low_rank_output(model: nn.Module, inputs: dict | torch.Tensor) -> torch.Tensor:
    """`output` through the adapters' low-rank path: with autograd on, no layer uses its cached inference weight."""
    with torch.enable_grad():
        return _output(model, inputs).detach()


def loss_and_grads(model: nn.Module, run: Callable, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of `run` (the model or its compiled form, which shares its parameters) and the gradients it leaves."""
    model.zero_grad(set_to_none=True)
    loss = run(**inputs).logits.pow(2).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def make_peft(case: Case, **cfg) -> tuple[nn.Module, nn.Module]:
    """(base model, SD-LoRA PeftModel on a copy of it)."""
    base = case.build()
    config = SDLoraConfig(**{**case.cfg, **cfg})
    return base, get_peft_model(copy.deepcopy(base), config)


def train_steps(
    model: nn.Module, inputs: dict | torch.Tensor, steps: int = 3, lr: float = 0.05, optimizer_cls=torch.optim.Adam
) -> None:
    """A few optimizer steps on a real loss, so that every trainable tensor moves."""
    model.train()
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = _output(model, inputs).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def run_tasks(model, inputs, tasks: int, steps: int = 2) -> list:
    """Train and advance `tasks` times; the task records."""
    records = []
    for _ in range(tasks):
        train_steps(model, inputs, steps)
        records.append(model.advance_task())
    return records


def sdlora_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, sdlora_peft.SDLoraLayer)]


def put_old_direction(model, coefficient: float = 2.0) -> None:
    """Make the current direction exactly `coefficient` times the first frozen one, in every layer."""
    for layer in sdlora_layers(model):
        rank = layer.sdlora_frozen_ranks["default"][0]
        with torch.no_grad():
            layer.sdlora_A["default"].zero_()[:rank] = layer.sdlora_frozen_A["default"][:rank]
            layer.sdlora_B["default"].zero_()[:, :rank] = coefficient * layer.sdlora_frozen_B["default"][:, :rank]


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Hub offline mode and an empty Hub cache of the test's own: whatever tries to reach the Hub fails instead."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # peft reads the variable itself
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache
