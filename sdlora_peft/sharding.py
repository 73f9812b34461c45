"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for SD-LoRA models: shard, gather, and cross a task boundary.

Within a task an SD-LoRA model shards like any PEFT model: every block that holds SD-LoRA layers becomes its own
FSDP unit, and the root unit owns the rest (embeddings, the head, `modules_to_save`, and the global magnitudes that
every layer reads while the root's parameters are gathered). A task boundary is different: `advance_task()` replaces
the trainable parameters (a new direction, possibly of another rank; one more magnitude) and grows the frozen
buffers, and FSDP's parameter groups cannot change shape. So a boundary is *gather, advance, re-shard*:
`advance_task_sharded` gathers the full state on every rank, rebuilds the unsharded model on a fresh base model,
calls `advance_task()` there (the same on every rank: the same inputs give the same result), and shards it again.
The full model is held once per rank during the boundary; training itself runs sharded.

`shard_sdlora` shards any PEFT model the same way (a LoRA's blocks are those that hold LoRA layers; a model without
adapter layers is one unit), and `gather_trained` writes a sharded copy's training back into the unsharded model it
was copied from: that is how `sdlora-cil --fsdp` and `ContinualTrainer` train each task sharded and keep everything
else (task boundaries, evaluation, saving) unsharded.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TypeVar

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from .model import TaskRecord

M = TypeVar("M", bound=nn.Module)


def shard_sdlora(model: M, **fsdp_kwargs) -> M:
    """Apply `fully_shard` to every block that directly contains adapter layers (SD-LoRA's, or any PEFT tuner's:
    attention blocks, for the usual query/value targets), then to the whole model. `fsdp_kwargs` go to each
    `fully_shard` call (`mesh`, `reshard_after_forward`, `mp_policy`, ...). Returns the model, sharded in place."""
    for block in _blocks(model):
        fully_shard(block, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict, on every rank (a collective: call it on all ranks). On rank 0 it is what
    `PeftModel.save_pretrained` and `get_peft_model_state_dict` need for a full adapter."""
    return {
        key: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
        for key, value in model.state_dict().items()
    }


def unsharded_copy(model: PeftModel, base: nn.Module, adapter_name: str = "default") -> PeftModel:
    """A plain (unsharded) `PeftModel` on `base` (a fresh base model of the same architecture) holding the sharded
    model's weights: for saving on rank 0, or to cross a task boundary. A collective, like `full_state_dict`."""
    state = full_state_dict(model)
    config = copy.deepcopy(model.peft_config[adapter_name])
    plain = get_peft_model(base, config, adapter_name=adapter_name)
    plain.load_state_dict(state, strict=True)
    return plain


def advance_task_sharded(
    model: PeftModel, base: nn.Module, adapter_name: str = "default", **fsdp_kwargs
) -> tuple[PeftModel, TaskRecord]:
    """`advance_task()` on an FSDP2-sharded SD-LoRA model: gather, advance on an unsharded copy built on `base`,
    re-shard. Returns the new sharded model (use it, and a new optimizer, for the next task) and the task's record."""
    plain = unsharded_copy(model, base, adapter_name)
    record = plain.advance_task(adapter_name)
    return shard_sdlora(plain, **fsdp_kwargs), record


@torch.no_grad()
def gather_trained(sharded: nn.Module, plain: nn.Module) -> None:
    """Write what training changed in `sharded` (a sharded copy of `plain`: its trainable parameters and its buffers)
    back into `plain`, the unsharded model it was copied from. A collective: call it on all ranks. `plain` keeps
    everything a state dict would not carry (non-persistent buffers, hooks, attributes)."""
    targets = dict(plain.named_parameters()) | dict(plain.named_buffers())
    trained = [(name, p) for name, p in sharded.named_parameters() if p.requires_grad]
    for name, value in [*trained, *sharded.named_buffers()]:
        targets[name].copy_(value.full_tensor() if isinstance(value, DTensor) else value)


def _blocks(model: nn.Module) -> Iterable[nn.Module]:
    """The modules whose direct children include adapter layers (e.g. attention blocks), in the model's order."""
    return [module for module in model.modules() if any(isinstance(c, BaseTunerLayer) for c in module.children())]
