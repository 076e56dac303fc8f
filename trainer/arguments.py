"""Training arguments: every ``transformers.TrainingArguments`` field plus the Obliviate and delta-push fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from hf_obliviate.config import CLASSIFIER_DEFAULTS, ObliviateConfig
from hf_obliviate.delta.format import LORA_MODES, check_scale_factor

__all__ = ["DeltaPushArguments", "ObliviateTrainingArguments"]

DELTA_METHODS = ("bitdelta",)


@dataclass
class DeltaPushArguments:
    """How the trainer pushes to the Hub: full weights (default) or a compressed fine-tuning delta."""

    delta_compression: str | None = field(
        default=None,
        metadata={"help": "Push a compressed fine-tuning delta instead of full weights: None or 'bitdelta'."},
    )
    delta_k: int = field(
        default=1,
        metadata={"help": "Number of 1-bit masks (k=1 is BitDelta; k>1 restores more of a backdoor, see the card)."},
    )
    delta_lora: str = field(
        default="merged",
        metadata={
            "help": "For a peft (LoRA) model: 'merged' (compress B·A into the base's shape; strips much of a "
            "fine-tuning backdoor) or 'factors' (the exact adapter; keeps what the fine-tune does against a backdoor "
            "planted in the base, which a compressed merge lost in the README's measurement)."
        },
    )
    delta_scale_factor: float = field(
        default=1.0,
        metadata={
            "help": "Shrink the pushed BitDelta delta toward the base (< 1; 1: as compressed). A shrunk 1-bit delta "
            "stripped more of a poisoned fine-tune's backdoor in the free-lunch evaluation; choose it on clean data."
        },
    )
    delta_distill_steps: int = field(
        default=0,
        metadata={"help": "Scale-distillation steps on calibration text (0: off; distillation can restore triggers)."},
    )
    delta_distill_lr: float = field(default=1e-4, metadata={"help": "Scale-distillation AdamW learning rate."})
    delta_calibration_texts: list[str] | None = field(
        default=None,
        metadata={"help": "Calibration texts for scale distillation (default: bundled IMDB sentences)."},
    )
    delta_calibration_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Calibration data for scale distillation: a .txt (one text per line), .jsonl or .csv file, or a "
            "`datasets` folder saved with save_to_disk (column: delta_calibration_column)."
        },
    )
    delta_calibration_column: str = field(default="text", metadata={"help": "Text column of the calibration data."})
    delta_calibration_sequences: int = field(
        default=800, metadata={"help": "Calibration sequences for scale distillation (METHOD §4: 800)."}
    )
    delta_calibration_seq_len: int = field(default=128, metadata={"help": "Tokens per calibration sequence."})
    delta_base_model: str | None = field(
        default=None, metadata={"help": "Base model id or path the delta applies to (default: config._name_or_path)."}
    )
    delta_dry_run_dir: str | None = field(
        default=None, metadata={"help": "Write the exact files of the push here instead of uploading."}
    )

    def __post_init__(self):
        if self.delta_compression is not None and self.delta_compression not in DELTA_METHODS:
            raise ValueError(
                f"Unknown delta_compression {self.delta_compression!r}: use one of {', '.join(DELTA_METHODS)} or None."
            )
        if self.delta_lora not in LORA_MODES:
            raise ValueError(f"delta_lora must be one of {', '.join(LORA_MODES)}, got {self.delta_lora!r}.")
        if self.delta_k < 1:
            raise ValueError(f"delta_k must be >= 1 (1 is plain BitDelta), got {self.delta_k}.")
        try:
            check_scale_factor(self.delta_scale_factor)
        except ValueError:
            raise ValueError(
                f"delta_scale_factor must be a finite number >= 0 (1: the delta as compressed), got "
                f"{self.delta_scale_factor!r}."
            ) from None
        if self.delta_distill_steps < 0:
            raise ValueError(f"delta_distill_steps must be >= 0, got {self.delta_distill_steps}.")
        if self.delta_distill_steps and self.delta_lora == "factors":
            raise ValueError(
                "delta_distill_steps trains BitDelta scales, but delta_lora='factors' stores the adapter as is "
                "(nothing is compressed): use delta_lora='merged', or delta_distill_steps=0."
            )
        if self.delta_calibration_sequences < 1 or self.delta_calibration_seq_len < 2:
            raise ValueError("delta_calibration_sequences must be >= 1 and delta_calibration_seq_len >= 2.")
        if self.delta_calibration_texts is not None and self.delta_calibration_dataset is not None:
            raise ValueError("Pass delta_calibration_texts or delta_calibration_dataset, not both.")
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


def _classifier_default(name: str):
    """``ObliviateConfig``'s field ``name`` with its `CLASSIFIER_DEFAULTS` value as the default (same help)."""
    value = CLASSIFIER_DEFAULTS[name]
    base = ObliviateConfig.__dataclass_fields__[name]
    return field(
        default=value,
        metadata={
            **base.metadata,
            "help": f"{base.metadata['help']} ObliviateTrainer "
            f"default: {value!r} (chosen on the defense benchmark's validation split).",
        },
    )


@dataclass
class ObliviateTrainingArguments(ObliviateConfig, DeltaPushArguments, TrainingArguments):
    """``transformers.TrainingArguments`` plus the defense fields of :class:`hf_obliviate.ObliviateConfig`
    (``obliviate``, ``lambda_amp``, ``lambda_attn``, ``lambda_consistency``, ``consistency_tokens``, ...) and the
    push fields of :class:`DeltaPushArguments` (``delta_compression``, ...).

    The defense defaults are those of :data:`hf_obliviate.config.CLASSIFIER_DEFAULTS`, the recipe the validation
    split of ``benchmarks/defense.py`` chose for sequence classifiers (LoRA and bottleneck adapters): the
    `scan-relative` consistency term (a vocabulary scan before training, about a minute for MiniLM-L6 on 2 CPU cores,
    which needs ``processing_class=tokenizer``) and the attention term at ``lambda_attn=3e-3``, the amplification term
    off. METHOD.md's recipe is
    ``lambda_consistency=0, lambda_amp=3e-4, lambda_attn=3e-3`` (:class:`hf_obliviate.ObliviateConfig`'s defaults).

    Example:
    ```python
    >>> from hf_obliviate import ObliviateTrainingArguments
    >>> args = ObliviateTrainingArguments(output_dir="out", lambda_amp=3e-4, lambda_attn=3e-3, report_to="none")
    >>> args.obliviate_config().lambda_attn
    0.003
    ```
    """

    lambda_amp: float = _classifier_default("lambda_amp")
    lambda_attn: float = _classifier_default("lambda_attn")
    lambda_consistency: float = _classifier_default("lambda_consistency")
    consistency_insertions: int = _classifier_default("consistency_insertions")
    consistency_tokens: str = _classifier_default("consistency_tokens")
    consistency_target: str = _classifier_default("consistency_target")
