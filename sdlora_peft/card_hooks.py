"""SD-LoRA's model card in PEFT's own save and push: `install_card_hooks` (run at import by `sdlora_peft.register`).

`PeftModel.save_pretrained` writes its card through `create_or_update_model_card`, and `push_to_hub` replaces the
saved card just before uploading; both are wrapped so that an SD-LoRA adapter's card also gets what `card` writes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import ModelCard
from peft import PeftModel

from .card import card_data, facts_from_model, new_card, update_card
from .config import SDLoraConfig


def _sdlora_adapter(model: PeftModel) -> str | None:
    """The adapter a card describes: the active one if it is SD-LoRA, else the first SD-LoRA adapter."""
    configs = getattr(model, "peft_config", {})
    names = [model.active_adapter] if isinstance(getattr(model, "active_adapter", None), str) else []
    names += list(configs)
    return next((name for name in names if isinstance(configs.get(name), SDLoraConfig)), None)


def _refresh_card(
    model: PeftModel, adapter_name: str, folder: str, peft_update: Callable, repo_id: str | None = None
) -> None:
    """Let PEFT update the card, then add SD-LoRA's part, keeping the tags the card had before."""
    facts = facts_from_model(model, adapter_name)
    path = Path(folder) / "README.md"
    if not path.exists():
        new_card(facts).save(path)
    tags_before = card_data(ModelCard.load(path)).tags or []
    peft_update(model, folder)  # PEFT's own part: library_name, base model tags, framework versions
    card = ModelCard.load(path)
    card_data(card).tags = sorted(set(card_data(card).tags or []) | set(tags_before))
    update_card(card, facts, repo_id)
    card.save(path)


def install_card_hooks() -> None:
    """Make `PeftModel.save_pretrained` and `push_to_hub` write SD-LoRA's card; other adapters are untouched.

    Two wrappers on `PeftModel`, installed once: `create_or_update_model_card` (called by `save_pretrained`), and
    transformers' `_upload_modified_files`, because `push_to_hub` overwrites the saved README with the card it
    fetched from the Hub (or a generic template) just before uploading; the wrapper re-applies the SD-LoRA part to
    that card, so a card already on the Hub keeps its own text and results.
    """
    if getattr(PeftModel.create_or_update_model_card, "_sdlora_hook", False):
        return
    peft_update = PeftModel.create_or_update_model_card
    upload = getattr(PeftModel, "_upload_modified_files", None)  # transformers' PushToHubMixin, private

    @functools.wraps(peft_update)
    def create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
        adapter_name = _sdlora_adapter(self)
        if adapter_name is None:
            return peft_update(self, output_dir)
        _refresh_card(self, adapter_name, output_dir, peft_update)

    create_or_update_model_card._sdlora_hook = True  # type: ignore[attr-defined]
    PeftModel.create_or_update_model_card = create_or_update_model_card  # type: ignore[method-assign]
    if upload is None:  # a push then uploads PEFT's card only; tests/test_hub.py would say so
        return

    @functools.wraps(upload)
    def _upload_modified_files(self: PeftModel, working_dir: str, repo_id: str, *args, **kwargs):
        adapter_name = _sdlora_adapter(self)
        if adapter_name is not None:
            _refresh_card(self, adapter_name, working_dir, peft_update, repo_id=repo_id)
        return upload(self, working_dir, repo_id, *args, **kwargs)

    PeftModel._upload_modified_files = _upload_modified_files  # type: ignore[method-assign,assignment]
