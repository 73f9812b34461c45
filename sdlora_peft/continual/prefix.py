"""The hidden states that frozen lower blocks compute, cached once per dataset, so that only the blocks above run.

When adapters sit only in the upper blocks (`--layers 8,9,10,11`), or nowhere (a frozen backbone), the blocks below
the first trainable one compute the same hidden states for a sample at every epoch and every evaluation. A
`PrefixCache` computes them once per dataset, the output of the last frozen block, and while a batch runs it skips
the blocks below and gives that block's output from the cache. Gradients are unchanged: nothing below the first
trainable block has a gradient to compute.

It is exact when the frozen part computes the same thing every time: no active dropout there and inputs that are
the same at every epoch (no augmentation). Otherwise the cache is not used, and `reason` says why. The states of
padding positions are not kept (zeros replace them), which no attended token and no pooling reads.

States are kept per sample, under a hash of the sample's model inputs, so that every subset of the same samples
(another seed's task split, the test set of one task or of all seen ones) reuses them: a run of three seeds computes
the frozen blocks once per sample, not once per seed.
"""

from __future__ import annotations

import contextlib
import hashlib
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
        self._digest: str | None = None
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

    def refresh(self, model: nn.Module) -> None:
        """Look at the model again (a method may have re-wrapped it between tasks); cached states are found again
        as long as the frozen blocks hold the same weights (in this run or in another run of the process)."""
        self.blocks = transformer_blocks(model)
        self.depth = first_trainable(self.blocks)
        self.reason = self._why_inexact(model, self._augmented)
        self._digest = _weights_digest(self.blocks[: self.depth]) if self.active else None

    def _held(self) -> dict[bytes, torch.Tensor]:
        """The states cached for these frozen blocks, by sample."""
        return _STATES.setdefault((self._digest, self.depth), {})

    @torch.no_grad()
    def prepare(
        self, accelerator: Accelerator, model: nn.Module, dataset: Dataset, collate: Collate, batch_size: int
    ) -> None:
        """Compute and keep the frozen part's output for every sample of `dataset` that has none cached yet (on every
        process: each holds the whole cache)."""
        if not self.active:
            return
        rows, held = _rows_key(dataset, collate), self._held()
        if rows in _ROW_KEYS and all(key in held for key in _ROW_KEYS[rows]):
            return
        if sum(t.numel() for states in _STATES.values() for t in states.values()) > STORE_LIMIT:
            _STATES.clear()
            held = self._held()
        keys: list[bytes] = []
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
                batch = {k: v for k, v in batch.items() if k != "labels"}
                batch_keys = _sample_keys(batch)
                keys += batch_keys
                missing = [i for i, key in enumerate(batch_keys) if key not in held]
                if not missing:
                    continue
                batch = {k: v[missing].to(accelerator.device) for k, v in batch.items()}
                try:
                    model(**batch)
                except _Captured as captured:
                    hidden = captured.output.float().cpu()
                else:
                    raise RuntimeError("the forward pass did not reach the last frozen block")
                mask = batch.get("attention_mask")
                masks = mask.bool().cpu() if mask is not None else [None] * len(hidden)
                for i, h, m in zip(missing, hidden, masks):
                    held[batch_keys[i]] = h if m is None else h[m]
        finally:
            hook.remove()
            model.train(training)
        _ROW_KEYS[rows] = keys

    @contextlib.contextmanager
    def replaying(
        self, dataset: Dataset, collate: Collate, batch: dict[str, torch.Tensor]
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield `batch` without its `sample_index`, ready for the model; inside the context, the frozen blocks are
        skipped and the last of them gives the cached states of those samples (`prepare` computed them)."""
        indices = batch.pop(INDEX_KEY)
        if not self.active:
            yield batch
            return
        keys, held = _ROW_KEYS[_rows_key(dataset, collate)], self._held()
        cached = _assemble([held[keys[i]] for i in indices.tolist()], batch.get("attention_mask"), indices.device)
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


_STATES: dict[tuple, dict[bytes, torch.Tensor]] = {}
"""Cached states of the process, by (frozen weights, depth), then by sample (`_sample_keys`): runs of several
methods and seeds on the same data and backbone (a benchmark's) compute their shared frozen blocks once."""
_ROW_KEYS: dict[tuple, list[bytes]] = {}
"""Each row's sample key, by (dataset fingerprint, preprocessing)."""
STORE_LIMIT = 2**29  # floats held (2 GiB) past which the next dataset with states to compute starts the store afresh


def _rows_key(dataset: Dataset, collate: Collate) -> tuple:
    """What `_ROW_KEYS` files a dataset's row keys under."""
    return (dataset._fingerprint, _inputs_key(collate))


def _sample_keys(batch: dict[str, torch.Tensor]) -> list[bytes]:
    """A hash of each sample's model inputs: its attended positions of the per-token inputs (so the padding a batch
    adds does not change it) and the whole of any other input (pixels)."""
    mask = batch.get("attention_mask")
    keys = []
    for row in range(len(next(iter(batch.values())))):
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(batch):
            value = batch[name][row]
            if mask is not None and value.shape[:1] == mask.shape[1:]:
                value = value[mask[row].bool()]
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        keys.append(digest.digest())
    return keys


def _weights_digest(blocks: nn.ModuleList) -> str:
    """A hash of the blocks' parameter values (not their identity: a copy of the same backbone matches)."""
    digest = hashlib.blake2b(digest_size=16)
    for parameter in blocks.parameters():
        data = parameter.detach().cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _inputs_key(collate: Collate) -> str:
    """What makes a collator's batches what they are: its class and plain settings, and its tokenizer's name."""
    settings = {k: v for k, v in vars(collate).items() if isinstance(v, (bool, int, float, str, tuple))}
    if not settings.get("augment", False):
        settings.pop("train", None)  # without augmentation, training and evaluation batches are the same
    tokenizer = getattr(collate, "tokenizer", None)
    return repr((type(collate).__name__, sorted(settings.items()), getattr(tokenizer, "name_or_path", None)))


def _pass_through(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states


def _assemble(states: list[torch.Tensor], mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """A `[batch, tokens, width]` tensor with each sample's cached states at its attended positions."""
    if mask is None:
        return torch.stack(states).to(device)
    out = torch.zeros(*mask.shape, states[0].shape[-1], device=device)
    out[mask.bool()] = torch.cat(states).to(device)
    return out
