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
    params = list(params)
    if not params:
        raise ValueError("amplification_loss got no tensors: the model has no trainable PEFT parameters.")
    stacked = _norms(params)
    if norm_cap is not None:
        if norm_cap <= 0:
            raise ValueError(f"norm_cap must be positive, got {norm_cap}.")
        stacked = stacked.clamp(max=norm_cap)
    return -stacked.sum()


def _norms(params: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms in fp32 (in no particular order), in as few kernels as possible: tensors of the same
    shape, dtype and device are stacked and reduced by one ``torch.linalg.vector_norm`` (LoRA has two shapes per
    target module type). The norm's gradient at a zero tensor is 0, not NaN (LoRA B at init)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        p = _full(p)
        groups.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
    device = params[0].device
    norms = [
        torch.linalg.vector_norm(torch.stack(group).float().reshape(len(group), -1), ord=2, dim=1).to(device)
        for group in groups.values()
    ]
    return norms[0] if len(norms) == 1 else torch.cat(norms)


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter: FSDP2 / tensor-parallel parameters are ``DTensor``s, and
    ``full_tensor()`` all-gathers them differentiably (the gradient flows back to each shard). The norm of a shard
    is not the shard's part of ``‖θ‖₂``, so never reduce the local shards alone."""
    full_tensor = getattr(param, "full_tensor", None)
    if full_tensor is not None and hasattr(param, "placements"):
        return full_tensor()
    return param


def attention_logit_loss(
    layer_norms: Sequence[torch.Tensor], layer_weights: Sequence[float] | None = None
) -> torch.Tensor:
    """``L_attn = (1/|layers|) Σ_ℓ mean_{b,h} ‖S^ℓ_{b,h,q*,:} ⊙ m_b‖₂`` from per-layer means already taken over b, h.

    ``layer_norms`` are the per-layer scalars that :class:`hf_obliviate.capture.AttentionLogitCapture` records.
    ``layer_weights`` (one per layer, in call order, ``>= 0``) turn the mean into the weighted mean
    ``Σ_ℓ w_ℓ n_ℓ / Σ_ℓ w_ℓ`` (``None``: METHOD.md's uniform mean).

    Example:
    ```python
    >>> import torch
    >>> from hf_obliviate.losses import attention_logit_loss
    >>> norms = [torch.tensor(2.0), torch.tensor(4.0)]
    >>> attention_logit_loss(norms).item(), attention_logit_loss(norms, [0.0, 1.0]).item()
    (3.0, 4.0)
    ```
    """
    if len(layer_norms) == 0:
        raise ValueError("attention_logit_loss got no layers: no attention call was captured.")
    norms = torch.stack(list(layer_norms))
    if layer_weights is None:
        return norms.mean()
    if len(layer_weights) != len(norms):
        raise ValueError(
            f"attn_layer_weights has {len(layer_weights)} weights but the forward pass made {len(norms)} captured "
            "attention calls (one per attention layer, first layer first): give one weight per layer, or None for "
            "the uniform mean."
        )
    weights = torch.tensor([float(w) for w in layer_weights], dtype=norms.dtype, device=norms.device)
    return (norms * weights).sum() / weights.sum()
