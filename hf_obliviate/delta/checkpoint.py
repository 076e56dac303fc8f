"""Streaming access to safetensors checkpoints (local folders, sharded or not, or Hub repos).

Tensors are read one at a time with plain file reads (the safetensors header gives each tensor's byte range), so
that hashing or diffing two checkpoints keeps a few tensors in memory, never two models. Reading through a memory
map (``safe_open``) would be as fast, but every page touched stays in the process's resident set while the file
is open, so a pass over two checkpoints would show their whole size as RSS.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .format import CorruptDeltaError, Fingerprinter

if TYPE_CHECKING:  # torch loads lazily: with ``framework="np"`` the reader never imports it
    import torch

__all__ = [
    "CheckpointReader",
    "fingerprint_checkpoint",
    "linear_weight_names",
    "linear_weight_names_from_config",
    "resolve_checkpoint",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def resolve_checkpoint(
    name_or_path: str | os.PathLike, revision: str | None = None, token: str | bool | None = None
) -> tuple[Path, str | None]:
    """Returns ``(local folder, revision)`` for a local folder or a Hub repo id.

    Only ``*.safetensors`` and ``*.json`` files are downloaded from the Hub (``snapshot_download``); the revision
    returned is the resolved commit sha for Hub repos and ``None`` for local folders.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path, revision
    from huggingface_hub import snapshot_download

    local = snapshot_download(
        str(name_or_path), revision=revision, token=token, allow_patterns=["*.safetensors", "*.json"]
    )
    commit = Path(local).name  # snapshots/<commit sha>
    return Path(local), commit


# safetensors dtype code -> (torch dtype name, numpy dtype of the raw bytes). bfloat16 has no numpy dtype: its
# bytes are read as uint16 (`as_float32` widens them exactly).
_ST_DTYPES = {
    "F64": ("float64", np.float64), "F32": ("float32", np.float32), "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.uint16), "I64": ("int64", np.int64), "I32": ("int32", np.int32),
    "I16": ("int16", np.int16), "I8": ("int8", np.int8), "U8": ("uint8", np.uint8), "BOOL": ("bool", np.bool_),
}  # fmt: skip
FLOAT_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16")


def as_float32(array: np.ndarray, dtype_name: str) -> np.ndarray:
    """A numpy chunk read with ``framework="np"`` as float32 (bfloat16's uint16 bytes widened exactly; float32
    returned as is, not copied)."""
    if dtype_name == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array if array.dtype == np.float32 else array.astype(np.float32)


def _wrap(buf: bytearray, dtype_name: str, framework: str):
    if framework == "np":
        return np.frombuffer(buf, dtype=_NP_DTYPES[dtype_name])
    import torch

    if not buf:  # torch.frombuffer refuses an empty buffer
        return torch.empty(0, dtype=getattr(torch, dtype_name))
    return torch.frombuffer(buf, dtype=getattr(torch, dtype_name))


_NP_DTYPES = {name: np_dtype for name, np_dtype in _ST_DTYPES.values()}
_FRAMEWORKS = ("pt", "np")


