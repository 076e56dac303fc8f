"""[`CompressedDelta`]: the in-memory container, its sharded safetensors writer and its verifying reader."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .codec import DeltaEntry, available_methods
from .format import (
    DELTA_CONFIG_NAME,
    METADATA_CHECKSUM_KEY,
    SUPPORTED_FORMAT_VERSIONS,
    CorruptDeltaError,
    DeltaFormatError,
    ShapeMismatchError,
    UnsupportedFormatVersionError,
    check_scale_factor,
    dedup_state_dict,
    file_sha256,
    metadata_checksum,
    scale_entry_tensors,
    tool_version,
)
from .writer import SEP, ShardWriter, build_metadata, size_report, write_json_atomic

__all__ = ["CompressedDelta", "ShardWriter", "read_delta_metadata"]


_METADATA_KEYS = {
    "format_version", "tool", "tool_version", "base_model", "base_revision", "base_fingerprint", "method",
    "method_config", "k", "distillation", "non_linear", "reverted", "modules", "model_class", "entries", "shards",
    "size", "stats", "extra", METADATA_CHECKSUM_KEY,
}  # fmt: skip


def read_delta_metadata(folder: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Reads and validates ``obliviate_delta.json``: format version first, then (``verify=True``) its own checksum.

    Files written before the checksum existed are accepted when they hold only known fields (so a corrupted field
    name cannot hide a missing checksum).
    """
    path = Path(folder) / DELTA_CONFIG_NAME
    if not path.is_file():
        raise CorruptDeltaError(f"{path} is missing: {folder} does not hold an hf-obliviate compressed delta.")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptDeltaError(f"{path} is not valid JSON (truncated or corrupt download?): {err}") from err
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise UnsupportedFormatVersionError(
            f"{path} has format_version={version!r}, this hf-obliviate ({tool_version()}) reads versions "
            f"{list(SUPPORTED_FORMAT_VERSIONS)}. Upgrade hf-obliviate (`pip install -U hf-obliviate`) to load it."
        )
    if verify and METADATA_CHECKSUM_KEY in meta:
        if meta[METADATA_CHECKSUM_KEY] != metadata_checksum(meta):
            raise CorruptDeltaError(
                f"{path} does not match its own checksum ({METADATA_CHECKSUM_KEY}): it was edited or corrupted "
                "(truncated or altered download?). Delete the delta and download it again."
            )
    elif verify and set(meta) - _METADATA_KEYS:
        raise CorruptDeltaError(
            f"{path} has no {METADATA_CHECKSUM_KEY} and unknown fields {sorted(set(meta) - _METADATA_KEYS)}: corrupt."
        )
    for key in ("entries", "shards", "method", "base_fingerprint"):
        if key not in meta:
            raise CorruptDeltaError(f"{path} lacks the required field {key!r}.")
    return meta


