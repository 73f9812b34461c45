"""PEFT's `TestPeftCustomModel` (tests/test_custom_models.py of the installed peft's sdist), run on SD-LoRA.

PEFT's custom-model matrix holds every method to the same contract: save/load round trips (safetensors, pickle,
low_cpu_mem_usage, several adapters), merging (fp16, idempotent, safe, NaN), disabling and deleting adapters,
adapter dtypes under `autocast_adapter_dtype`, training, requires_grad after loading. Its bodies run unchanged here;
only its cases are replaced by SD-LoRA's (see cases.py).
"""

from __future__ import annotations

import pytest

from sdlora_peft import SDLoraConfig

from .cases import CUSTOM_CASES, PICKLE_OPT_IN, check_modelcard
from .peft_suite import import_peft_tests
from .repoint import repointed_tests

peft_custom = import_peft_tests("test_custom_models")


class TestSDLoraCustomModel(peft_custom.TestPeftCustomModel):
    """PEFT's custom-model tests over SD-LoRA's cases; tests written for one particular method are hidden."""

    check_modelcard = staticmethod(check_modelcard)

    locals().update(
        repointed_tests(
            peft_custom.TestPeftCustomModel,
            cases=[(peft_custom.TEST_CASES, CUSTOM_CASES), (peft_custom.ALL_PEFT_CONFIG_CLASSES, [SDLoraConfig])],
            environment={"test_save_pretrained_pickle": PICKLE_OPT_IN},
        )
    )


def test_pickle_round_trip_needs_the_opt_in(tmp_path, monkeypatch):
    """The decision the pickle round trips above run under, made visible: without the opt-in the load is refused."""
    from peft import PeftModel, get_peft_model

    monkeypatch.delenv("SDLORA_ALLOW_PICKLE", raising=False)
    model = get_peft_model(peft_custom.MLP(), SDLoraConfig(target_modules=["lin0"]))
    model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match="SDLORA_ALLOW_PICKLE=1"):
        PeftModel.from_pretrained(peft_custom.MLP(), tmp_path)
