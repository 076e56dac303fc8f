"""hf-obliviate: backdoor-safe PEFT fine-tuning (Obliviate) and compressed, verified deltas on the Hub.

Exports are lazy, so ``import hf_obliviate`` stays light: torch, transformers, peft and trl load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it. One place for each idea; this table only points at it.
_EXPORTS: dict[str, str] = {
    "AttentionCaptureError": "hf_obliviate.capture",
    "AttentionLogitCapture": "hf_obliviate.capture",
    "BottleneckAdapterModel": "hf_obliviate.bottleneck",
    "BottleneckConfig": "hf_obliviate.bottleneck",
    "DeltaPushArguments": "hf_obliviate.trainer",
    "ObliviateConfig": "hf_obliviate.config",
    "ObliviateDefense": "hf_obliviate.defense",
    "ObliviateTrainer": "hf_obliviate.trainer",
    "ObliviateTrainingArguments": "hf_obliviate.trainer",
    "UnsupportedTunerError": "hf_obliviate.tuners",
    "amplification_loss": "hf_obliviate.losses",
    "attention_logit_loss": "hf_obliviate.losses",
    "get_bottleneck_model": "hf_obliviate.bottleneck",
    "load_movie_reviews": "hf_obliviate.data",
    "tuner_parameters": "hf_obliviate.tuners",
}

__all__ = [
    "AttentionCaptureError",
    "AttentionLogitCapture",
    "BottleneckAdapterModel",
    "BottleneckConfig",
    "DeltaPushArguments",
    "ObliviateConfig",
    "ObliviateDefense",
    "ObliviateTrainer",
    "ObliviateTrainingArguments",
    "UnsupportedTunerError",
    "__version__",
    "amplification_loss",
    "attention_logit_loss",
    "get_bottleneck_model",
    "load_movie_reviews",
    "tuner_parameters",
]


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_obliviate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover
    from .bottleneck import BottleneckAdapterModel, BottleneckConfig, get_bottleneck_model
    from .capture import AttentionCaptureError, AttentionLogitCapture
    from .config import ObliviateConfig
    from .data import load_movie_reviews
    from .defense import ObliviateDefense
    from .losses import amplification_loss, attention_logit_loss
    from .trainer import DeltaPushArguments, ObliviateTrainer, ObliviateTrainingArguments
    from .tuners import UnsupportedTunerError, tuner_parameters
