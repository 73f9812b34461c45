"""PEFT's `TestDecoderModels` (tests/test_decoder_models.py of the installed peft's sdist), run on SD-LoRA.

The decoder matrix: generation (also half precision and positional arguments), training (with layer indexing and
both gradient-checkpointing modes), merging (NaN included), saving selected adapters, deleting, unloading and
disabling adapters, adapter dtypes. PEFT runs it on tiny Hub models; here on the same architectures built locally
(tiny_models.py), and over SD-LoRA's configs (cases.py).
"""

from __future__ import annotations

from sdlora_peft import SDLoraConfig

from .cases import DECODER_CONFIGS, PICKLE_OPT_IN, check_modelcard
from .peft_suite import import_peft_tests
from .repoint import repointed_tests
from .tiny_models import tiny_model_ids

peft_decoder = import_peft_tests("test_decoder_models")
peft_common = import_peft_tests("testing_common")


def _unless_sdlora(skip_check):
    """Two of PEFT's skip helpers would skip SD-LoRA for reasons that do not hold for it, so the tests run:
    `_skip_if_conv1d_not_supported` lists the methods that adapt GPT-2's `Conv1D` (SD-LoRA does too), and
    `check_beft_config` skips every method on Llama ("layers have no bias term", meant for BEFT only: it tests
    `isinstance(config_cls, BeftConfig)` on a class, which is never true)."""

    def check(*args):  # (model_id, config_cls, kwargs) for one, (config_cls, model_id, kwargs) for the other
        if SDLoraConfig not in args:
            skip_check(*args)

    return check


peft_common._skip_if_conv1d_not_supported = _unless_sdlora(peft_common._skip_if_conv1d_not_supported)
peft_decoder.check_beft_config = _unless_sdlora(peft_decoder.check_beft_config)


class TestSDLoraDecoderModels(peft_decoder.TestDecoderModels):
    """PEFT's decoder tests over tiny local GPT-2, Llama and OPT models and SD-LoRA's configs; tests written for one
    particular method (prompt tuning, LoRA's layer replication, prefix tuning, ...) are hidden."""

    check_modelcard = staticmethod(check_modelcard)

    locals().update(
        repointed_tests(
            peft_decoder.TestDecoderModels,
            cases=[
                (peft_decoder.PEFT_DECODER_MODELS_TO_TEST, tiny_model_ids()),
                (peft_decoder.ALL_CONFIGS, DECODER_CONFIGS),
            ],
            environment={
                "test_save_pretrained_pickle": PICKLE_OPT_IN,
                "test_save_pretrained_selected_adapters_pickle": PICKLE_OPT_IN,
            },
        )
    )
