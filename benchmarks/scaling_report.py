"""What `bench_scaling.py` measured, as tables and a plot.

Every run times each variant a few rounds, interleaved; a run's figure for a variant is its median. Ratios are taken
within a run (a variant's median over its reference's, e.g. PEFT LoRA's), and the tables give each ratio's median
over the runs and its range (lowest-highest run), so that a machine's drift between runs shows instead of hiding in
one number.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class Variant:
    """One model under test at one batch shape, and what was measured on it."""

    name: str
    model: nn.Module
    batch: Any  # bench_scaling.Batch
    tokens: int  # per adapted layer and step: batch size x sequence length
    tasks: int | None = None
    frozen_path: str = "-"  # how the frozen directions run at this batch shape
    reference: str = "lora"  # the training ratios' denominator
    trains: bool = True
    infers: bool = True
    evaluated: nn.Module | None = None
    merged: nn.Module | None = None
    optimizer: Any = None
    runs: list[dict[str, list[float]]] = field(default_factory=list)  # per run: "train"/"infer"/"merged" -> seconds
    resident_bytes: int | None = None
    step_bytes: int | None = None
    trainable: int = 0
    stored: int = 0

    @property
    def peak_bytes(self) -> int | None:
        """Peak memory of a train step: what stays resident plus the step's own peak allocation."""
        return (
            None if self.step_bytes is None or self.resident_bytes is None else self.resident_bytes + self.step_bytes
        )


def run_medians(variant: Variant, what: str) -> list[float]:
    """The variant's median time of `what` in each run, in seconds."""
    return [statistics.median(run[what]) for run in variant.runs if run.get(what)]


def time_ms(variant: Variant, what: str) -> str:
    medians = run_medians(variant, what)
    return f"{1000 * statistics.median(medians):.1f}" if medians else "-"


def ratio_across_runs(variant: Variant, what: str, reference: Variant, reference_what: str | None = None) -> str:
    """`median (lowest-highest)` over the runs of the variant's time over the reference's in the same run."""
    ratios = [
        mine / theirs
        for mine, theirs in zip(run_medians(variant, what), run_medians(reference, reference_what or what))
        if theirs
    ]
    if not ratios:
        return "-"
    spread = f" ({min(ratios):.3f}-{max(ratios):.3f})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.3f}x{spread}"


def memory_ratio(value: int | None, reference: int | None) -> str:
    return "-" if value is None or not reference else f"{value / reference:.3f}x"


def mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def training_table(variants: list[Variant]) -> list[str]:
    """Train step time and memory as ratios to each variant's reference (PEFT LoRA of the same adapter dtype)."""
    by_name = {v.name: v for v in variants}
    header = ["variant", "tasks", "frozen path", "train ms", "x ref (range over runs)", "ref", "resident MiB"]
    header += ["step MiB", "peak MiB", "x ref", "trainable", "stored"]
    rows = []
    for v in (v for v in variants if v.trains):
        reference = by_name[v.reference]
        row = [v.name, "-" if v.tasks is None else str(v.tasks), v.frozen_path, time_ms(v, "train")]
        row += [ratio_across_runs(v, "train", reference), v.reference]
        row += [mib(v.resident_bytes), mib(v.step_bytes), mib(v.peak_bytes)]
        row += [memory_ratio(v.peak_bytes, reference.peak_bytes), f"{v.trainable:,}", f"{v.stored:,}"]
        rows.append(row)
    return markdown_table(header, rows)


def inference_table(variants: list[Variant]) -> list[str]:
    """Inference time with adapters unmerged and merged, as ratios to the base model."""
    base = next(v for v in variants if v.name == "base")
    header = ["variant", "tasks", "infer ms", "x base (range over runs)", "merged ms", "x base (range over runs)"]
    rows = []
    for v in (v for v in variants if v.infers):
        row = [v.name, "-" if v.tasks is None else str(v.tasks), time_ms(v, "infer")]
        row += [ratio_across_runs(v, "infer", base), time_ms(v, "merged")]
        rows.append(row + [ratio_across_runs(v, "merged", base, "infer") if v.merged is not None else "-"])
    return markdown_table(header, rows)


