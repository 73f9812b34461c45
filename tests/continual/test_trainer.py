"""ContinualTrainer: a task sequence on transformers' real Trainer, its logs, its per-task folders and its resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import CASE_BY_NAME, output
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from sdlora_peft import SDLoraConfig
from sdlora_peft.continual.trainer import ContinualTrainer, task_folder

ROOT = Path(__file__).resolve().parents[2]
CLASSES = [[0, 1], [2, 3], [4, 5]]


def base_model() -> nn.Module:
    """The tests' tiny ViT with a 6-class head, so that each of the 3 tasks has 2 classes to tell apart."""
    base = CASE_BY_NAME["vit"].build()
    base.classifier = nn.Linear(base.config.hidden_size, 6)
    base.config.num_labels = 6
    return base


BASE = base_model()


def fresh_model() -> nn.Module:
    """The same SD-LoRA model every time: task 0's direction is drawn when the adapter is created."""
    torch.manual_seed(0)
    return get_peft_model(copy.deepcopy(BASE), SDLoraConfig(r=4, modules_to_save=["classifier"]))


def task_sets() -> list[Dataset]:
    generator = torch.Generator().manual_seed(0)
    sets = []
    for classes in CLASSES:
        labels = torch.tensor(classes * 6)
        pixels = torch.randn(len(labels), 3, 16, 16, generator=generator) + labels.view(-1, 1, 1, 1)
        sets.append(Dataset.from_dict({"pixel_values": pixels.numpy(), "label": labels.numpy()}).with_format("torch"))
    return sets


