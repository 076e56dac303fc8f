"""Ready-made pieces for the demo, the CLI, the evaluation and the benchmarks: load a classifier, wrap it in a PEFT
tuner, tokenize sentences. Each is a few lines of ordinary transformers/peft code; they live here once so that
every entry point builds its runs the same way. Fine-tuning: ``hf_obliviate.trainer.fine_tune``; predictions and
CACC / ASR: ``hf_obliviate.evaluation``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

__all__ = ["PEFT_TYPES", "EncodedDataset", "held_load_report", "load_classifier", "tokenize_examples", "wrap_peft"]

logger = logging.getLogger(__name__)

# Heads that a sequence classifier adds on top of an encoder or decoder (BERT-style, Llama-style); a BERT pooler,
# which a checkpoint saved without one (e.g. a masked-LM) lacks, is new with them.
_HEAD_MODULES = ("classifier", "score")

PEFT_TYPES = ("lora", "dora", "prefix", "ia3", "adapter")

# Per-architecture module names (peft's `target_modules` match name suffixes).
_ATTENTION_TARGETS = {
    "bert": (["query", "value"], ["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["query", "value"], ["key", "value", "output.dense"], ["output.dense"]),
    "llama": (["q_proj", "v_proj"], ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}


class _HeldReport(logging.Filter):
    """Holds back transformers' LOAD REPORT (a table of every missing and unexpected tensor) of the installing thread
    while it is installed (other threads' reports pass); ``release`` logs what it held."""

    def __init__(self, target: logging.Logger):
        super().__init__()
        self.target, self.held, self.thread = target, [], threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True

    def release(self) -> None:
        self.target.removeFilter(self)
        for record in self.held:
            self.target.handle(record)
        self.held = []


@contextmanager
def held_load_report() -> Iterator[_HeldReport]:
    """Within the block, transformers' LOAD REPORT of this thread's ``from_pretrained`` calls is held back (for a
    caller that reads ``output_loading_info`` and reports what matters itself); if the block raises, the held report is
    logged, since it explains the error."""
    target = logging.getLogger("transformers.modeling_utils")
    held = _HeldReport(target)
    target.addFilter(held)
    try:
        yield held
    except BaseException:
        held.release()
        raise
    finally:
        target.removeFilter(held)


def _log_loading(model: nn.Module, info: dict, path: str, quiet_head: bool = False) -> list[str]:
    """One line instead of the LOAD REPORT for what loading an encoder as a classifier always does (a new head, the
    pre-training head left out; the head line left to the caller with ``quiet_head``); a warning naming any other
    missing tensor. Returns the new head's tensor names."""
    missing = sorted(info.get("missing_keys") or ())
    head = [k for k in missing if k.split(".")[0] in _HEAD_MODULES or ".pooler." in f".{k}"]
    other = [k for k in missing if k not in head]
    if head and not quiet_head:
        logger.info("%s: new %d-label classification head (%s); fine-tune it before use.", path,
                    model.config.num_labels, ", ".join(head))  # fmt: skip
    if info.get("unexpected_keys"):
        logger.info("%s: %d checkpoint tensors the classifier does not use (e.g. a pre-training head).", path,
                    len(info["unexpected_keys"]))  # fmt: skip
    if other:
        shown = ", ".join(other[:8]) + (f" and {len(other) - 8} more" if len(other) > 8 else "")
        logger.warning("%s lacks %d tensors of the model body, initialised at random: %s. Is it the right "
                       "checkpoint?", path, len(other), shown)  # fmt: skip
    return head


def load_classifier(
    model_name_or_path: str | Path | None = None,
    num_labels: int = 2,
    attn_implementation: str = "sdpa",
    trained_head: bool = False,
) -> tuple[nn.Module, object]:
    """Load a sequence classifier and its tokenizer; default: the bundled MiniLM-L6 with a new 2-label head.

    A backdoored checkpoint saved by :mod:`hf_obliviate.attacks` loads the same way. A new head is logged on one
    line (INFO) instead of transformers' LOAD REPORT, which still shows when loading fails; tensors of the model body
    missing from the checkpoint are a warning.

    Args:
        trained_head (`bool`, *optional*, defaults to `False`):
            The checkpoint is a fine-tuned classifier (e.g. to evaluate it): its head and label count are used, and
            a checkpoint without a head is an error instead of getting a new one (``num_labels`` is ignored).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .bundled import minilm_path

    path = str(model_name_or_path or minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {} if trained_head else {"num_labels": num_labels}
    with held_load_report():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, attn_implementation=attn_implementation, output_loading_info=True, **kwargs
        )
    head = _log_loading(model, info, path, quiet_head=trained_head)
    if trained_head and head:
        raise ValueError(
            f"{path} has no trained classification head ({', '.join(head)} missing): evaluate a fine-tuned "
            "classifier, or the adapter folder of a fine-tune (with --base for its base model)."
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
    from .tuners import prepare_prefix_tuning

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
        prepare_prefix_tuning(prefixed)
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
