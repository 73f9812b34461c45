"""Speed and memory of SD-LoRA as tasks accumulate, against PEFT's own LoRA and DoRA, side by side in one run.

Every variant adapts the same modules of the same randomly initialised model (by default a ViT-B/16-shaped
`ViTForImageClassification`, query and value projections, rank 10) and is timed on the same batch. Measurements go
round-robin over the variants, so a machine that gets slower or faster during the run affects all of them alike;
the table reports medians.

Variants:
- `base`: the model without adapters (inference only; the reference for inference ratios);
- `lora`, `dora`: PEFT's LoRA and DoRA at rank `r` (the reference for training ratios is `lora`);
- `sdlora-t<N>`: SD-LoRA training its N-th task, i.e. N-1 frozen directions plus the current one (N directions
  stored: at N = 20 this is the paper's 7.37M parameters);
- `sdlora-rr-t<N>`: the same with SD-LoRA-RR's rank schedule;
- `naive-t<N>`: the same math as `sdlora-t<N>` written as a Python loop over tasks in every layer, each frozen
  direction applied on its own and re-normalised at every forward (a reference point only, kept in this file);
- `upcast-t<N>` (bfloat16 runs only): `sdlora-t<N>` with its frozen directions applied in float32, where PEFT applies
  trainable adapters in a half-precision model (a reference point for running them in the model's dtype).

Usage:
    python benchmarks/bench_scaling.py                  # ViT-B/16 shape, 112 px, batch 8, 2 CPU threads
    python benchmarks/bench_scaling.py --quick          # tiny model, 3 repeats: a smoke test
    python benchmarks/bench_scaling.py --device cuda --dtype bfloat16 --batch-size 64 --image-size 224
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import os
import platform
import shlex
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F
from transformers import ViTConfig, ViTForImageClassification

import sdlora_peft
from sdlora_peft import SDLoraConfig, SDLoraLayer, lowrank

HERE = Path(__file__).resolve().parent
TARGET_MODULES = ["q_proj", "v_proj", "query", "value"]  # ViT's query/value projections: transformers >= 5, < 5
TASK_GRID = (1, 5, 10, 20)
ADVANCE_REPEATS = 9
KD_THRESHOLD = 9e-4
VIT_B16 = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
"""Largest relative difference accepted between outputs that must agree (naive vs fused, merged vs unmerged)."""


# ----------------------------------------------------------------------------------------------------------------
# The naive reference: SD-LoRA as a per-task loop
# ----------------------------------------------------------------------------------------------------------------


class NaiveSDLoraLinear(nn.Module):
    """SD-LoRA's forward written the way the paper's reference code does it: one term per task, in Python.

    Frozen direction k adds `alpha_k * c_k * B_k (A_k x) / ||B_k A_k||_F`, with the norm recomputed at every forward
    (here through the cheap r x r trace, not a dense `B_k A_k`, so the loop itself is what is measured); the current
    task adds `alpha_t * B_t (A_t x)`. Computes the same function as `SDLoraLinear` at a cost that grows with the
    number of tasks. `magnitude` is one parameter shared by every layer, as SD-LoRA's global magnitudes are.
    """

    def __init__(self, base_layer: nn.Linear, layer: SDLoraLayer, magnitude: nn.Parameter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.magnitude = magnitude
        self.A = nn.Parameter(layer.sdlora_A["default"].detach().clone())
        self.B = nn.Parameter(layer.sdlora_B["default"].detach().clone())
        frozen_A, frozen_B, constants = [], [], []
        if "default" in layer.sdlora_frozen_A:
            ranks = layer.sdlora_frozen_ranks["default"]
            frozen_A = layer.sdlora_frozen_A["default"].split(ranks, dim=0)
            frozen_B = layer.sdlora_frozen_B["default"].split(ranks, dim=1)
            scales = layer.sdlora_frozen_scale["default"].tolist()
            constants = [s * float(lowrank.frobenius_norm(B, A)) for s, A, B in zip(scales, frozen_A, frozen_B)]
        self.frozen_A = nn.ParameterList(nn.Parameter(A.clone(), requires_grad=False) for A in frozen_A)
        self.frozen_B = nn.ParameterList(nn.Parameter(B.clone(), requires_grad=False) for B in frozen_B)
        self.register_buffer("frozen_c", torch.tensor(constants, dtype=self.A.dtype, device=self.A.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.magnitude
        h = x.to(self.A.dtype)  # adapters are float32 (PEFT's autocast) even in a bfloat16 model
        delta = F.linear(F.linear(h, self.A), self.B) * alpha[-1]
        for k, (A_k, B_k) in enumerate(zip(self.frozen_A, self.frozen_B)):
            scale = alpha[k] * self.frozen_c[k] / lowrank.frobenius_norm(B_k, A_k).to(h.dtype)
            delta = delta + F.linear(F.linear(h, A_k), B_k) * scale
        return self.base_layer(x) + delta.to(x.dtype)


def naive_copy(sdlora: PeftModel, base: nn.Module) -> nn.Module:
    """The base model with every adapted layer of `sdlora` replaced by a `NaiveSDLoraLinear` of the same values."""
    model = shared_copy(base)
    modules = dict(model.named_modules())
    magnitude = nn.Parameter(sdlora.base_model.sdlora_magnitude["default"].detach().clone())
    for name, layer in sdlora.base_model.model.named_modules():
        if isinstance(layer, SDLoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, NaiveSDLoraLinear(modules[name], layer, magnitude))
    return model


def upcast_copy(sdlora: PeftModel, base: nn.Module) -> PeftModel:
    """`sdlora` with every layer's frozen directions applied to a float32 copy of the input."""
    model = shared_copy(sdlora, base)
    for layer in model.modules():
        if isinstance(layer, SDLoraLayer):
            layer._frozen_output = types.MethodType(_frozen_output_in_float32, layer)  # type: ignore[method-assign]
    return model