def advance_table(advance: dict[str, tuple[list[float], bool]]) -> list[str]:
    rows = [
        [name, f"{1000 * statistics.median(times):.1f}", f"{1000 * min(times):.1f}", str(absorbed)]
        for name, (times, absorbed) in advance.items()
    ]
    return markdown_table(["config", "median ms", "min ms", "direction absorbed"], rows)


def write_results(
    path: Path,
    description: Sequence[str],
    points: dict[int, list[Variant]],
    advance: dict[str, tuple[list[float], bool]],
    last_task: int,
) -> None:
    """The results file: the run's description, then training (and inference at the main batch shape) per point."""
    (main_tokens, main), *larger = points.items()
    lines = ["# SD-LoRA scaling benchmark", "", *description, "", f"## Training ({main_tokens:,} tokens per layer)"]
    lines += ["", *training_table(main), "", *TRAINING_NOTES, ""]
    for tokens, variants in larger:
        lines += [f"## Training with many tokens ({tokens:,} per layer)", "", *training_table(variants), ""]
    lines += ["## Inference", "", *inference_table(main), "", *INFERENCE_NOTES, ""]
    lines += [f"## `advance_task()` finishing task {last_task} (calls on copies of one model)", ""]
    lines += [*advance_table(advance), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


TRAINING_NOTES = [
    "- train: forward, cross-entropy, backward and an Adam step over the trainable parameters; x ref: the train "
    "time over the reference's in the same run, median over the runs (lowest-highest run).",
    "- frozen path: how the frozen directions ran (`frozen_path`; `auto` names what it chose at this token count); "
    "`+recompute`: `frozen_recompute=True`.",
    "- resident: tensors kept between steps (weights incl. the base model's, buffers, Adam state); step: the peak "
    "allocated during one train step above its start (CPU: torch.profiler allocation events; CUDA: "
    "max_memory_allocated), including the fold's folded weights, which it also keeps from one step to the next; "
    "peak = resident + step.",
    "- stored: saved tensors beyond the base model (adapter factors, frozen directions, magnitudes, scales).",
]
INFERENCE_NOTES = [
    "- infer: one no-grad forward in eval mode, adapters unmerged; merged: after merge_and_unload() on a copy; "
    "x base: over the base model's infer time in the same run, median over the runs (lowest-highest run).",
]


def write_plot(path: Path, variants: list[Variant], task_grid: Sequence[int]) -> None:
    """Train step time against the number of tasks; LoRA and DoRA, which have no tasks, as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    def median_ms(name: str) -> float:
        return 1000 * statistics.median(run_medians(by_name[name], "train"))

    by_name = {variant.name: variant for variant in variants}
    figure, axes = plt.subplots(figsize=(6, 4))
    for prefix, label, marker in (("sdlora-t", "SD-LoRA", "o"), ("naive-t", "naive per-task loop", "s")):
        axes.plot(task_grid, [median_ms(f"{prefix}{t}") for t in task_grid], marker=marker, label=label)
    last = task_grid[-1]
    others = [("sdlora-rr", "SD-LoRA-RR", "^"), ("upcast", "SD-LoRA, frozen in float32", "v")]
    others += [(f"sdlora-t{last}-recompute", "SD-LoRA, frozen_recompute", "x")]
    for name, label, marker in others:
        name = name if name.startswith("sdlora-t") else f"{name}-t{last}"
        if name in by_name:
            axes.plot([last], [median_ms(name)], marker=marker, linestyle="", label=label)
    for name, label, style in (("lora", "PEFT LoRA", "--"), ("dora", "PEFT DoRA", ":")):
        axes.axhline(median_ms(name), color="grey", linestyle=style, label=label)
    axes.set_xlabel("tasks (directions stored)")
    axes.set_ylabel("train step, median ms")
    axes.set_xticks(list(task_grid))
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
