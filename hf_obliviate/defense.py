"""The Obliviate defense for any training loop: tuner selection, logit capture and the two loss terms together."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .capture import AttentionCaptureError, AttentionLogitCapture, CaptureRecord
from .config import HIDDEN_TARGETS, ObliviateConfig
from .consistency import (
    consistency_loss,
    hidden_consistency_loss,
    insert_random_tokens,
    rank_weights,
    relative_consistency_loss,
)
from .losses import amplification_loss
from .probing import hidden_states_of, summary_of, summary_state
from .tuners import peft_type_of, prepare_prefix_tuning, tuner_parameters

__all__ = ["DefenseStep", "ObliviateDefense"]

# Containers whose output is the PEFT path's output, for `peft_dropout` (peft's LoRA, our bottleneck adapter).
_OUTPUT_CONTAINERS = ("lora_B", "adapter_up")


def _check_layer_weights(configs: Sequence[Any], weights: Sequence[float] | None) -> None:
    """Refuse ``attn_layer_weights`` of the wrong length before training, where the model's configs (those the
    capture found) name one depth; otherwise (several attention stacks) the loss checks the captured calls."""
    if weights is None:
        return
    depths = {c.num_hidden_layers for c in configs if isinstance(getattr(c, "num_hidden_layers", None), int)}
    layers = depths.pop() if len(depths) == 1 else None
    if layers is not None and len(weights) != layers:
        raise ValueError(
            f"attn_layer_weights has {len(weights)} weights but the model has {layers} attention layers "
            "(config.num_hidden_layers): give one weight per layer, first layer first, or None for the plain mean."
        )


class DefenseStep:
    """The defense terms of one forward pass, available after the ``with defense.track(...)`` block."""

    def __init__(self, defense: ObliviateDefense):
        self.defense = defense
        self.record: CaptureRecord | None = None
        self.consistency: torch.Tensor | None = None

    def add_consistency(
        self,
        inputs: Mapping[str, Any],
        logits: torch.Tensor | None,
        model: nn.Module | None = None,
        outputs: Any = None,
    ) -> torch.Tensor:
        """Run the consistency copy of ``inputs`` (words of the token pool inserted) through ``model`` (default: the
        defense's model) and keep :meth:`ObliviateDefense.consistency_loss` as ``loss_consistency`` (``outputs``: the
        main forward pass's, whose hidden states then serve as the clean side of the hidden target).

        Call it after the ``with defense.track(...)`` block, so the copy's attention is not penalised."""
        self.consistency = self.defense.consistency_loss(inputs, logits, model, outputs)
        return self.consistency

    def terms(self) -> dict[str, torch.Tensor]:
        """Unweighted terms, those switched on: ``loss_amp`` (``−Σ‖θ‖₂``), ``loss_attn`` (mean logit-row norm) and
        ``loss_consistency`` (after :meth:`add_consistency`)."""
        out: dict[str, torch.Tensor] = {}
        config = self.defense.config
        if config.lambda_amp > 0:
            out["loss_amp"] = amplification_loss(self.defense.parameters, norm_cap=config.amp_norm_cap)
        if config.lambda_attn > 0:
            if self.record is None:
                raise AttentionCaptureError("terms() called before a forward pass ran inside `defense.track()`.")
            out["loss_attn"] = self.record.loss(config.attn_layer_weights)
        if config.lambda_consistency > 0:
            if self.consistency is None:
                raise ValueError(
                    "lambda_consistency > 0 but step.add_consistency(batch, logits) was not called after the forward "
                    "pass."
                )
            out["loss_consistency"] = self.consistency
        return out

    def penalty(self, terms: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``λ_amp · L_amp + λ_attn · L_attn + λ_consistency · L_consistency``."""
        terms = self.terms() if terms is None else terms
        config = self.defense.config
        total: torch.Tensor | None = None
        weights = (
            ("loss_amp", config.lambda_amp),
            ("loss_attn", config.lambda_attn),
            ("loss_consistency", config.lambda_consistency),
        )
        for name, weight in weights:
            if name in terms:
                term = weight * terms[name]
                total = term if total is None else total + term.to(total.device)
        return torch.zeros(()) if total is None else total


class ObliviateDefense:
    """Add the Obliviate defense to PEFT training in any loop (no Trainer needed).

    Args:
        model (`torch.nn.Module`):
            A PEFT model (peft ``PeftModel`` or :class:`hf_obliviate.BottleneckAdapterModel`).
        config (`ObliviateConfig`, *optional*):
            The defense settings; keyword arguments build one when omitted.
        token_pool (sequence of `int`, *optional*):
            Token ids the consistency term inserts (needed when ``lambda_consistency > 0``), e.g.
            :func:`hf_obliviate.consistency.rare_token_pool` of the tokenizer.

    Example:
    ```python
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_obliviate import ObliviateConfig, ObliviateDefense
    >>> base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                                                 intermediate_size=64))
    >>> model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    >>> defense = ObliviateDefense(model, ObliviateConfig(lambda_amp=3e-4, lambda_attn=3e-3))
    >>> batch = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
    ...          "labels": torch.tensor([0, 1])}
    >>> with defense.track(attention_mask=batch["attention_mask"]) as step:
    ...     out = model(**batch)
    >>> loss = out.loss + step.penalty()
    >>> loss.backward()
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        config: ObliviateConfig | None = None,
        token_pool: Sequence[int] | None = None,
        **kwargs,
    ):
        if config is None:
            config = ObliviateConfig(**kwargs)
        elif kwargs:
            raise TypeError("Pass either an ObliviateConfig or keyword arguments, not both.")
        if not isinstance(config, ObliviateConfig):
            raise TypeError(f"config must be an ObliviateConfig, got {type(config).__name__}.")
        self.model = model
        self.config = config.obliviate_config()
        self.parameter_names: list[str] = []
        self.parameters: list[nn.Parameter] = []
        named = tuner_parameters(model)  # also with lambda_amp = 0: the defense is for PEFT models, say so early
        prepare_prefix_tuning(model)  # a prefix peft cannot pass to this transformers: adapt it, or say so now
        if self.config.lambda_amp > 0:
            self.parameter_names = [n for n, _ in named]
            self.parameters = [p for _, p in named]
        self.capture: AttentionLogitCapture | None = None
        if self.config.lambda_attn > 0:
            self.capture = AttentionLogitCapture(
                model,
                query=self.config.attn_query,
                query_offset=_query_offset(model),
                virtual_keys=self.config.attn_virtual_keys,
                centre=self.config.attn_centre,
            )
            _check_layer_weights(self.capture.configs, self.config.attn_layer_weights)
        self.token_pool: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self._pool_weights: torch.Tensor | None = None  # consistency_sampling="rank": 1/k for the k-th token
        if self.config.lambda_consistency > 0:
            if token_pool is None or len(token_pool) == 0:
                raise ValueError(
                    "lambda_consistency > 0 needs the token ids to insert: pass token_pool="
                    "hf_obliviate.consistency.rare_token_pool(tokenizer) (the trainers build it from "
                    "`processing_class`), or set lambda_consistency=0."
                )
            self.token_pool = torch.as_tensor(list(token_pool), dtype=torch.long)
            if self.config.consistency_sampling == "rank":
                self._pool_weights = rank_weights(self.token_pool.numel())
            self._generator = torch.Generator().manual_seed(torch.initial_seed() % (2**63))
        self._hooks: list = []
        if self.config.peft_dropout > 0:
            self._install_dropout(self.config.peft_dropout)

    @contextmanager
    def track(
        self,
        attention_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        keep_logits: bool | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        grad_only: bool = False,
    ) -> Iterator[DefenseStep]:
        """Run forward passes inside this block; the yielded :class:`DefenseStep` then holds the terms.

        The arguments go to :meth:`hf_obliviate.AttentionLogitCapture.record` (``segment_ids`` / ``position_ids``:
        packed batches, keys stay within the query's own sequence; ``grad_only``: skip forwards run without
        autograd)."""
        step = DefenseStep(self)
        if self.capture is None:
            yield step
            return
        with self.capture.record(
            attention_mask=attention_mask,
            query_mask=query_mask,
            keep_logits=keep_logits,
            segment_ids=segment_ids,
            position_ids=position_ids,
            grad_only=grad_only,
        ) as rec:
            step.record = rec
            yield step

    def consistency_loss(
        self,
        inputs: Mapping[str, Any],
        logits: torch.Tensor | None,
        model: nn.Module | None = None,
        outputs: Any = None,
    ) -> torch.Tensor:
        """The consistency term on ``x'``, ``inputs`` with 1 to ``consistency_insertions`` words of the token pool
        inserted per row (:func:`hf_obliviate.consistency.insert_random_tokens`): ``KL(p(x) ‖ p(x'))`` against the
        model's ``logits`` on ``x`` (``consistency_target="logits"``), or the mean squared difference of the last
        layer's summary hidden states (``"hidden"``, :func:`hf_obliviate.probing.summary_state`: [CLS] for encoders),
        or that distance relative to the clean batch's spread of those states (``"relative"``, the clean states with
        their gradients, :func:`hf_obliviate.consistency.relative_consistency_loss`).
        The clean side of the hidden target is read from ``outputs`` (the model's outputs on ``inputs`` called with
        ``output_hidden_states=True``, as the trainers' main forward pass is) when they hold hidden states, else from
        an extra forward pass (without gradients for ``"hidden"``, with them for ``"relative"``)."""
        if self.token_pool is None:
            raise ValueError("The consistency term is off (lambda_consistency=0): nothing to compute.")
        model = model or self.model
        perturbed = insert_random_tokens(
            inputs, self.token_pool, self.config.consistency_insertions, self._generator, weights=self._pool_weights
        )
        if self.config.consistency_target in HIDDEN_TARGETS:
            clean = {k: v for k, v in inputs.items() if k in perturbed}
            in_outputs = hidden_states_of(outputs) is not None
            if self.config.consistency_target == "relative":  # with gradients: the clean spread is part of the term
                state = summary_of(model, clean, outputs) if in_outputs else summary_state(model, clean)[0]
                return relative_consistency_loss(state, summary_state(model, perturbed)[0])
            if in_outputs:
                target = summary_of(model, clean, outputs).detach()
            else:
                with torch.no_grad():
                    target = summary_state(model, clean)[0]
            return hidden_consistency_loss(target, summary_state(model, perturbed)[0])
        copy = model(**perturbed)  # ``outputs`` stays the main pass's
        other = copy["logits"] if isinstance(copy, Mapping) else getattr(copy, "logits", copy[0])
        return consistency_loss(logits, other)

    def remove(self) -> None:
        """Remove the ``peft_dropout`` hooks (the capture leaves nothing behind outside ``track``)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _install_dropout(self, p: float) -> None:
        dropout = nn.Dropout(p)

        def hook(module, args, output):
            return dropout(output) if module.training else output

        targets: list[nn.Module] = []
        for module in self.model.modules():
            names = getattr(module, "adapter_layer_names", ())
            for name in _OUTPUT_CONTAINERS:
                container = getattr(module, name, None) if name in names else None
                if isinstance(container, nn.ModuleDict):
                    targets.extend(container.values())
        prompt_encoder = getattr(self.model, "prompt_encoder", None)
        if isinstance(prompt_encoder, nn.ModuleDict):
            targets.extend(prompt_encoder.values())
        if not targets:
            raise ValueError(
                "peft_dropout is set but the tuner has no output module to apply it to (supported: LoRA, "
                "bottleneck adapters, prompt learning). Set peft_dropout=0."
            )
        self._hooks = [t.register_forward_hook(hook) for t in targets]


def _query_offset(model: nn.Module) -> int:
    """Prompt tuning / P-tuning prepend virtual *tokens* (not keys): the summary row moves right by their number."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    if peft_type_of(config) in ("PREFIX_TUNING", "CARTRIDGE"):
        return 0
    return int(config.num_virtual_tokens)
