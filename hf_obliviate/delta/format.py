"""On-disk format of a compressed delta: constants, errors, sign packing and the base-weight fingerprint.

A compressed delta is a folder (or Hub repo) holding

- ``obliviate_delta.json``: the metadata (format version, base model id / revision / fingerprint, method, ``k``,
  distillation, the entry list with shapes, the shard list with their sha256, the fidelity statistics) and
  ``metadata_sha256``, the checksum of the metadata itself;
- ``delta-0000i-of-0000n.safetensors``: the tensors, safetensors header metadata ``{"format": "pt", ...}``.

Only safetensors and JSON are ever read: no pickle, no ``torch.load``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads lazily: the streaming compressor reads, hashes and writes without it
    import torch

__all__ = [
    "DELTA_CONFIG_NAME",
    "FORMAT_VERSION",
    "LORA_MODES",
    "BaseMismatchError",
    "CorruptDeltaError",
    "DeltaFormatError",
    "Fingerprinter",
    "ShapeMismatchError",
    "UnsupportedFormatVersionError",
    "fingerprint_tensors",
    "label_fields",
    "label_kwargs",
    "metadata_checksum",
    "pack_signs",
    "scale_entry_tensors",
    "shard_name",
    "tool_version",
    "unpack_signs",
]

FORMAT_VERSION = 1
DELTA_CONFIG_NAME = "obliviate_delta.json"
SUPPORTED_FORMAT_VERSIONS = (1,)


class DeltaFormatError(ValueError):
    """Base class of every error raised while reading or applying a compressed delta."""


class UnsupportedFormatVersionError(DeltaFormatError):
    """The delta was written by a format version this release cannot read."""


class CorruptDeltaError(DeltaFormatError):
    """A delta file is missing, truncated, or its content does not match the recorded checksum."""


class ShapeMismatchError(DeltaFormatError):
    """A stored tensor does not have the shape recorded for it, or the base parameter has another shape."""


class BaseMismatchError(DeltaFormatError):
    """The base weights given to the loader are not the ones the delta was computed against."""


def tool_version() -> str:
    """Version string of hf-obliviate recorded in every delta."""
    try:
        from importlib.metadata import version

        return version("hf-obliviate")
    except Exception:  # pragma: no cover - not installed
        return "0+unknown"


def shard_name(index: int, total: int) -> str:
    """File name of shard ``index`` (1-based) out of ``total``: ``delta-00001-of-00003.safetensors``."""
    return f"delta-{index:05d}-of-{total:05d}.safetensors"


# ----------------------------------------------------------------------------------------------------------- signs
def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """Packs the signs of ``delta`` 8 per byte (little bit order: element ``8i + j`` is bit ``j`` of byte ``i``).

    A bit is 1 for a non-negative element and 0 for a negative one, so **sign(0) = +1**. The flattened tensor is
    zero-padded to a multiple of 8 elements.

    Example:

    ```python
    >>> import torch
    >>> from hf_obliviate.delta import pack_signs, unpack_signs
    >>> d = torch.tensor([[0.5, -1.0, 0.0], [-2.0, 3.0, -0.1]])
    >>> unpack_signs(pack_signs(d), d.shape)
    tensor([[ 1., -1.,  1.],
            [-1.,  1., -1.]])

    ```
    """
    import torch

    flat = delta.detach().reshape(-1)
    if flat.device.type != "cpu":
        bits = (flat >= 0).to(torch.uint8)
        bits = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)]).view(-1, 8)
        weights = (2 ** torch.arange(8, dtype=torch.int32, device=bits.device)).to(torch.uint8)
        return (bits * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8).cpu().contiguous()
    return pack_bits(flat >= 0)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Packs a flat CPU bool tensor 8 per byte, little bit order, zero-padded (numpy's ``packbits``, one C pass)."""
    import torch

    return torch.from_numpy(np.packbits(bits.numpy(), bitorder="little"))


