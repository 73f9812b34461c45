"""An SD-LoRA adapter written out as a plain PEFT LoRA adapter, exactly or as the best rank-k approximation.

SD-LoRA's update of a layer is low rank at every moment: `sum_k s_k B_k A_k` over the kept directions plus the
current one, with `s_k` the direction's `alpha_k * c_k / ||B_k A_k||` (the current one trains raw, `s = alpha_t`).
Stacking the factors with their scales folded into `B` gives one LoRA pair of rank R + r that computes the same
update, so `lora_alpha = r` (scaling 1) makes it an ordinary LoRA adapter: `peft_type: LORA`, safetensors, the same
`modules_to_save`. That is how an SD-LoRA adapter reaches tools that know only LoRA (serving engines with multi-LoRA
support, merging tools, transformers' `load_adapter`). With `rank=k` every layer keeps its best rank-k approximation,
computed from the factors (`lowrank.truncate`), and the report gives each layer's relative error.

The export reads only the adapter's saved form (its state dict and config), so it works on a live `PeftModel` and on
a saved folder alike, without the base model.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import ModelCardData
from peft import LoraConfig, PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from . import lowrank
from .card import _is_repo_id
from .config import SDLoraConfig

GLOBAL_MAGNITUDE_KEY = "base_model.sdlora_magnitude"
"""Where a saved adapter keeps its global magnitudes (one per kept task, the current one last)."""


@dataclass(frozen=True)
class ExportReport:
    """What `export_lora` wrote.

    Attributes:
        folder: the LoRA adapter's folder.
        rank: the LoRA rank of every layer (`r` of its `adapter_config.json`, with `lora_alpha == r`).
        exact: whether the LoRA adapter computes the SD-LoRA update itself (no rank was given, or none was cut).
        tasks: how many tasks the SD-LoRA adapter was trained on (finished ones and the current one).
        kept_directions: directions stored in each layer (kept frozen ones and the current one).
        errors: per adapted module, `||delta - delta_lora||_F / ||delta||_F` of its weight update (0.0 when exact).
    """

    folder: str
    rank: int
    exact: bool
    tasks: int
    kept_directions: int
    errors: dict[str, float]

    @property
    def max_error(self) -> float:
        """The largest relative Frobenius error over the adapted modules."""
        return max(self.errors.values(), default=0.0)


def export_lora(
    model: PeftModel | str | os.PathLike,
    folder: str | os.PathLike,
    *,
    rank: int | None = None,
    adapter_name: str | None = None,
) -> ExportReport:
    """Write an SD-LoRA adapter as a standard PEFT LoRA adapter into `folder`.

    Args:
        model: a `PeftModel` holding the SD-LoRA adapter, or the folder of a saved one.
        folder: where the LoRA adapter goes (`adapter_config.json`, `adapter_model.safetensors`, `README.md`). Files
            of those names there are replaced, all at once; an SD-LoRA adapter there is never overwritten.
        rank: None for the exact export (rank R + r); an int k for the best rank-k approximation of every layer.
        adapter_name: the adapter to export from a model with several (default: the active one).

    Returns:
        [`ExportReport`]: the rank, whether the export is exact, and each layer's relative error.

    The folder loads with plain `PeftModel.from_pretrained(base, folder)` (no `sdlora_peft` needed), with
    `AutoPeftModel*`, and with transformers' `base.load_adapter(folder)`.
    """
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"`rank` must be None (exact) or a positive integer, got {rank!r}.")
    if isinstance(model, PeftModel):
        config, state, auto_mapping = _from_model(model, adapter_name)
    else:
        config, state, auto_mapping = _from_folder(Path(model))
    _refuse_sdlora_target(Path(folder))
    factors = _layer_factors(state, config)
    lora_state, errors = {}, {}
    full_rank = config.rank_for_task(config.current_task) + sum(config.frozen_ranks)
    for prefix, (B, A) in factors.items():
        if rank is not None:
            B, A, errors[_module_name(prefix)] = lowrank.truncate(B, A, rank)
        else:
            errors[_module_name(prefix)] = 0.0
        dtype = state[f"{prefix}.sdlora_A"].dtype
        lora_state[f"{prefix}.lora_A.weight"] = A.to(dtype).contiguous()
        lora_state[f"{prefix}.lora_B.weight"] = B.to(dtype).contiguous()
    lora_state.update({key: value for key, value in state.items() if ".sdlora_" not in f".{key}"})
    report = ExportReport(
        folder=str(folder),
        rank=rank or full_rank,
        exact=rank is None or rank >= full_rank,
        tasks=config.current_task + 1,
        kept_directions=len(config.frozen_ranks) + 1,
        errors=errors,
    )
    lora_config = _lora_config(config, report.rank, sorted(errors))
    _write(Path(folder), lora_config, auto_mapping, lora_state, _card(report, config))
    return report


def _from_model(model: PeftModel, adapter_name: str | None) -> tuple[SDLoraConfig, dict, dict | None]:
    adapter_name = adapter_name or model.active_adapter
    if adapter_name not in model.peft_config:
        raise ValueError(f"Unknown adapter {adapter_name!r}; this model has {sorted(model.peft_config)}.")
    config = model.peft_config[adapter_name]
    if not isinstance(config, SDLoraConfig):
        raise ValueError(f"Adapter {adapter_name!r} is a {config.peft_type} adapter, not an SD-LoRA one.")
    if any(adapter_name in getattr(module, "merged_adapters", ()) for module in model.modules()):
        raise ValueError(f"Adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() first.")
    base = model.get_base_model()
    # as PeftModel.save_pretrained records it: AutoPeftModel rebuilds a model without a task type from this
    auto_mapping = None
    if config.task_type is None:
        auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    if not config.base_model_name_or_path:
        config = SDLoraConfig(**{**config.to_dict(), "base_model_name_or_path": getattr(base, "name_or_path", None)})
    state = {key: value.detach().cpu() for key, value in get_peft_model_state_dict(model, None, adapter_name).items()}
    return config, state, auto_mapping


def _from_folder(folder: Path) -> tuple[SDLoraConfig, dict, dict | None]:
    """A saved SD-LoRA adapter, through the same checks as loading it (valid JSON, known fields, intact weights)."""
    config = SDLoraConfig.from_pretrained(str(folder))
    weights = folder / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{folder} has no {SAFETENSORS_WEIGHTS_NAME}; export reads safetensors adapters only.")
    auto_mapping = json.loads((folder / CONFIG_NAME).read_text()).get("auto_mapping")
    return config, load_file(weights), auto_mapping


def _refuse_sdlora_target(folder: Path) -> None:
    existing = folder / CONFIG_NAME
    if existing.is_file():
        try:
            peft_type = json.loads(existing.read_text()).get("peft_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            peft_type = None
        if peft_type == "SDLORA":
            raise ValueError(f"{folder} holds an SD-LoRA adapter; export into another folder (nothing was written).")


def _layer_factors(
    state: dict[str, torch.Tensor], config: SDLoraConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted module (its state-dict prefix), float64 factors `B (out x K)`, `A (K x in)` whose product is the
    module's SD-LoRA update (as `SDLoraLayer.get_delta_weight` computes it): the current direction scaled by its
    magnitude, then every kept frozen direction scaled by `alpha_k * c_k / ||B_k A_k||`."""
    global_magnitude = state.get(GLOBAL_MAGNITUDE_KEY)
    ranks = torch.tensor(config.frozen_ranks, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(ranks)), ranks)  # frozen column -> its direction
    factors = {}
    for key in sorted(state):
        if not key.endswith(".sdlora_A"):
            continue
        prefix = key.removesuffix(".sdlora_A")
        magnitude = state.get(f"{prefix}.sdlora_magnitude", global_magnitude)
        if magnitude is None:
            raise ValueError(f"The adapter's weights hold no magnitudes for {prefix} (a truncated file?).")
        magnitude = magnitude.double()
        Bs = [state[f"{prefix}.sdlora_B"].double() * magnitude[-1]]
        As = [state[key].double()]
        if config.frozen_ranks:
            per_direction = magnitude[:-1] * state[f"{prefix}.sdlora_frozen_scale"].double()
            Bs.append(state[f"{prefix}.sdlora_frozen_B"].double() * per_direction[owner])
            As.append(state[f"{prefix}.sdlora_frozen_A"].double())
        factors[prefix] = (torch.cat(Bs, dim=1), torch.cat(As))
    if not factors:
        raise ValueError("The adapter has no SD-LoRA layers to export.")
    return factors


