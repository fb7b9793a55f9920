"""Adds SPARSE_DELTA to PEFT's registries.

PEFT has no public hook for methods defined outside its source tree: `register_peft_method` requires a member of the
`PeftType` enum, and enums cannot be extended by normal means. This module adds the member the way the enum machinery
itself stores members, then calls PEFT's own registration. Nothing else of PEFT changes: saving and pushing are
extended for sparse-delta models only (`peft_model_hooks.py`), loading goes through the tuner's own classes.
`tests/tuner/test_registration.py` fails loudly if a PEFT upgrade changes these mechanisms.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

NAME = "sparse_delta"
PREFIX = "sparse_delta_"


def add_peft_type(name: str = NAME.upper()) -> PeftType:
    """Add ``name`` to `peft.utils.PeftType` (idempotent) and return the member."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    # EnumType.__setattr__ refuses to rebind members, so set the class attribute first, then register the member.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register(config_cls, model_cls) -> None:
    """Register the method with PEFT (idempotent, so re-imports and reloads are harmless)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    add_peft_type()
    if PeftType.SPARSE_DELTA in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
