"""Capture of pre-softmax attention logits for the summary query rows, beside the model's own attention kernel.

The Obliviate attention term needs ``S = Q Kᵀ · scaling`` (logits *before* softmax) for a few query rows per layer:
position 0 for BERT-style encoders, the last non-pad token for decoder classifiers, the completion tokens for
causal-LM SFT. ``output_attentions=True`` returns probabilities (and only on the eager path), and SDPA or flash
attention return neither. So we route the model's attention through transformers' ``AttentionInterface``:

* For the duration of :meth:`AttentionLogitCapture.record`, every config of the model has its
  ``_attn_implementation`` renamed from ``<impl>`` to ``obliviate:<impl>``. That name is registered with
  ``AttentionInterface`` (a wrapper) and with ``AttentionMaskInterface`` (the original mask builder), so the masks
  the model builds are exactly those of ``<impl>``.
* The wrapper calls the original kernel (``sdpa``, the model's own ``eager_attention_forward``, flash, flex, ...)
  with the same arguments, so the model's outputs are unchanged, and computes beside it only the needed rows:
  ``q_rows @ Kᵀ`` of shape ``(batch, heads, rows, keys)``. Memory per layer is O(rows × keys), never keys².
* Afterwards the configs get their original names back, so nothing leaks into ``save_pretrained``.

Key masking uses the 2D ``attention_mask`` of the batch (1 = real token). When the keys are longer than the mask
(prefix tuning prepends virtual keys) the mask is extended on the left: with ones by default, so prefix keys count
in the norm as in METHOD.md §1, or with zeros for ``virtual_keys="skip"`` (the prefix keys are prefix tuning's only
lever on the model, and penalising them collapsed it in `benchmarks/defense.py`). Padded keys are *selected out*
(``masked_fill`` with 0), never multiplied by a mask that holds ``-inf``. Causal attention modules only count keys
at or before each query row.

Packed (padding-free) batches have no ``attention_mask``; pass ``segment_ids`` (or ``position_ids``, from which
:func:`segments_from_position_ids` derives them: a new sequence starts wherever the position restarts at 0) and a
query row then only counts keys of its own sequence.

Gradient checkpointing: the row logits are computed by custom autograd functions that keep their inputs (the
layer's query and key states) on the autograd context instead of saving them through ``saved_tensors_hooks``. So
non-reentrant checkpointing neither sees nor recomputes them: re-running a layer during backward (outside
``record()``) calls the plain kernel, adds nothing to the record and the saved-tensor order of the layer is
unchanged. The price is that each layer's query and key states stay alive until backward. Reentrant checkpointing
runs the forward without autograd, so it cannot carry the term's gradient: the trainers refuse it.

With ``query="rows"`` (completion tokens in SFT) there can be as many rows as keys. Those rows are reduced to
their norms inside the forward pass, in chunks of rows, and the backward pass recomputes each chunk, so a layer
never holds more than one chunk of ``rows × keys`` logits (nothing of that size is kept for backward).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .losses import attention_logit_loss

__all__ = [
    "QUERY_MODES",
    "AttentionCaptureError",
    "AttentionLogitCapture",
    "CaptureRecord",
    "LayerCapture",
    "segments_from_position_ids",
]

QUERY_MODES = ("auto", "first", "last", "rows")
# Keys before the sequence's own (prefix tuning's virtual keys): counted in the row norm (METHOD.md §1) or skipped.
VIRTUAL_KEY_MODES = ("count", "skip")
_PREFIX = "obliviate:"
_REGISTERED: set[str] = set()
_LOCK = threading.Lock()
# id(attention module) -> active recording session; filled only inside `record()`.
_ACTIVE: dict[int, _Session] = {}
# Elements of one chunk of (batch, heads, rows, keys) logits in the fused rows path (64 MiB in fp32).
_CHUNK_ELEMENTS = 1 << 24


def segments_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``(batch, seq_len)`` sequence index of each token of a packed batch: a sequence starts where the position is 0.

    Example:
    ```python
    >>> import torch
    >>> from hf_obliviate.capture import segments_from_position_ids
    >>> segments_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0]])).tolist()
    [[0, 0, 0, 1, 1, 2]]
    ```
    """
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    return (position_ids == 0).long().cumsum(dim=-1) - 1


