"""Model cards for SD-LoRA adapters: what every save and push writes to `README.md`, and evaluation results.

`PeftModel.save_pretrained` and `push_to_hub` write a model card through `PeftModel.create_or_update_model_card`.
`card_hooks.install_card_hooks()` (run at import by `sdlora_peft.register`) wraps that method so that, for an SD-LoRA
adapter only, the card also gets the Hub metadata (`library_name: peft`, `base_model`, tags), a usage snippet, the task
history with each task's current magnitude, and the configuration. Other PEFT types are left to PEFT.

`write_model_card` adds continual-learning results (final accuracy, average incremental accuracy, forgetting) to a
saved adapter's card, in the Hub's `model-index` form, named by the setting the adapter learned in: class-incremental
learning for a classifier (`sdlora-cil`), a sequence of generative tasks for a causal LM (`sdlora-clm`). Results sit
in their own section, which later saves keep.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import PeftConfig, PeftModel
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import load_file

from .config import SDLoraConfig

REPO_ID_PLACEHOLDER = "<repo-id>"
"""Stands for the repository id in the usage snippet of a card written by `save_pretrained` (a push writes the
real id): replace it by a repo id or a local folder."""

CARD_TAGS = ("peft", "sdlora", "continual-learning")
PAPER = "https://arxiv.org/abs/2501.13198"

RESULT_METRICS = {
    "final_accuracy": ("accuracy", "Final accuracy"),
    "average_incremental_accuracy": ("accuracy", "Average incremental accuracy"),
    "forgetting": ("forgetting", "Forgetting"),
    "final_exact_match": ("exact_match", "Final exact match"),
}
"""Results keys (as in `sdlora-cil`'s and `sdlora-clm`'s per-method summaries and runs) -> (model-index metric type,
name). Values in percent; a key that is missing or None is left out."""


@dataclass(frozen=True)
class Setting:
    """How a card names the continual-learning setting an adapter learned in."""

    summary: str  # what the adapter is for, in the card's first sentence
    tag: str | None  # a Hub tag beyond CARD_TAGS
    task_name: str  # the model-index task name of its results
    evaluation: str  # the results section's first line; `{dataset}` is the dataset (or tasks) measured on


CLASS_INCREMENTAL = Setting(
    "class-incremental learning",
    "class-incremental",
    "Class-incremental learning",
    "Class-incremental learning on `{dataset}`, without a task id at inference.",
)
GENERATIVE_TASKS = Setting(
    "continual learning of generative tasks",
    None,
    "Continual learning of generative tasks",
    "Generative tasks `{dataset}` learned one after the other, no earlier task's data kept; a task's accuracy ranks "
    "its answers by their log-likelihood after the prompt.",
)

_PIPELINE_BY_CLASS_SUFFIX = {
    "ForImageClassification": "image-classification",
    "ForSequenceClassification": "text-classification",
    "ForCausalLM": "text-generation",
}


@dataclass
class AdapterFacts:
    """What a card says about one SD-LoRA adapter, from a live `PeftModel` or from a saved folder."""

    config: SDLoraConfig
    magnitudes: torch.Tensor | None  # (adapted layers or 1, kept tasks + 1): the open task's magnitude is last
    base_model: str | None  # the base model's hub id or path
    base_class: str | None  # e.g. "ViTForImageClassification"
    base_library: str | None  # the module that defines base_class

    @property
    def pipeline_tag(self) -> str | None:
        """The Hub task of the base model, when its class name or the adapter's task type says it."""
        by_task_type = {"SEQ_CLS": "text-classification", "CAUSAL_LM": "text-generation"}
        if self.config.task_type in by_task_type:
            return by_task_type[self.config.task_type]
        for suffix, tag in _PIPELINE_BY_CLASS_SUFFIX.items():
            if self.base_class and self.base_class.endswith(suffix):
                return tag
        return None

    @property
    def setting(self) -> Setting:
        """A causal LM learns generative tasks (`sdlora-clm`); any other model, classes (`sdlora-cil`)."""
        return setting_of(self.pipeline_tag)


def setting_of(pipeline_tag: str | None) -> Setting:
    """The continual-learning setting of an adapter whose base model does the Hub task `pipeline_tag`."""
    return GENERATIVE_TASKS if pipeline_tag == "text-generation" else CLASS_INCREMENTAL


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------


