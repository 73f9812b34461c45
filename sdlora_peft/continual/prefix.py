"""The hidden states that frozen lower blocks compute, cached once per dataset, so that only the blocks above run.

When adapters sit only in the upper blocks (`--layers 8,9,10,11`), or nowhere (a frozen backbone), the blocks below
the first trainable one compute the same hidden states for a sample at every epoch and every evaluation. A
`PrefixCache` computes them once per dataset, the output of the last frozen block, and while a batch runs it skips
the blocks below and gives that block's output from the cache. Gradients are unchanged: nothing below the first
trainable block has a gradient to compute.

It is exact when the frozen part computes the same thing every time: no active dropout there and inputs that are
the same at every epoch (no augmentation). Otherwise the cache is not used, and `reason` says why. The states of
padding positions are not kept (zeros replace them), which no attended token and no pooling reads.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

Collate = Callable[[list[dict]], dict[str, torch.Tensor]]
INDEX_KEY = "sample_index"


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: its longest `ModuleList` of modules of one class (BERT's and ViT's
    `encoder.layer`, Llama's `layers`); empty if it has none."""
    best = nn.ModuleList()
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            if len(Counter(type(child).__name__ for child in module)) == 1:
                best = module
    return best


def first_trainable(blocks: nn.ModuleList) -> int:
    """Index of the first block holding a trainable parameter; `len(blocks)` when none does."""
    for index, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return index
    return len(blocks)


def _active_dropout(modules: list[nn.Module]) -> str | None:
    """The first dropout that acts in training mode among `modules` and their children: a `nn.Dropout` with p > 0,
    or a float attribute named like `*drop*` (attention dropout passed to the kernel, stochastic depth)."""
    for module in modules:
        for child in module.modules():
            if isinstance(child, nn.modules.dropout._DropoutNd) and child.p > 0:
                return f"{type(child).__name__}(p={child.p}) in {type(module).__name__}"
            for attribute, value in vars(child).items():
                if "drop" in attribute and isinstance(value, float) and value > 0:
                    return f"{attribute}={value} in {type(child).__name__}"
    return None


def with_indices(collate: Collate) -> Callable[[list[tuple[int, dict]]], dict[str, torch.Tensor]]:
    """A collate function for `IndexedDataset` rows: `collate`'s batch plus the samples' indices."""

    def collate_indexed(rows: list[tuple[int, dict]]) -> dict[str, torch.Tensor]:
        batch = collate([row for _, row in rows])
        return {**batch, INDEX_KEY: torch.tensor([index for index, _ in rows])}

    return collate_indexed


class IndexedDataset(torch.utils.data.Dataset):
    """`(index, row)` for every row of a datasets.Dataset."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict]:
        return index, self.dataset[index]


class PrefixCache:
    """The output of the last frozen block for every sample of the datasets it has seen (see the module's doc)."""

    def __init__(self, model: nn.Module, augmented: bool = False) -> None:
        self._augmented = augmented
        self._states: dict[str, list[torch.Tensor]] = {}
        self._key: tuple | None = None
        self.refresh(model)

    @property
    def active(self) -> bool:
        return self.reason is None

    def _why_inexact(self, model: nn.Module, augmented: bool) -> str | None:
        if len(self.blocks) == 0:
            return "no stack of transformer blocks found"
        if self.depth == 0:
            return "the first block trains"
        if augmented:
            return "the training inputs are augmented"
        below = list(self.blocks[: self.depth])
        embeddings = [m for name, m in model.named_modules() if name.endswith("embeddings")]
        dropout = _active_dropout(below + embeddings)
        return f"dropout acts below the first trainable block ({dropout})" if dropout else None

    def describe(self) -> dict:
        """What results.json records of the cache."""
        return {"used": self.active, "frozen_blocks": self.depth, "blocks": len(self.blocks), "reason": self.reason}

    def _prefix_key(self) -> tuple:
        """Identifies the frozen blocks' weights as they are: the cache is rebuilt if any was replaced or changed."""
        frozen = self.blocks[: self.depth]
        return tuple((id(p), p.data_ptr(), p._version) for block in frozen for p in block.parameters())

    def refresh(self, model: nn.Module) -> None:
        """Look at the model again (a method may have re-wrapped it between tasks); cached states stay valid as long
        as the frozen blocks and their weights are the same."""
        self.blocks = transformer_blocks(model)
        self.depth = first_trainable(self.blocks)
        self.reason = self._why_inexact(model, self._augmented)
        key = self._prefix_key() if self.active else None
        if key != self._key:
            self._states, self._key = {}, key

    @torch.no_grad()
    def prepare(
        self, accelerator: Accelerator, model: nn.Module, dataset: Dataset, collate: Collate, batch_size: int
    ) -> None:
        """Compute and keep the frozen part's output for every sample of `dataset` (on every process: each holds the
        whole cache), unless it is cached already."""
        if not self.active or dataset._fingerprint in self._states:
            return
        states: list[torch.Tensor] = []
        last = self.blocks[self.depth - 1]

        def capture(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            raise _Captured(output)  # the blocks above are not needed: stop the forward here

        hook = last.register_forward_hook(capture)
        training = model.training
        model.eval()
        try:
            # a generator of its own: iterating a DataLoader draws a seed from the global one otherwise, and a run
            # with the cache would then draw different initialisations than a run without it
            loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, generator=torch.Generator())
            for batch in loader:
                batch = {k: v.to(accelerator.device) for k, v in batch.items() if k != "labels"}
                try:
                    model(**batch)
                except _Captured as captured:
                    hidden = captured.output.float().cpu()
                else:
                    raise RuntimeError("the forward pass did not reach the last frozen block")
                mask = batch.get("attention_mask")
                rows = mask.bool().cpu() if mask is not None else [None] * len(hidden)
                states += [h if m is None else h[m] for h, m in zip(hidden, rows)]
        finally:
            hook.remove()
            model.train(training)
        self._states[dataset._fingerprint] = states

    @contextlib.contextmanager
    def replaying(self, dataset: Dataset, batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """Yield `batch` without its `sample_index`, ready for the model; inside the context, the frozen blocks are
        skipped and the last of them gives the cached states of those samples."""
        indices = batch.pop(INDEX_KEY)
        if not self.active:
            yield batch
            return
        states = self._states[dataset._fingerprint]
        cached = _assemble([states[i] for i in indices.tolist()], batch.get("attention_mask"), indices.device)
        replaced = dict.fromkeys(self.blocks[: self.depth - 1], _pass_through)
        replaced[self.blocks[self.depth - 1]] = lambda hidden_states, *args, **kwargs: cached.to(hidden_states.dtype)
        for block, forward in replaced.items():
            block.forward = forward
        try:
            yield batch
        finally:
            for block in replaced:
                del block.forward


class _Captured(Exception):
    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


def _pass_through(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states


def _assemble(states: list[torch.Tensor], mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """A `[batch, tokens, width]` tensor with each sample's cached states at its attended positions."""
    if mask is None:
        return torch.stack(states).to(device)
    out = torch.zeros(*mask.shape, states[0].shape[-1], device=device)
    out[mask.bool()] = torch.cat(states).to(device)
    return out
