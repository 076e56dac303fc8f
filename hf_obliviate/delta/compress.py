"""Computing compressed deltas: from two state dicts, two models, or (streaming) two checkpoints on disk or the Hub."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import linear_weight_names
from .codec import BitDeltaCompressor, DeltaCompressor, DeltaEntry, _dtype, get_compressor
from .container import CompressedDelta
from .format import dedup_state_dict, fingerprint_tensors, label_fields
from .stream import CHUNK_ELEMS, align_names, compress_checkpoints, encode_chunk_pairs
from .stream import check_options as _check_options
from .writer import summarize_errors

# compress_checkpoints (the streaming compressor, torch-free by default) lives in `stream`; it is re-exported here
__all__ = [
    "align_names",
    "compress_checkpoints",
    "compress_delta",
    "compress_model",
    "model_class_name",
    "summarize_errors",
]

logger = logging.getLogger(__name__)


def _chunked(compressor: DeltaCompressor, is_linear: bool) -> bool:
    """Whether a changed parameter can be encoded from matching chunks (plain BitDelta and dense deltas can)."""
    return not is_linear or (isinstance(compressor, BitDeltaCompressor) and compressor.k == 1)


def _numpy_chunk(t: torch.Tensor) -> np.ndarray:
    """A flat CPU numpy view of a torch chunk in its own dtype (bfloat16 as its uint16 bytes)."""
    t = t.detach().reshape(-1).cpu()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _encode_chunks(
    shape: tuple[int, ...],
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    dtypes: tuple[torch.dtype, torch.dtype],
    is_linear: bool,
    non_linear: str,
    dense_dtype: str,
) -> tuple[DeltaEntry | None, float | None, bool]:
    """[`~hf_obliviate.delta.stream.encode_chunk_pairs`] (the one chunked encoder, numpy) for torch chunk pairs."""
    names = tuple(str(d).replace("torch.", "") for d in dtypes)
    np_pairs = ((_numpy_chunk(b), _numpy_chunk(f)) for b, f in pairs)
    entry, err, rev = encode_chunk_pairs(shape, np_pairs, names, is_linear, non_linear, dense_dtype)
    if entry is None:
        return None, err, rev
    tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in entry.tensors.items()}
    return DeltaEntry(entry.kind, entry.shape, tensors, dict(entry.params)), err, rev


def _encode_one(
    name: str,
    base: torch.Tensor | None,
    ft: torch.Tensor,
    is_linear: bool,
    compressor: DeltaCompressor,
    non_linear: str,
    dense_dtype: str,
) -> tuple[DeltaEntry | None, float | None, bool]:
    """Returns ``(entry or None when unchanged/reverted, relative error for compressed matrices, reverted?)``."""
    if base is None or tuple(base.shape) != tuple(ft.shape) or not ft.is_floating_point():
        if base is not None and torch.equal(base, ft):
            return None, None, False
        # no base counterpart (a new head, a resized embedding, an integer buffer): store the fine-tuned tensor
        value = ft.to(_dtype(dense_dtype)) if ft.is_floating_point() else ft
        return DeltaEntry("full", tuple(ft.shape), {"value": value.contiguous()}), None, False
    if _chunked(compressor, is_linear):
        pairs = zip(base.reshape(-1).split(CHUNK_ELEMS), ft.reshape(-1).split(CHUNK_ELEMS))
        return _encode_chunks(tuple(ft.shape), pairs, (base.dtype, ft.dtype), is_linear, non_linear, dense_dtype)
    if torch.equal(base, ft):
        return None, None, False
    delta = ft.to(torch.float32, copy=True).sub_(base)  # one fp32 temporary (the inputs may be fp16 / bf16)
    entry = compressor.encode(delta, param_name=name)
    norm = delta.norm().clamp_min(1e-30)
    err = entry.decode().sub_(delta).norm() / norm
    return entry, float(err), False


def compress_delta(
    base_state: dict[str, torch.Tensor],
    ft_state: dict[str, torch.Tensor],
    method: str = "bitdelta",
    *,
    linear_names: Iterable[str] | None = None,
    non_linear: str = "dense",
    dense_dtype: str = "float16",
    base_model: str | None = None,
    base_revision: str | None = None,
    model_class: str | None = None,
    progress: bool = False,
    **method_kwargs: Any,
) -> CompressedDelta:
    """Compresses ``ft_state - base_state``.

    Args:
        base_state / ft_state (`dict[str, torch.Tensor]`): state dicts of the base and fine-tuned models.
        method (`str`, *optional*, defaults to `"bitdelta"`): codec for the ``nn.Linear`` weights (see
            [`available_methods`]); its options go in ``method_kwargs`` (``k=1``, ``rank=16``, ``p=0.9``, ...).
        linear_names (`Iterable[str]`, *optional*): the parameters to compress with ``method`` (the ``nn.Linear``
            weights). Use [`compress_model`] to derive them from the module structure; without it, every 2-D
            floating ``*.weight`` tensor is treated as a Linear weight (embeddings included), with a warning.
        non_linear (`str`, *optional*, defaults to `"dense"`): ``"dense"`` or ``"revert"`` (METHOD §7 variant B).
        dense_dtype (`str`, *optional*, defaults to `"float16"`): storage dtype of dense deltas.

    Returns:
        [`CompressedDelta`]. Unchanged parameters are omitted.
    """
    _check_options(non_linear, dense_dtype)
    compressor = get_compressor(method, **method_kwargs)
    base_state = dedup_state_dict(base_state)
    ft_state = dedup_state_dict(ft_state)
    if linear_names is None:
        logger.warning("compress_delta: no linear_names given; treating every 2-D *.weight tensor as a Linear weight.")
        linear = {n for n, t in ft_state.items() if n.endswith(".weight") and t.dim() == 2 and t.is_floating_point()}
    else:
        linear = set(linear_names)
    entries: dict[str, DeltaEntry] = {}
    errors: dict[str, float] = {}
    reverted: list[str] = []
    ft_to_base = align_names(base_state, ft_state)
    for name in tqdm(sorted(ft_state), desc="Compressing delta", disable=not progress, unit="tensor"):
        base_t = base_state[ft_to_base[name]] if name in ft_to_base else None
        is_linear = name in linear
        entry, err, rev = _encode_one(name, base_t, ft_state[name], is_linear, compressor, non_linear, dense_dtype)
        if entry is not None:
            entries[name] = entry
        if err is not None:
            errors[name] = err
        if rev:
            reverted.append(name)
    fp = fingerprint_tensors((n, base_state[n]) for n in sorted(base_state))
    return CompressedDelta(
        entries=entries,
        method=method,
        method_config=compressor.config(),
        base_fingerprint=fp,
        base_model=base_model,
        base_revision=base_revision,
        non_linear=non_linear,
        reverted=reverted,
        stats={"rel_error": summarize_errors(errors), "rel_error_per_matrix": errors},
        model_class=model_class,
    )


def compress_model(
    base_model: torch.nn.Module,
    ft_model: torch.nn.Module,
    method: str = "bitdelta",
    *,
    base_model_id: str | None = None,
    base_revision: str | None = None,
    **kwargs: Any,
) -> CompressedDelta:
    """[`compress_delta`] for two in-memory models, the Linear weights found by module type on ``ft_model``.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from hf_obliviate.delta import compress_model
    >>> cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    >>> base = BertModel(cfg)
    >>> ft = BertModel(cfg)
    >>> _ = ft.load_state_dict(base.state_dict())
    >>> with torch.no_grad():
    ...     _ = ft.encoder.layer[0].attention.self.query.weight.add_(0.01)
    >>> compress_model(base, ft).modules
    ['encoder.layer.0.attention.self.query.weight']

    ```
    """
    if base_model_id is None:
        base_model_id = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
    model_class = kwargs.pop("model_class", None) or model_class_name(ft_model)
    delta = compress_delta(
        base_model.state_dict(),
        ft_model.state_dict(),
        method,
        linear_names=linear_weight_names(ft_model),
        base_model=base_model_id,
        base_revision=base_revision,
        model_class=model_class,
        **kwargs,
    )
    config = getattr(ft_model, "config", None)
    delta.extra.update(label_fields(model_class, config.to_dict() if hasattr(config, "to_dict") else {}))
    return delta


def model_class_name(model: torch.nn.Module) -> str:
    """The transformers class to rebuild ``model`` with: its own class when transformers defines it, else the first
    of ``config.architectures``, else the class name.

    ``config.architectures`` alone is wrong for a model built in memory: a classifier loaded from an encoder
    checkpoint keeps the checkpoint's ``["BertModel"]`` until it is saved, and a delta rebuilt with that class loses
    the head."""
    cls = type(model)
    if cls.__module__.startswith("transformers."):
        return cls.__name__
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return archs[0] if archs else cls.__name__
