"""Trainer integrations of hf-obliviate (shipped as ``hf_obliviate.trainer``)."""

from .arguments import DeltaPushArguments, ObliviateTrainingArguments
from .recipes import fine_tune
from .trainer import ObliviateTrainer, ObliviateTrainerMixin

__all__ = [
    "DeltaPushArguments",
    "ObliviateTrainer",
    "ObliviateTrainerMixin",
    "ObliviateTrainingArguments",
    "fine_tune",
]
