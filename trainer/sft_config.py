"""``ObliviateSFTConfig``: every ``trl.SFTConfig`` field plus the Obliviate defense and delta-push fields."""

from __future__ import annotations

import json
from dataclasses import dataclass

from trl import SFTConfig

from hf_obliviate.config import ObliviateConfig

from .arguments import DeltaPushArguments

__all__ = ["ObliviateSFTConfig"]


@dataclass
class ObliviateSFTConfig(ObliviateConfig, DeltaPushArguments, SFTConfig):
    """``trl.SFTConfig`` plus the defense fields of :class:`hf_obliviate.ObliviateConfig` (``obliviate``,
    ``lambda_amp``, ``lambda_attn``, ``amp_norm_cap``, ``attn_query``, ``attn_virtual_keys``, ``attn_centre``,
    ``peft_dropout``; not ``lambda_consistency``, which is for sequence classification) and the push fields of
    :class:`hf_obliviate.DeltaPushArguments`.

    For causal-LM SFT, ``attn_query="auto"`` penalises the query rows of every completion token (the positions whose
    label is not -100: the completion with ``completion_only_loss``, the assistant turns with ``assistant_only_loss``,
    every token of plain-text data), averaged per example, keys restricted to causal ones in the same sequence.

    trl turns gradient checkpointing on by default. The attention term works with non-reentrant checkpointing (the
    transformers 5 default, set explicitly here when unset); reentrant checkpointing runs the forward pass without
    autograd, so it would silently drop the term's gradient and is refused.

    Example:
    ```python
    >>> from hf_obliviate import ObliviateSFTConfig
    >>> args = ObliviateSFTConfig(output_dir="out", lambda_amp=3e-4, lambda_attn=3e-3, report_to="none")
    >>> args.obliviate_config().lambda_amp, args.gradient_checkpointing_kwargs["use_reentrant"]
    (0.0003, False)
    ```
    """

    def __post_init__(self):
        super().__post_init__()
        if self.obliviate and self.lambda_consistency > 0:
            raise ValueError(
                "lambda_consistency compares sequence-classification predictions (ObliviateTrainer); the SFT trainer "
                "does not support it yet. Set lambda_consistency=0."
            )
        if (
            self.obliviate
            and self.lambda_attn > 0
            and self.attn_centre is True
            and self.attn_query in ("auto", "rows")
        ):
            raise ValueError(
                "attn_centre=True centres one summary row per example; SFT penalises every completion token's row "
                "(attn_query='auto'). Set attn_centre=False, or attn_query='last' to penalise only the last token."
            )
        # transformers >= 5.2x: `gradient_checkpointing*` are deprecated aliases of `activation_checkpointing*`
        # (resolved above, the old names mirror the new ones); keep both in step.
        checkpointing = getattr(self, "activation_checkpointing", self.gradient_checkpointing)
        if not (self.obliviate and self.lambda_attn > 0 and checkpointing):
            return
        kwargs = getattr(self, "activation_checkpointing_kwargs", self.gradient_checkpointing_kwargs)
        if isinstance(kwargs, str):  # from the command line
            kwargs = json.loads(kwargs)
        kwargs = dict(kwargs or {})
        if kwargs.get("use_reentrant"):
            raise ValueError(
                "gradient_checkpointing_kwargs={'use_reentrant': True} runs the checkpointed forward pass without "
                "autograd, so the attention term would get no gradient. Use non-reentrant checkpointing (unset "
                "`use_reentrant` or set it to False), set `gradient_checkpointing=False`, or set `lambda_attn=0`."
            )
        kwargs["use_reentrant"] = False
        self.gradient_checkpointing_kwargs = kwargs
        if hasattr(self, "activation_checkpointing_kwargs"):
            self.activation_checkpointing_kwargs = kwargs