def _frozen_output_in_float32(
    layer: SDLoraLayer, x: torch.Tensor, adapter_name: str, magnitude: torch.Tensor
) -> torch.Tensor:
    return SDLoraLayer._frozen_output(layer, x.float(), adapter_name, magnitude)


# ----------------------------------------------------------------------------------------------------------------
# Building the variants
# ----------------------------------------------------------------------------------------------------------------


def build_base(settings: Settings) -> nn.Module:
    """A randomly initialised ViT of the benchmark's shape, in the benchmark's dtype and on its device."""
    torch.manual_seed(0)
    shape = TINY_VIT if settings.quick else VIT_B16
    config = ViTConfig(**shape, image_size=settings.image_size, patch_size=settings.patch_size, num_labels=100)
    return ViTForImageClassification(config).to(device=settings.device, dtype=settings.dtype)


def shared_copy(module: nn.Module, base: nn.Module | None = None) -> nn.Module:
    """A deep copy of `module` that shares the parameters and buffers of `base` (default: `module`), so that a dozen
    variants of one model fit in memory. Nothing here writes into a shared tensor (see `merged_copy`)."""
    base = module if base is None else base
    memo = {id(tensor): tensor for tensor in itertools.chain(base.parameters(), base.buffers())}
    return copy.deepcopy(module, memo)


def randomize_current_directions(model: PeftModel) -> None:
    """Give every layer's current `B` random values, as training would, so that `advance_task` stores them."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SDLoraLayer):
                B = layer.sdlora_B["default"]
                B.copy_(torch.randn_like(B) / B.shape[1])


def sdlora_at_task(base: nn.Module, tasks: int, **config: object) -> PeftModel:
    """An SD-LoRA model training its `tasks`-th task: `tasks - 1` random directions frozen by `advance_task()`."""
    torch.manual_seed(tasks)
    model = get_peft_model(shared_copy(base), SDLoraConfig(target_modules=TARGET_MODULES, **config))
    for _ in range(tasks - 1):
        randomize_current_directions(model)
        model.advance_task()
    return model


def lora(base: nn.Module, rank: int, use_dora: bool) -> PeftModel:
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGET_MODULES, use_dora=use_dora)
    return get_peft_model(shared_copy(base), config)


def merged_copy(model: PeftModel, base: nn.Module) -> nn.Module:
    """`merge_and_unload()` on a copy of `model`; the adapted weights are cloned first, since merging writes into
    them and they are shared with every other variant."""
    model = shared_copy(model, base)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base_layer = module.get_base_layer()
            base_layer.weight = nn.Parameter(base_layer.weight.detach().clone(), requires_grad=False)
    return model.merge_and_unload()


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    image_size: int
    patch_size: int
    repeats: int
    rank: int
    quick: bool

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Variant:
    """One model under test and what was measured on it."""

    name: str
    model: nn.Module
    tasks: int | None = None
    trains: bool = True
    infers: bool = True
    evaluated: nn.Module | None = None
    merged: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    times: dict[str, list[float]] = field(default_factory=dict)
    resident_bytes: int | None = None
    step_bytes: int | None = None
    trainable: int = 0
    stored: int = 0

    @property
    def peak_bytes(self) -> int | None:
        """Peak memory of a train step: what stays resident plus the step's own peak allocation."""
        return None if self.step_bytes is None else self.resident_bytes + self.step_bytes


