"""The frozen-prefix cache: when it applies, and that a run with it equals the run without it."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from datasets import ClassLabel, Dataset, Features, Value
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from sdlora_peft.continual import prefix, zoo
from sdlora_peft.continual.data import ImageCollator, TaskSplit, TextCollator, split_dataset
from sdlora_peft.continual.heads import make_head
from sdlora_peft.continual.methods import AdapterOptions, make_method
from sdlora_peft.continual.prefix import PrefixCache, first_trainable, transformer_blocks
from sdlora_peft.continual.train import TrainSettings, run_sequence
from sdlora_peft.continual.zoo.models.tiny import _char_tokenizer


def tiny_bert(dropout: float, num_labels: int = 4) -> BertForSequenceClassification:
    tokenizer = _char_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, num_labels=num_labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def test_blocks_and_the_first_trainable_one_are_found():
    bert = tiny_bert(0.0)
    assert transformer_blocks(bert) is bert.bert.encoder.layer
    llama = LlamaForSequenceClassification(
        LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    )
    assert transformer_blocks(llama) is llama.model.layers
    bert.requires_grad_(False)
    assert first_trainable(bert.bert.encoder.layer) == 3
    bert.bert.encoder.layer[2].attention.self.query.weight.requires_grad_(True)
    assert first_trainable(bert.bert.encoder.layer) == 2


def wrapped(model, layers):
    return make_method("sdlora", AdapterOptions(r=2, layers_to_transform=layers)).wrap(model)


def test_the_cache_is_used_only_where_it_is_exact():
    assert PrefixCache(wrapped(tiny_bert(0.0), [2])).describe() == {
        "used": True, "frozen_blocks": 2, "blocks": 3, "reason": None,
    }  # fmt: skip
    assert "dropout" in PrefixCache(wrapped(tiny_bert(0.1), [2])).reason
    assert PrefixCache(wrapped(tiny_bert(0.0), [0, 2])).reason == "the first block trains"
    assert PrefixCache(wrapped(tiny_bert(0.0), [2]), augmented=True).reason == "the training inputs are augmented"
    frozen = tiny_bert(0.1)
    frozen.requires_grad_(False)  # a frozen backbone still runs its blocks' dropout while the head trains
    assert "dropout" in PrefixCache(frozen).reason


def text_data() -> Dataset:
    """Strings of very different lengths, so that batches are padded and the cache must place states by mask."""
    texts = [("a" * (1 + i % 7)) + " " + ("xyz" * (i % 5)) + str(label) for label in range(4) for i in range(12)]
    labels = [label for label in range(4) for _ in range(12)]
    features = Features({"text": Value("string"), "label": ClassLabel(num_classes=4)})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def text_tasks():
    split = TaskSplit([[0, 1], [2, 3]])
    return split, split_dataset(text_data(), split), TextCollator(_char_tokenizer(), "text", "label", 32)


def image_tasks():
    data = zoo.load_dataset("digits")
    split = TaskSplit([[0, 1], [2, 3]])
    model, processor, _ = zoo.tiny_model("image", 4)
    collate = ImageCollator("image", "label", 32, processor)
    return split, split_dataset(data["train"], split, max_per_class=12), split_dataset(data["test"], split), collate


def run(model, method: str, head: str, split, train_sets, test_sets, collate, prefix_cache: bool, layers):
    settings = TrainSettings(epochs=2, batch_size=8, lr=1e-2, eval_batch_size=5, prefix_cache=prefix_cache)
    method_ = make_method(method, AdapterOptions(r=2, layers_to_transform=layers))
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model, record = run_sequence(
        accelerator, copy.deepcopy(model), method_, make_head(head), split, train_sets, test_sets, collate, settings
    )
    return model, record


@pytest.mark.parametrize("method, head", [("sdlora", "linear"), ("lora-merge", "ncm"), ("linear", "lda")])
def test_a_cached_run_equals_the_uncached_run_on_padded_text(method, head):
    split, train_sets, collate = text_tasks()
    model = tiny_bert(0.0)
    runs = [run(model, method, head, split, train_sets, train_sets, collate, cached, [2]) for cached in (False, True)]
    (plain_model, plain), (cached_model, cached) = runs
    assert cached["prefix_cache"]["used"] and cached["prefix_cache"]["frozen_blocks"] == (
        3 if method == "linear" else 2
    )
    assert not plain["prefix_cache"]["used"]
    assert cached["accuracy_matrix"] == plain["accuracy_matrix"]
    # not bit for bit: the cached states were computed in batches padded to other lengths, and a matrix product's
    # rounding depends on the shapes it runs in
    for (name, tensor), (_, reference) in zip(cached_model.state_dict().items(), plain_model.state_dict().items()):
        torch.testing.assert_close(tensor, reference, rtol=1e-5, atol=1e-6, msg=name)


def test_a_cached_run_equals_the_uncached_run_on_images():
    split, train_sets, test_sets, collate = image_tasks()
    model, _, _ = zoo.tiny_model("image", 4)
    runs = [run(model, "sdlora", "linear", split, train_sets, test_sets, collate, cached, [1]) for cached in (0, 1)]
    (plain_model, plain), (cached_model, cached) = runs
    assert cached["prefix_cache"]["used"]
    assert cached["accuracy_matrix"] == plain["accuracy_matrix"]
    for (name, tensor), (_, reference) in zip(cached_model.state_dict().items(), plain_model.state_dict().items()):
        assert torch.equal(tensor, reference), name  # fixed-size inputs: bit for bit


def test_runs_on_copies_of_one_backbone_share_the_cached_states():
    prefix._STATES.clear()  # what earlier tests of this process cached
    split, train_sets, collate = text_tasks()
    model = tiny_bert(0.0)
    calls = []
    model.bert.encoder.layer[0].attention.register_forward_hook(lambda *args: calls.append(1))  # not when skipped
    run(model, "sdlora", "linear", split, train_sets, train_sets, collate, True, [2])
    first = len(calls)
    run(model, "lora-seq", "ncm", split, train_sets, train_sets, collate, True, [2])  # same frozen blocks 0-1
    assert first > 0 and len(calls) == first  # the second run never ran block 0


def test_another_task_split_of_the_same_samples_reuses_their_states():
    prefix._STATES.clear()
    split, train_sets, collate = text_tasks()
    model = tiny_bert(0.0)
    calls = []
    model.bert.encoder.layer[0].attention.register_forward_hook(lambda *args: calls.append(1))
    run(model, "sdlora", "linear", split, train_sets, train_sets, collate, True, [2])
    first = len(calls)
    other = TaskSplit([[3, 0], [1, 2]])  # another seed's class order: other subsets of the same samples
    other_sets = split_dataset(text_data(), other)
    _, record = run(model, "sdlora", "linear", other, other_sets, other_sets, collate, True, [2])
    assert first > 0 and len(calls) == first
    _, plain = run(model, "sdlora", "linear", other, other_sets, other_sets, collate, False, [2])
    assert record["accuracy_matrix"] == plain["accuracy_matrix"]


def test_a_sample_keeps_its_key_however_its_batch_is_padded():
    collate = TextCollator(_char_tokenizer(), "text", "label", 32)
    rows = [{"text": text, "label": 0} for text in ("ab", "ab", "a much longer text", "ba")]
    alone, padded = (prefix._sample_keys({k: v for k, v in collate(batch).items() if k != "labels"})
                     for batch in (rows[:2], rows[1:]))  # fmt: skip
    assert alone[0] == alone[1] == padded[0]  # the same text in a batch of 4 tokens and in one of 17
    assert len(set(padded)) == 3  # other texts, other keys
