"""Trainer integrations of hf-obliviate (shipped as ``hf_obliviate.trainer``).

The SFT names (:class:`ObliviateSFTTrainer`, :class:`ObliviateSFTConfig`) load trl on first use, so importing this
package does not import trl.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .arguments import DeltaPushArguments, ObliviateTrainingArguments
from .recipes import fine_tune
from .trainer import ObliviateTrainer, ObliviateTrainerMixin

__all__ = [
    "DeltaPushArguments",
    "ObliviateSFTConfig",
    "ObliviateSFTTrainer",
    "ObliviateTrainer",
    "ObliviateTrainerMixin",
    "ObliviateTrainingArguments",
    "fine_tune",
]

_LAZY = {"ObliviateSFTConfig": ".sft_config", "ObliviateSFTTrainer": ".sft_trainer"}


def __getattr__(name: str):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover
    from .sft_config import ObliviateSFTConfig
    from .sft_trainer import ObliviateSFTTrainer