@dataclass
class CompressedDelta:
    """A compressed fine-tuning delta: per-parameter [`DeltaEntry`]s plus the metadata needed to verify and apply it.

    Args:
        entries (`dict[str, DeltaEntry]`): stored parameters, by state-dict name.
        method (`str`): codec used for the ``nn.Linear`` weights (``"bitdelta"``, ``"svd"``, ``"dare"``, ...).
        method_config (`dict`): the codec's parameters (``{"k": 1}`` for BitDelta).
        base_fingerprint (`str`): fingerprint of the base weights the delta applies to.
        base_model (`str`, *optional*): base model id or path.
        base_revision (`str`, *optional*): base model revision (commit sha) when known.
        non_linear (`str`, *optional*, defaults to `"dense"`): ``"dense"`` keeps changed non-Linear parameters as
            dense deltas, ``"revert"`` reverts them to base (METHOD §7 variant B).
        reverted (`list[str]`): parameters reverted to base.
        stats (`dict`): fidelity statistics (``rel_error`` per compressed matrix, logit MSE when measured).
        distillation (`dict`, *optional*): scale-distillation settings when it was used.
        model_class (`str`, *optional*): transformers class of the fine-tuned model (used by the loader).
        extra (`dict`): anything else recorded in the metadata (LoRA size trade-off, ...).

    Example:

    ```python
    >>> import torch
    >>> from hf_obliviate.delta import compress_delta
    >>> base = {"fc.weight": torch.zeros(4, 8)}
    >>> ft = {"fc.weight": torch.randn(4, 8)}
    >>> cd = compress_delta(base, ft, linear_names={"fc.weight"})
    >>> cd.modules
    ['fc.weight']
    >>> new = cd.apply_to_state_dict(base)
    >>> bool(((new["fc.weight"] > 0) == (ft["fc.weight"] >= 0)).all())
    True

    ```
    """

    entries: dict[str, DeltaEntry]
    method: str
    method_config: dict[str, Any]
    base_fingerprint: str
    base_model: str | None = None
    base_revision: str | None = None
    non_linear: str = "dense"
    reverted: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    distillation: dict[str, Any] | None = None
    model_class: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def modules(self) -> list[str]:
        """Parameters compressed with ``method`` (the ``nn.Linear`` weights), sorted."""
        return sorted(n for n, e in self.entries.items() if e.kind == self.method)

    def size_report(self) -> dict[str, Any]:
        """Bytes of the compressed tensors vs a dense fp16 delta of the same parameters."""
        return size_report(self.entries.values(), self.method)

    # ------------------------------------------------------------------------------------------------ decoding
    def to_dense(self) -> dict[str, torch.Tensor]:
        """Dense fp32 deltas of every delta entry (``"full"`` entries, which replace a parameter, are left out)."""
        return {name: e.decode() for name, e in self.entries.items() if e.kind != "full"}

    def apply_to_state_dict(self, base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns a new state dict: base + decoded delta (``"full"`` entries replace the parameter)."""
        out = dict(base_state)
        for name, entry in self.entries.items():
            if entry.kind == "full":
                out[name] = entry.decode().to(base_state[name].dtype if name in base_state else torch.float32)
                continue
            if name not in base_state:
                raise ShapeMismatchError(f"The delta has {name!r} but the base state dict does not.")
            base = base_state[name]
            if tuple(base.shape) != entry.shape:
                raise ShapeMismatchError(
                    f"{name}: the delta is for shape {list(entry.shape)}, the base parameter has {list(base.shape)}."
                )
            out[name] = entry.add_to_(base.detach().clone())
        return out

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Adds the decoded delta to ``model``'s parameters in place and returns the model.

        Shapes are checked before anything is modified; a mismatch raises [`ShapeMismatchError`].
        """
        state = dedup_state_dict(model.state_dict(keep_vars=True))
        problems = []
        for name, entry in self.entries.items():
            if name not in state:
                problems.append(f"{name}: missing from the model")
            elif tuple(state[name].shape) != entry.shape:
                problems.append(f"{name}: delta shape {list(entry.shape)}, model shape {list(state[name].shape)}")
        if problems:
            raise ShapeMismatchError(
                "The delta does not fit this model (was it made for another architecture or size?): "
                + "; ".join(problems[:5])
                + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            )
        for name, entry in self.entries.items():
            target = state[name]
            if entry.kind == "full":
                target.data.copy_(entry.decode().to(target.device, target.dtype))
            else:
                entry.add_to_(target.data)
        return model

    def scaled(self, factor: float) -> CompressedDelta:
        """A copy whose delta is ``factor`` times this one: the model moves that fraction of the way from the base
        to this delta's model (``factor < 1`` shrinks the fine-tune toward the base).

        BitDelta scales (``alpha``) and dense deltas are multiplied; the 1-bit signs are shared, so the size does not
        change. ``"full"`` entries (parameters the base lacks) are kept as they are. The factor is recorded in
        ``extra["scale_factor"]`` (multiplied into any factor already there). Other codecs raise ``ValueError``.
        ``stats`` are kept: a relative error ``‖Δ − Δ̂‖ / ‖Δ‖`` is the same for ``factor · Δ`` and ``factor · Δ̂``.

        Example:

        ```python
        >>> import torch
        >>> from hf_obliviate.delta import compress_delta
        >>> base, ft = {"fc.weight": torch.zeros(2, 4)}, {"fc.weight": torch.ones(2, 4)}
        >>> cd = compress_delta(base, ft, linear_names={"fc.weight"})
        >>> cd.scaled(0.5).to_dense()["fc.weight"][0, 0].item()
        0.5

        ```
        """
        factor = check_scale_factor(factor)
        entries = {}
        for name, entry in self.entries.items():
            tensors = scale_entry_tensors(name, entry.kind, entry.tensors, factor)
            entries[name] = DeltaEntry(entry.kind, entry.shape, tensors, dict(entry.params))
        extra = copy.deepcopy(self.extra)
        extra["scale_factor"] = float(extra.get("scale_factor", 1.0)) * float(factor)
        return dataclasses.replace(
            self, entries=entries, extra=extra, stats=copy.deepcopy(self.stats), reverted=list(self.reverted)
        )

    # ---------------------------------------------------------------------------------------------------- I/O
    def metadata(self, entry_shard: dict[str, str] | None = None, shards: dict[str, str] | None = None) -> dict:
        """The ``obliviate_delta.json`` content."""
        entries = {
            name: {"kind": e.kind, "shape": list(e.shape), "params": e.params, "shard": (entry_shard or {}).get(name)}
            for name, e in sorted(self.entries.items())
        }
        return build_metadata(
            entries=entries,
            shards=shards or {},
            method=self.method,
            method_config=self.method_config,
            base_fingerprint=self.base_fingerprint,
            base_model=self.base_model,
            base_revision=self.base_revision,
            non_linear=self.non_linear,
            reverted=self.reverted,
            stats=self.stats,
            distillation=self.distillation,
            model_class=self.model_class,
            extra=self.extra,
            size=self.size_report(),
        )

    def save(self, folder: str | os.PathLike, max_shard_size: int | str = "2GB") -> list[Path]:
        """Writes ``obliviate_delta.json`` and the safetensors shards to ``folder``; returns the written paths."""
        folder = Path(folder)
        writer = ShardWriter(folder, max_shard_size, header=_header(self.method, self.base_fingerprint))
        for name in sorted(self.entries):
            writer.add(name, self.entries[name])
        entry_shard, shards = writer.finish()
        write_json_atomic(folder / DELTA_CONFIG_NAME, self.metadata(entry_shard, shards))
        return [folder / DELTA_CONFIG_NAME] + [folder / s for s in shards]

    @classmethod
    def load(cls, folder: str | os.PathLike, verify_checksums: bool = True) -> CompressedDelta:
        """Reads a delta written by [`~CompressedDelta.save`] or the streaming compressor, verifying it.

        Raises [`UnsupportedFormatVersionError`], [`CorruptDeltaError`] (missing, truncated or altered shard) or
        [`ShapeMismatchError`] (a stored tensor disagrees with the recorded shape). Only safetensors is read.
        """
        folder = Path(folder)
        meta = read_delta_metadata(folder, verify=verify_checksums)
        tensors_by_shard: dict[str, dict[str, torch.Tensor]] = {}
        for shard, digest in meta["shards"].items():
            if "/" in shard or "\\" in shard or shard.startswith("."):
                raise CorruptDeltaError(f"Refusing shard name {shard!r} in {DELTA_CONFIG_NAME}.")
            path = folder / shard
            if not path.is_file():
                raise CorruptDeltaError(f"Shard {shard} listed in {DELTA_CONFIG_NAME} is missing from {folder}.")
            if verify_checksums and file_sha256(path) != digest:
                raise CorruptDeltaError(
                    f"Shard {path} does not match its recorded sha256 (truncated or corrupt download?). "
                    "Delete it and download the delta again."
                )
            tensors_by_shard[shard] = _read_shard(path)
        entries: dict[str, DeltaEntry] = {}
        known_kinds = {"dense", "full", *available_methods()}
        for name, info in meta["entries"].items():
            kind = info.get("kind")
            if kind not in known_kinds:
                raise UnsupportedFormatVersionError(
                    f"Entry {name!r} uses codec {kind!r}, unknown to this hf-obliviate; upgrade it to load the delta."
                )
            shard = info.get("shard")
            stored = tensors_by_shard.get(shard)
            if stored is None:
                raise CorruptDeltaError(f"Entry {name!r} points to shard {shard!r}, which is not listed.")
            prefix = f"{name}{SEP}"
            parts = {key[len(prefix) :]: t for key, t in stored.items() if key.startswith(prefix)}
            if not parts:
                raise CorruptDeltaError(f"Entry {name!r} has no tensors in {shard}.")
            entry = DeltaEntry(kind, tuple(int(s) for s in info["shape"]), parts, dict(info.get("params") or {}))
            _check_entry_shapes(name, entry)
            entries[name] = entry
        return cls(
            entries=entries,
            method=meta["method"],
            method_config=dict(meta.get("method_config") or {}),
            base_fingerprint=meta["base_fingerprint"],
            base_model=meta.get("base_model"),
            base_revision=meta.get("base_revision"),
            non_linear=meta.get("non_linear", "dense"),
            reverted=list(meta.get("reverted") or []),
            stats=dict(meta.get("stats") or {}),
            distillation=meta.get("distillation"),
            model_class=meta.get("model_class"),
            extra=dict(meta.get("extra") or {}),
        )


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            version = header.get("obliviate_format_version")
            if version is not None and version not in {str(v) for v in SUPPORTED_FORMAT_VERSIONS}:
                raise UnsupportedFormatVersionError(
                    f"{path} was written with format version {version}; upgrade hf-obliviate to read it."
                )
            return {key: f.get_tensor(key) for key in f.keys()}
    except DeltaFormatError:
        raise
    except Exception as err:
        raise CorruptDeltaError(f"Cannot read {path} as safetensors (truncated or corrupt?): {err}") from err


def _check_entry_shapes(name: str, entry: DeltaEntry) -> None:
    """Cheap structural checks of the stored parts against the recorded shape (before any decoding)."""
    n = entry.numel
    t = entry.tensors
    try:
        if entry.kind == "bitdelta":
            signs, alpha = t["signs"], t["alpha"]
            ok = signs.dim() == 2 and signs.shape[1] == (n + 7) // 8 and tuple(alpha.shape) == (signs.shape[0],)
        elif entry.kind in ("dense", "full"):
            ok = tuple(t["value"].shape) == entry.shape
        elif entry.kind == "svd":
            us, v = t["us"], t["v"]
            ok = us.shape[0] == entry.shape[0] and us.shape[1] == v.shape[0] and us.shape[0] * v.shape[1] == n
        elif entry.kind in ("dare", "magnitude"):
            idx, val = t["indices"], t["values"]
            ok = idx.dim() == 1 and idx.shape == val.shape and idx.numel() <= n
        else:
            ok = True
    except KeyError as err:
        raise CorruptDeltaError(f"Entry {name!r} ({entry.kind}) lacks its part {err}.") from err
    if not ok:
        parts = {k: list(v.shape) for k, v in t.items()}
        raise ShapeMismatchError(
            f"Entry {name!r} ({entry.kind}) holds parts {parts} that do not fit its recorded shape "
            f"{list(entry.shape)}."
        )


def _header(method: str, fingerprint: str) -> dict[str, str]:
    return {"method": method, "base_fingerprint": fingerprint}
