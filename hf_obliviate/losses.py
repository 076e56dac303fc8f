"""The two Obliviate loss terms (METHOD.md §1), as plain functions on tensors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["amplification_loss", "attention_logit_loss"]


def amplification_loss(params: Iterable[torch.Tensor], norm_cap: float | None = None) -> torch.Tensor:
    """``L_amp = − Σ_θ ‖θ‖₂`` over the given PEFT tensors (flattened Frobenius norm, not squared, not normalised).

    Minimising it grows the PEFT weights so that the clean-trained path dominates the frozen, possibly backdoored,
    pretrained path. The norm is ``torch.linalg.vector_norm``, whose gradient at ``θ = 0`` (LoRA B at init) is 0,
    not NaN.

    Args:
        params (iterable of `torch.Tensor`):
            The tuner's own trainable tensors (see :func:`hf_obliviate.tuners.tuner_parameters`).
        norm_cap (`float`, *optional*):
            Stop pushing a tensor once its norm exceeds this value (its term is clamped, with zero gradient). The
            sum is otherwise unbounded below.

    Example:
    ```python
    >>> import torch
    >>> from hf_obliviate.losses import amplification_loss
    >>> amplification_loss([torch.ones(2, 2), torch.zeros(3)]).item()
    -2.0
    ```
    """
    norms = [torch.linalg.vector_norm(p.float()) for p in params]
    if not norms:
        raise ValueError("amplification_loss got no tensors: the model has no trainable PEFT parameters.")
    stacked = torch.stack([n.to(norms[0].device) for n in norms])
    if norm_cap is not None:
        if norm_cap <= 0:
            raise ValueError(f"norm_cap must be positive, got {norm_cap}.")
        stacked = stacked.clamp(max=norm_cap)
    return -stacked.sum()


def attention_logit_loss(layer_norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``L_attn = (1/|layers|) Σ_ℓ mean_{b,h} ‖S^ℓ_{b,h,q*,:} ⊙ m_b‖₂`` from per-layer means already taken over b, h.

    ``layer_norms`` are the per-layer scalars that :class:`hf_obliviate.capture.AttentionLogitCapture` records.
    """
    if len(layer_norms) == 0:
        raise ValueError("attention_logit_loss got no layers: no attention call was captured.")
    return torch.stack(list(layer_norms)).mean()
