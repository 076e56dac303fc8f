"""``ObliviateSFTTrainer``: ``trl.SFTTrainer`` with the Obliviate defense terms added to PEFT training."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from trl import SFTTrainer

from hf_obliviate.tuners import peft_type_of

from .hub_mixin import CompressedPushMixin
from .sft_config import ObliviateSFTConfig
from .trainer import TAGS, ObliviateTrainerMixin

__all__ = ["ObliviateSFTTrainer"]

logger = logging.getLogger(__name__)


def _is_prefix_tuning(model: Any, peft_config: Any) -> bool:
    return any(peft_type_of(c) == "PREFIX_TUNING" for c in (peft_config, getattr(model, "active_peft_config", None)))


class ObliviateSFTTrainer(ObliviateTrainerMixin, CompressedPushMixin, SFTTrainer):
    """A drop-in ``trl.SFTTrainer`` for causal language models that adds the Obliviate defense (METHOD.md §1).

    ``loss = L_task + λ_amp · L_amp + λ_attn · L_attn``. ``L_task`` is trl's own loss (``loss_type`` ``"nll"`` or
    ``"dft"``, completion-only or assistant-only masking, packing). ``L_attn`` penalises the pre-softmax attention
    logits of the query rows of every completion token (tokens whose label is not -100), over causal keys of the same
    sequence: padded keys are excluded through ``attention_mask``; in padding-free / packed batches (no
    ``attention_mask``) the sequences are told apart by ``position_ids``. Rows are averaged per example, then over
    examples and heads. The extra terms are scaled like the task loss under gradient accumulation (divided by the
    accumulation steps exactly when the Trainer does not divide), computed per process on local tensors under DDP,
    and logged through trl's metric buffer as ``loss_task``, ``loss_amp`` and ``loss_attn``.

    Gradient checkpointing (trl's default) is supported in its non-reentrant form. Prefix tuning does not support
    gradient checkpointing in peft, so with a prefix-tuning model or ``peft_config`` it is switched off (with a
    warning). 4-bit and 8-bit bitsandbytes bases (QLoRA) train like any other base.

    Args:
        model (`str` or `transformers.PreTrainedModel` or `peft.PeftModel`):
            The model, as ``trl.SFTTrainer`` takes it; pass ``peft_config`` (or a ``PeftModel``) for PEFT training.
        args (`ObliviateSFTConfig`, *optional*):
            ``trl.SFTConfig`` plus the defense fields.
        **kwargs:
            Everything ``trl.SFTTrainer`` accepts (``train_dataset``, ``processing_class``, ``peft_config``, ...).

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from peft import LoraConfig
    >>> from hf_obliviate import ObliviateSFTConfig, ObliviateSFTTrainer
    >>> from hf_obliviate.smollm import load_smollm2
    >>> model, tokenizer = load_smollm2()
    >>> data = Dataset.from_list([{"prompt": [{"role": "user", "content": "Say hi."}],
    ...                            "completion": [{"role": "assistant", "content": "Hi!"}]}] * 4)
    >>> args = ObliviateSFTConfig(output_dir="out", max_steps=1, per_device_train_batch_size=2, report_to="none",
    ...                           lambda_amp=3e-4, lambda_attn=3e-3)
    >>> trainer = ObliviateSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
    ...                               peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    >>> _ = trainer.train()
    ```
    """

    _tag_names = ["trl", "sft", *TAGS]
    _name = "Obliviate SFT"

    def __init__(self, model: Any, args: ObliviateSFTConfig | None = None, **kwargs):
        if args is None:
            args = ObliviateSFTConfig(output_dir="trainer_output")
        if args.gradient_checkpointing and _is_prefix_tuning(model, kwargs.get("peft_config")):
            logger.warning(
                "peft's prefix tuning does not support gradient checkpointing (trl turns it on by default): "
                "training without it. Set `gradient_checkpointing=False` to silence this warning."
            )
            args.gradient_checkpointing = False
            if hasattr(args, "activation_checkpointing"):  # transformers >= 5.2x renamed the field (old name: alias)
                args.activation_checkpointing = False
        super().__init__(model=model, args=args, **kwargs)
        self._setup_obliviate()
        defense = self.obliviate_defense
        if defense is not None and defense.capture is not None and defense.config.attn_query == "auto":
            defense.capture.query = "rows"  # causal-LM SFT: the completion tokens' rows

    def _attention_inputs(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """Key mask, completion rows and (padding-free batches) sequence ids for the capture."""
        attention_mask = inputs.get("attention_mask")
        labels = inputs.get("labels")
        query_mask = None
        if labels is not None:
            query_mask = labels != -100
            if attention_mask is not None:
                query_mask = query_mask & attention_mask.bool()
        position_ids = inputs.get("position_ids") if attention_mask is None else None
        return {"attention_mask": attention_mask, "query_mask": query_mask, "position_ids": position_ids}

    def _defense_inputs(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> tuple[Any, dict[str, torch.Tensor | None]]:
        capture_inputs = self._attention_inputs(inputs)
        capture = self.obliviate_defense.capture
        if capture_inputs["query_mask"] is None and capture is not None and capture.query == "rows":
            raise ValueError("The SFT attention term needs `labels` in the batch to find the completion tokens.")
        return num_items_in_batch, capture_inputs

    def _record_terms(self, task_loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Per-term metrics through trl's buffer (``self._metrics``), averaged over processes like trl's own."""
        values = {"loss_task": task_loss, **terms}
        stacked = torch.stack([v.detach().float().reshape(()).to(task_loss.device) for v in values.values()])
        gathered = self.accelerator.gather_for_metrics(stacked[None]).reshape(-1, len(values)).mean(dim=0).tolist()
        for name, value in zip(values, gathered):
            self._metrics["train"][name].append(value)
