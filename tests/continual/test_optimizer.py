"""The per-task optimizer: one learning rate each for the head, SD-LoRA's magnitudes and the rest."""

from __future__ import annotations

import pytest
import torch

from sdlora_peft.continual import zoo
from sdlora_peft.continual.methods import AdapterOptions, make_method
from sdlora_peft.continual.train import TrainSettings, _optimizer


@pytest.mark.parametrize("optimizer, kind", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_head_magnitudes_and_adapters_get_their_own_rates(optimizer, kind):
    model, _, _ = zoo.tiny_model("image", 4)
    model = make_method("sdlora", AdapterOptions(r=2)).wrap(model)
    settings = TrainSettings(lr=1e-4, head_lr=1e-3, magnitude_lr=1e-2, optimizer=optimizer)
    built = _optimizer(model, settings)
    assert isinstance(built, kind)
    names = {id(p): n for n, p in model.named_parameters()}
    by_rate = {group["lr"]: [names[id(p)] for p in group["params"]] for group in built.param_groups}
    assert all("classifier" in n for n in by_rate[1e-3])
    assert by_rate[1e-2] and all("sdlora_magnitude" in n for n in by_rate[1e-2])
    assert by_rate[1e-4] and all("sdlora_A" in n or "sdlora_B" in n for n in by_rate[1e-4])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for group in by_rate.values() for n in group}
    if optimizer == "sgd":
        assert all(group["momentum"] == 0.9 for group in built.param_groups)


def test_magnitudes_follow_lr_unless_told_otherwise():
    model, _, _ = zoo.tiny_model("image", 4)
    model = make_method("sdlora", AdapterOptions(r=2)).wrap(model)
    rates = sorted(group["lr"] for group in _optimizer(model, TrainSettings(lr=1e-4, head_lr=1e-3)).param_groups)
    assert rates == [1e-4, 1e-4, 1e-3]
    with pytest.raises(ValueError, match="Unknown optimizer"):
        _optimizer(model, TrainSettings(optimizer="lion"))
