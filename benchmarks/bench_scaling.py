"""Speed and memory of SD-LoRA as tasks accumulate, against PEFT's own LoRA and DoRA, side by side in one run.

Every variant adapts the same modules of the same randomly initialised model (by default a ViT-B/16-shaped
`ViTForImageClassification`, query and value projections, rank 10) and is timed on the same batch. Measurements go
round-robin over the variants, so a machine that gets slower or faster during the run affects all of them alike.
`--runs N` repeats the whole interleaved comparison N times and reports each ratio's median and range over the runs.

Variants (at the main batch shape):
- `base`: the model without adapters (inference only; the reference for inference ratios);
- `lora`, `dora`: PEFT's LoRA and DoRA at rank `r` (the reference for training ratios is `lora`);
- `sdlora-t<N>`: SD-LoRA training its N-th task, i.e. N-1 frozen directions plus the current one (N directions
  stored: at N = 20 this is the paper's 7.37M parameters), with the default `frozen_path="auto"`;
- `sdlora-t20-fold` or `sdlora-t20-lowrank`: task 20 with the frozen path that `auto` did not choose here, and
  `sdlora-t20-recompute`: with `frozen_recompute=True`;
- `sdlora-rr-t<N>`: the same with SD-LoRA-RR's rank schedule;
- `naive-t<N>`: the same math as `sdlora-t<N>` written as a Python loop over tasks in every layer, each frozen
  direction applied on its own and re-normalised at every forward (a reference point only, kept in this file);
- bfloat16 runs only: `upcast-t20`, task 20 with its frozen directions applied in float32, where PEFT applies
  trainable adapters in a half-precision model (a reference point for running them in the model's dtype); and
  `lora-bf16-adapters`, `sdlora-t20-bf16-adapters(-recompute)`: adapters stored in bfloat16
  (`autocast_adapter_dtype=False`), whose training ratios refer to `lora-bf16-adapters`.
Then training of `lora` and of task 20's strategies again at `--large-batch-size` (default: 4 x the batch; 0: none):
where tokens are many, `auto` folds the frozen directions into the weight.

Usage:
    python benchmarks/bench_scaling.py                  # ViT-B/16 shape, 112 px, batch 8 (and 32), 2 CPU threads
    python benchmarks/bench_scaling.py --runs 5         # five interleaved runs, 3 rounds each: ~15 min on 2 cores
    python benchmarks/bench_scaling.py --quick          # tiny model, 3 rounds: a smoke test
    python benchmarks/bench_scaling.py --threads 1 --cpu-clock   # on a CPU shared with other work
    python benchmarks/bench_scaling.py --device cuda --dtype bfloat16 --batch-size 128 --image-size 224
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel
from scaling_measure import Batch, Settings, check_same_function, prepare, random_batch, run_interleaved, timed
from scaling_models import (
    frozen_path_label,
    lora,
    merged_copy,
    naive_copy,
    randomize_current_directions,
    sdlora_at_task,
    shared_copy,
    upcast_copy,
    with_frozen_path,
)
from scaling_report import Variant, write_plot, write_results
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

import sdlora_peft
from sdlora_peft import SDLoraLayer, frozen

HERE = Path(__file__).resolve().parent
TASK_GRID = (1, 5, 10, 20)
ADVANCE_REPEATS = 9
KD_THRESHOLD = 9e-4
VIT_B16 = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
TOTAL_ROUNDS = 15
"""Timed rounds over all runs when `--repeats` is not given (at least 3 per run)."""


def build_base(settings: Settings) -> nn.Module:
    """A randomly initialised ViT of the benchmark's shape, in the benchmark's dtype and on its device."""
    torch.manual_seed(0)
    shape = TINY_VIT if settings.quick else VIT_B16
    config = ViTConfig(**shape, image_size=settings.image_size, patch_size=settings.patch_size, num_labels=100)
    return ViTForImageClassification(config).to(device=settings.device, dtype=settings.dtype)


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
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 (2 with --quick)")
    parser.add_argument(
        "--large-batch-size",
        type=int,
        default=None,
        help="batch of the many-token point (default: 4 x batch; 0: none)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="default: 112 (16 with --quick)")
    parser.add_argument("--runs", type=int, default=1, help="interleaved runs of the whole comparison")
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"timed rounds per run; default: {TOTAL_ROUNDS} / runs"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: 2 (1 with --quick)")
    parser.add_argument("--rank", type=int, default=10, help="rank of every adapter (and of SD-LoRA's tasks)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--plot", type=Path, default=HERE / "scaling.png")
    parser.add_argument("--quick", action="store_true", help="tiny model and 3 rounds: a smoke test")
    parser.add_argument(
        "--cpu-clock", action="store_true", help="time CPU time, not wall time (a busy CPU machine; use --threads 1)"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or (args.repeats is not None and args.repeats < 1):
        parser.error("--runs and --repeats must be at least 1")
    if args.cpu_clock and args.device != "cpu":
        parser.error("--cpu-clock times CPU work: it needs --device cpu")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    def pick(value: int | None, default: int, quick: int) -> int:
        return value if value is not None else (quick if args.quick else default)

    batch_size = pick(args.batch_size, 8, 2)
    return Settings(
        device=torch.device(args.device),
        dtype=getattr(torch, args.dtype),
        batch_size=batch_size,
        large_batch_size=4 * batch_size if args.large_batch_size is None else args.large_batch_size,
        image_size=pick(args.image_size, 112, 16),
        patch_size=8 if args.quick else 16,
        runs=args.runs,
        repeats=pick(args.repeats, max(3, TOTAL_ROUNDS // args.runs), 3),
        rank=args.rank,
        quick=args.quick,
        cpu_clock=args.cpu_clock,
    )


def task20_strategies(
    settings: Settings, base: nn.Module, sdlora: PeftModel, batch: Batch, reference: str = "lora", suffix: str = ""
) -> list[Variant]:
    """Task 20 with `auto`'s frozen path at this batch shape's token count, with the other path forced, and with
    recomputation; checked to compute the same function. `sdlora` is the default-config model at task 20."""
    last, tokens = TASK_GRID[-1], settings.tokens(len(batch.labels))
    layer = next(module for module in sdlora.modules() if isinstance(module, SDLoraLayer))
    other = "lowrank" if frozen.fold_pays(tokens, layer.in_features, layer.out_features, recompute=False) else "fold"
    models = {
        f"sdlora-t{last}{suffix}": with_frozen_path(sdlora, base, "auto", False),
        f"sdlora-t{last}-{other}{suffix}": with_frozen_path(sdlora, base, other, False),
        f"sdlora-t{last}-recompute{suffix}": with_frozen_path(sdlora, base, "auto", True),
    }
    variants = []
    for name, model in models.items():
        check_same_function(settings, batch, sdlora, model, name)
        label = frozen_path_label(model, tokens)
        variants.append(Variant(name, model, batch, tokens, last, label, reference, infers=False))
    return variants


def main_variants(settings: Settings, base: nn.Module, batch: Batch) -> list[Variant]:
    """The variants at the main batch shape, sharing the base model's weights, with their merged copies; checked to
    compute what they should before anything is timed."""
    last, tokens = TASK_GRID[-1], settings.tokens(len(batch.labels))
    variants = [
        Variant("base", base, batch, tokens, trains=False),
        Variant("lora", lora(base, settings.rank, use_dora=False), batch, tokens),
        Variant("dora", lora(base, settings.rank, use_dora=True), batch, tokens),
    ]
    sdlora = {t: sdlora_at_task(base, t, r=settings.rank) for t in TASK_GRID}
    rr = sdlora_at_task(base, last, r=settings.rank, rank_schedule="rr")
    for name, t, model in [
        *((f"sdlora-t{t}", t, model) for t, model in sdlora.items()),
        (f"sdlora-rr-t{last}", last, rr),
    ]:
        variants.append(Variant(name, model, batch, tokens, t, frozen_path_label(model, tokens)))
    for variant in variants[1:]:
        variant.merged = merged_copy(variant.model, base)
        check_same_function(settings, batch, variant.model, variant.merged, f"{variant.name} merged")
    variants += task20_strategies(settings, base, sdlora[last], batch)[1:]
    for t, model in sdlora.items():
        naive = naive_copy(model, base)
        check_same_function(settings, batch, model, naive, f"naive-t{t}")
        variants.append(Variant(f"naive-t{t}", naive, batch, tokens, t))
    if settings.dtype != torch.float32:
        variants += half_precision_variants(settings, base, sdlora[last], batch)
    return variants


def half_precision_variants(settings: Settings, base: nn.Module, sdlora: PeftModel, batch: Batch) -> list[Variant]:
    """Task 20 with the frozen directions in float32 (low-rank path), and with adapters stored in the model's dtype
    (`autocast_adapter_dtype=False`) next to LoRA stored so."""
    last, tokens = TASK_GRID[-1], settings.tokens(len(batch.labels))
    low_rank = with_frozen_path(sdlora, base, "lowrank", False)
    upcast = upcast_copy(low_rank, base)
    check_same_function(settings, batch, low_rank, upcast, f"upcast-t{last}")
    variants = [Variant(f"upcast-t{last}", upcast, batch, tokens, last, "lowrank, float32", infers=False)]
    lora_half = lora(base, settings.rank, use_dora=False, autocast_adapter_dtype=False)
    variants.append(Variant("lora-bf16-adapters", lora_half, batch, tokens, infers=False))
    half = sdlora_at_task(base, last, autocast_adapter_dtype=False, r=settings.rank)
    for name, recompute in (
        (f"sdlora-t{last}-bf16-adapters", False),
        (f"sdlora-t{last}-bf16-adapters-recompute", True),
    ):
        model = with_frozen_path(half, base, "auto", recompute)
        label = frozen_path_label(model, tokens)
        variants.append(Variant(name, model, batch, tokens, last, label, "lora-bf16-adapters", infers=False))
    return variants


def large_token_variants(settings: Settings, base: nn.Module, sdlora: PeftModel, batch: Batch) -> list[Variant]:
    """LoRA and task 20's strategies at the many-token batch shape (training only)."""
    tokens = settings.tokens(len(batch.labels))
    suffix = f"@b{len(batch.labels)}"
    name = f"lora{suffix}"
    reference = Variant(name, lora(base, settings.rank, use_dora=False), batch, tokens, reference=name, infers=False)
    return [reference, *task20_strategies(settings, base, sdlora, batch, reference.name, suffix)]


