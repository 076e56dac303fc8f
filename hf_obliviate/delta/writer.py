"""Writing a delta folder: safetensors shards, the metadata and its size and error statistics.

Torch-free (numpy + safetensors), so that the streaming compressor can run without importing torch; torch tensors
are accepted too.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .format import (
    DELTA_CONFIG_NAME,
    FORMAT_VERSION,
    METADATA_CHECKSUM_KEY,
    file_sha256,
    metadata_checksum,
    shard_name,
    tool_version,
)

__all__ = ["ShardWriter", "build_metadata", "parse_size", "size_report", "summarize_errors", "write_json_atomic"]

SEP = "::"  # shard tensor name = f"{entry name}{SEP}{part}"


def parse_size(size: int | str) -> int:
    """``2GB`` / ``500MB`` / ``10KB`` / ``123B`` or an int, in bytes."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _save(tensors: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """One safetensors file from numpy arrays and/or torch tensors (the same bytes either way)."""
    if any(not isinstance(t, np.ndarray) for t in tensors.values()):
        import torch
        from safetensors.torch import save_file

        tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in tensors.items()}
    else:
        from safetensors.numpy import save_file
    save_file(tensors, str(path), metadata=metadata)


class ShardWriter:
    """Writes entries to ``delta-0000i-of-0000n.safetensors`` shards, flushing whenever ``max_shard_size`` is reached.

    Only the current shard's compressed tensors are kept in memory. Call [`~ShardWriter.finish`] to rename the
    shards with their final count and get ``({entry name: shard}, {shard: sha256})``.
    """

    def __init__(self, folder: str | os.PathLike, max_shard_size: int | str = "2GB", header: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = parse_size(max_shard_size)
        self.header = {"format": "pt", "obliviate_format_version": str(FORMAT_VERSION), **(header or {})}
        self._buffer: dict[str, Any] = {}
        self._buffer_names: list[str] = []
        self._buffer_bytes = 0
        self._tmp_files: list[Path] = []
        self._entry_shard: dict[str, int] = {}

    def add(self, name: str, entry: Any) -> None:
        """Adds an entry: a [`~hf_obliviate.delta.DeltaEntry`] or anything with ``tensors`` (torch tensors or numpy
        arrays, by part name) and ``nbytes``."""
        if self._buffer and self._buffer_bytes + entry.nbytes > self.max_bytes:
            self._flush()
        for part, tensor in entry.tensors.items():
            if isinstance(tensor, np.ndarray):
                tensor = np.ascontiguousarray(tensor)
            else:
                tensor = tensor.detach().to("cpu").contiguous()
            self._buffer[f"{name}{SEP}{part}"] = tensor
        self._buffer_names.append(name)
        self._buffer_bytes += entry.nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.folder / f".tmp-delta-{len(self._tmp_files):05d}.safetensors"
        _save(self._buffer, path, self.header)
        for name in self._buffer_names:
            self._entry_shard[name] = len(self._tmp_files)
        self._tmp_files.append(path)
        self._buffer, self._buffer_names, self._buffer_bytes = {}, [], 0

    def finish(self) -> tuple[dict[str, str], dict[str, str]]:
        self._flush()
        if not self._tmp_files:  # an empty delta still gets one (empty) shard so that the layout is uniform
            path = self.folder / ".tmp-delta-00000.safetensors"
            _save({}, path, self.header)
            self._tmp_files.append(path)
        total = len(self._tmp_files)
        shards: dict[str, str] = {}
        for i, tmp in enumerate(self._tmp_files):
            final = self.folder / shard_name(i + 1, total)
            os.replace(tmp, final)
            shards[final.name] = file_sha256(final)
        for stale in self.folder.glob("delta-*-of-*.safetensors"):  # left over from an earlier write to this folder
            if stale.name not in shards:
                stale.unlink()
        entry_shard = {name: shard_name(i + 1, total) for name, i in self._entry_shard.items()}
        return entry_shard, shards


def write_json_atomic(path: Path, obj: dict | list) -> None:
    """Writes JSON through a temporary file and a rename; ``obliviate_delta.json`` gets its checksum first."""
    if path.name == DELTA_CONFIG_NAME:  # the delta metadata carries its own checksum
        obj = json.loads(json.dumps(obj))  # checksum what a reader will parse (tuples, int keys, ...)
        obj[METADATA_CHECKSUM_KEY] = metadata_checksum(obj)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def size_report(entries: Iterable[Any], method: str) -> dict[str, Any]:
    """Sizes in bytes: compressed payload, its Linear part, and the dense fp16 delta of the same parameters.

    ``entries`` are [`DeltaEntry`]s or ``(kind, numel, nbytes)`` tuples.
    """
    rows = [tuple(e) if isinstance(e, tuple) else (e.kind, e.numel, e.nbytes) for e in entries]
    total = sum(r[2] for r in rows)
    linear_bytes = sum(r[2] for r in rows if r[0] == method)
    linear_numel = sum(r[1] for r in rows if r[0] == method)
    dense_fp16 = 2 * sum(r[1] for r in rows)
    return {
        "compressed_bytes": total,
        "linear_compressed_bytes": linear_bytes,
        "linear_weights": linear_numel,
        "bits_per_linear_weight": (8 * linear_bytes / linear_numel) if linear_numel else None,
        "dense_fp16_bytes": dense_fp16,
        "ratio_vs_dense_fp16": (dense_fp16 / total) if total else None,
    }


def summarize_errors(rel_errors: dict[str, float]) -> dict[str, Any]:
    """Mean / median (the lower middle value for an even count) / max of the per-matrix relative reconstruction
    errors ``||Δ - Δ̂||_F / ||Δ||_F``."""
    if not rel_errors:
        return {"matrices": 0}
    values = list(rel_errors.values())
    return {
        "matrices": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median_low(values),
        "max": max(values),
        "worst_matrix": max(rel_errors, key=rel_errors.get),
    }


def build_metadata(**kw: Any) -> dict[str, Any]:
    """The ``obliviate_delta.json`` content (also used by the streaming writer)."""
    return {
        "format_version": FORMAT_VERSION,
        "tool": "hf-obliviate",
        "tool_version": tool_version(),
        "base_model": kw["base_model"],
        "base_revision": kw["base_revision"],
        "base_fingerprint": kw["base_fingerprint"],
        "method": kw["method"],
        "method_config": kw["method_config"],
        "k": kw["method_config"].get("k") if kw["method"] == "bitdelta" else None,
        "distillation": kw["distillation"],
        "non_linear": kw["non_linear"],
        "reverted": sorted(kw["reverted"]),
        "modules": sorted(n for n, e in kw["entries"].items() if e["kind"] == kw["method"]),
        "model_class": kw["model_class"],
        "entries": kw["entries"],
        "shards": kw["shards"],
        "size": kw["size"],
        "stats": kw["stats"],
        "extra": kw["extra"],
    }