@dataclass
class Batch:
    pixel_values: torch.Tensor
    labels: torch.Tensor


def logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(pixel_values=batch.pixel_values).logits


def train_step(variant: Variant, batch: Batch) -> None:
    """Forward, cross-entropy, backward and an Adam step over the variant's trainable parameters."""
    variant.model.train()
    loss = F.cross_entropy(logits(variant.model, batch).float(), batch.labels)
    loss.backward()
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)


def inference(model: nn.Module, batch: Batch) -> None:
    with torch.no_grad():
        logits(model, batch)


def timed(settings: Settings, run: Callable[[], None]) -> float:
    settings.synchronize()
    start = time.perf_counter()
    run()
    settings.synchronize()
    return time.perf_counter() - start


def measure_resident_bytes(variant: Variant) -> int:
    """Bytes of every tensor the variant keeps between steps: weights (shared ones counted), buffers, optimizer
    state. Gradients are freed after each step, so they are not resident."""
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
    Autograd stays on, so SD-LoRA layers compute through their low-rank path, not a cached inference weight."""
    with torch.enable_grad():
        expected = logits(reference.eval(), batch).detach().float()
        actual = logits(other.eval(), batch).detach().float()
    error = float((actual - expected).abs().max() / expected.abs().max())
    if error > TOLERANCE[settings.dtype]:
        raise AssertionError(f"{what}: outputs differ by {error:.2e} (relative), more than expected.")


def prepare(settings: Settings, variant: Variant, base: nn.Module, batch: Batch) -> None:
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
        train_step(variant, batch)
    variant.resident_bytes = measure_resident_bytes(variant)
    variant.step_bytes = step_peak_bytes(settings, lambda: train_step(variant, batch))


def measurements(variants: list[Variant], batch: Batch) -> list[tuple[Variant, str, Callable[[], None]]]:
    """Every timed call of one round: (variant, what, call)."""
    calls = []
    for variant in variants:
        if variant.trains:
            calls.append((variant, "train", lambda v=variant: train_step(v, batch)))
        if variant.infers:
            calls.append((variant, "infer", lambda m=variant.evaluated: inference(m, batch)))
        if variant.merged is not None:
            calls.append((variant, "merged", lambda m=variant.merged: inference(m, batch)))
    return calls


def run_interleaved(settings: Settings, variants: list[Variant], batch: Batch) -> None:
    """Time every call once per round, rotating the starting point each round; one untimed warm-up round first."""
    calls = measurements(variants, batch)
    for _, _, call in calls:
        call()
    for round_index in range(settings.repeats):
        shift = round_index % len(calls)
        for variant, what, call in calls[shift:] + calls[:shift]:
            variant.times.setdefault(what, []).append(timed(settings, call))
        print(f"round {round_index + 1}/{settings.repeats} done", file=sys.stderr)


def time_advance_task(settings: Settings, base: nn.Module, tasks: int, **config: object) -> tuple[list[float], bool]:
    """Wall times of the `advance_task()` that finishes task `tasks` (on fresh copies of one model), and whether KD
    absorbed the direction."""
    model = sdlora_at_task(base, tasks, r=settings.rank, **config)
    randomize_current_directions(model)
    times, absorbed = [], False
    for _ in range(ADVANCE_REPEATS):
        candidate = shared_copy(model, base)
        times.append(timed(settings, lambda c=candidate: c.advance_task()))
        absorbed = candidate.peft_config["default"].task_history[-1]["absorbed"]
    return times, absorbed


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------


def median_ms(variant: Variant, what: str) -> float | None:
    values = variant.times.get(what)
    return 1000 * statistics.median(values) if values else None


def min_ms(variant: Variant, what: str) -> float | None:
    values = variant.times.get(what)
    return 1000 * min(values) if values else None


def iqr_ms(variant: Variant, what: str) -> str:
    values = variant.times.get(what)
    if not values or len(values) < 2:
        return "-"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{1000 * q1:.0f}-{1000 * q3:.0f}"


def cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(value: float | None, reference: float | None) -> str:
    return "-" if value is None or not reference else f"{value / reference:.3f}x"


def mib(nbytes: int | None) -> str:
    return cell(None if nbytes is None else nbytes / 2**20)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def training_table(variants: list[Variant]) -> list[str]:
    """Train step time, memory and parameter counts, as ratios to PEFT LoRA."""
    lora = next(v for v in variants if v.name == "lora")
    header = ["variant", "tasks", "train ms", "IQR ms", "min ms", "x LoRA", "x LoRA (min)", "resident MiB"]
    header += ["step MiB", "peak MiB", "x LoRA", "trainable", "stored"]
    rows = []
    for v in (v for v in variants if v.trains):
        row = [v.name, "-" if v.tasks is None else str(v.tasks)]
        row += [cell(median_ms(v, "train")), iqr_ms(v, "train"), cell(min_ms(v, "train"))]
        row += [
            ratio(median_ms(v, "train"), median_ms(lora, "train")),
            ratio(min_ms(v, "train"), min_ms(lora, "train")),
        ]
        row += [mib(v.resident_bytes), mib(v.step_bytes), mib(v.peak_bytes), ratio(v.peak_bytes, lora.peak_bytes)]
        rows.append(row + [f"{v.trainable:,}", f"{v.stored:,}"])
    return markdown_table(header, rows)


def inference_table(variants: list[Variant]) -> list[str]:
    """Inference time with adapters unmerged and merged, as ratios to the base model."""
    base = next(v for v in variants if v.name == "base")
    header = [
        "variant",
        "tasks",
        "infer ms",
        "IQR ms",
        "x base",
        "x base (min)",
        "merged ms",
        "x base",
        "x base (min)",
    ]
    rows = []
    for v in (v for v in variants if v.infers):
        row = [v.name, "-" if v.tasks is None else str(v.tasks)]
        row += [cell(median_ms(v, "infer")), iqr_ms(v, "infer")]
        row += [
            ratio(median_ms(v, "infer"), median_ms(base, "infer")),
            ratio(min_ms(v, "infer"), min_ms(base, "infer")),
        ]
        row += [cell(median_ms(v, "merged")), ratio(median_ms(v, "merged"), median_ms(base, "infer"))]
        rows.append(row + [ratio(min_ms(v, "merged"), min_ms(base, "infer"))])
    return markdown_table(header, rows)


def machine(settings: Settings) -> str:
    if settings.device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(settings.device)}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"


def write_results(
    path: Path,
    argv: Sequence[str],
    settings: Settings,
    variants: list[Variant],
    advance: dict[str, tuple[list[float], bool]],
    seconds: float,
) -> None:
    lines = [
        "# SD-LoRA scaling benchmark",
        "",
        f"- command: `{shlex.join(['python', 'benchmarks/bench_scaling.py', *argv])}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- versions: torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
        f"sdlora_peft {sdlora_peft.__version__}, Python {platform.python_version()}",
        f"- machine: {machine(settings)}",
        f"- model: {'tiny ViT (--quick)' if settings.quick else 'ViT-B/16 shape'}, random weights, "
        f"{settings.image_size} px, batch {settings.batch_size}, {str(settings.dtype).removeprefix('torch.')}, "
        f"adapters of rank {settings.rank} on the query and value projections of every block",
        f"- timing: {settings.repeats} rounds, every round times each variant once, round-robin; medians unless "
        f"marked min; whole run {seconds:.0f} s",
        "- tasks N: training the N-th task, i.e. N-1 frozen directions plus the current one.",
        "",
        "## Training",
        "",
        *training_table(variants),
        "",
        "- train: forward, cross-entropy, backward and an Adam step over the trainable parameters.",
        "- resident: tensors kept between steps (weights incl. the base model's, buffers, Adam state); step: the peak "
        "allocated during one train step above its start (CPU: torch.profiler allocation events; CUDA: "
        "max_memory_allocated); peak = resident + step.",
        "- stored: saved tensors beyond the base model (adapter factors, frozen directions, magnitudes, scales).",
        "",
        "## Inference",
        "",
        *inference_table(variants),
        "",
        "- infer: one no-grad forward in eval mode, adapters unmerged; merged: after merge_and_unload() on a copy.",
        "",
        f"## `advance_task()` finishing task {TASK_GRID[-1]} ({ADVANCE_REPEATS} calls on copies of one model)",
        "",
        *markdown_table(
            ["config", "median ms", "min ms", "direction absorbed"],
            [
                [name, cell(1000 * statistics.median(times)), cell(1000 * min(times)), str(absorbed)]
                for name, (times, absorbed) in advance.items()
            ],
        ),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def write_plot(path: Path, variants: list[Variant]) -> None:
    """Train step time against the number of tasks; LoRA and DoRA, which have no tasks, as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    by_name = {variant.name: variant for variant in variants}
    figure, axes = plt.subplots(figsize=(6, 4))
    for prefix, label, marker in (("sdlora-t", "SD-LoRA (fused)", "o"), ("naive-t", "naive per-task loop", "s")):
        axes.plot(
            TASK_GRID, [median_ms(by_name[f"{prefix}{t}"], "train") for t in TASK_GRID], marker=marker, label=label
        )
    last = TASK_GRID[-1]
    for name, label, marker in (("sdlora-rr", "SD-LoRA-RR", "^"), ("upcast", "SD-LoRA, frozen in float32", "v")):
        if f"{name}-t{last}" in by_name:
            time_ms = median_ms(by_name[f"{name}-t{last}"], "train")
            axes.plot([last], [time_ms], marker=marker, linestyle="", label=label)
    for name, label, style in (("lora", "PEFT LoRA", "--"), ("dora", "PEFT DoRA", ":")):
        axes.axhline(median_ms(by_name[name], "train"), color="grey", linestyle=style, label=label)
    axes.set_xlabel("tasks (directions stored)")
    axes.set_ylabel("train step, median ms")
    axes.set_xticks(TASK_GRID)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 (2 with --quick)")
    parser.add_argument("--image-size", type=int, default=None, help="default: 112 (16 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds; default: 15 (3 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: 2 (1 with --quick)")
    parser.add_argument("--rank", type=int, default=10, help="rank of every adapter (and of SD-LoRA's tasks)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--plot", type=Path, default=HERE / "scaling.png")
    parser.add_argument("--quick", action="store_true", help="tiny model and 3 repeats: a smoke test")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    def pick(value: int | None, default: int, quick: int) -> int:
        return value if value is not None else (quick if args.quick else default)

    return Settings(
        device=torch.device(args.device),
        dtype=getattr(torch, args.dtype),
        batch_size=pick(args.batch_size, 8, 2),
        image_size=pick(args.image_size, 112, 16),
        patch_size=8 if args.quick else 16,
        repeats=pick(args.repeats, 15, 3),
        rank=args.rank,
        quick=args.quick,
    )