def write_model_card(
    folder: str | os.PathLike,
    model_or_config: PeftModel | SDLoraConfig | None = None,
    results: Mapping[str, Any] | None = None,
    *,
    dataset: str | None = None,
    repo_id: str | None = None,
    adapter_name: str = "default",
) -> ModelCard:
    """Write (or update) the model card `folder/README.md` of a saved SD-LoRA adapter.

    Args:
        folder: the adapter's folder (the one holding `adapter_config.json`).
        model_or_config: the `PeftModel` the adapter was saved from (its live magnitudes are reported), its
            `SDLoraConfig`, or None to read the config from `folder`. Magnitudes come from the folder's weights
            unless a model is given.
        results: results in percent, keyed `final_accuracy`, `average_incremental_accuracy`, `forgetting` (and
            `final_exact_match`); each value a number or a `{"mean", "std"}` dict, as in `sdlora-cil`'s or
            `sdlora-clm`'s per-method summary (`results.json["methods"][name]`) or one of its runs. Other keys are
            ignored. None keeps the results the card already has. A causal LM's results are named as continual
            learning of generative tasks, any other model's as class-incremental learning.
        dataset: the dataset the results were measured on, or a causal LM's tasks (needed with `results`).
        repo_id: the repository id for the usage snippet (default: `REPO_ID_PLACEHOLDER`).
        adapter_name: the adapter to describe when `model_or_config` is a model with several adapters.

    Returns:
        The card, as saved.
    """
    folder = Path(folder)
    if isinstance(model_or_config, PeftModel):
        facts = facts_from_model(model_or_config, adapter_name)
    else:
        facts = facts_from_folder(folder, model_or_config)
    card = _load_or_start(folder / "README.md", facts)
    update_card(card, facts, repo_id)
    if results is not None:
        if not dataset:
            raise ValueError("write_model_card needs `dataset` (the dataset's name) to report results.")
        name = repo_id or card_data(card).model_name or "sdlora-adapter"
        set_results(card, results, dataset, model_name=name, task=facts.pipeline_tag)
    card.save(folder / "README.md")
    return card


# ----------------------------------------------------------------------------------------------------------------
# What the card describes
# ----------------------------------------------------------------------------------------------------------------


def facts_from_model(model: PeftModel, adapter_name: str) -> AdapterFacts:
    """The adapter as it is in memory: the config being trained and the current magnitudes."""
    config = model.peft_config[adapter_name]
    if not isinstance(config, SDLoraConfig):
        raise ValueError(f"Adapter {adapter_name!r} is not an SD-LoRA adapter.")
    base = model.get_base_model()
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return AdapterFacts(
        config=config,
        magnitudes=_magnitudes(state),
        # save_pretrained fills base_model_name_or_path from the base model after it has written the card
        base_model=config.base_model_name_or_path or getattr(base, "name_or_path", None) or None,
        base_class=type(base).__name__,
        base_library=type(base).__module__,
    )


def facts_from_folder(folder: Path, config: SDLoraConfig | None = None) -> AdapterFacts:
    """The adapter as saved in `folder`: `adapter_config.json` and the weights file, when present."""
    if config is None:
        config = PeftConfig.from_pretrained(str(folder))
        if not isinstance(config, SDLoraConfig):
            raise ValueError(f"{folder} does not hold an SD-LoRA adapter (peft_type {config.peft_type}).")
    weights = folder / SAFETENSORS_WEIGHTS_NAME
    config_file = folder / "adapter_config.json"
    auto_mapping = json.loads(config_file.read_text()).get("auto_mapping") if config_file.exists() else None
    auto_mapping = auto_mapping or {}
    return AdapterFacts(
        config=config,
        magnitudes=_magnitudes(load_file(weights)) if weights.exists() else None,
        base_model=config.base_model_name_or_path,
        base_class=auto_mapping.get("base_model_class"),
        base_library=auto_mapping.get("parent_library"),
    )


