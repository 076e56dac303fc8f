"""Computing compressed deltas: from two state dicts, two models, or (streaming) two checkpoints on disk or the Hub."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointReader, linear_weight_names, linear_weight_names_from_config, resolve_checkpoint
from .codec import BitDeltaCompressor, BitDeltaPairEncoder, DeltaCompressor, DeltaEntry, _dtype, get_compressor
from .container import CompressedDelta, ShardWriter, _write_json_atomic, build_metadata, size_report
from .format import DELTA_CONFIG_NAME, Fingerprinter, dedup_state_dict, fingerprint_tensors

__all__ = ["align_names", "compress_checkpoints", "compress_delta", "compress_model", "summarize_errors"]

logger = logging.getLogger(__name__)

NON_LINEAR_MODES = ("dense", "revert")


def _check_options(non_linear: str, dense_dtype: str) -> None:
    if non_linear not in NON_LINEAR_MODES:
        raise ValueError(
            f"non_linear must be one of {NON_LINEAR_MODES} (got {non_linear!r}): 'dense' keeps changed embeddings, "
            "norms and heads as dense deltas, 'revert' reverts them to the base weights."
        )
    _dtype(dense_dtype)


CHUNK_ELEMS = 1 << 18  # 1 MiB of fp32: a chunk's temporaries stay in cache


def _chunked(compressor: DeltaCompressor, is_linear: bool) -> bool:
    """Whether a changed parameter can be encoded from matching chunks (plain BitDelta and dense deltas can)."""
    return not is_linear or (isinstance(compressor, BitDeltaCompressor) and compressor.k == 1)


def _encode_chunks(
    shape: tuple[int, ...],
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    is_linear: bool,
    non_linear: str,
    dense_dtype: str,
) -> tuple[DeltaEntry | None, float | None, bool]:
    """[`_encode_one`] for a base and fine-tuned tensor of the same shape, given as matching flat chunk pairs.

    Plain BitDelta goes through [`BitDeltaPairEncoder`]; a dense delta is written chunk by chunk into its storage
    dtype. No full-size fp32 temporary is made, so streaming compression holds a few chunks, not a tensor.
    """
    numel = 1
    for d in shape:
        numel *= d
    if is_linear:
        encoder = BitDeltaPairEncoder(numel)
        for base_chunk, ft_chunk in pairs:
            encoder.update(base_chunk, ft_chunk)
        if not encoder.changed:
            return None, None, False
        return encoder.entry(shape), encoder.rel_error, False
    out = None if non_linear == "revert" else torch.empty(numel, dtype=_dtype(dense_dtype))
    changed, pos = False, 0
    for base_chunk, ft_chunk in pairs:
        n = ft_chunk.numel()
        if not changed and not torch.equal(base_chunk, ft_chunk):
            changed = True
        if out is not None:
            out[pos : pos + n].copy_(ft_chunk.float() - base_chunk.float())
        pos += n
    if not changed:
        return None, None, False
    if out is None:
        return None, None, True
    return DeltaEntry("dense", tuple(shape), {"value": out.reshape(shape)}), None, False


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
        return _encode_chunks(tuple(ft.shape), pairs, is_linear, non_linear, dense_dtype)
    if torch.equal(base, ft):
        return None, None, False
    delta = ft.to(torch.float32, copy=True).sub_(base)  # one fp32 temporary (the inputs may be fp16 / bf16)
    entry = compressor.encode(delta, param_name=name)
    norm = delta.norm().clamp_min(1e-30)
    err = entry.decode().sub_(delta).norm() / norm
    return entry, float(err), False


def align_names(base_names: Iterable[str], ft_names: Iterable[str]) -> dict[str, str]:
    """Maps fine-tuned parameter names to the base checkpoint's names.

    Equal names match. A task model fine-tuned from a bare backbone (``BertForSequenceClassification`` from a
    ``BertModel`` checkpoint) stores the backbone under a prefix (``bert.``) that the base lacks, and the reverse
    happens too; as in transformers' own loading, the one prefix that matches the most names is stripped (or added).
    Fine-tuned names left out (a new head) have no base counterpart.

    Example:

    ```python
    >>> from hf_obliviate.delta.compress import align_names
    >>> align_names(["embeddings.w", "encoder.q"], ["bert.embeddings.w", "bert.encoder.q", "classifier.weight"])
    {'bert.embeddings.w': 'embeddings.w', 'bert.encoder.q': 'encoder.q'}

    ```
    """
    base, ft = set(base_names), list(ft_names)
    mapping = {n: n for n in ft if n in base}
    unmatched = [n for n in ft if n not in base]
    free_base = base - set(mapping.values())
    if not unmatched or not free_base:
        return mapping
    votes: dict[tuple[str, str], int] = {}
    for name in unmatched:
        head, _, rest = name.partition(".")
        if rest and rest in free_base:  # fine-tuned `prefix.x`, base `x`
            votes[("strip", head)] = votes.get(("strip", head), 0) + 1
    for b in free_base:
        head, _, rest = b.partition(".")
        if rest and rest in unmatched:  # base `prefix.x`, fine-tuned `x`
            votes[("add", head)] = votes.get(("add", head), 0) + 1
    if not votes:
        return mapping
    (how, prefix), _ = max(votes.items(), key=lambda kv: kv[1])
    for name in unmatched:
        target = name.partition(".")[2] if how == "strip" and name.startswith(prefix + ".") else None
        if how == "add":
            target = f"{prefix}.{name}"
        if target and target in free_base:
            mapping[name] = target
            free_base.discard(target)
    return mapping


def _reader_dtype(reader: CheckpointReader, name: str) -> torch.dtype:
    dtype = reader.dtype(name)
    return dtype if dtype is not None else reader.get(name).dtype  # rare dtypes: ask safetensors


def _fed(chunks: Iterable[torch.Tensor], fingerprint: Fingerprinter) -> Iterator[torch.Tensor]:
    """Passes chunks through, hashing each into ``fingerprint`` on the way (one read serves both)."""
    for chunk in chunks:
        fingerprint.feed(chunk)
        yield chunk


def summarize_errors(rel_errors: dict[str, float]) -> dict[str, Any]:
    """Mean / median / max of the per-matrix relative reconstruction errors ``||Δ - Δ̂||_F / ||Δ||_F``."""
    if not rel_errors:
        return {"matrices": 0}
    v = torch.tensor(list(rel_errors.values()), dtype=torch.float64)
    worst = max(rel_errors, key=rel_errors.get)
    return {
        "matrices": len(rel_errors),
        "mean": float(v.mean()),
        "median": float(v.median()),
        "max": float(v.max()),
        "worst_matrix": worst,
    }


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
    archs = getattr(getattr(ft_model, "config", None), "architectures", None)
    model_class = kwargs.pop("model_class", None) or (archs[0] if archs else type(ft_model).__name__)
    return compress_delta(
        base_model.state_dict(),
        ft_model.state_dict(),
        method,
        linear_names=linear_weight_names(ft_model),
        base_model=base_model_id,
        base_revision=base_revision,
        model_class=model_class,
        **kwargs,
    )


def compress_checkpoints(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    output_dir: str | os.PathLike,
    method: str = "bitdelta",
    *,
    base_revision: str | None = None,
    finetuned_revision: str | None = None,
    token: str | bool | None = None,
    non_linear: str = "dense",
    dense_dtype: str = "float16",
    max_shard_size: int | str = "2GB",
    linear_names: Iterable[str] | None = None,
    progress: bool = True,
    **method_kwargs: Any,
) -> Path:
    """Streams two safetensors checkpoints tensor by tensor and writes the compressed delta shard by shard.

    ``base`` and ``finetuned`` are local folders (``model.safetensors`` or a sharded index) or Hub repo ids (only
    ``*.safetensors`` and ``*.json`` are downloaded). Memory holds a few tensors plus the current output shard,
    never two models. The base fingerprint is computed in the same pass. Returns ``output_dir``.

    Example:

    ```python
    >>> import tempfile
    >>> from transformers import BertConfig, BertModel
    >>> from hf_obliviate.delta import CompressedDelta, compress_checkpoints
    >>> cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    >>> d = tempfile.mkdtemp()
    >>> BertModel(cfg).save_pretrained(f"{d}/base"); BertModel(cfg).save_pretrained(f"{d}/ft")
    >>> out = compress_checkpoints(f"{d}/base", f"{d}/ft", f"{d}/delta", progress=False)
    >>> CompressedDelta.load(out).method
    'bitdelta'

    ```
    """
    _check_options(non_linear, dense_dtype)
    compressor = get_compressor(method, **method_kwargs)
    base_dir, base_rev = resolve_checkpoint(base, base_revision, token)
    ft_dir, _ = resolve_checkpoint(finetuned, finetuned_revision, token)
    if linear_names is None:
        linear = linear_weight_names_from_config(ft_dir)
        if linear is None:
            logger.warning("No known architecture in %s/config.json: treating 2-D *.weight tensors as Linear.", ft_dir)
    else:
        linear = set(linear_names)
    config = CheckpointReader(ft_dir).config() or {}
    archs = config.get("architectures") or []
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    errors: dict[str, float] = {}
    reverted: list[str] = []
    sizes: list[tuple[str, int, int]] = []
    entry_info: dict[str, dict] = {}
    fingerprint = Fingerprinter()
    # the shard headers carry the method; the fingerprint is only known after the pass and lives in the json
    writer = ShardWriter(output_dir, max_shard_size, header={"method": method})
    with CheckpointReader(base_dir) as base_reader, CheckpointReader(ft_dir) as ft_reader:
        ft_to_base = align_names(base_reader.names(), ft_reader.names())
        base_to_ft = {b: f for f, b in ft_to_base.items()}
        # base tensors in sorted order (the fingerprint needs it), each with its fine-tuned counterpart; then the
        # fine-tuned tensors the base lacks (a new head)
        order = [(base_to_ft.get(b), b) for b in base_reader.names()]
        order += [(f, None) for f in ft_reader.names() if f not in ft_to_base]
        for name, base_name in tqdm(order, desc="Compressing delta", disable=not progress, unit="tensor"):
            if name is None:
                fingerprint.begin(base_name, base_reader.shape(base_name), _reader_dtype(base_reader, base_name))
                for chunk in base_reader.chunks(base_name, CHUNK_ELEMS):
                    fingerprint.feed(chunk)
                continue
            shape = ft_reader.shape(name)
            if linear is not None:
                is_linear = name in linear
            else:
                is_linear = name.endswith(".weight") and len(shape) == 2
            ft_dtype = ft_reader.dtype(name)
            streamable = (
                base_name is not None
                and base_reader.shape(base_name) == shape
                and ft_dtype is not None
                and ft_dtype.is_floating_point
                and base_reader.dtype(base_name) is not None
                and _chunked(compressor, is_linear)
            )
            if streamable:
                fingerprint.begin(base_name, shape, _reader_dtype(base_reader, base_name))
                base_chunks = _fed(base_reader.chunks(base_name, CHUNK_ELEMS), fingerprint)
                pairs = zip(base_chunks, ft_reader.chunks(name, CHUNK_ELEMS))
                entry, err, rev = _encode_chunks(shape, pairs, is_linear, non_linear, dense_dtype)
            else:
                base_t = base_reader.get(base_name) if base_name is not None else None
                if base_t is not None:
                    fingerprint.update(base_name, base_t)
                entry, err, rev = _encode_one(
                    name, base_t, ft_reader.get(name), is_linear, compressor, non_linear, dense_dtype
                )
                del base_t
            if entry is not None:
                writer.add(name, entry)
                sizes.append((entry.kind, entry.numel, entry.nbytes))
                entry_info[name] = {"kind": entry.kind, "shape": list(entry.shape), "params": entry.params}
                del entry
            if err is not None:
                errors[name] = err
            if rev:
                reverted.append(name)
    entry_shard, shards = writer.finish()
    for name, info in entry_info.items():
        info["shard"] = entry_shard[name]
    meta = build_metadata(
        entries=entry_info,
        shards=shards,
        method=method,
        method_config=compressor.config(),
        base_fingerprint=fingerprint.hexdigest(),
        base_model=str(base),
        base_revision=base_rev,
        non_linear=non_linear,
        reverted=reverted,
        stats={"rel_error": summarize_errors(errors), "rel_error_per_matrix": errors},
        distillation=None,
        model_class=archs[0] if archs else None,
        extra={},
        size=size_report(sizes, method),
    )
    _write_json_atomic(output_dir / DELTA_CONFIG_NAME, meta)
    return output_dir
