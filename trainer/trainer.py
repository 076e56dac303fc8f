"""``ObliviateTrainer``: ``transformers.Trainer`` with the Obliviate defense terms added to PEFT training."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_obliviate.bottleneck import BottleneckAdapterModel
from hf_obliviate.config import HIDDEN_TARGETS, ObliviateConfig
from hf_obliviate.consistency import rare_token_pool, scan_trigger_tokens
from hf_obliviate.defense import ObliviateDefense
from hf_obliviate.tuners import prepare_prefix_tuning

from .arguments import ObliviateTrainingArguments
from .hub_mixin import CompressedPushMixin

__all__ = ["ObliviateTrainer", "ObliviateTrainerMixin"]

logger = logging.getLogger(__name__)

TAGS = ["obliviate", "backdoor-defense", "peft"]


class ObliviateTrainerMixin:
    """The defense logic shared by :class:`ObliviateTrainer` and ``ObliviateSFTTrainer``.

    Subclasses call :meth:`_setup_obliviate` at the end of ``__init__`` and implement :meth:`_defense_inputs`
    (what the attention capture needs from a batch); :meth:`compute_loss` does the rest.
    """

    _tag_names = TAGS
    _name = "Obliviate"
    _paper = {
        "title": "Obliviate: Neutralizing Task-agnostic Backdoors within the Parameter-efficient Fine-tuning Paradigm",
        "id": "2409.14119",
    }

    def _setup_obliviate(self, consistency_pool: list[int] | None = None) -> None:
        args = self.args
        if not isinstance(args, ObliviateConfig):
            raise TypeError(
                f"{type(self).__name__} needs the defense fields: pass `args=ObliviateTrainingArguments(...)` "
                f"(or ObliviateSFTConfig for the SFT trainer) instead of {type(args).__name__}."
            )
        self.obliviate_config = args.obliviate_config()
        # Detached device tensors, turned into floats only when logging (no host sync per step).
        self._obliviate_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.obliviate_defense: ObliviateDefense | None = None
        self.obliviate_scan_tokens: list[str] | None = None  # what the trigger scan found (consistency_tokens="scan")
        prepare_prefix_tuning(self.model)  # undefended runs too: peft's prefix under transformers' current name
        if self.obliviate_config.obliviate:
            if self.obliviate_config.lambda_consistency > 0:
                _check_classifier(self.model)  # before the scan (the SFT config refuses the term itself)
                if consistency_pool is None:
                    consistency_pool = self._consistency_pool()
            self.obliviate_defense = ObliviateDefense(self.model, self.obliviate_config, token_pool=consistency_pool)
        unwrapped = self.model
        for tagged in (unwrapped, getattr(unwrapped, "base_model", None)):
            add_tags = getattr(tagged, "add_model_tags", None)
            if callable(add_tags):
                try:
                    add_tags(self._tag_names)
                except Exception:  # noqa: BLE001 - tags are cosmetic; never fail training over them
                    pass
                break

    def _consistency_pool(self) -> list[int]:
        """The consistency term's words: :func:`~hf_obliviate.consistency.rare_token_pool` of the tokenizer, or with
        ``consistency_tokens="scan"`` the top tokens of :func:`~hf_obliviate.consistency.scan_trigger_tokens` on the
        model as it is before training (logged)."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
            raise ValueError(
                "lambda_consistency > 0 inserts words into each batch, which needs the tokenizer: pass "
                "`processing_class=tokenizer` (or `consistency_pool=[token ids]`), or set lambda_consistency=0."
            )
        if self.obliviate_config.consistency_tokens == "scan":
            pool = scan_trigger_tokens(
                self.model,
                tokenizer,
                top_k=self.obliviate_config.consistency_scan_top_k,
                show_progress=not self.args.disable_tqdm and self.is_local_process_zero(),
            )
            self.obliviate_scan_tokens = tokenizer.convert_ids_to_tokens(pool)
            logger.info("Obliviate trigger scan, most suspicious first: %s", self.obliviate_scan_tokens)
            return pool
        pool = rare_token_pool(tokenizer)
        if not pool:
            raise ValueError(
                "The tokenizer has no short rare word tokens (2-4 lower-case letters, id >= 5000) for the consistency "
                "term: pass `consistency_pool=[token ids]` to the trainer, or set lambda_consistency=0."
            )
        return pool

    def _check_sharding(self) -> None:
        """Once, at the first defended step (after accelerate has wrapped the model): the amplification term needs
        whole PEFT tensors. DDP and FSDP2 (``DTensor`` parameters, gathered in :func:`~hf_obliviate.losses.
        amplification_loss`) give them; ZeRO-3 partitions and FSDP1 flattens them, which would silently make the
        term a norm of shards. The attention term uses activations only and works under all of them."""
        self._sharding_checked = True
        defense = self.obliviate_defense
        if defense is None or not defense.parameters:
            return
        partitioned = [
            name
            for name, p in zip(defense.parameter_names, defense.parameters)
            if getattr(p, "ds_numel", p.numel()) != p.numel()
        ]
        if partitioned:
            largest = max(int(p.ds_numel) for p in defense.parameters if hasattr(p, "ds_numel"))
            raise ValueError(
                f"DeepSpeed ZeRO-3 partitions the PEFT tensors ({partitioned[0]}, ...), so the amplification term "
                "would see shards. Keep them whole: set `stage3_param_persistence_threshold` in the DeepSpeed config "
                f"above {largest} (the largest adapter tensor), use ZeRO-2, or set `lambda_amp=0`."
            )
        plugin = getattr(getattr(self, "accelerator", None), "state", None)
        fsdp = getattr(plugin, "fsdp_plugin", None)
        if fsdp is not None and int(getattr(fsdp, "fsdp_version", 1) or 1) < 2:
            raise ValueError(
                "FSDP1 flattens and shards the PEFT tensors, so the amplification term would see shards. Use FSDP2 "
                "(`fsdp_version: 2` in the accelerate config / `fsdp_config={'version': 2}`), whose DTensor "
                "parameters are gathered for the term, or set `lambda_amp=0`."
            )

    def _extra_terms_scale(self, num_items_in_batch: Any) -> float:
        """Mirror of ``Trainer.training_step``: when it will not divide the returned loss by the accumulation steps
        (the task loss was normalised by ``num_items_in_batch`` over the whole accumulated batch), divide the extra
        terms here so the total does not change with the accumulation setting."""
        # `loss_is_scaled_for_ga` appeared in transformers 5.2x; older 5.x decide from the two conditions below.
        declared = getattr(self, "loss_is_scaled_for_ga", None)
        if declared is not None:
            scaled = declared
        else:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return 1.0 / steps if scaled else 1.0

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """The parent's loss; in training with the defense on, plus the Obliviate terms (:meth:`_defended_loss`)."""
        if self.obliviate_defense is None or not model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if not getattr(self, "_sharding_checked", False):
            self._check_sharding()
        num_items_in_batch, capture_inputs = self._defense_inputs(model, inputs, num_items_in_batch)
        return self._defended_loss(model, inputs, return_outputs, num_items_in_batch, **capture_inputs)

    def _defense_inputs(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> tuple[Any, dict[str, torch.Tensor | None]]:
        """``(num_items_in_batch, keyword arguments of ObliviateDefense.track)`` for one training batch."""
        raise NotImplementedError

    def _defended_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool,
        num_items_in_batch: torch.Tensor | int | None,
        **capture_inputs: torch.Tensor | None,
    ):
        """The defended training loss shared by both trainers: the parent's task loss computed inside
        ``defense.track(**capture_inputs)``, plus the weighted terms scaled for gradient accumulation; the task loss is
        logged per micro-batch (before that scaling)."""
        # Outputs only when the caller asks: trl's SFTTrainer answers return_outputs=True with a second (no-grad)
        # forward pass for the logits, a forward per step; grad_only keeps such a pass out of the term.
        consistency = self.obliviate_config.lambda_consistency > 0
        # the hidden target's clean side comes from this forward pass (its hidden states are kept for the backward
        # pass anyway) instead of a forward pass of its own
        hidden = consistency and self.obliviate_config.consistency_target in HIDDEN_TARGETS
        with self.obliviate_defense.track(**capture_inputs, grad_only=True) as step:
            result = super().compute_loss(
                model,
                {**inputs, "output_hidden_states": True} if hidden else inputs,
                return_outputs=return_outputs or consistency,
                num_items_in_batch=num_items_in_batch,
            )
        task_loss, outputs = result if return_outputs or consistency else (result, None)
        if consistency:  # outside the capture: the inserted copy's attention is not penalised
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            step.add_consistency(inputs, logits, model, outputs)
        terms = step.terms()
        scale = self._extra_terms_scale(num_items_in_batch)
        self._record_terms(task_loss / scale, terms)
        loss = task_loss + (step.penalty(terms) * scale).to(task_loss.device)
        return (loss, outputs) if return_outputs else loss

    def _record_terms(self, task_loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        self._obliviate_metrics["loss_task"].append(task_loss.detach().float().mean())
        for name, value in terms.items():
            self._obliviate_metrics[name].append(value.detach().float())

    def _flush_obliviate_metrics(self, logs: dict[str, float]) -> None:
        if "loss" in logs and self._obliviate_metrics:  # training logs only, never eval logs
            for name, values in self._obliviate_metrics.items():
                if values:
                    logs[name] = round(torch.stack([v.to(values[0].device) for v in values]).mean().item(), 6)
            self._obliviate_metrics.clear()


def _check_classifier(model: nn.Module) -> None:
    """The consistency term compares sequence-classification outputs: refuse other models before any training."""
    if not any(type(m).__name__.endswith("ForSequenceClassification") for m in model.modules()):
        raise ValueError(
            f"lambda_consistency > 0 (ObliviateTrainingArguments' default, with the vocabulary scan) needs a sequence "
            f"classifier (an ...ForSequenceClassification model), got {type(model).__name__}. Set "
            "lambda_consistency=0 with METHOD.md's terms instead (e.g. lambda_amp=3e-4, lambda_attn=3e-3), or use "
            "ObliviateSFTTrainer to fine-tune a causal LM."
        )


class ObliviateTrainer(ObliviateTrainerMixin, CompressedPushMixin, Trainer):
    """A drop-in ``transformers.Trainer`` for PEFT models that adds the Obliviate defense (METHOD.md §1).

    ``loss = L_task + λ_amp · L_amp + λ_attn · L_attn + λ_consistency · L_consistency``: ``L_amp`` amplifies the PEFT
    tensors, ``L_attn`` shrinks the pre-softmax attention logits of the summary query row, captured beside the
    model's own attention kernel (SDPA stays SDPA), and ``L_consistency`` pulls the model's summary state on a copy of
    the batch with a suspicious token inserted to its state on the batch (:mod:`hf_obliviate.consistency`). The
    defaults of :class:`hf_obliviate.ObliviateTrainingArguments` are the recipe the defense benchmark chose on its
    validation split (`CLASSIFIER_DEFAULTS`): the consistency term (relative to the batch's spread of summary states)
    with the tokens of a vocabulary scan run before training (pass ``processing_class=tokenizer``), and the
    attention term. The extra terms are scaled like the task
    loss under gradient accumulation and logged as ``loss_task``, ``loss_amp``, ``loss_attn`` and
    ``loss_consistency``. Evaluation and prediction are unchanged.

    Args:
        model (`torch.nn.Module`):
            A peft ``PeftModel`` (LoRA, DoRA, IA3, prefix tuning, ...) or a
            :class:`hf_obliviate.BottleneckAdapterModel`.
        args (`ObliviateTrainingArguments`):
            ``TrainingArguments`` plus the defense fields.
        consistency_pool (list of `int`, *optional*):
            Token ids the consistency term inserts (``lambda_consistency > 0``); default: the short rare words of
            ``processing_class`` (:func:`hf_obliviate.consistency.rare_token_pool`), or with
            ``consistency_tokens="scan"`` the tokens a vocabulary scan of the model finds
            (:func:`hf_obliviate.consistency.scan_trigger_tokens`).
        **kwargs:
            Everything ``transformers.Trainer`` accepts.

    Example:
    ```python
    >>> import torch
    >>> from datasets import Dataset
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_obliviate import ObliviateTrainer, ObliviateTrainingArguments
    >>> base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                                                 intermediate_size=64))
    >>> model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    >>> data = Dataset.from_dict({"input_ids": [[101, 7, 8, 102]] * 8, "attention_mask": [[1, 1, 1, 1]] * 8,
    ...                           "labels": [0, 1] * 4})
    >>> args = ObliviateTrainingArguments(output_dir="out", max_steps=2, per_device_train_batch_size=4,
    ...                                   report_to="none", lambda_amp=3e-4, lambda_attn=3e-3, lambda_consistency=0)
    >>> trainer = ObliviateTrainer(model=model, args=args, train_dataset=data)
    >>> _ = trainer.train()
    ```
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *,
        consistency_pool: list[int] | None = None,
        **kwargs,
    ):
        if args is None:
            args = ObliviateTrainingArguments(output_dir="trainer_output")
        super().__init__(model=model, args=args, **kwargs)
        self._setup_obliviate(consistency_pool)
        self._loss_kwargs_checked = False

    def _defense_inputs(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> tuple[Any, dict[str, torch.Tensor | None]]:
        if num_items_in_batch is not None and not self._loss_kwargs_checked:
            num_items_in_batch = self._check_model_consumes_num_items(model, inputs, num_items_in_batch)
        attention_mask = inputs.get("attention_mask")
        capture = self.obliviate_defense.capture  # compute_loss calls this only with the defense on
        query_mask = None
        if capture is not None and capture.query == "rows":
            # every real token's query row of a classifier (SFT picks the completion tokens instead); no mask: all
            query_mask = attention_mask
            if query_mask is None and isinstance(inputs.get("input_ids"), torch.Tensor):
                query_mask = torch.ones_like(inputs["input_ids"])
        return num_items_in_batch, {"attention_mask": attention_mask, "query_mask": query_mask}

    @torch.no_grad()
    def _check_model_consumes_num_items(self, model: nn.Module, inputs: dict, num_items_in_batch: Any) -> Any:
        """Once per run: does the model's loss actually use ``num_items_in_batch``?

        ``Trainer`` assumes so whenever ``forward`` takes ``**kwargs``, and then does not divide by the accumulation
        steps. Several sequence-classification heads (BERT's among them) take ``**kwargs`` but compute a plain mean,
        which would make the task loss grow with ``gradient_accumulation_steps``. If the loss does not change when
        ``num_items_in_batch`` doubles, we tell the Trainer the model does not consume it.
        """
        self._loss_kwargs_checked = True
        if not self.model_accepts_loss_kwargs or self.compute_loss_func is not None or "labels" not in inputs:
            return num_items_in_batch
        was_training = model.training
        model.eval()
        try:
            n = num_items_in_batch if torch.is_tensor(num_items_in_batch) else torch.tensor(num_items_in_batch)
            first = model(**inputs, num_items_in_batch=n)
            second = model(**inputs, num_items_in_batch=n * 2)
            consumes = not torch.allclose(first["loss"], second["loss"])
        except TypeError:
            consumes = False
        finally:
            model.train(was_training)
        if not consumes:
            logger.info("The model's loss ignores num_items_in_batch: gradient accumulation divides the loss instead.")
            self.model_accepts_loss_kwargs = False
            return None
        return num_items_in_batch

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._flush_obliviate_metrics(logs)
        super().log(logs, start_time)

    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        for tag in self._tag_names:
            if tag not in tags:
                tags.append(tag)
        return super().create_model_card(*args, tags=tags, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, BottleneckAdapterModel):
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            model.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            with open(f"{output_dir}/obliviate_training_args.json", "w") as handle:
                handle.write(self.args.to_json_string())
            return
        super()._save(output_dir, state_dict=state_dict)
