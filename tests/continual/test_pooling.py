"""Text classifiers on the pooling their backbone was trained with."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from sdlora_peft import SDLoraConfig
from sdlora_peft.continual import zoo
from sdlora_peft.continual.prefix import transformer_blocks
from sdlora_peft.continual.zoo.models.pooling import pool


def test_pooling_by_hand():
    hidden = torch.arange(24.0).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # right- and left-padded rows
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.stack([hidden[0, :2].mean(0), hidden[1, 1:].mean(0)]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool(hidden, mask, "max")


@pytest.mark.parametrize("pooling", zoo.POOLINGS)
def test_a_pooled_text_classifier_trains_with_sdlora(pooling):
    model, tokenizer, info = zoo.load_model("tiny-bert", 3, pooling=pooling)
    assert isinstance(model, zoo.PooledClassifier) and info.pooling == pooling
    assert model.encoder.pooler is None  # BERT's CLS pooler is not computed
    inputs = tokenizer(["a b c", "defgh", "x"], padding=True, return_tensors="pt")
    peft_model = get_peft_model(model, SDLoraConfig(r=2, modules_to_save=["classifier"]))  # default targets
    assert {name.split(".")[-1] for name, m in peft_model.named_modules() if hasattr(m, "sdlora_A")} == {
        "query",
        "value",
    }
    output = peft_model(**inputs, labels=torch.tensor([0, 1, 2]))
    output.loss.backward()
    assert output.logits.shape == (3, 3)
    assert transformer_blocks(peft_model) is model.encoder.encoder.layer


def test_pooling_applies_to_text_models_only():
    with pytest.raises(ValueError, match="applies to text models"):
        zoo.load_model("tiny-dinov2", 3, pooling="mean")
    model, _, info = zoo.load_model("tiny-bert", 3)
    assert info.pooling is None and not isinstance(model, zoo.PooledClassifier)  # the architecture's own head


def test_set_dropout_reaches_every_dropout():
    model, _, _ = zoo.load_model("tiny-bert", 3, pooling="mean")
    zoo.set_dropout(model, 0.0)
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and all(rate == 0.0 for rate in rates)
