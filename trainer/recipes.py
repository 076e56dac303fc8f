"""One-call fine-tuning of a PEFT classifier on labelled sentences, defended or plain."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["fine_tune"]


def fine_tune(model: nn.Module, tokenizer, train_examples: Sequence[dict], args, max_length: int = 64, **kwargs):
    """Fine-tune a PEFT ``model`` on ``[{"text", "label"}]`` with :class:`hf_obliviate.ObliviateTrainer`.

    ``args`` is an :class:`hf_obliviate.ObliviateTrainingArguments`; ``obliviate=False`` gives plain PEFT training
    through the same code path. Returns the trainer after training.
    """
    from transformers import DataCollatorWithPadding

    from hf_obliviate.models import tokenize_examples

    from .trainer import ObliviateTrainer

    trainer = ObliviateTrainer(
        model=model,
        args=args,
        train_dataset=tokenize_examples(tokenizer, train_examples, max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        **kwargs,
    )
    trainer.train()
    return trainer