def _module_name(prefix: str) -> str:
    return prefix.removeprefix("base_model.model.")


def _lora_config(config: SDLoraConfig, rank: int, modules: list[str]) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling lora_alpha / r = 1: the factors carry the scales
        lora_dropout=0.0,
        bias="none",
        target_modules=modules,
        fan_in_fan_out=config.fan_in_fan_out,
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )


def _card(report: ExportReport, config: SDLoraConfig) -> str:
    base = config.base_model_name_or_path
    data = ModelCardData(
        library_name="peft", base_model=base if _is_repo_id(base) else None, tags=["lora", "peft", "sdlora-export"]
    )
    finished = len(config.task_history)
    if report.exact:
        fidelity = "The export is exact: the LoRA update equals the SD-LoRA update up to float rounding."
    else:
        fidelity = (
            f"Each layer keeps its best rank-{report.rank} approximation of the SD-LoRA update; the relative "
            f"Frobenius error of the updates is at most {report.max_error:.3g} (mean "
            f"{sum(report.errors.values()) / len(report.errors):.3g})."
        )
    return (
        f"---\n{data.to_yaml()}\n---\n\n# LoRA adapter exported from SD-LoRA\n\n"
        f"A plain PEFT LoRA adapter (rank {report.rank}, `lora_alpha = r`) exported with `sdlora_peft.export_lora` "
        f"from an SD-LoRA adapter after {report.tasks} tasks ({finished} finished with `advance_task()`, "
        f"{report.kept_directions} directions kept per layer). {fidelity}\n\n"
        "It loads wherever LoRA adapters load, without `sdlora_peft`:\n\n"
        "```python\nfrom peft import PeftModel\n\nmodel = PeftModel.from_pretrained(base_model, adapter_folder)\n```\n"
    )


