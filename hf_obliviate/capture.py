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
(prefix tuning prepends virtual keys, prompt tuning virtual tokens) the mask is extended with ones on the left, so
prefix keys count in the norm. Padded keys are *selected out* (``masked_fill`` with 0), never multiplied by a mask
that holds ``-inf``. Causal attention modules only count keys at or before each query row.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "QUERY_MODES",
    "AttentionCaptureError",
    "AttentionLogitCapture",
    "CaptureRecord",
    "LayerCapture",
]

QUERY_MODES = ("auto", "first", "last", "rows")
_PREFIX = "obliviate:"
_REGISTERED: set[str] = set()
_LOCK = threading.Lock()
# id(attention module) -> active recording session; filled only inside `record()`.
_ACTIVE: dict[int, _Session] = {}


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
class CaptureRecord:
    """The result of one recorded forward pass: one :class:`LayerCapture` per attention call, in call order."""

    layers: list[LayerCapture] = field(default_factory=list)

    def loss(self) -> torch.Tensor:
        """``L_attn = (1/|layers|) Σ_ℓ mean_{b,h} ‖S^ℓ_{b,h,q*,:} ⊙ m_b‖₂`` (METHOD.md §1)."""
        if not self.layers:
            raise AttentionCaptureError(
                "No attention call was captured during the forward pass. The model does not route attention "
                "through transformers' AttentionInterface (or the forward ran outside `record()`). Use a model "
                "whose attention supports `attn_implementation` switching, or set `lambda_attn=0`."
            )
        return torch.stack([layer.norm for layer in self.layers]).mean()


class _Session:
    def __init__(
        self,
        record: CaptureRecord,
        mode: str,
        attention_mask: torch.Tensor | None,
        query_mask: torch.Tensor | None,
        query_offset: int,
        keep_logits: bool,
    ):
        self.record = record
        self.mode = mode
        self.attention_mask = attention_mask
        self.query_mask = query_mask
        self.query_offset = query_offset
        self.keep_logits = keep_logits
        self._rows_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def key_mask(self, batch: int, kv_len: int, device: torch.device) -> torch.Tensor:
        mask = self.attention_mask
        if mask is None:
            return torch.ones(batch, kv_len, dtype=torch.bool, device=device)
        mask = mask.to(device=device).bool()
        if mask.dim() != 2 or mask.shape[0] != batch:
            raise AttentionCaptureError(
                f"attention_mask must be a 2D (batch, seq_len) tensor of 0/1 with batch {batch}; got shape "
                f"{tuple(mask.shape)}. Pass the tokenizer's attention_mask to `record()`."
            )
        if mask.shape[1] < kv_len:  # prefix / virtual keys come first and are always attended to
            mask = torch.cat([mask.new_ones(batch, kv_len - mask.shape[1]), mask], dim=1)
        elif mask.shape[1] > kv_len:
            raise AttentionCaptureError(
                f"attention_mask has {mask.shape[1]} positions but the attention layer sees {kv_len} keys. "
                "Sliding-window or cropped caches are not supported by the attention term."
            )
        return mask

    def rows(
        self, module: nn.Module, batch: int, q_len: int, kv_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
            valid = torch.ones(batch, 1, dtype=torch.bool, device=device)
        elif mode == "last":
            token_mask = kv_mask[:, -q_len:]
            positions = torch.arange(q_len, device=device).expand(batch, q_len)
            rows = torch.where(token_mask, positions, torch.full_like(positions, -1)).amax(dim=1, keepdim=True)
            valid = rows >= 0
            rows = rows.clamp_min(0)
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
        self._rows_cache[key] = (rows, valid)
        return rows, valid

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
        kv_mask = self.key_mask(batch, kv_len, query.device)
        rows, row_valid = self.rows(module, batch, q_len, kv_mask)
        n_rows = rows.shape[1]
        q_rows = torch.gather(query, 2, rows[:, None, :, None].expand(batch, heads, n_rows, head_dim))
        # Grouped-query attention: query head h reads key head h // n_rep; group rows instead of repeating keys.
        n_rep = heads // kv_heads
        q_rows = q_rows.reshape(batch, kv_heads, n_rep * n_rows, head_dim)
        logits = torch.matmul(q_rows, key.transpose(-1, -2)).mul(scaling)
        logits = logits.reshape(batch, heads, n_rows, kv_len)

        counted = kv_mask[:, None, :].expand(batch, n_rows, kv_len)
        if getattr(module, "is_causal", False):
            # Key j is visible to query row i when j <= i + (kv_len - q_len) (cached / prefix keys come first).
            key_pos = torch.arange(kv_len, device=query.device)
            limit = rows + (kv_len - q_len)
            counted = counted & (key_pos[None, None, :] <= limit[:, :, None])
        masked = logits.float().masked_fill(~counted[:, None, :, :], 0.0)
        norms = torch.linalg.vector_norm(masked, ord=2, dim=-1)  # (batch, heads, rows); grad 0 (not NaN) at 0
        weights = row_valid[:, None, :].to(norms.dtype).expand_as(norms)
        norm = (norms * weights).sum() / weights.sum().clamp_min(1.0)
        capture = LayerCapture(norm=norm)
        if self.keep_logits:
            capture.logits = logits.detach().float().masked_fill(~counted[:, None, :, :], float("-inf"))
            capture.key_mask = counted
            capture.rows = rows
        self.record.layers.append(capture)


def _original_kernel(impl: str | None, module: nn.Module):
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
    def obliviate_attention(module, query, key, value, attention_mask, *args, **kwargs):
        kernel = _original_kernel(impl, module)
        config = getattr(module, "config", None)
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
        if session is not None:
            session.observe(module, query, key, kwargs.get("scaling"))
        return output

    obliviate_attention.__name__ = f"obliviate_{impl}"
    return obliviate_attention


def _register(impl: str | None) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = f"{_PREFIX}{impl or 'eager'}"
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

    def __init__(self, model: nn.Module, query: str = "auto", query_offset: int = 0, keep_logits: bool = False):
        if query not in QUERY_MODES:
            raise ValueError(f"Unknown query mode {query!r}: choose one of {', '.join(QUERY_MODES)}.")
        self.model = model
        self.query = query
        self.query_offset = query_offset
        self.keep_logits = keep_logits
        configs = _model_configs(model)
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

    @contextmanager
    def record(
        self,
        attention_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        keep_logits: bool | None = None,
    ) -> Iterator[CaptureRecord]:
        """Record the attention calls of the forward passes run inside the ``with`` block.

        Args:
            attention_mask (`torch.Tensor`, *optional*): the batch's 2D mask (1 = token, 0 = pad).
            query_mask (`torch.Tensor`, *optional*): 2D boolean mask of query rows, for ``query="rows"``.
            keep_logits (`bool`, *optional*): override the instance's ``keep_logits``.
        """
        record = CaptureRecord()
        session = _Session(
            record,
            self.query,
            attention_mask,
            query_mask,
            self.query_offset,
            self.keep_logits if keep_logits is None else keep_logits,
        )
        configs = _model_configs(self.model)
        originals = [config._attn_implementation for config in configs]
        modules = [m for m in self.model.modules() if hasattr(m, "config")]
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