def _select_rows(query: torch.Tensor, rows: torch.Tensor, uniform: int | None) -> torch.Tensor:
    batch, heads, _, head_dim = query.shape
    if uniform is not None:
        return query.narrow(2, uniform, 1)  # a view: no gather kernel
    return torch.gather(query, 2, rows[:, None, :, None].expand(batch, heads, rows.shape[1], head_dim))


def _scatter_rows(query: torch.Tensor, rows: torch.Tensor, uniform: int | None, grad_rows: torch.Tensor):
    grad = torch.zeros_like(query)
    if uniform is not None:
        grad.narrow(2, uniform, 1).copy_(grad_rows)
        return grad
    batch, heads, _, head_dim = query.shape
    index = rows[:, None, :, None].expand(batch, heads, rows.shape[1], head_dim)
    return grad.scatter_add_(2, index, grad_rows.to(grad.dtype))


def _grouped_logits(q_rows: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``q_rows @ Kᵀ`` with grouped-query attention: query head h reads key head h // n_rep (no repeated keys)."""
    batch, heads, n_rows, head_dim = q_rows.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    grouped = q_rows.reshape(batch, kv_heads, (heads // kv_heads) * n_rows, head_dim)
    return torch.matmul(grouped, key.transpose(-1, -2)).reshape(batch, heads, n_rows, kv_len)


def _grouped_backward(grad: torch.Tensor, q_rows: torch.Tensor, key: torch.Tensor):
    """Gradients of :func:`_grouped_logits` w.r.t. ``q_rows`` and ``key`` for an upstream ``grad`` of its output."""
    batch, heads, n_rows, head_dim = q_rows.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    grad = grad.to(key.dtype).reshape(batch, kv_heads, -1, kv_len)
    grouped = q_rows.reshape(batch, kv_heads, -1, head_dim)
    grad_rows = torch.matmul(grad, key).reshape(batch, heads, n_rows, head_dim)
    grad_key = torch.matmul(grad.transpose(-1, -2), grouped)
    return grad_rows, grad_key


class _RowLogits(torch.autograd.Function):
    """``(batch, heads, rows, keys)`` unscaled logits of the selected rows. Inputs live on ``ctx`` (not
    ``save_for_backward``) so that checkpointing's saved-tensor hooks do not see them (see the module docstring)."""

    @staticmethod
    def forward(ctx, query, key, rows, uniform):
        ctx.query, ctx.key, ctx.rows, ctx.uniform = query, key, rows, uniform
        return _grouped_logits(_select_rows(query, rows, uniform), key)

    @staticmethod
    def backward(ctx, grad):
        query, key, rows, uniform = ctx.query, ctx.key, ctx.rows, ctx.uniform
        grad_rows, grad_key = _grouped_backward(grad, _select_rows(query, rows, uniform), key)
        grad_query = _scatter_rows(query, rows, uniform, grad_rows) if ctx.needs_input_grad[0] else None
        return grad_query, grad_key if ctx.needs_input_grad[1] else None, None, None


class _RowNorms(torch.autograd.Function):
    """``(batch, heads, rows)`` fp32 norms ``‖S_row ⊙ m‖₂`` of the unscaled logits, computed in chunks of rows; the
    backward pass recomputes each chunk instead of keeping ``rows × keys`` logits.

    ``plan`` is a tuple of ``(start, stop, key_limit)``: the chunk's rows and the keys it needs. In causal layers a
    chunk never sees keys after its last row, so they are skipped (they are masked anyway)."""

    @staticmethod
    def forward(ctx, query, key, rows, dropped, plan):
        ctx.query, ctx.key, ctx.rows, ctx.dropped, ctx.plan = query, key, rows, dropped, plan
        norms = torch.cat([_RowNorms._chunk(query, key, rows, dropped, *chunk)[1] for chunk in plan], dim=2)
        ctx.norms = norms.detach()  # a detached alias: storing the output itself would make a reference cycle
        return norms

    @staticmethod
    def _chunk(query, key, rows, dropped, start, stop, limit):
        key = key[:, :, :limit]
        q_rows = _select_rows(query, rows[:, start:stop], None)
        logits = _grouped_logits(q_rows, key)
        if dropped is not None:
            logits = logits.masked_fill(dropped[:, :, start:stop, :limit], 0.0)  # select, never multiply by -inf
        return q_rows, torch.linalg.vector_norm(logits, ord=2, dim=-1, dtype=torch.float32), logits

    @staticmethod
    def backward(ctx, grad_norms):
        query, key, rows, dropped, norms = ctx.query, ctx.key, ctx.rows, ctx.dropped, ctx.norms
        # d‖s‖/ds = s / ‖s‖, and 0 (not NaN) where ‖s‖ = 0, like torch.linalg.vector_norm.
        coef = torch.where(norms > 0, grad_norms / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
        grad_query = torch.zeros_like(query) if ctx.needs_input_grad[0] else None
        grad_key = torch.zeros_like(key, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        batch, heads, _, head_dim = query.shape
        for start, stop, limit in ctx.plan:
            q_rows, _, logits = _RowNorms._chunk(query, key, rows, dropped, start, stop, limit)
            grad_logits = logits.float() * coef[:, :, start:stop, None]
            grad_rows, chunk_key = _grouped_backward(grad_logits, q_rows, key[:, :, :limit])
            if grad_key is not None:
                grad_key[:, :, :limit] += chunk_key.float()
            if grad_query is not None:
                chunk_rows = rows[:, start:stop]
                index = chunk_rows[:, None, :, None].expand(batch, heads, chunk_rows.shape[1], head_dim)
                grad_query.scatter_add_(2, index, grad_rows.to(grad_query.dtype))
        if grad_key is not None:
            grad_key = grad_key.to(key.dtype)
        return grad_query, grad_key, None, None, None


class AttentionCaptureError(RuntimeError):
    """Raised when the attention logits of a model cannot be captured; the message says how to switch."""


@dataclass
class LayerCapture:
    """What one attention call contributed.

    Attributes:
        norm (`torch.Tensor`): scalar, mean over batch, heads and query rows of ``‖S_row ⊙ m‖₂`` (differentiable).
        logits (`torch.Tensor`, *optional*): detached ``(batch, heads, rows, keys)`` pre-softmax logits, padded keys
            set to ``-inf`` (only with ``keep_logits=True``).
        key_mask (`torch.Tensor`, *optional*): ``(batch, rows, keys)`` boolean mask of the counted keys.
        rows (`torch.Tensor`, *optional*): ``(batch, rows)`` query positions.
    """

    norm: torch.Tensor
    logits: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    rows: torch.Tensor | None = None


@dataclass
class _Pending:
    raw: torch.Tensor  # (batch, heads, rows, keys) unscaled Q Kᵀ of the summary rows, or (fused) their fp32 norms
    fused: bool  # True: `raw` already holds the (batch, heads, rows) masked row norms
    masks: tuple[torch.Tensor, torch.Tensor] | None
    row_valid: torch.Tensor | None
    rows: torch.Tensor
    scaling: float
    keep_logits: bool
    centred: bool = False  # subtract the row's mean over its counted keys before the norm


class CaptureRecord:
    """The result of one recorded forward pass: one :class:`LayerCapture` per attention call, in call order.

    During the forward pass each layer only computes its ``q_rows @ Kᵀ`` (one small matmul beside the attention
    kernel); masking and norms are done for all layers at once, in a handful of batched kernels, when
    :attr:`layers` or :meth:`loss` is first read. That keeps the per-step kernel count low on GPUs, where small
    models are launch-bound.
    """

    def __init__(self, centre: bool | None = False):
        self.centre = centre
        self._pending: list[_Pending] = []
        self._layers: list[LayerCapture] = []
        self._loss: torch.Tensor | None = None

    @property
    def layers(self) -> list[LayerCapture]:
        self._finalize()
        return self._layers

    def loss(self, layer_weights: Sequence[float] | None = None) -> torch.Tensor:
        """``L_attn = (1/|layers|) Σ_ℓ mean_{b,h} ‖S^ℓ_{b,h,q*,:} ⊙ m_b‖₂`` (METHOD.md §1); with several rows q* per
        example (completion tokens) their norms are averaged per example first. With ``centre=True`` each row's mean
        over its counted keys is subtracted first. ``layer_weights``: a weighted mean over the layers instead
        (:func:`hf_obliviate.losses.attention_logit_loss`)."""
        self._finalize()
        if not self._layers:
            raise AttentionCaptureError(
                "No attention call was captured during the forward pass. The model does not route attention "
                "through transformers' AttentionInterface (or the forward ran outside `record()`). Use a model "
                "whose attention supports `attn_implementation` switching, or set `lambda_attn=0`."
            )
        if layer_weights is not None:
            return attention_logit_loss([layer.norm for layer in self._layers], layer_weights)
        if self._loss is None:
            self._loss = attention_logit_loss([layer.norm for layer in self._layers])
        return self._loss

    def _finalize(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(pending):
            key = (
                tuple(item.raw.shape), item.raw.dtype, item.raw.device, id(item.masks), id(item.row_valid), item.fused,
                item.centred,
            )  # fmt: skip
            groups.setdefault(key, []).append(i)
        norms: list[torch.Tensor | None] = [None] * len(pending)
        single = len(groups) == 1 and len({item.scaling for item in pending}) == 1
        for idx in groups.values():
            first = pending[idx[0]]
            if first.fused:
                row_norms = torch.stack([pending[i].raw for i in idx])  # (layers, batch, heads, rows)
            else:
                values = torch.stack([pending[i].raw for i in idx]).float()  # (layers, batch, heads, rows, keys)
                if first.masks is not None:
                    values = values.masked_fill(first.masks[1][None], 0.0)  # select, never multiply by -inf
                if first.centred:
                    # softmax ignores a row's mean: penalise only the spread (the mean over the counted keys).
                    if first.masks is None:
                        values = values - values.mean(dim=-1, keepdim=True)
                    else:
                        counted = (~first.masks[1][None]).to(values.dtype)
                        mean = values.sum(dim=-1, keepdim=True) / counted.sum(dim=-1, keepdim=True).clamp_min(1.0)
                        values = (values - mean) * counted
                row_norms = torch.linalg.vector_norm(values, ord=2, dim=-1)  # gradient 0 (not NaN) at 0
            if first.row_valid is None:
                per_layer = row_norms.mean(dim=(1, 2, 3))
            else:
                # Rows are averaged per example, then examples (with at least one row) and heads: a mean over
                # examples, so equal micro-batches under gradient accumulation or DDP give the full batch's value.
                valid = first.row_valid.to(row_norms.dtype)
                weights = valid / valid.sum(dim=1, keepdim=True).clamp_min(1.0)
                examples = (valid.sum(dim=1) > 0).sum().clamp_min(1) * row_norms.shape[2]
                per_layer = (row_norms * weights[None, :, None, :]).sum(dim=(1, 2, 3)) / examples
            # ‖scaling · S‖ = scaling · ‖S‖: scale the per-layer norms, not the logits.
            scales = torch.tensor([pending[i].scaling for i in idx], dtype=per_layer.dtype, device=per_layer.device)
            per_layer = per_layer * scales if not single else per_layer * first.scaling
            if single:
                self._loss = per_layer.mean()
            for position, i in enumerate(idx):
                norms[i] = per_layer[position]
        for item, norm in zip(pending, norms):
            capture = LayerCapture(norm=norm)
            if item.keep_logits:
                batch, _, n_rows, kv_len = item.raw.shape
                if item.masks is None:
                    counted = torch.ones(batch, n_rows, kv_len, dtype=torch.bool, device=item.raw.device)
                else:
                    counted = item.masks[0]
                logits = item.raw.detach().float() * item.scaling
                capture.logits = logits.masked_fill(~counted[:, None, :, :], float("-inf"))
                capture.key_mask = counted
                capture.rows = item.rows
            self._layers.append(capture)


class _Session:
    def __init__(
        self,
        record: CaptureRecord,
        mode: str,
        attention_mask: torch.Tensor | None,
        query_mask: torch.Tensor | None,
        query_offset: int,
        keep_logits: bool,
        segment_ids: torch.Tensor | None = None,
        grad_only: bool = False,
        virtual_keys: str = "count",
    ):
        self.record = record
        self.segment_ids = segment_ids
        self.virtual_keys = virtual_keys
        self.grad_only = grad_only
        self.mode = mode
        self.attention_mask = attention_mask
        self.query_mask = query_mask
        self.query_offset = query_offset
        self.keep_logits = keep_logits
        self._rows_cache: dict[tuple, object] = {}

    def key_mask(self, batch: int, kv_len: int, device: torch.device, q_len: int | None = None) -> torch.Tensor | None:
        mask = self.attention_mask
        cache_key = ("keys", batch, kv_len, q_len)
        if cache_key in self._rows_cache:
            return self._rows_cache[cache_key]
        if mask is None:
            if self.virtual_keys == "count" or q_len is None or kv_len <= q_len:
                return None
            mask = torch.ones(batch, q_len, dtype=torch.bool, device=device)  # only the virtual keys are masked
        mask = mask.to(device=device).bool()
        if mask.dim() != 2 or mask.shape[0] != batch:
            raise AttentionCaptureError(
                f"attention_mask must be a 2D (batch, seq_len) tensor of 0/1 with batch {batch}; got shape "
                f"{tuple(mask.shape)}. Pass the tokenizer's attention_mask to `record()`."
            )
        if mask.shape[1] < kv_len:  # prefix / virtual keys come first and are always attended to
            virtual = mask.new_ones if self.virtual_keys == "count" else mask.new_zeros
            mask = torch.cat([virtual(batch, kv_len - mask.shape[1]), mask], dim=1)
        elif mask.shape[1] > kv_len:
            raise AttentionCaptureError(
                f"attention_mask has {mask.shape[1]} positions but the attention layer sees {kv_len} keys. "
                "Sliding-window or cropped caches are not supported by the attention term."
            )
        self._rows_cache[cache_key] = mask
        return mask

    def rows(
        self, module: nn.Module, batch: int, q_len: int, kv_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """``(batch, rows)`` query positions, their validity (``None``: all valid), and the position shared by all
        examples when there is one row at the same place everywhere (``"first"``), else ``None``."""
        causal = bool(getattr(module, "is_causal", False))
        mode = self.mode
        if mode == "auto":
            mode = "last" if causal else "first"
        key = (mode, batch, q_len, kv_mask.shape[1])
        if key in self._rows_cache:
            return self._rows_cache[key]
        device = kv_mask.device
        if mode == "first":
            if self.query_offset >= q_len:
                raise AttentionCaptureError(f"query offset {self.query_offset} is outside the {q_len} query rows.")
            rows = torch.full((batch, 1), self.query_offset, dtype=torch.long, device=device)
            valid = None
            uniform = self.query_offset
        elif mode == "last":
            token_mask = kv_mask[:, -q_len:]
            positions = torch.arange(q_len, device=device).expand(batch, q_len)
            rows = torch.where(token_mask, positions, torch.full_like(positions, -1)).amax(dim=1, keepdim=True)
            valid = rows >= 0
            rows = rows.clamp_min(0)
            uniform = None
        else:  # "rows"
            if self.query_mask is None:
                raise AttentionCaptureError("query mode 'rows' needs a `query_mask` of shape (batch, seq_len).")
            qmask = self.query_mask.to(device=device).bool()
            if qmask.shape[0] != batch:
                raise AttentionCaptureError(f"query_mask has batch {qmask.shape[0]}, the model has batch {batch}.")
            if qmask.shape[1] < q_len:
                qmask = torch.cat([qmask.new_zeros(batch, q_len - qmask.shape[1]), qmask], dim=1)
            elif qmask.shape[1] > q_len:
                raise AttentionCaptureError(f"query_mask has {qmask.shape[1]} positions for {q_len} query rows.")
            n_rows = max(int(qmask.sum(dim=1).max().item()), 1)
            # Stable sort puts the selected positions first, in order.
            order = torch.sort((~qmask).to(torch.int8), dim=1, stable=True).indices
            rows = order[:, :n_rows]
            valid = torch.gather(qmask, 1, rows)
            uniform = None
        self._rows_cache[key] = (rows, valid, uniform)
        return rows, valid, uniform

    def counted_keys(
        self, module: nn.Module, rows: torch.Tensor, q_len: int, kv_mask: torch.Tensor | None, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(batch, rows, keys)`` mask of the keys that count and its ``(batch, 1, rows, keys)`` complement, or
        ``None`` when every key counts."""
        causal = bool(getattr(module, "is_causal", False))
        if kv_mask is None and not causal and self.segment_ids is None:
            return None
        key = ("counted", causal, tuple(rows.shape), q_len, kv_len)
        if key not in self._rows_cache:
            batch, n_rows = rows.shape
            if kv_mask is None:
                counted = torch.ones(batch, n_rows, kv_len, dtype=torch.bool, device=rows.device)
            else:
                counted = kv_mask[:, None, :].expand(batch, n_rows, kv_len)
            if causal:
                # Key j is visible to query row i when j <= i + (kv_len - q_len) (cached / prefix keys come first).
                key_pos = torch.arange(kv_len, device=rows.device)
                counted = counted & (key_pos[None, None, :] <= (rows + (kv_len - q_len))[:, :, None])
            if self.segment_ids is not None:
                counted = counted & self.same_segment(rows, q_len, kv_len)
            self._rows_cache[key] = (counted, ~counted[:, None, :, :])
        return self._rows_cache[key]

    def chunk_plan(
        self, module: nn.Module, rows: torch.Tensor, heads: int, q_len: int, kv_len: int
    ) -> tuple[tuple[int, int, int], ...]:
        """``(start, stop, key_limit)`` chunks of rows for :class:`_RowNorms`, the same for every layer of a pass
        (computed once per ``record()``: one host sync)."""
        causal = bool(getattr(module, "is_causal", False))
        batch, n_rows = rows.shape
        key = ("plan", causal, batch, n_rows, heads, q_len, kv_len)
        if key not in self._rows_cache:
            step = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * kv_len))
            if causal and n_rows >= 256:  # 4+ chunks: each skips the keys after its last row (~40% less work)
                step = min(step, -(-n_rows // 4))
            starts = list(range(0, n_rows, step))
            if causal:
                # The last key a chunk can see: its largest row position (+ prefix / cached keys), for every example.
                padded = torch.nn.functional.pad(rows, (0, len(starts) * step - n_rows), value=0)
                last = padded.reshape(batch, len(starts), step).amax(dim=(0, 2)) + (kv_len - q_len) + 1
                limits = [min(int(v), kv_len) for v in last.tolist()]
            else:
                limits = [kv_len] * len(starts)
            self._rows_cache[key] = tuple((a, min(a + step, n_rows), lim) for a, lim in zip(starts, limits))
        return self._rows_cache[key]

    def same_segment(self, rows: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
        """``(batch, rows, keys)``: key j is in the same packed sequence as the query row (prefix keys: always)."""
        segments = self.segment_ids.to(device=rows.device)
        if segments.dim() == 1:
            segments = segments[None]
        batch = rows.shape[0]
        if segments.shape[0] != batch or segments.shape[1] != q_len or kv_len < q_len:
            raise AttentionCaptureError(
                f"segment_ids must have shape (batch, seq_len) = ({batch}, {q_len}); got {tuple(segments.shape)}. "
                "Pass the packed batch's position_ids (or segment ids) to `record()`."
            )
        row_segments = torch.gather(segments, 1, rows)  # (batch, rows)
        same = segments[:, None, :] == row_segments[:, :, None]  # (batch, rows, q_len)
        if kv_len > q_len:  # prefix / cached keys come first
            virtual = same.new_ones if self.virtual_keys == "count" else same.new_zeros
            same = torch.cat([virtual(batch, rows.shape[1], kv_len - q_len), same], dim=2)
        return same

    def observe(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        scaling: float | None,
    ) -> None:
        batch, heads, q_len, head_dim = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        if heads % kv_heads != 0:
            raise AttentionCaptureError(f"{heads} query heads cannot share {kv_heads} key heads.")
        if scaling is None:
            scaling = head_dim**-0.5
        kv_mask = self.key_mask(batch, kv_len, query.device, q_len)
        if kv_mask is None:
            token_mask = query.new_ones(batch, kv_len, dtype=torch.bool)
        else:
            token_mask = kv_mask
        rows, row_valid, uniform = self.rows(module, batch, q_len, token_mask)
        masks = self.counted_keys(module, rows, q_len, kv_mask, kv_len)
        # Many rows (completion tokens): reduce each chunk of rows to norms now; else keep the few rows' logits and
        # mask / reduce all layers at once in `CaptureRecord._finalize`.
        fused = rows.shape[1] > 1 and not self.keep_logits
        if self.record.centre is True and rows.shape[1] > 1:
            raise AttentionCaptureError(
                "Centred attention logits (attn_centre=True) are supported for one summary row per example (encoders, "
                "sequence classification), not for many query rows such as SFT completion tokens: set "
                "attn_centre=False."
            )
        if fused:
            plan = self.chunk_plan(module, rows, heads, q_len, kv_len)
            raw = _RowNorms.apply(query, key, rows, None if masks is None else masks[1], plan)
        else:
            raw = _RowLogits.apply(query, key, rows, uniform)
        # centre=None ("auto"): centred where the penalised query is one summary row per example
        centred = self.record.centre is True or (self.record.centre is None and rows.shape[1] == 1)
        self.record._pending.append(
            _Pending(raw, fused, masks, row_valid, rows, float(scaling), self.keep_logits, centred)
        )


_KERNELS: dict[tuple[str | None, type], object] = {}


def _original_kernel(impl: str | None, module: nn.Module):
    key = (impl, type(module))
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = _find_kernel(impl, module)
    return kernel


def _find_kernel(impl: str | None, module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl in (None, "eager"):
        modeling = sys.modules.get(type(module).__module__)
        kernel = getattr(modeling, "eager_attention_forward", None)
        if kernel is None:
            raise AttentionCaptureError(
                f"{type(module).__name__} has no module-level `eager_attention_forward`, so its eager path cannot "
                "be wrapped. Load the model with attn_implementation='sdpa' to use the attention term."
            )
        return kernel
    if impl not in ALL_ATTENTION_FUNCTIONS:
        raise AttentionCaptureError(
            f"Attention implementation {impl!r} is not registered in transformers' AttentionInterface; load the "
            "model with attn_implementation='sdpa' (or 'eager') to use the attention term."
        )
    return ALL_ATTENTION_FUNCTIONS[impl]


def _make_wrapper(impl: str | None):
    # Flash / hub kernels look their own name up on the config; sdpa and eager do not (skip the swap's cost).
    swap_name = impl not in (None, "eager", "sdpa")

    def obliviate_attention(module, query, key, value, attention_mask, *args, **kwargs):
        kernel = _original_kernel(impl, module)
        config = getattr(module, "config", None) if swap_name else None
        if config is not None:
            # Let the kernel see its own name (flash / kernels look it up on the config).
            renamed = config._attn_implementation_internal
            config._attn_implementation_internal = impl
        try:
            output = kernel(module, query, key, value, attention_mask, *args, **kwargs)
        finally:
            if config is not None:
                config._attn_implementation_internal = renamed
        session = _ACTIVE.get(id(module))
        if session is not None and (torch.is_grad_enabled() or not session.grad_only):
            session.observe(module, query, key, kwargs.get("scaling"))
        return output

    obliviate_attention.__name__ = f"obliviate_{impl}"
    return obliviate_attention


def _register(impl: str | None) -> str:
    name = f"{_PREFIX}{impl or 'eager'}"
    if name in _REGISTERED:
        return name
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    with _LOCK:
        if name not in _REGISTERED:
            AttentionInterface.register(name, _make_wrapper(impl))
            mask_impl = impl or "eager"
            if mask_impl in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
                AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[mask_impl])
            _REGISTERED.add(name)
    return name


def _model_configs(model: nn.Module) -> list:
    from transformers import PreTrainedModel

    seen: dict[int, object] = {}
    stack = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while stack:
        config = stack.pop()
        if config is None or id(config) in seen:
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            stack.append(getattr(config, key, None))
    return list(seen.values())


class AttentionLogitCapture:
    """Capture pre-softmax attention logits of selected query rows, whatever ``attn_implementation`` was loaded.

    Args:
        model (`torch.nn.Module`):
            A transformers model, a peft ``PeftModel`` around one, or any module containing transformers models.
        query (`str`, *optional*, defaults to `"auto"`):
            Which query rows: `"first"` (position 0, CLS / ``<s>``), `"last"` (last non-pad token), `"rows"`
            (the rows of a ``query_mask`` given to :meth:`record`, e.g. completion tokens), or `"auto"` (`"last"`
            in causal attention modules, `"first"` otherwise).
        query_offset (`int`, *optional*, defaults to 0):
            Offset of the `"first"` row, for tuners that prepend virtual tokens to the input (prompt tuning).
        keep_logits (`bool`, *optional*, defaults to `False`):
            Also keep detached logits, key masks and rows on each :class:`LayerCapture` (for inspection).
        virtual_keys (`str`, *optional*, defaults to `"count"`):
            Prefix tuning's virtual keys in the norm: `"count"` or `"skip"`.
        centre (`bool`, *optional*, defaults to `False`):
            Subtract each row's mean over its counted keys before the norm (`‖S − mean S‖₂`): softmax ignores the
            mean, so only the spread that moves attention is penalised. One summary row per example only (`True`
            with many rows, e.g. SFT completion tokens, raises); `None` centres where there is one row per example
            and keeps the raw norm elsewhere.

    Example:
    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from hf_obliviate.capture import AttentionLogitCapture
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    >>> capture = AttentionLogitCapture(model, query="first")
    >>> ids, mask = torch.randint(0, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    >>> with capture.record(attention_mask=mask) as rec:
    ...     _ = model(input_ids=ids, attention_mask=mask)
    >>> len(rec.layers), rec.loss().dim()
    (2, 0)
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        query: str = "auto",
        query_offset: int = 0,
        keep_logits: bool = False,
        virtual_keys: str = "count",
        centre: bool | None = False,
    ):
        if query not in QUERY_MODES:
            raise ValueError(f"Unknown query mode {query!r}: choose one of {', '.join(QUERY_MODES)}.")
        if virtual_keys not in VIRTUAL_KEY_MODES:
            raise ValueError(f"Unknown virtual_keys {virtual_keys!r}: choose one of {', '.join(VIRTUAL_KEY_MODES)}.")
        self.virtual_keys = virtual_keys
        if centre not in (True, False, None):
            raise ValueError(f"centre must be True, False or None (auto), got {centre!r}.")
        self.centre = centre
        self.model = model
        self.query = query
        self.query_offset = query_offset
        self.keep_logits = keep_logits
        configs = self._configs = _model_configs(model)
        # Modules that can call an attention kernel (they carry a config); the model's structure is fixed.
        self._modules = [m for m in model.modules() if hasattr(m, "config")]
        if not configs:
            raise AttentionCaptureError(
                f"{type(model).__name__} contains no transformers PreTrainedModel, so its attention cannot be "
                "captured."
            )
        for module in model.modules():
            can_set = getattr(module, "_can_set_attn_implementation", None)
            if callable(can_set) and not can_set():
                raise AttentionCaptureError(
                    f"{type(module).__name__} does not route attention through transformers' AttentionInterface, "
                    "so pre-softmax logits cannot be captured. Use a model class that supports "
                    "`set_attn_implementation`, or train with `lambda_attn=0`."
                )

    @property
    def configs(self) -> list:
        """The transformers configs of the model's attention stacks: the capture switches their attention
        implementation inside [`record`] (their ``num_hidden_layers`` give the depth of each stack)."""
        return list(self._configs)

    @contextmanager
    def record(
        self,
        attention_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        keep_logits: bool | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        grad_only: bool = False,
    ) -> Iterator[CaptureRecord]:
        """Record the attention calls of the forward passes run inside the ``with`` block.

        Args:
            attention_mask (`torch.Tensor`, *optional*): the batch's 2D mask (1 = token, 0 = pad).
            query_mask (`torch.Tensor`, *optional*): 2D boolean mask of query rows, for ``query="rows"``.
            keep_logits (`bool`, *optional*): override the instance's ``keep_logits``.
            segment_ids (`torch.Tensor`, *optional*): ``(batch, seq_len)`` sequence index of each token of a packed
                (padding-free) batch; a query row then only counts keys of its own sequence.
            position_ids (`torch.Tensor`, *optional*): of a packed batch, to derive ``segment_ids`` from (positions
                restart at 0 at each sequence). Ignored when ``segment_ids`` is given.
            grad_only (`bool`, *optional*, defaults to `False`): ignore forward passes run without autograd (a
                trainer's extra ``torch.no_grad`` forward for metrics must not dilute the training term).
        """
        if segment_ids is None and position_ids is not None:
            segment_ids = segments_from_position_ids(position_ids)
        record = CaptureRecord(centre=self.centre)
        session = _Session(
            record,
            self.query,
            attention_mask,
            query_mask,
            self.query_offset,
            self.keep_logits if keep_logits is None else keep_logits,
            segment_ids,
            grad_only,
            self.virtual_keys,
        )
        configs = self._configs
        originals = [config._attn_implementation for config in configs]
        modules = self._modules
        try:
            for config, impl in zip(configs, originals):
                if impl is not None and impl.startswith(_PREFIX):
                    raise AttentionCaptureError("record() blocks cannot be nested on the same model.")
                config._attn_implementation_internal = _register(impl)
            for module in modules:
                _ACTIVE[id(module)] = session
            yield record
        finally:
            for module in modules:
                if _ACTIVE.get(id(module)) is session:
                    del _ACTIVE[id(module)]
            for config, impl in zip(configs, originals):
                config._attn_implementation_internal = impl
