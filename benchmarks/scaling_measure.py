"""How `bench_scaling.py` measures: train steps and no-grad forwards timed round-robin over the variants, in runs;
peak memory of a train step (CPU: replayed allocation events; CUDA: the allocator's peak); parameter counts; and
checks that variants which must compute the same function do."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from scaling_models import shared_copy
from scaling_report import Variant
from torch import nn
from torch.nn import functional as F

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
"""Largest relative difference accepted between outputs that must agree (naive vs fused, merged vs unmerged)."""


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    large_batch_size: int
    image_size: int
    patch_size: int
    runs: int
    repeats: int
    rank: int
    quick: bool
    cpu_clock: bool = False  # time.process_time: the process's CPU time, which other processes on the machine
    # do not stretch (with one torch thread it is the work done; with more it also counts threads waiting for work)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def tokens(self, batch_size: int) -> int:
        """Tokens per adapted layer in one step: images x (patches + the class token)."""
        return batch_size * ((self.image_size // self.patch_size) ** 2 + 1)


@dataclass
class Batch:
    pixel_values: torch.Tensor
    labels: torch.Tensor


def random_batch(settings: Settings, batch_size: int, num_labels: int) -> Batch:
    torch.manual_seed(0)
    shape = (batch_size, 3, settings.image_size, settings.image_size)
    return Batch(
        pixel_values=torch.randn(shape, device=settings.device, dtype=settings.dtype),
        labels=torch.randint(0, num_labels, (batch_size,), device=settings.device),
    )


def logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(pixel_values=batch.pixel_values).logits


def train_step(variant: Variant) -> None:
    """Forward, cross-entropy, backward and an Adam step over the variant's trainable parameters."""
    variant.model.train()
    loss = F.cross_entropy(logits(variant.model, variant.batch).float(), variant.batch.labels)
    loss.backward()
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)


def inference(model: nn.Module, batch: Batch) -> None:
    with torch.no_grad():
        logits(model, batch)


def timed(settings: Settings, run: Callable[[], None]) -> float:
    clock = time.process_time if settings.cpu_clock else time.perf_counter
    settings.synchronize()
    start = clock()
    run()
    settings.synchronize()
    return clock() - start


def measure_resident_bytes(variant: Variant) -> int:
    """Bytes of every tensor the variant keeps between steps: weights (shared ones counted), buffers, optimizer
    state. Gradients are freed after each step, so they are not resident; SD-LoRA's folded weights are counted in
    the step (see `prepare`)."""
    tensors = [*variant.model.parameters(), *variant.model.buffers()]
    tensors += [t for state in variant.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def step_peak_bytes(settings: Settings, run: Callable[[], None]) -> int:
    """Peak bytes allocated by `run` above what was allocated when it started (activations, gradients, temporaries).

    CUDA: the caching allocator's peak statistic. CPU: the allocation and free events that torch.profiler records
    for every tensor, replayed in time order.
    """
    if settings.device.type == "cuda":
        settings.synchronize()
        start = torch.cuda.memory_allocated(settings.device)
        torch.cuda.reset_peak_memory_stats(settings.device)
        run()
        settings.synchronize()
        return torch.cuda.max_memory_allocated(settings.device) - start
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        run()
    events = profiler.profiler.kineto_results.events()
    allocations = sorted((event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]")
    return max(0, max(itertools.accumulate(nbytes for _, nbytes in allocations), default=0))


def parameter_counts(variant: Variant, base: nn.Module) -> tuple[int, int]:
    """(trainable, stored): stored counts every saved tensor that is not the base model's, e.g. frozen directions."""
    trainable = sum(p.numel() for p in variant.model.parameters() if p.requires_grad)
    base_ids = {id(t) for t in base.state_dict(keep_vars=True).values()}
    own = {id(t): t for t in variant.model.state_dict(keep_vars=True).values() if id(t) not in base_ids}
    return trainable, sum(t.numel() for t in own.values())


def check_same_function(settings: Settings, batch: Batch, reference: nn.Module, other: nn.Module, what: str) -> None:
    """Fail loudly if two variants that must compute the same function do not (a benchmark of wrong math is void).
    Autograd stays on, so SD-LoRA layers compute through their training path, not a cached inference weight."""
    with torch.enable_grad():
        expected = logits(reference.eval(), batch).detach().float()
        actual = logits(other.eval(), batch).detach().float()
    error = float((actual - expected).abs().max() / expected.abs().max())
    if error > TOLERANCE[settings.dtype]:
        raise AssertionError(f"{what}: outputs differ by {error:.2e} (relative), more than expected.")


def prepare(settings: Settings, variant: Variant, base: nn.Module) -> None:
    """Parameter counts, the inference copy, optimizer, two warm-up steps (Adam creates its state in the first),
    peak memory.

    Inference runs on a copy in eval mode that is never trained, as a served model would: a train step or a mode
    switch in between would make it a measure of what changing the model costs (e.g. rebuilding a cached weight).
    """
    variant.trainable, variant.stored = parameter_counts(variant, base)
    if variant.infers:
        variant.evaluated = (shared_copy(variant.model, base) if variant.trains else variant.model).eval()
    if variant.merged is not None:
        variant.merged.eval()
    if not variant.trains:
        return
    variant.optimizer = torch.optim.Adam([p for p in variant.model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        train_step(variant)
    variant.resident_bytes = measure_resident_bytes(variant)
    # The profiler does not see tensors allocated before it starts being freed: folded weights, which a step
    # replaces, are freed first so that the step allocates its own (and its peak includes them).
    for module in variant.model.modules():
        if getattr(module, "_folded_weight", None) is not None:
            module._folded_weight = None
    variant.step_bytes = step_peak_bytes(settings, lambda: train_step(variant))


def measurements(variants: list[Variant]) -> list[tuple[Variant, str, Callable[[], None]]]:
    """Every timed call of one round: (variant, what, call)."""
    calls = []
    for variant in variants:
        if variant.trains:
            calls.append((variant, "train", lambda v=variant: train_step(v)))
        if variant.infers:
            calls.append((variant, "infer", lambda v=variant: inference(v.evaluated, v.batch)))
        if variant.merged is not None:
            calls.append((variant, "merged", lambda v=variant: inference(v.merged, v.batch)))
    return calls


def run_interleaved(settings: Settings, variants: list[Variant]) -> None:
    """`settings.runs` runs of the whole comparison, after one untimed warm-up round. Each run times every call once
    per round, in an order rotated by one call from round to round."""
    calls = measurements(variants)
    for _, _, call in calls:
        call()
    for run_index in range(settings.runs):
        for variant in variants:
            variant.runs.append({})
        for round_index in range(settings.repeats):
            shift = (run_index * settings.repeats + round_index) % len(calls)  # every round starts elsewhere
            for variant, what, call in calls[shift:] + calls[:shift]:
                variant.runs[-1].setdefault(what, []).append(timed(settings, call))
            print(f"run {run_index + 1}/{settings.runs}: round {round_index + 1}/{settings.repeats}", file=sys.stderr)
