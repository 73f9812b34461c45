"""Register SD-LoRA with PEFT's tuner registry (and its model card with PEFT's save and push, see `card`).

peft's `register_peft_method` only accepts names that already exist in its `PeftType` enum, so the member is added
at import time. If a future peft ships `PeftType.SDLORA` itself, that member is used as is.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "sdlora"


def ensure_peft_type() -> PeftType:
    """Return `PeftType.SDLORA`, adding the member to peft's enum if peft does not define it."""
    member_name = NAME.upper()
    if member_name in PeftType.__members__:
        return PeftType[member_name]
    member = str.__new__(PeftType, member_name)
    member._name_ = member_name
    member._value_ = member_name
    member.__objclass__ = PeftType  # type: ignore[attr-defined]  # what Enum sets on its own members
    member._sort_order_ = len(PeftType._member_names_)  # type: ignore[attr-defined]
    PeftType._member_names_.append(member_name)
    PeftType._member_map_[member_name] = member
    PeftType._value2member_map_[member_name] = member
    # EnumType.__setattr__ refuses to rebind members; the attribute is new, so set it on the class dict directly.
    type.__setattr__(PeftType, member_name, member)
    return member


def register() -> None:
    """Register `SDLoraConfig` / `SDLoraModel` with peft, and SD-LoRA's model card with `PeftModel`'s save and
    push; calling it again is harmless."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .card_hooks import install_card_hooks
    from .config import SDLoraConfig
    from .model import SDLoraModel

    install_card_hooks()
    peft_type = ensure_peft_type()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is SDLoraModel:
        return
    register_peft_method(name=NAME, config_cls=SDLoraConfig, model_cls=SDLoraModel, prefix="sdlora_")