def _magnitudes(state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Magnitudes from a saved-form state dict: the model's global ones, else every layer's, one row each."""
    rows = [value for key, value in state_dict.items() if key.split(".")[-1] == "sdlora_magnitude"]
    return torch.stack([row.detach().float().cpu() for row in rows]) if rows else None


# ----------------------------------------------------------------------------------------------------------------
# Writing the card
# ----------------------------------------------------------------------------------------------------------------

_BLOCK = "sdlora-peft"
_RESULTS_BLOCK = "sdlora-peft-results"


def _load_or_start(path: Path, facts: AdapterFacts) -> ModelCard:
    return ModelCard.load(path) if path.exists() else new_card(facts)


def new_card(facts: AdapterFacts) -> ModelCard:
    """A short new card (PEFT's default template is mostly placeholders); `update_card` fills it."""
    title = f"SD-LoRA adapter for {facts.base_model}" if _is_repo_id(facts.base_model) else "SD-LoRA adapter"
    return ModelCard(f"---\nlibrary_name: peft\n---\n\n# {title}\n")


def _is_repo_id(name: str | None) -> bool:
    """Whether `name` can be the Hub's `base_model`: a repository id, not a local path."""
    if not name or os.path.isabs(name) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def update_card(card: ModelCard, facts: AdapterFacts, repo_id: str | None = None) -> None:
    """Set the Hub metadata and (re)write the adapter section of `card`; idempotent."""
    data = card_data(card)
    data.library_name = "peft"
    if _is_repo_id(facts.base_model):
        data.base_model = facts.base_model
    elif isinstance(data.base_model, str) and not _is_repo_id(data.base_model):
        data.base_model = None  # the Hub takes repository ids only; PEFT writes '' or a local path here
    prefix = "base_model:adapter:"  # PEFT's tag also names an unnamed base ('') or a local path
    tags = {tag for tag in (data.tags or []) if not tag.startswith(prefix) or _is_repo_id(tag[len(prefix) :])}
    data.tags = sorted(tags | set(CARD_TAGS) | ({facts.setting.tag} if facts.setting.tag else set()))
    if not data.pipeline_tag and facts.pipeline_tag:
        data.pipeline_tag = facts.pipeline_tag
    card.text = _put_block(card.text, _BLOCK, _adapter_section(facts, repo_id or REPO_ID_PLACEHOLDER))


def set_results(
    card: ModelCard, results: Mapping[str, Any], dataset: str, model_name: str, task: str | None = None
) -> None:
    """Put `results` into the card's `model-index` metadata and its results section, replacing earlier ones. `task`
    is the base model's Hub task; it names the setting (`setting_of`)."""
    found = [(key, _mean_std(results[key])) for key in RESULT_METRICS if results.get(key) is not None]
    if not found:
        raise ValueError(f"`results` has none of {sorted(RESULT_METRICS)}; got keys {sorted(results)}.")
    setting = setting_of(task)
    card_data(card).model_name = model_name
    card_data(card).eval_results = [
        EvalResult(
            task_type=task or "image-classification",
            task_name=setting.task_name,
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=RESULT_METRICS[key][0],
            metric_name=RESULT_METRICS[key][1],
            metric_value=round(mean, 4),
        )
        for key, (mean, _) in found
    ]
    rows = [f"| {RESULT_METRICS[key][1]} (%) | {_format_mean_std(mean, std)} |" for key, (mean, std) in found]
    section = "\n".join(
        [f"## Evaluation\n\n{setting.evaluation.format(dataset=dataset)}\n",
         "| metric | value |", "|---|---|", *rows]
    )  # fmt: skip
    card.text = _put_block(card.text, _RESULTS_BLOCK, section, after=_BLOCK)


def card_data(card: ModelCard) -> ModelCardData:
    """The card's metadata; a `ModelCard` always holds `ModelCardData`."""
    return cast(ModelCardData, card.data)


def _mean_std(value: Any) -> tuple[float, float | None]:
    if isinstance(value, Mapping):
        return float(value["mean"]), (float(value["std"]) if value.get("std") is not None else None)
    return float(value), None


def _format_mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _put_block(text: str, name: str, content: str, after: str | None = None) -> str:
    """Replace the marked block `name` in `text`, or insert it: after block `after` if given and present, else
    after the card's title, else at the top. The text comes back with one blank line above and one newline at the
    end, so that saving again changes nothing."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{content.strip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        lines = text.splitlines()
        anchor = f"<!-- {after}:end -->" if after else None
        at = next((i + 1 for i, line in enumerate(lines) if anchor and line.strip() == anchor), None)
        if at is None:
            at = next((i + 1 for i, line in enumerate(lines) if line.startswith("# ")), 0)
        text = "\n".join([*lines[:at], "", block, "", *lines[at:]])
    return "\n" + text.strip("\n") + "\n"


def _adapter_section(facts: AdapterFacts, repo_id: str) -> str:
    config = facts.config
    finished = len(config.task_history)
    absorbed = sum(record["absorbed"] for record in config.task_history)
    summary = (
        f"An [SD-LoRA]({PAPER}) adapter (Scalable Decoupled LoRA, Wu et al., ICLR 2025) for {facts.setting.summary}, "
        f"made with `sdlora_peft`. Each finished task keeps a frozen low-rank direction whose magnitude "
        f"keeps training with the later tasks; the whole adapter merges into the base weights "
        f"(`merge_and_unload()`).\n\n{finished} finished task(s), {finished - absorbed} stored direction(s), "
        f"{absorbed} absorbed; task {finished} is open for training."
    )
    return "\n\n".join(
        [
            "## SD-LoRA adapter",
            summary,
            "### Usage",
            _usage(facts, repo_id),
            "### Tasks",
            _task_table(facts),
            "### Configuration",
            _config_table(config),
        ]
    )


def _usage(facts: AdapterFacts, repo_id: str) -> str:
    """A snippet that loads the adapter; the repo id appears once, so it can be swapped for a local folder."""
    auto_class = _auto_class(facts)
    if auto_class is None:
        lines = [
            "import sdlora_peft  # registers SD-LoRA with PEFT",
            "from peft import PeftModel",
            "",
            "base_model = ...  # the model the adapter was trained on",
            f'model = PeftModel.from_pretrained(base_model, "{repo_id}")',
        ]
    else:
        lines = [
            "import sdlora_peft  # registers SD-LoRA with PEFT",
            f"from peft import {auto_class}",
            "",
            f'model = {auto_class}.from_pretrained("{repo_id}")',
            "merged = model.merge_and_unload()  # optional: a plain model at the base model's inference cost",
        ]
    return "```python\n" + "\n".join(lines) + "\n```"


def _auto_class(facts: AdapterFacts) -> str | None:
    """The `AutoPeftModel*` class that rebuilds base model and adapter, or None when there is none."""
    task_type = facts.config.task_type
    if task_type is not None:
        peft_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type)
        return f"Auto{peft_class.__name__}" if peft_class is not None else None
    if facts.base_class and (facts.base_library or "").startswith("transformers"):
        return "AutoPeftModel"  # rebuilds the base class saved in adapter_config.json's auto_mapping
    return None


def _task_table(facts: AdapterFacts) -> str:
    config, magnitudes = facts.config, facts.magnitudes
    kept = len(config.frozen_ranks) + 1
    if magnitudes is not None and magnitudes.shape[-1] != kept:
        magnitudes = None  # weights from another state of the adapter: do not guess
    rows, column = [], 0
    for record in config.task_history:
        if record["absorbed"]:
            residual = "" if record["residual"] is None else f" (residual {record['residual']:.2g})"
            rows.append(f"| {record['task']} | {record['rank']} | folded into earlier tasks | yes{residual} |")
            continue
        rows.append(f"| {record['task']} | {record['rank']} | {_magnitude(magnitudes, column)} | no |")
        column += 1
    open_task = config.current_task
    rows.append(f"| {open_task} (open) | {config.rank_for_task(open_task)} | {_magnitude(magnitudes, column)} | - |")
    if config.magnitude_sharing == "global":
        note = "Magnitudes: one per task, shared by every adapted layer."
    else:
        layers = "" if magnitudes is None else f" {magnitudes.shape[0]}"
        note = (
            f"Magnitudes: one per task and layer; the table gives the mean over the{layers} adapted layers (min-max)."
        )
    return "\n".join(["| task | rank | magnitude | absorbed |", "|---|---|---|---|", *rows, "", note])


def _magnitude(magnitudes: torch.Tensor | None, column: int) -> str:
    if magnitudes is None:
        return "-"
    values = magnitudes[:, column]
    if values.numel() == 1 or bool((values == values[0]).all()):
        return f"{values[0].item():.4g}"
    return f"{values.mean().item():.4g} ({values.min().item():.4g}-{values.max().item():.4g})"


def _config_table(config: SDLoraConfig) -> str:
    """SD-LoRA's own fields (the task history is the table above) and the task type."""
    own = [f.name for f in fields(SDLoraConfig) if f.name not in {f.name for f in fields(PeftConfig)}]
    rows = [
        f"| `{name}` | `{json.dumps(_plain(getattr(config, name)))}` |"
        for name in ["task_type", *own]
        if name != "task_history"
    ]
    return "\n".join(["| field | value |", "|---|---|", *rows])


def _plain(value: Any) -> Any:
    """A config value as it reads in JSON: sets sorted into lists, enums as their value."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return getattr(value, "value", value)
