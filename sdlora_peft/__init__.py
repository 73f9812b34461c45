"""SD-LoRA (Scalable Decoupled LoRA, ICLR 2025) as a PEFT method.

Importing this package registers `PeftType.SDLORA` with PEFT, so `get_peft_model`, `PeftModel.from_pretrained`,
`PeftConfig.from_pretrained` and `AutoPeftModel*` work with SD-LoRA adapters, and `save_pretrained` / `push_to_hub`
write an SD-LoRA model card (`write_model_card` adds evaluation results to it). `export_lora` writes an adapter
as a plain PEFT LoRA adapter.
"""

from .card import write_model_card
from .config import SDLoraConfig
from .export import ExportReport, export_lora
from .layer import SDLoraLayer, SDLoraLinear
from .model import SDLoraModel, TaskRecord
from .registration import register

register()

__version__ = "0.1.0"
__all__ = [
    "ExportReport",
    "SDLoraConfig",
    "SDLoraLayer",
    "SDLoraLinear",
    "SDLoraModel",
    "TaskRecord",
    "__version__",
    "export_lora",
    "write_model_card",
]
