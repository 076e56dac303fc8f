"""Ready-made pieces for the demo, the CLI, the evaluation and the benchmarks: load a classifier, wrap it in a PEFT
tuner, tokenize sentences. Each is a few lines of ordinary transformers/peft code; they live here once so that
every entry point builds its runs the same way. Fine-tuning: ``hf_obliviate.trainer.fine_tune``; predictions and
CACC / ASR: ``hf_obliviate.evaluation``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["PEFT_TYPES", "EncodedDataset", "load_classifier", "tokenize_examples", "wrap_peft"]

PEFT_TYPES = ("lora", "dora", "prefix", "ia3", "adapter")

# Per-architecture module names (peft's `target_modules` match name suffixes).
_ATTENTION_TARGETS = {
    "bert": (["query", "value"], ["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["query", "value"], ["key", "value", "output.dense"], ["output.dense"]),
    "llama": (["q_proj", "v_proj"], ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}


def load_classifier(
    model_name_or_path: str | Path | None = None, num_labels: int = 2, attn_implementation: str = "sdpa"
) -> tuple[nn.Module, object]:
    """Load a sequence classifier and its tokenizer; default: the bundled MiniLM-L6 with a new 2-label head.

    A backdoored checkpoint saved by :mod:`hf_obliviate.attacks` loads the same way.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .bundled import minilm_path

    path = str(model_name_or_path or minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, attn_implementation=attn_implementation
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def wrap_peft(model: nn.Module, peft: str = "lora", r: int = 16, num_virtual_tokens: int = 16) -> nn.Module:
    """Wrap ``model`` in a PEFT tuner with defaults of METHOD.md §6 (LoRA r=16, α=16 on query/value).

    Args:
        peft (`str`): `lora`, `dora`, `prefix` (prefix tuning, projection MLP), `ia3` or `adapter` (bottleneck).
        r (`int`): LoRA rank, or the bottleneck width for adapters (×4).
        num_virtual_tokens (`int`): prefix length for prefix tuning.
    """
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, get_peft_model

    from .bottleneck import BottleneckConfig, get_bottleneck_model
    from .tuners import check_prefix_tuning

    if peft not in PEFT_TYPES:
        raise ValueError(f"Unknown PEFT type {peft!r}: choose one of {', '.join(PEFT_TYPES)}.")
    model_type = getattr(model.config, "model_type", None)
    lora_targets, ia3_targets, ia3_ff = _ATTENTION_TARGETS.get(model_type, (None, None, None))
    if peft in ("lora", "dora"):
        if lora_targets is None:
            raise ValueError(f"No default LoRA targets for {model_type!r}: build the LoraConfig yourself.")
        config = LoraConfig(
            r=r,
            lora_alpha=r,
            lora_dropout=0.0,
            target_modules=lora_targets,
            use_dora=peft == "dora",
            task_type="SEQ_CLS",
        )
        return get_peft_model(model, config)
    if peft == "prefix":
        config = PrefixTuningConfig(
            num_virtual_tokens=num_virtual_tokens, prefix_projection=True, encoder_hidden_size=256, task_type="SEQ_CLS"
        )
        prefixed = get_peft_model(model, config)
        check_prefix_tuning(prefixed)
        return prefixed
    if peft == "ia3":
        if ia3_targets is None:
            raise ValueError(f"No default IA3 targets for {model_type!r}: build the IA3Config yourself.")
        return get_peft_model(
            model, IA3Config(target_modules=ia3_targets, feedforward_modules=ia3_ff, task_type="SEQ_CLS")
        )
    return get_bottleneck_model(model, BottleneckConfig(bottleneck_size=4 * r))


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenized examples as a plain map-style dataset of dicts (no `datasets` dependency)."""

    def __init__(self, encodings: dict[str, list], labels: Sequence[int]):
        self.encodings = encodings
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item = {key: values[index] for key, values in self.encodings.items()}
        item["labels"] = self.labels[index]
        return item


def tokenize_examples(tokenizer, examples: Sequence[dict], max_length: int = 64) -> EncodedDataset:
    """Tokenize ``[{"text", "label"}]`` into a dataset of ``input_ids``, ``attention_mask`` (...) and ``labels``."""
    encoded = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length)
    return EncodedDataset(dict(encoded), [int(e["label"]) for e in examples])
