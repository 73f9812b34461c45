"""SD-LoRA in a few lines: three tasks on a small ViT, save, load, merge.

Runs offline on a CPU in seconds: `python examples/quickstart.py`.
"""

import copy
import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import ViTConfig, ViTForImageClassification

import sdlora_peft  # noqa: F401  (registers SD-LoRA with PEFT)
from sdlora_peft import SDLoraConfig

torch.manual_seed(0)
config = ViTConfig(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8,
    num_labels=6,
)  # fmt: skip
base = ViTForImageClassification(config).eval()
model = get_peft_model(copy.deepcopy(base), SDLoraConfig(r=10, modules_to_save=["classifier"]))
model.print_trainable_parameters()

images = torch.randn(24, 3, 32, 32)
labels = torch.arange(24) % 6
for task in range(3):
    # task t brings classes 2t and 2t+1; a new optimizer per task, since advance_task() makes new parameters
    in_task = (labels // 2) == task
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(10):
        loss = model(pixel_values=images[in_task], labels=labels[in_task]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    print(f"task {task}: loss {loss.item():.3f}, {model.advance_task()}")

print("magnitudes:", model.base_model.sdlora_magnitude["default"].tolist())
with torch.no_grad(), tempfile.TemporaryDirectory() as directory:
    expected = model(pixel_values=images).logits
    model.save_pretrained(directory)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), directory)
    print("loaded == trained:", torch.equal(loaded(pixel_values=images).logits, expected))
    merged = loaded.merge_and_unload()  # a plain ViT again: base-model inference cost
    print("merged max diff:", (merged(pixel_values=images).logits - expected).abs().max().item())
