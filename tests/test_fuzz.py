"""Property-based tests: random configs, tiny models and sequences of operations (train, advance, save/load,
merge/unmerge, disable, add/delete another adapter) keep SD-LoRA's invariants.

- the function is preserved by `advance_task()` (unless `freeze_scale="unit"`), save/load, merge/unmerge and
  deleting another adapter, up to 1e-5 relative in float32;
- frozen directions stay bit-identical while training (and while another adapter trains);
- outputs stay finite; disabling the adapter gives the base model; `advance_task()` on a merged model is refused
  and changes nothing.
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from conftest import CASE_BY_NAME, output, put_old_direction, sdlora_layers, train_steps
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from peft import PeftModel, get_peft_model

from sdlora_peft import SDLoraConfig

TOLERANCE = 1e-5

ranks = st.integers(1, 4)
configs = st.fixed_dictionaries(
    {
        "r": ranks,
        "rank_schedule": st.one_of(st.none(), st.just("rr"), st.lists(ranks, min_size=1, max_size=4)),
        "magnitude_sharing": st.sampled_from(["global", "layer"]),
        "direction_norm": st.sampled_from(["frobenius", "factor"]),
        # mostly the settings under which advance_task() must keep the function exactly
        "freeze_scale": st.sampled_from(["preserve", "preserve", "normalized", "unit"]),
        "reset_magnitudes": st.sampled_from([False, False, False, True]),
        "kd_threshold": st.sampled_from([None, 9e-4]),
        "magnitude_init": st.sampled_from([1.0, 0.8]),
        "cache_inference_weight": st.booleans(),
        "frozen_path": st.sampled_from(["auto", "lowrank", "fold"]),
        "frozen_recompute": st.booleans(),
    }
)


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool((actual - expected).abs().max() <= TOLERANCE * max(1.0, expected.abs().max().item()))


class SDLoraSequence(RuleBasedStateMachine):
    """One SD-LoRA model driven through a random sequence of the operations a user performs."""

    @initialize(case_name=st.sampled_from(["mlp", "gpt2", "vit"]), config=configs)
    def build(self, case_name: str, config: dict) -> None:
        self.case = CASE_BY_NAME[case_name]
        self.base = self.case.build()
        self.config = config
        self.model = get_peft_model(copy.deepcopy(self.base), SDLoraConfig(**self.case.cfg, **config))
        self.inputs = self.case.inputs()

    def out(self) -> torch.Tensor:
        return output(self.model, self.inputs)

    def frozen(self) -> list[tuple[torch.Tensor, ...]]:
        return [
            tuple(getattr(layer, name)["default"].clone() for name in ("sdlora_frozen_A", "sdlora_frozen_B"))
            for layer in sdlora_layers(self.model)
            if "default" in layer.sdlora_frozen_A
        ]

    def assert_frozen_unchanged(self, before: list[tuple[torch.Tensor, ...]]) -> None:
        after = self.frozen()
        assert len(after) == len(before)
        assert all(torch.equal(a, b) for pair_a, pair_b in zip(after, before) for a, b in zip(pair_a, pair_b))

    @precondition(lambda self: not self.merged())
    @rule(steps=st.integers(1, 2), lr=st.sampled_from([1e-3, 5e-2, 0.5]))
    def train(self, steps: int, lr: float) -> None:
        frozen = self.frozen()
        train_steps(self.model, self.inputs, steps=steps, lr=lr)
        self.assert_frozen_unchanged(frozen)

    @precondition(lambda self: not self.merged())
    @rule()
    def advance(self) -> None:
        before = self.out()
        config = self.model.peft_config["default"]
        tasks = config.current_task
        record = self.model.advance_task()
        assert record.task == tasks and config.current_task == tasks + 1
        assert sum(layer.sdlora_frozen_A["default"].shape[0] for layer in sdlora_layers(self.model)[:1]
                   if "default" in layer.sdlora_frozen_A) == sum(config.frozen_ranks)  # fmt: skip
        if self.config["freeze_scale"] != "unit" and not self.config["reset_magnitudes"]:
            assert close(self.out(), before)

    @precondition(lambda self: not self.merged() and self.model.peft_config["default"].frozen_ranks)
    @rule()
    def repeat_an_old_direction(self) -> None:
        """Train the current direction into a multiple of the first frozen one: SD-LoRA-KD can absorb it."""
        layer = sdlora_layers(self.model)[0]
        if layer.r["default"] < layer.sdlora_frozen_ranks["default"][0]:
            return
        put_old_direction(self.model)
        self.advance()

    @rule(low_cpu_mem_usage=st.booleans())
    def save_and_load(self, low_cpu_mem_usage: bool) -> None:
        before = self.out()
        with tempfile.TemporaryDirectory() as directory:
            self.model.save_pretrained(directory)
            self.model = PeftModel.from_pretrained(
                copy.deepcopy(self.base), directory, is_trainable=True, low_cpu_mem_usage=low_cpu_mem_usage
            )
        assert close(self.out(), before)

    def merged(self) -> bool:
        return any(layer.merged for layer in sdlora_layers(self.model))

    @precondition(lambda self: not self.merged())
    @rule()
    def merge(self) -> None:
        before = self.out()
        self.model.merge_adapter()
        assert close(self.out(), before)

    @precondition(lambda self: self.merged())
    @rule()
    def unmerge(self) -> None:
        before = self.out()
        self.model.unmerge_adapter()
        assert close(self.out(), before)

    @precondition(lambda self: self.merged())
    @rule()
    def advance_while_merged_is_refused(self) -> None:
        before, history = self.out(), list(self.model.peft_config["default"].task_history)
        with pytest.raises(ValueError, match="unmerge_adapter"):
            self.model.advance_task()
        assert self.model.peft_config["default"].task_history == history and torch.equal(self.out(), before)

    @rule()
    def merge_and_unload_a_copy(self) -> None:
        merged = copy.deepcopy(self.model).merge_and_unload()
        assert not sdlora_layers(merged)
        assert close(output(merged, self.inputs), self.out())

    @rule()
    def disable(self) -> None:
        with self.model.disable_adapter():
            assert close(self.out(), output(self.base, self.inputs))

    @precondition(lambda self: not self.merged())
    @rule(config=configs)
    def train_and_delete_another_adapter(self, config: dict) -> None:
        before, frozen = self.out(), self.frozen()
        self.model.add_adapter("other", SDLoraConfig(**self.case.cfg, **config))
        self.model.set_adapter("other")
        train_steps(self.model, self.inputs, steps=1)
        self.model.advance_task()
        self.model.set_adapter("default")
        self.model.delete_adapter("other")
        self.assert_frozen_unchanged(frozen)
        assert close(self.out(), before)

    @invariant()
    def finite(self) -> None:
        if hasattr(self, "model"):
            assert torch.isfinite(self.out()).all()


TestSDLoraSequence = SDLoraSequence.TestCase
TestSDLoraSequence.settings = settings(max_examples=15, stateful_step_count=10, deadline=None)


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(-1, 5), st.text(max_size=3), st.booleans()), max_size=3),
)
FIELDS = [
    "r", "rank_schedule", "magnitude_init", "magnitude_sharing", "direction_norm", "freeze_scale", "kd_threshold",
    "reset_magnitudes", "target_modules", "layers_to_transform", "modules_to_save", "task_history",
]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(FIELDS), value=values)
def test_any_config_value_is_accepted_and_round_trips_or_is_refused_with_a_value_error(field, value):
    try:
        config = SDLoraConfig(**{field: value})
    except ValueError as error:
        assert f"`{field}" in str(error)
        return
    with tempfile.TemporaryDirectory() as directory:
        config.save_pretrained(directory)
        assert SDLoraConfig.from_pretrained(directory) == config
