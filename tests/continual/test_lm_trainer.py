"""ContinualTrainer on a causal LM: prompt/target tasks on transformers' real Trainer and a tiny Llama from a
config, the loss on the target tokens only, advance between tasks, magnitudes in the logs, bit-identical resume;
and the example script."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from peft import get_peft_model, get_peft_model_state_dict
from transformers import TrainingArguments

from sdlora_peft import SDLoraConfig
from sdlora_peft.continual.lm.encode import IGNORE_INDEX, CausalLMCollator, encode_pair
from sdlora_peft.continual.trainer import ContinualTrainer, task_folder

from .test_lm import EVERY_PROJECTION, MODEL, TASKS, TOKENIZER
from .test_trainer import Crash, CrashOnSave, Recorder

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SETS = [task.train for task in TASKS]


class Batches(CausalLMCollator):
    """The trainer's collator, keeping every batch it made."""

    def __init__(self) -> None:
        super().__init__(TOKENIZER.pad_token_id)
        self.made: list[dict[str, torch.Tensor]] = []

    def __call__(self, rows):
        self.made.append(batch := super().__call__(rows))
        return batch


def make_trainer(output_dir: Path, callbacks=None, collator=None) -> ContinualTrainer:
    torch.manual_seed(0)
    config = SDLoraConfig(r=4, task_type="CAUSAL_LM", target_modules=EVERY_PROJECTION)
    args = TrainingArguments(
        str(output_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=1,
        save_strategy="steps", save_steps=2, use_cpu=True, report_to=[], disable_tqdm=True, seed=7,
    )  # fmt: skip
    model = get_peft_model(copy.deepcopy(MODEL), config)
    return ContinualTrainer(
        model=model, args=args, processing_class=TOKENIZER, callbacks=callbacks, data_collator=collator
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    recorder, batches = Recorder(), Batches()
    trainer = make_trainer(tmp_path_factory.mktemp("uninterrupted"), [recorder], batches)
    trainer.train_tasks(TRAIN_SETS)
    return trainer, recorder, batches


def test_loss_is_on_the_target_tokens_and_tasks_advance(uninterrupted):
    trainer, recorder, batches = uninterrupted
    assert [r["task"] for r in trainer.model.peft_config["default"].task_history] == [0]  # advanced once
    encoded = {tuple(row["input_ids"]): row["labels"] for task in TRAIN_SETS for row in
               (encode_pair(TOKENIZER, p, t) for p, t in zip(task["prompt"], task["target"]))}  # fmt: skip
    assert len(batches.made) == 8  # 4 steps a task
    for batch in batches.made:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            real = ids[mask.bool()].tolist()
            assert labels[mask.bool()].tolist() == encoded[tuple(real)]  # -100 on the prompt, the target kept
            assert labels[~mask.bool()].eq(IGNORE_INDEX).all()
    train_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert [logs["sdlora/task"] for logs in train_logs] == [0] * 4 + [1] * 4
    assert "sdlora/magnitude/task_0" in train_logs[-1] and train_logs[-1]["loss"] < train_logs[0]["loss"]
    state = json.loads((task_folder(trainer.args.output_dir, 1) / "task_state.json").read_text())
    assert state["task"] == 1 and len(state["classes"]) == 1  # the digest of the task's pairs


def test_resume_from_a_mid_task_checkpoint_is_bit_identical(uninterrupted, tmp_path):
    with pytest.raises(Crash):  # checkpoints: task 0 at steps 2 and 4, task 1 at step 2, then the crash
        make_trainer(tmp_path, [CrashOnSave(3)]).train_tasks(TRAIN_SETS)
    resumed = make_trainer(tmp_path)
    outputs = resumed.train_tasks(TRAIN_SETS, resume_from_checkpoint=True)
    assert [o.global_step for o in outputs] == [4]
    want, got = get_peft_model_state_dict(uninterrupted[0].model), get_peft_model_state_dict(resumed.model)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(ValueError, match="other prompt/target pairs"):
        make_trainer(tmp_path).train_tasks(TRAIN_SETS[::-1], resume_from_checkpoint=True)


def test_a_causal_lm_needs_its_tokenizer(tmp_path):
    model = get_peft_model(copy.deepcopy(MODEL), SDLoraConfig(r=4, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="processing_class=tokenizer"):
        ContinualTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]))


def test_trl_sft_trainer_learns_the_same_task_sequence(uninterrupted, tmp_path):
    """With the real TRL: SFTTrainer's completion-only loss, ContinualTrainer's sequence; the same adapter as
    ContinualTrainer's own tokenization gives when both train on the same pairs with the same settings."""
    pytest.importorskip("trl")
    from trl import SFTConfig

    from sdlora_peft.continual.lm.sft import ContinualSFTTrainer

    torch.manual_seed(0)
    model = get_peft_model(
        copy.deepcopy(MODEL), SDLoraConfig(r=4, task_type="CAUSAL_LM", target_modules=EVERY_PROJECTION)
    )
    # SFTConfig turns bfloat16 on where the machine has it: off, as in the other runs (and Accelerate's state, which
    # lives on in this process, is left as other tests expect it)
    args = SFTConfig(
        str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=1,
        save_strategy="no", use_cpu=True, report_to=[], disable_tqdm=True, seed=7, bf16=False,
    )  # fmt: skip
    recorder = Recorder()
    try:
        trainer = ContinualSFTTrainer(
            model=model, args=args, processing_class=TOKENIZER, train_dataset=TRAIN_SETS[0], callbacks=[recorder]
        )
        trainer.train_tasks(TRAIN_SETS)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert [r["task"] for r in trainer.model.peft_config["default"].task_history] == [0]
    prepared = trainer.prepare_task_dataset(TRAIN_SETS[1])
    row = encode_pair(TOKENIZER, TRAIN_SETS[1][0]["prompt"], TRAIN_SETS[1][0]["target"])
    # TRL tokenizes the pair as ContinualTrainer does, and leaves the same prompt tokens out of the loss
    assert prepared[0]["input_ids"] == row["input_ids"] and prepared[0]["labels"] == row["labels"]
    train_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert [logs["sdlora/task"] for logs in train_logs] == [0] * 4 + [1] * 4
    assert (task_folder(tmp_path, 1) / "adapter_model.safetensors").is_file()