def describe(argv: Sequence[str], settings: Settings, seconds: float) -> list[str]:
    if settings.device.type == "cuda":
        machine = f"GPU {torch.cuda.get_device_name(settings.device)}"
    else:
        cpu = platform.processor() or platform.machine()
        machine = f"CPU {cpu}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"
    load = f", load average at the end {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    clock = "CPU time of the process (--cpu-clock)" if settings.cpu_clock else "wall time"
    return [
        f"- command: `{shlex.join(['python', 'benchmarks/bench_scaling.py', *argv])}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- versions: torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
        f"sdlora_peft {sdlora_peft.__version__}, Python {platform.python_version()}",
        f"- machine: {machine}{load}",
        f"- model: {'tiny ViT (--quick)' if settings.quick else 'ViT-B/16 shape'}, random weights, "
        f"{settings.image_size} px, {str(settings.dtype).removeprefix('torch.')}, adapters of rank {settings.rank} "
        "on the query and value projections of every block",
        f"- timing: {settings.runs} run(s) of {settings.repeats} rounds; every round times each variant once, "
        f"round-robin; a run's figure is its median; {clock}; whole benchmark {seconds:.0f} s (wall)",
        "- tasks N: training the N-th task, i.e. N-1 frozen directions plus the current one.",
    ]