def unpack_signs(packed: torch.Tensor, shape: Iterable[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of [`pack_signs`]: a tensor of ``shape`` holding ±1 in ``dtype`` (default float32)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ShapeMismatchError(
            f"Packed signs hold {packed.numel()} bytes of {packed.dtype}, expected {(numel + 7) // 8} uint8 bytes "
            f"for shape {list(shape)}: the delta file is corrupt or was written for another model."
        )
    if packed.device.type != "cpu":
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = (packed.unsqueeze(1) >> shifts).bitwise_and_(1).reshape(-1)[:numel]
    else:
        bits = torch.from_numpy(np.unpackbits(packed.numpy(), count=numel, bitorder="little"))
    signs = bits.to(dtype)
    del bits
    return signs.mul_(2).sub_(1).reshape(shape)  # in place: one tensor of the output size, not three


# ----------------------------------------------------------------------------------------------------- fingerprint
class Fingerprinter:
    """Incremental form of [`fingerprint_tensors`]: feed tensors in sorted name order, one at a time."""

    def __init__(self):
        self._h = hashlib.sha256()
        self._previous: str | None = None

    def update(self, name: str, tensor: torch.Tensor) -> None:
        self.begin(name, tuple(tensor.shape), tensor.dtype)
        self.feed(tensor)

    def begin(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | str) -> None:
        """Starts a tensor whose bytes then arrive in order through [`~Fingerprinter.feed`] (chunked reads).

        ``dtype`` is a torch dtype or its name without the ``torch.`` prefix (``"bfloat16"``): both hash the same.
        """
        if self._previous is not None and name <= self._previous:
            raise ValueError(f"Fingerprints need names in increasing order, got {name!r} after {self._previous!r}.")
        self._previous = name
        header = json.dumps([name, list(shape), str(dtype).replace("torch.", "")])
        self._h.update(header.encode())
        self._h.update(b"\0")

    def feed(self, chunk: torch.Tensor | np.ndarray | bytes | bytearray | memoryview) -> None:
        """Hashes the next bytes of the current tensor (in place, without a bytes copy): a torch tensor, a numpy
        array or raw bytes in the tensor's own dtype."""
        if isinstance(chunk, np.ndarray):
            self._h.update(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
        elif isinstance(chunk, (bytes, bytearray, memoryview)):
            self._h.update(chunk)
        else:
            import torch

            flat = chunk.detach().to("cpu").contiguous().reshape(-1)
            self._h.update(flat.view(torch.uint8).numpy())

    def hexdigest(self) -> str:
        return "sha256:" + self._h.hexdigest()


def fingerprint_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of tensors, **in sorted name order**, computed streaming.

    The iterable must yield names in increasing order (checked) so that a checkpoint can be hashed one tensor at a
    time. Returns ``"sha256:<hex>"``.
    """
    fp = Fingerprinter()
    for name, tensor in named_tensors:
        fp.update(name, tensor)
    return fp.hexdigest()


def dedup_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops tensors that alias an earlier one (tied weights), as ``save_pretrained`` does, keeping the first name."""
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state.items():
        if tensor.device.type != "meta" and tensor.numel() > 0:
            key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
            if key in seen:
                continue
            seen.add(key)
        out[name] = tensor
    return out


def fingerprint_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Fingerprint of an in-memory state dict (tied duplicates removed, as on disk)."""
    state = dedup_state_dict(state)
    return fingerprint_tensors((name, state[name]) for name in sorted(state))


METADATA_CHECKSUM_KEY = "metadata_sha256"


def metadata_checksum(meta: dict) -> str:
    """sha256 of the delta metadata itself (canonical JSON of every field but ``metadata_sha256``).

    Stored in ``obliviate_delta.json`` as ``metadata_sha256`` so that any change to the file's content (a flipped byte,
    a hand edit) is refused on load, like the shards, whose sha256 the metadata records.
    """
    body = {k: v for k, v in meta.items() if k != METADATA_CHECKSUM_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


# How a peft (LoRA) fine-tune is pushed: "merged" (B·A compressed like any Linear delta) or "factors" (the adapter).
LORA_MODES = ("merged", "factors")


def label_fields(model_class: str | None, config: dict) -> dict:
    """``{"labels": ...}``, the entry of the delta metadata's ``extra`` that holds the label settings a rebuilt
    classifier needs from its fine-tune's config (``{}`` for other models), to merge into ``extra``.

    The loader builds the base with the fine-tune's class; a classification head sized or named from the base's own
    config would lose the fine-tune's label count (a shape error) or its label names. [`label_kwargs`] passes them to
    ``from_pretrained`` on load."""
    id2label = config.get("id2label")
    if not model_class or "Classification" not in model_class or not id2label:
        return {}
    return {
        "labels": {
            "id2label": {str(k): v for k, v in id2label.items()},
            "label2id": {str(k): int(v) for k, v in (config.get("label2id") or {}).items()},
        }
    }


def label_kwargs(meta: dict) -> dict:
    """The ``from_pretrained`` keyword arguments that rebuild the head of [`label_fields`] from a delta's metadata
    (integer label ids, as transformers keeps them in memory)."""
    labels = (meta.get("extra") or {}).get("labels") or {}
    if not labels:
        return {}
    return {"id2label": {int(k): v for k, v in labels["id2label"].items()}, "label2id": dict(labels["label2id"])}


def check_scale_factor(factor: float) -> float:
    """Refuses a delta scale factor that is not a finite number >= 0 (1 keeps the delta, < 1 shrinks it)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 0:
        raise ValueError(f"The delta scale factor must be a finite number >= 0 (1: unchanged), got {factor!r}.")
    return float(factor)


def scale_entry_tensors(name: str, kind: str, tensors: dict, factor: float) -> dict:
    """The tensors of one delta entry with the delta times ``factor`` (numpy arrays or torch tensors alike).

    BitDelta entries multiply their scales (``alpha``; the 1-bit signs are shared), dense deltas their values, in
    fp32 and back to the stored dtype; ``"full"`` entries (parameters the base lacks) are kept. Other codecs raise
    ``ValueError``: their factors do not scale linearly in one tensor."""
    out = dict(tensors)
    if kind == "bitdelta":
        out["alpha"] = tensors["alpha"] * factor
    elif kind == "dense":
        value = tensors["value"]
        if isinstance(value, np.ndarray):
            out["value"] = (value.astype(np.float32) * factor).astype(value.dtype)
        else:
            out["value"] = (value.float() * factor).to(value.dtype)
    elif kind != "full":
        raise ValueError(
            f"{name}: scaling a {kind!r} entry is not supported (only BitDelta and dense deltas); compress with "
            "method='bitdelta' to shrink the delta."
        )
    return out


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()