class _SafetensorsFile:
    """One safetensors file read with ``readinto`` (no memory map): the page cache is not counted in the RSS."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            size = os.fstat(self._f.fileno()).st_size
            raw = self._f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(self._f.read(n))
            header.pop("__metadata__", None)
            for info in header.values():
                start, end = info["data_offsets"]
                if not 0 <= start <= end or 8 + n + end > size:
                    raise ValueError("tensor data out of the file")
        except (ValueError, KeyError, TypeError, struct.error) as err:
            self._f.close()
            raise CorruptDeltaError(f"Cannot open {path}: not a valid safetensors file ({err}).") from err
        self.header: dict[str, dict] = header
        self._data_start = 8 + n
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype_name(self, name: str) -> str | None:
        """The torch dtype name of a tensor read with plain file reads (``None``: safetensors must decode it)."""
        known = _ST_DTYPES.get(self.header[name]["dtype"])
        return known[0] if known is not None and sys.byteorder == "little" else None

    def _plain_span(self, name: str) -> tuple[str, int, int] | None:
        """``(dtype name, start, end)`` of a tensor read with plain file reads, its byte count checked against its
        shape; ``None`` for dtypes that safetensors itself must decode (fp8, ...) or a big-endian host."""
        info = self.header[name]
        dtype = self.dtype_name(name)
        if dtype is None:
            return None
        start, end = info["data_offsets"]
        if math.prod(info["shape"]) * np.dtype(_NP_DTYPES[dtype]).itemsize != end - start:
            raise CorruptDeltaError(f"{self.path}: tensor {name!r} has {end - start} bytes for shape {info['shape']}.")
        return dtype, start, end

    def _read(self, name: str, offset: int, nbytes: int) -> bytearray:
        buf = bytearray(nbytes)
        self._f.seek(self._data_start + offset)  # every read seeks: readers of several tensors may interleave
        if self._f.readinto(buf) != nbytes:
            raise CorruptDeltaError(f"{self.path} is truncated (tensor {name!r}).")
        return buf

    def get(self, name: str, framework: str = "pt"):
        span = self._plain_span(name)
        if span is None:  # rare dtypes (fp8, ...): let safetensors decode them (torch only)
            if framework != "pt":
                raise TypeError(f"{self.path}: tensor {name!r} ({self.header[name]['dtype']}) needs framework='pt'.")
            if self._mmap is None:
                from safetensors import safe_open

                self._mmap = safe_open(self.path, framework="pt").__enter__()
            return self._mmap.get_tensor(name)
        dtype, start, end = span
        shape = self.shape(name)
        return _wrap(self._read(name, start, end - start), dtype, framework).reshape(shape)

    def chunks(self, name: str, chunk_elems: int, framework: str = "pt") -> Iterator:
        """The flattened tensor in consecutive pieces of ``chunk_elems`` elements, each read when it is needed."""
        span = self._plain_span(name)
        if span is None:
            yield from self.get(name, framework).reshape(-1).split(chunk_elems)
            return
        dtype, start, end = span
        step = chunk_elems * np.dtype(_NP_DTYPES[dtype]).itemsize
        for offset in range(start, end, step):
            yield _wrap(self._read(name, offset, min(step, end - offset)), dtype, framework)

    def close(self) -> None:
        self._f.close()
        if self._mmap is not None:
            self._mmap.__exit__(None, None, None)
            self._mmap = None

    def __enter__(self) -> _SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CheckpointReader:
    """Reads the tensors of a safetensors checkpoint folder one by one.

    Args:
        folder (`str` or `os.PathLike`):
            A folder with ``model.safetensors`` or ``model.safetensors.index.json`` and its shards (an adapter folder
            with ``adapter_model.safetensors`` also works).

    Example:

    ```python
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from hf_obliviate.delta.checkpoint import CheckpointReader
    >>> d = tempfile.mkdtemp()
    >>> save_file({"w": torch.ones(2, 2)}, f"{d}/model.safetensors", metadata={"format": "pt"})
    >>> with CheckpointReader(d) as reader:
    ...     print(reader.names(), reader.shape("w"))
    ['w'] (2, 2)

    ```
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            candidates = [SAFE_WEIGHTS_NAME, "adapter_model.safetensors"]
            single = next((self.folder / c for c in candidates if (self.folder / c).is_file()), None)
            if single is None:
                raise FileNotFoundError(
                    f"No {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {self.folder}: save the model with "
                    "`save_pretrained(..., safe_serialization=True)` (only safetensors checkpoints are read)."
                )
            with _SafetensorsFile(single) as f:
                weight_map = dict.fromkeys(f.keys(), single.name)
        self.weight_map: dict[str, str] = dict(weight_map)
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def _handle(self, name: str):
        file = self.weight_map[name]
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(_SafetensorsFile(self.folder / file))
            except CorruptDeltaError:
                raise
            except Exception as err:
                raise CorruptDeltaError(f"Cannot open {self.folder / file}: {err}") from err
        return self._handles[file]

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handle(name).shape(name)

    def get(self, name: str, framework: str = "pt") -> torch.Tensor | np.ndarray:
        """Materialises one tensor (a fresh CPU tensor that owns its memory). ``framework="np"`` gives a numpy array
        without importing torch (bfloat16 as its raw uint16 bytes: see [`as_float32`])."""
        _check_framework(framework)
        return self._handle(name).get(name, framework)

    def chunks(self, name: str, chunk_elems: int = 1 << 18, framework: str = "pt") -> Iterator:
        """Reads one tensor as flat pieces of ``chunk_elems`` elements (the last may be shorter), never all at once."""
        _check_framework(framework)
        return self._handle(name).chunks(name, chunk_elems, framework)

    def dtype_name(self, name: str) -> str | None:
        """The stored dtype as a torch dtype name (``"bfloat16"``), without importing torch; ``None`` for dtypes read
        through safetensors itself, such as fp8."""
        return self._handle(name).dtype_name(name)

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype (``None`` for dtypes read through safetensors itself, such as fp8)."""
        import torch

        dtype = self.dtype_name(name)
        return getattr(torch, dtype) if dtype is not None else None

    def config(self) -> dict | None:
        path = self.folder / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None


def _check_framework(framework: str) -> None:
    if framework not in _FRAMEWORKS:
        raise ValueError(f"framework must be one of {_FRAMEWORKS}, got {framework!r}.")


def fingerprint_checkpoint(folder: str | os.PathLike, chunk_elems: int = 1 << 18) -> str:
    """Fingerprint of the base weights stored in a checkpoint folder (the same digest as [`fingerprint_tensors`] of
    its tensors), read in chunks, without torch for the common dtypes."""
    fp = Fingerprinter()
    with CheckpointReader(folder) as reader:
        for name in reader.names():
            fingerprint_stored(fp, reader, name, chunk_elems)
    return fp.hexdigest()


def fingerprint_stored(fp: Fingerprinter, reader: CheckpointReader, name: str, chunk_elems: int = 1 << 18) -> None:
    """Feeds one stored tensor into ``fp``: read in numpy chunks, or whole through torch for dtypes only safetensors
    decodes (fp8, ...)."""
    dtype = reader.dtype_name(name)
    if dtype is None:
        fp.update(name, reader.get(name))
        return
    fp.begin(name, reader.shape(name), dtype)
    for chunk in reader.chunks(name, chunk_elems, framework="np"):
        fp.feed(chunk)


def linear_weight_names(model: torch.nn.Module) -> set[str]:
    """Names of the ``weight`` parameters of the model's ``nn.Linear`` modules, output embeddings (LM head) excluded.

    Selection is by module type, never by name. Tied output embeddings are excluded because they alias the
    input embeddings, which are kept dense.
    """
    excluded: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            excluded.add(id(head))
    import torch

    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in excluded:
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def linear_weight_names_from_config(folder: str | os.PathLike) -> set[str] | None:
    """Builds the architecture named in the folder's ``config.json`` on the meta device and lists its Linear weights.

    Only classes defined in ``transformers`` are used (never remote code). Returns ``None`` when there is no config or
    the architecture is unknown; callers then fall back to "2-D ``*.weight`` tensors".
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    import torch
    import transformers

    archs = json.loads(path.read_text()).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None or not isinstance(cls, type):
        return None
    cfg = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = cls(cfg)
    return linear_weight_names(model)
