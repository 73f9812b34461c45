"""SD-LoRA (Scalable Decoupled LoRA, ICLR 2025) as a PEFT method.

Importing this package registers `PeftType.SDLORA` with PEFT, so `get_peft_model`, `PeftModel.from_pretrained`,
`PeftConfig.from_pretrained` and `AutoPeftModel*` work with SD-LoRA adapters, and `save_pretrained` / `push_to_hub`
write an SD-LoRA model card (`write_model_card` adds evaluation results to it).
"""

from .card import write_model_card
from .config import SDLoraConfig
from .layer import SDLoraLayer, SDLoraLinear
from .model import SDLoraModel, TaskRecord
from .registration import register

register()

__version__ = "0.1.0"
__all__ = [
    "SDLoraConfig",
    "SDLoraLayer",
    "SDLoraLinear",
    "SDLoraModel",
    "TaskRecord",
    "__version__",
    "write_model_card",
]
