"""hf-obliviate: backdoor-safe PEFT fine-tuning (Obliviate) and compressed, verified deltas on the Hub.

Exports are lazy, so ``import hf_obliviate`` stays light: torch, transformers, peft and trl load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

# name -> module that defines it. One place for each idea; this table only points at it.
_EXPORTS: dict[str, str] = {
    "AttentionCaptureError": "hf_obliviate.capture",
    "AttentionLogitCapture": "hf_obliviate.capture",
    "BaseMismatchError": "hf_obliviate.delta",
    "BottleneckAdapterModel": "hf_obliviate.bottleneck",
    "BottleneckConfig": "hf_obliviate.bottleneck",
    "CompressedDelta": "hf_obliviate.delta",
    "CorruptDeltaError": "hf_obliviate.delta",
    "DeltaFormatError": "hf_obliviate.delta",
    "DeltaPushArguments": "hf_obliviate.trainer",
    "DistillConfig": "hf_obliviate.delta",
    "FreeLunchConfig": "hf_obliviate.freelunch",
    "HubAuthError": "hf_obliviate.hub",
    "LensResult": "hf_obliviate.lens",
    "LocalHub": "hf_obliviate.hub",
    "ObliviateConfig": "hf_obliviate.config",
    "ObliviateDefense": "hf_obliviate.defense",
    "ObliviateSFTConfig": "hf_obliviate.trainer",
    "ObliviateSFTTrainer": "hf_obliviate.trainer",
    "ObliviateTrainer": "hf_obliviate.trainer",
    "ObliviateTrainingArguments": "hf_obliviate.trainer",
    "ShapeMismatchError": "hf_obliviate.delta",
    "UnsupportedFormatVersionError": "hf_obliviate.delta",
    "UnsupportedTunerError": "hf_obliviate.tuners",
    "amplification_loss": "hf_obliviate.losses",
    "attention_logit_loss": "hf_obliviate.losses",
    "compress_checkpoints": "hf_obliviate.delta",
    "compress_delta": "hf_obliviate.delta",
    "compress_model": "hf_obliviate.delta",
    "distill_scales": "hf_obliviate.delta",
    "fine_tune": "hf_obliviate.trainer",
    "get_bottleneck_model": "hf_obliviate.bottleneck",
    "load_compressed": "hf_obliviate.hub",
    "load_movie_reviews": "hf_obliviate.data",
    "logit_lens": "hf_obliviate.lens",
    "plot_lens": "hf_obliviate.lens",
    "push_compressed_delta": "hf_obliviate.hub",
    "run_freelunch": "hf_obliviate.freelunch",
    "tuner_parameters": "hf_obliviate.tuners",
}

__all__ = [
    "AttentionCaptureError",
    "AttentionLogitCapture",
    "BaseMismatchError",
    "BottleneckAdapterModel",
    "BottleneckConfig",
    "CompressedDelta",
    "CorruptDeltaError",
    "DeltaFormatError",
    "DeltaPushArguments",
    "DistillConfig",
    "FreeLunchConfig",
    "HubAuthError",
    "LensResult",
    "LocalHub",
    "ObliviateConfig",
    "ObliviateDefense",
    "ObliviateSFTConfig",
    "ObliviateSFTTrainer",
    "ObliviateTrainer",
    "ObliviateTrainingArguments",
    "ShapeMismatchError",
    "UnsupportedFormatVersionError",
    "UnsupportedTunerError",
    "__version__",
    "amplification_loss",
    "attention_logit_loss",
    "compress_checkpoints",
    "compress_delta",
    "compress_model",
    "distill_scales",
    "fine_tune",
    "get_bottleneck_model",
    "load_compressed",
    "load_movie_reviews",
    "logit_lens",
    "plot_lens",
    "push_compressed_delta",
    "run_freelunch",
    "tuner_parameters",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover
    from .bottleneck import BottleneckAdapterModel, BottleneckConfig, get_bottleneck_model
    from .capture import AttentionCaptureError, AttentionLogitCapture
    from .config import ObliviateConfig
    from .data import load_movie_reviews
    from .defense import ObliviateDefense
    from .delta import (
        BaseMismatchError,
        CompressedDelta,
        CorruptDeltaError,
        DeltaFormatError,
        DistillConfig,
        ShapeMismatchError,
        UnsupportedFormatVersionError,
        compress_checkpoints,
        compress_delta,
        compress_model,
        distill_scales,
    )
    from .freelunch import FreeLunchConfig, run_freelunch
    from .hub import HubAuthError, LocalHub, load_compressed, push_compressed_delta
    from .lens import LensResult, logit_lens, plot_lens
    from .losses import amplification_loss, attention_logit_loss
    from .trainer import (
        DeltaPushArguments,
        ObliviateSFTConfig,
        ObliviateSFTTrainer,
        ObliviateTrainer,
        ObliviateTrainingArguments,
        fine_tune,
    )
    from .tuners import UnsupportedTunerError, tuner_parameters