def main(argv: Sequence[str] | None = None) -> list[Variant]:
    """Run the benchmark and write the tables and the plot; returns the measured variants."""
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    settings = settings_from(args)
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    base = build_base(settings).requires_grad_(False)
    batch = random_batch(settings, settings.batch_size, base.config.num_labels)
    points = {settings.tokens(settings.batch_size): main_variants(settings, base, batch)}
    if settings.large_batch_size:
        sdlora = next(
            v.model for v in points[settings.tokens(settings.batch_size)] if v.name == f"sdlora-t{TASK_GRID[-1]}"
        )
        large = random_batch(settings, settings.large_batch_size, base.config.num_labels)
        points[settings.tokens(settings.large_batch_size)] = large_token_variants(settings, base, sdlora, large)
    variants = [variant for point in points.values() for variant in point]
    for variant in variants:
        prepare(settings, variant, base)
    run_interleaved(settings, variants)
    advance = {
        "SD-LoRA": time_advance_task(settings, base, TASK_GRID[-1]),
        f"SD-LoRA-KD (kd_threshold={KD_THRESHOLD})": time_advance_task(
            settings, base, TASK_GRID[-1], kd_threshold=KD_THRESHOLD
        ),
    }
    description = describe(argv, settings, time.perf_counter() - started)
    write_results(args.output, description, points, advance, TASK_GRID[-1])
    write_plot(args.plot, next(iter(points.values())), TASK_GRID)
    print(args.output.read_text())
    return variants


if __name__ == "__main__":
    main()
