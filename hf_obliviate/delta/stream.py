"""Streaming compression of two safetensors checkpoints, tensor by tensor and chunk by chunk.

The default case runs on numpy and safetensors alone, **without importing torch**: plain BitDelta (k = 1), dense
fp16 / fp32 deltas for the other changed tensors, the common dtypes, and an architecture whose ``nn.Linear`` weights
are known by name ([`~hf_obliviate.delta.linear_names.VERIFIED_MODEL_TYPES`]). Importing torch alone takes about
220 MB of resident memory, 0.4× a 135M-parameter checkpoint, so the small models pay most for it. Anything else (SVD,
DARE, magnitude pruning, k > 1, bf16 dense deltas, fp8 tensors, an architecture that must be built to find its Linear
layers) loads torch lazily, for the tensors that need it. Both routes write the same bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from .checkpoint import FLOAT_DTYPE_NAMES, CheckpointReader, as_float32, fingerprint_stored, resolve_checkpoint
from .format import (
    DELTA_CONFIG_NAME,
    Fingerprinter,
    ShapeMismatchError,
    check_scale_factor,
    label_fields,
    scale_entry_tensors,
)
from .linear_names import linear_weight_names_by_name
from .writer import ShardWriter, build_metadata, size_report, summarize_errors, write_json_atomic

__all__ = [
    "CHUNK_ELEMS",
    "BitDeltaStats",
    "align_names",
    "checkpoint_linear_names",
    "compress_checkpoints",
    "encode_chunk_pairs",
]

logger = logging.getLogger(__name__)

CHUNK_ELEMS = 1 << 18  # 1 MiB of fp32: a chunk's temporaries stay in cache
NON_LINEAR_MODES = ("dense", "revert")
DENSE_DTYPES = ("float16", "bfloat16", "float32")
_NUMPY_DENSE = {"float16": np.float16, "float32": np.float32}  # bfloat16 storage goes through torch


def check_options(non_linear: str, dense_dtype: str) -> None:
    """Validates the options shared by every compressor entry point."""
    if non_linear not in NON_LINEAR_MODES:
        raise ValueError(
            f"non_linear must be one of {NON_LINEAR_MODES} (got {non_linear!r}): 'dense' keeps changed embeddings, "
            "norms and heads as dense deltas, 'revert' reverts them to the base weights."
        )
    check_dense_dtype(dense_dtype)


def check_dense_dtype(name: str) -> None:
    """Refuses a storage dtype name outside [`DENSE_DTYPES`] (the one list, shared with the torch compressors)."""
    if name not in DENSE_DTYPES:
        raise ValueError(f"Unsupported storage dtype {name!r}; choose one of {sorted(DENSE_DTYPES)}.")


# ------------------------------------------------------------------------------------------------- BitDelta kernel
_ONES: dict[int, np.ndarray] = {}


def _ones(n: int) -> np.ndarray:
    """A cached fp32 vector of ones (``dot(|x|, 1)`` is a fast BLAS sum)."""
    size = 1 << max(n - 1, 0).bit_length()
    if size not in _ONES:
        _ONES[size] = np.ones(size, dtype=np.float32)
    return _ONES[size][:n]


class BitDeltaStats:
    """Plain BitDelta (k = 1) of ``ft - base`` accumulated over matching flat chunks, in numpy.

    Each chunk's fp32 difference lives only in cache: its signs are packed at once and only ``sum |Δ|`` and
    ``sum Δ²`` are kept, so the full fp32 delta is never materialised. The relative error needs no decode pass:
    with ``α = mean |Δ|``, ``||Δ - α·sign(Δ)||² = ||Δ||² - n·α²``. Feed chunks in order; every chunk but the last
    must hold a multiple of 8 elements. [`~hf_obliviate.delta.BitDeltaPairEncoder`] is the torch face of this class.

    Example:

    ```python
    >>> import numpy as np
    >>> base, ft = np.zeros(16, np.float32), np.arange(16, dtype=np.float32) - 4
    >>> stats = BitDeltaStats(16)
    >>> stats.update_np(base[:8], ft[:8]); stats.update_np(base[8:], ft[8:])
    >>> float(stats.alpha_value), stats.packed.tolist()
    (4.75, [240, 255])

    ```
    """

    def __init__(self, numel: int):
        self.numel = int(numel)
        self.packed = np.empty((self.numel + 7) // 8, dtype=np.uint8)
        self._seen = 0
        self._l1 = 0.0
        self._sq = 0.0

    def _check_chunk(self, n: int, n_other: int) -> None:
        if n_other != n or self._seen % 8 or self._seen + n > self.numel:
            raise ShapeMismatchError(
                f"BitDelta chunk of {n} elements at offset {self._seen} does not fit a tensor of {self.numel} "
                "(chunks must match in length and all but the last hold a multiple of 8 elements)."
            )

    def _store(self, packed: np.ndarray, sq: float, l1: float, n: int) -> None:
        start = self._seen // 8
        self.packed[start : start + packed.size] = packed
        self._sq += sq
        self._l1 += l1
        self._seen += n

    def update_np(self, base32: np.ndarray, ft32: np.ndarray) -> None:
        """Adds the next pair of flat float32 chunks."""
        n = ft32.size
        self._check_chunk(n, base32.size)
        delta = np.subtract(ft32, base32)
        packed = np.packbits(delta >= 0, bitorder="little")
        sq = float(np.dot(delta, delta))
        l1 = float(np.dot(np.abs(delta, out=delta), _ones(n)))
        self._store(packed, sq, l1, n)

    @property
    def complete(self) -> bool:
        return self._seen == self.numel

    @property
    def changed(self) -> bool:
        """Whether any element differs (a zero delta is not stored at all)."""
        return self._l1 > 0.0 or self._sq != self._sq  # NaN: differs, and is stored as such

    @property
    def alpha_value(self) -> float:
        """The scale, mean ``|Δ|`` (accumulated in float64 across chunks)."""
        return self._l1 / max(self.numel, 1)

    @property
    def rel_error(self) -> float:
        """``||Δ - α·sign(Δ)||_F / ||Δ||_F`` in closed form (0 for a zero delta)."""
        if self._sq <= 0.0:
            return 0.0
        mean = self.alpha_value
        return max(self._sq - self.numel * mean * mean, 0.0) ** 0.5 / self._sq**0.5


# ---------------------------------------------------------------------------------------------- chunked encoding
class ArrayEntry(NamedTuple):
    """An encoded entry as numpy arrays (or a torch tensor for bfloat16 storage); the streaming writer takes it as
    it takes a [`~hf_obliviate.delta.DeltaEntry`]."""

    kind: str
    shape: tuple[int, ...]
    tensors: dict[str, Any]
    params: dict[str, Any]
    numel: int
    nbytes: int


def _dense_buffer(numel: int, dense_dtype: str):
    if dense_dtype in _NUMPY_DENSE:
        return np.empty(numel, dtype=_NUMPY_DENSE[dense_dtype])
    import torch

    return torch.empty(numel, dtype=getattr(torch, dense_dtype))


def encode_chunk_pairs(
    shape: tuple[int, ...],
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    dtypes: tuple[str, str],
    is_linear: bool,
    non_linear: str,
    dense_dtype: str,
) -> tuple[ArrayEntry | None, float | None, bool]:
    """Encodes one changed-or-not tensor from matching flat chunk pairs ``(base, fine-tuned)`` as read from disk
    (``dtypes`` = their torch dtype names): plain BitDelta for a Linear weight, a dense delta in ``dense_dtype``
    otherwise (or nothing when ``non_linear="revert"``).

    Returns ``(entry or None when unchanged / reverted, relative error for a BitDelta matrix, reverted?)``. No
    full-size fp32 temporary is made, so streaming holds a few chunks, not a tensor.
    """
    numel = math.prod(shape)
    base_dtype, ft_dtype = dtypes
    if is_linear:
        stats = BitDeltaStats(numel)
        for base_chunk, ft_chunk in pairs:
            stats.update_np(as_float32(base_chunk, base_dtype), as_float32(ft_chunk, ft_dtype))
        if not stats.complete:
            raise ShapeMismatchError(f"BitDelta saw {stats._seen} of {numel} elements: a chunk is missing.")
        if not stats.changed:
            return None, None, False
        signs, alpha = stats.packed[None, :], np.array([stats.alpha_value], dtype=np.float32)
        entry = ArrayEntry("bitdelta", tuple(shape), {"signs": signs, "alpha": alpha}, {}, numel,
                           signs.nbytes + alpha.nbytes)  # fmt: skip
        return entry, stats.rel_error, False
    out = None if non_linear == "revert" else _dense_buffer(numel, dense_dtype)
    changed, pos = False, 0
    for base_chunk, ft_chunk in pairs:
        n = ft_chunk.size
        if not changed and not np.array_equal(base_chunk, ft_chunk):
            changed = True
        if out is not None:
            delta = np.subtract(as_float32(ft_chunk, ft_dtype), as_float32(base_chunk, base_dtype))
            if isinstance(out, np.ndarray):
                out[pos : pos + n] = delta
            else:  # bfloat16 storage: torch rounds
                import torch

                out[pos : pos + n] = torch.from_numpy(delta)
        pos += n
    if not changed:
        return None, None, False
    if out is None:
        return None, None, True
    value = out.reshape(shape)
    nbytes = value.nbytes
    return ArrayEntry("dense", tuple(shape), {"value": value}, {}, numel, nbytes), None, False


# ------------------------------------------------------------------------------------------------ name alignment
def align_names(base_names: Iterable[str], ft_names: Iterable[str]) -> dict[str, str]:
    """Maps fine-tuned parameter names to the base checkpoint's names.

    Equal names match. A task model fine-tuned from a bare backbone (``BertForSequenceClassification`` from a
    ``BertModel`` checkpoint) stores the backbone under a prefix (``bert.``) that the base lacks, and the reverse
    happens too; as in transformers' own loading, the one prefix that matches the most names is stripped (or added).
    Fine-tuned names left out (a new head) have no base counterpart.

    Example:

    ```python
    >>> from hf_obliviate.delta.stream import align_names
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


# ---------------------------------------------------------------------------------------------------- the stream
def _fed(chunks: Iterable, fingerprint: Fingerprinter) -> Iterator:
    """Passes chunks through, hashing each into ``fingerprint`` on the way (one read serves both)."""
    for chunk in chunks:
        fingerprint.feed(chunk)
        yield chunk


def checkpoint_linear_names(
    ft_dir: Path, ft_reader: CheckpointReader, linear_names: Iterable[str] | None = None
) -> set[str] | None:
    """The ``nn.Linear`` weights of the checkpoint in ``ft_dir`` (read through ``ft_reader``), as the streaming
    compressor finds them: ``linear_names`` when given; by name for a verified architecture (no torch, see
    `linear_weight_names_by_name`); else by type, building the architecture on the meta device (imports torch and
    transformers). ``None`` when the architecture is unknown (2-D ``*.weight`` tensors are then treated as Linear)."""
    if linear_names is not None:
        return set(linear_names)
    shapes = {name: ft_reader.shape(name) for name in ft_reader.names()}
    by_name = linear_weight_names_by_name(shapes, ft_reader.config())
    if by_name is not None:
        return by_name
    from .checkpoint import linear_weight_names_from_config

    linear = linear_weight_names_from_config(ft_dir)
    if linear is None:
        logger.warning("No known architecture in %s/config.json: treating 2-D *.weight tensors as Linear.", ft_dir)
    return linear


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
    scale_factor: float = 1.0,
    progress: bool = True,
    **method_kwargs: Any,
) -> Path:
    """Streams two safetensors checkpoints tensor by tensor and writes the compressed delta shard by shard.

    ``base`` and ``finetuned`` are local folders (``model.safetensors`` or a sharded index) or Hub repo ids (only
    ``*.safetensors`` and ``*.json`` are downloaded). Memory holds a few chunks plus the current output shard, never
    two models. The base fingerprint is computed in the same pass. The default settings run without torch (see the
    module docstring). ``scale_factor < 1`` shrinks the delta toward the base as it is written (BitDelta and dense
    entries; as [`CompressedDelta.scaled`]), recorded in ``extra["scale_factor"]``. Returns ``output_dir``.

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
    check_options(non_linear, dense_dtype)
    scale_factor = check_scale_factor(scale_factor)
    if scale_factor != 1.0 and method != "bitdelta":
        raise ValueError(f"scale_factor needs method='bitdelta' (got {method!r}): only BitDelta scales linearly.")
    plain_bitdelta = method == "bitdelta" and set(method_kwargs) <= {"k"} and int(method_kwargs.get("k", 1)) == 1
    compressor = None
    if plain_bitdelta:
        method_config: dict[str, Any] = {"k": 1}
    else:  # the other compressors work on whole torch tensors
        from .codec import get_compressor

        compressor = get_compressor(method, **method_kwargs)
        method_config = compressor.config()
    base_dir, base_rev = resolve_checkpoint(base, base_revision, token)
    ft_dir, _ = resolve_checkpoint(finetuned, finetuned_revision, token)
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
        linear = checkpoint_linear_names(ft_dir, ft_reader, linear_names)
        ft_config = ft_reader.config() or {}
        archs = ft_config.get("architectures") or []
        ft_to_base = align_names(base_reader.names(), ft_reader.names())
        base_to_ft = {b: f for f, b in ft_to_base.items()}
        # base tensors in sorted order (the fingerprint needs it), each with its fine-tuned counterpart; then the
        # fine-tuned tensors the base lacks (a new head)
        order = [(base_to_ft.get(b), b) for b in base_reader.names()]
        order += [(f, None) for f in ft_reader.names() if f not in ft_to_base]
        for name, base_name in tqdm(order, desc="Compressing delta", disable=not progress, unit="tensor"):
            base_dtype = base_reader.dtype_name(base_name) if base_name is not None else None
            if name is None:  # only in the base: hashed, nothing to store
                fingerprint_stored(fingerprint, base_reader, base_name, CHUNK_ELEMS)
                continue
            shape = ft_reader.shape(name)
            is_linear = name in linear if linear is not None else name.endswith(".weight") and len(shape) == 2
            ft_dtype = ft_reader.dtype_name(name)
            streamable = (
                base_dtype in FLOAT_DTYPE_NAMES
                and ft_dtype in FLOAT_DTYPE_NAMES
                and base_reader.shape(base_name) == shape
                and (plain_bitdelta or not is_linear)
            )
            if streamable:
                fingerprint.begin(base_name, shape, base_dtype)
                base_chunks = _fed(base_reader.chunks(base_name, CHUNK_ELEMS, framework="np"), fingerprint)
                pairs = zip(base_chunks, ft_reader.chunks(name, CHUNK_ELEMS, framework="np"))
                entry, err, rev = encode_chunk_pairs(shape, pairs, (base_dtype, ft_dtype), is_linear, non_linear,
                                                     dense_dtype)  # fmt: skip
            else:  # whole tensors through torch: another compressor, a new or resized tensor, integers, fp8, ...
                from .codec import get_compressor
                from .compress import _encode_one

                base_t = base_reader.get(base_name) if base_name is not None else None
                if base_t is not None:
                    fingerprint.update(base_name, base_t)
                compressor = compressor or get_compressor(method, **method_kwargs)
                entry, err, rev = _encode_one(
                    name, base_t, ft_reader.get(name), is_linear, compressor, non_linear, dense_dtype
                )
                del base_t
            if entry is not None:
                if scale_factor != 1.0:
                    scaled = scale_entry_tensors(name, entry.kind, entry.tensors, scale_factor)
                    is_array = isinstance(entry, ArrayEntry)
                    entry = entry._replace(tensors=scaled) if is_array else dataclasses.replace(entry, tensors=scaled)
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
    extra = label_fields(archs[0] if archs else None, ft_config)
    if scale_factor != 1.0:
        extra["scale_factor"] = scale_factor
    meta = build_metadata(
        entries=entry_info,
        shards=shards,
        method=method,
        method_config=method_config,
        base_fingerprint=fingerprint.hexdigest(),
        base_model=str(base),
        base_revision=base_rev,
        non_linear=non_linear,
        reverted=reverted,
        stats={"rel_error": summarize_errors(errors), "rel_error_per_matrix": errors},
        distillation=None,
        model_class=archs[0] if archs else None,
        extra=extra,
        size=size_report(sizes, method),
    )
    write_json_atomic(output_dir / DELTA_CONFIG_NAME, meta)
    return output_dir