def _write(folder: Path, config: LoraConfig, auto_mapping: dict | None, state: dict, card: str) -> None:
    """Write the three files into a scratch folder beside `folder`, then move them in: a failure leaves `folder` as
    it was."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.export-") as scratch:
        config.save_pretrained(scratch, auto_mapping_dict=auto_mapping)
        save_file(state, os.path.join(scratch, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        Path(scratch, "README.md").write_text(card, encoding="utf-8")
        folder.mkdir(exist_ok=True)
        for name in (SAFETENSORS_WEIGHTS_NAME, "README.md", CONFIG_NAME):  # the config last: it makes an adapter
            os.replace(os.path.join(scratch, name), folder / name)


def main(argv: list[str] | None = None) -> int:
    """`sdlora-export ADAPTER_DIR OUT_DIR [--rank K]`: a saved SD-LoRA adapter as a plain LoRA adapter. A refused
    export prints one line (`sdlora-export: error: ...`, exit status 2) and writes nothing; `--debug` shows the
    traceback."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="sdlora-export", description="Write a saved SD-LoRA adapter as a plain PEFT LoRA adapter."
    )
    parser.add_argument("adapter_dir", help="folder of the saved SD-LoRA adapter (adapter_config.json + safetensors)")
    parser.add_argument("out_dir", help="folder for the LoRA adapter")
    parser.add_argument("--rank", type=int, default=None, help="best rank-K approximation per layer (default: exact)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        report = export_lora(args.adapter_dir, args.out_dir, rank=args.rank)
    except (ValueError, OSError) as error:
        if args.debug:
            raise
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    kind = "exact" if report.exact else f"rank {report.rank}, max relative error {report.max_error:.3g}"
    print(f"Wrote a LoRA adapter of rank {report.rank} ({kind}, {report.tasks} tasks) to {report.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