TASKS = task_sets()
INPUTS = {"pixel_values": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


class Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class Crash(Exception):
    pass


class CrashOnSave(TrainerCallback):
    """Stops the run like a killed process, right after the `n`-th Trainer checkpoint is written."""

    def __init__(self, n: int) -> None:
        self.left = n

    def on_save(self, args, state, control, **kwargs):
        self.left -= 1
        if self.left == 0:
            raise Crash


def make_trainer(output_dir: Path, callbacks: list | None = None, model: nn.Module | None = None) -> ContinualTrainer:
    """A fresh model from the base and a real Trainer: 4 steps a task, a Trainer checkpoint every 2 steps."""
    args = TrainingArguments(
        str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=7,
    )
    return ContinualTrainer(model=model or fresh_model(), args=args, callbacks=callbacks)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[ContinualTrainer, Recorder]:
    recorder = Recorder()
    trainer = make_trainer(tmp_path_factory.mktemp("uninterrupted"), [recorder])
    trainer.train_tasks(TASKS)
    return trainer, recorder


def assert_same_adapter(expected: nn.Module, actual: nn.Module) -> None:
    """Bit-identical adapter weights (every task's direction, the magnitudes, the head) and logits."""
    want, got = get_peft_model_state_dict(expected), get_peft_model_state_dict(actual)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert torch.equal(output(expected.eval(), INPUTS), output(actual.eval(), INPUTS))


def classifier_weight(folder: Path) -> torch.Tensor:
    return PeftModel.from_pretrained(copy.deepcopy(BASE), folder).base_model.model.classifier.weight.detach()


def test_each_task_trains_a_new_direction_with_a_fresh_optimizer(uninterrupted):
    trainer, _ = uninterrupted
    model = trainer.model
    assert [record["task"] for record in model.peft_config["default"].task_history] == [0, 1]  # advanced in between
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == trainable  # the last task's optimizer holds the last task's direction and magnitudes
    for name, parameter in model.named_parameters():
        if "sdlora_B" in name:
            assert parameter.abs().sum() > 0, name  # the current direction trained
    frozen = [b for n, b in model.named_buffers() if "sdlora_frozen_B" in n]
    assert frozen and all(b.shape[1] == 8 for b in frozen)  # two frozen rank-4 directions per layer


def test_magnitudes_reach_the_callbacks_on_log(uninterrupted):
    trainer, recorder = uninterrupted
    train_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert [logs["sdlora/task"] for logs in train_logs] == [0] * 4 + [1] * 4 + [2] * 4
    for logs in train_logs:
        logged = sorted(k for k in logs if k.startswith("sdlora/magnitude/"))
        assert logged == [f"sdlora/magnitude/task_{k}" for k in range(logs["sdlora/task"] + 1)]
    final = recorder.logs[-1]
    assert "train_runtime" in final
    assert {k: final[f"sdlora/magnitude/task_{k}"] for k in range(3)} == trainer.model.task_magnitudes()
    assert final["sdlora/magnitude/task_0"] != 1.0  # an old magnitude kept training


def test_one_adapter_folder_per_task_that_loads_back(uninterrupted):
    trainer, _ = uninterrupted
    output_dir = Path(trainer.args.output_dir)
    for task in range(3):
        folder = task_folder(output_dir, task)
        assert (folder / "adapter_model.safetensors").is_file()
        assert json.loads((folder / "task_state.json").read_text())["classes"] == CLASSES[task]
        assert (folder / "checkpoint-2").is_dir()  # Trainer's own checkpoints stay inside their task's folder
    loaded = PeftModel.from_pretrained(copy.deepcopy(BASE), task_folder(output_dir, 2))
    assert torch.equal(output(loaded, INPUTS), output(trainer.model.eval(), INPUTS))


def test_loss_sees_only_the_current_tasks_classes(uninterrupted):
    """Head rows of classes outside the task get no gradient: earlier and later classes' rows stay as they were."""
    output_dir = Path(uninterrupted[0].args.output_dir)
    weights = [BASE.classifier.weight.detach()] + [classifier_weight(task_folder(output_dir, t)) for t in range(3)]
    for task, classes in enumerate(CLASSES):
        before, after = weights[task], weights[task + 1]
        others = [c for c in range(6) if c not in classes]
        assert torch.equal(before[others], after[others])
        assert not torch.equal(before[classes], after[classes])


def test_resume_after_a_finished_task_is_bit_identical(uninterrupted, tmp_path):
    make_trainer(tmp_path).train_tasks(TASKS[:2])  # a run that stopped after task 1 of 3
    resumed = make_trainer(tmp_path)  # a new model from the base, as in a new process
    outputs = resumed.train_tasks(TASKS, resume_from_checkpoint=True)
    assert len(outputs) == 1  # only task 2 was trained
    assert_same_adapter(uninterrupted[0].model, resumed.model)


def test_resume_from_a_mid_task_checkpoint_is_bit_identical(uninterrupted, tmp_path):
    with pytest.raises(Crash):  # checkpoints: task 0 at steps 2 and 4, task 1 at step 2, then the crash
        make_trainer(tmp_path, [CrashOnSave(3)]).train_tasks(TASKS)
    assert not (tmp_path / "task_1" / "task_state.json").exists()
    resumed = make_trainer(tmp_path)
    outputs = resumed.train_tasks(TASKS, resume_from_checkpoint=True)
    assert [o.global_step for o in outputs] == [4, 4]  # task 1 from its step 2, then task 2
    assert_same_adapter(uninterrupted[0].model, resumed.model)


def test_resume_refuses_another_task_sequence(uninterrupted):
    trainer = make_trainer(Path(uninterrupted[0].args.output_dir))
    with pytest.raises(ValueError, match="same task sequence"):
        trainer.train_tasks(TASKS, task_classes=[[0, 1], [2, 3], [5, 4]], resume_from_checkpoint=True)


def test_a_trained_adapter_needs_resume_to_continue(uninterrupted):
    output_dir = Path(uninterrupted[0].args.output_dir)
    trained = PeftModel.from_pretrained(copy.deepcopy(BASE), task_folder(output_dir, 1), is_trainable=True)
    trainer = make_trainer(output_dir, model=trained)
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        trainer.train_tasks(TASKS)


def test_refuses_what_it_cannot_train(tmp_path):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    lora = get_peft_model(copy.deepcopy(BASE), LoraConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="SD-LoRA PeftModel"):
        ContinualTrainer(model=lora, args=args)
    model = fresh_model()
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):  # the trainable set changes at every task
        ContinualTrainer(model=model, args=args, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match="No task folder or checkpoint"):
        ContinualTrainer(model=model, args=args).train_tasks(TASKS, resume_from_checkpoint=True)