def build_variants(settings: Settings, base: nn.Module, batch: Batch) -> list[Variant]:
    """All variants, sharing the base model's weights, with their merged copies; checked to compute what they
    should before anything is timed."""
    last = TASK_GRID[-1]
    variants = [
        Variant("base", base, trains=False),
        Variant("lora", lora(base, settings.rank, use_dora=False)),
        Variant("dora", lora(base, settings.rank, use_dora=True)),
    ]
    sdlora = {t: sdlora_at_task(base, t, r=settings.rank) for t in TASK_GRID}
    variants += [Variant(f"sdlora-t{t}", model, t) for t, model in sdlora.items()]
    variants.append(
        Variant(f"sdlora-rr-t{last}", sdlora_at_task(base, last, r=settings.rank, rank_schedule="rr"), last)
    )
    for variant in variants[1:]:
        variant.merged = merged_copy(variant.model, base)
        check_same_function(settings, batch, variant.model, variant.merged, f"{variant.name} merged")
    for t, model in sdlora.items():
        naive = naive_copy(model, base)
        check_same_function(settings, batch, model, naive, f"naive-t{t}")
        variants.append(Variant(f"naive-t{t}", naive, t))
    if settings.dtype != torch.float32:
        upcast = upcast_copy(sdlora[last], base)
        check_same_function(settings, batch, sdlora[last], upcast, f"upcast-t{last}")
        variants.append(Variant(f"upcast-t{last}", upcast, last, infers=False))  # inference uses the cached weight
    return variants


def main(argv: Sequence[str] | None = None) -> list[Variant]:
    """Run the benchmark and write the table and the plot; returns the measured variants."""
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    settings = settings_from(args)
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    base = build_base(settings).requires_grad_(False)
    torch.manual_seed(0)
    shape = (settings.batch_size, 3, settings.image_size, settings.image_size)
    batch = Batch(
        pixel_values=torch.randn(shape, device=settings.device, dtype=settings.dtype),
        labels=torch.randint(0, base.config.num_labels, (settings.batch_size,), device=settings.device),
    )
    variants = build_variants(settings, base, batch)
    for variant in variants:
        prepare(settings, variant, base, batch)
    run_interleaved(settings, variants, batch)
    advance = {
        "SD-LoRA": time_advance_task(settings, base, TASK_GRID[-1]),
        f"SD-LoRA-KD (kd_threshold={KD_THRESHOLD})": time_advance_task(
            settings, base, TASK_GRID[-1], kd_threshold=KD_THRESHOLD
        ),
    }
    write_results(args.output, argv, settings, variants, advance, time.perf_counter() - started)
    write_plot(args.plot, variants)
    print(args.output.read_text())
    return variants


if __name__ == "__main__":
    main()
