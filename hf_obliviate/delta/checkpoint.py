"""Streaming access to safetensors checkpoints (local folders, sharded or not, or Hub repos).

Tensors are read one at a time with ``safetensors.safe_open`` so that hashing or diffing two checkpoints keeps a
few tensors in memory, never two models.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .format import CorruptDeltaError, fingerprint_tensors

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
            with safe_open(single, framework="pt") as f:
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
                self._handles[file] = self._stack.enter_context(safe_open(self.folder / file, framework="pt"))
            except Exception as err:
                raise CorruptDeltaError(f"Cannot open {self.folder / file}: {err}") from err
        return self._handles[file]

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """Materialises one tensor."""
        return self._handle(name).get_tensor(name)

    def config(self) -> dict | None:
        path = self.folder / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None


def fingerprint_checkpoint(folder: str | os.PathLike) -> str:
    """Fingerprint of the base weights stored in a checkpoint folder, hashed one tensor at a time."""
    with CheckpointReader(folder) as reader:
        return fingerprint_tensors((name, reader.get(name)) for name in reader.names())


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
    import transformers

    archs = json.loads(path.read_text()).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None or not isinstance(cls, type):
        return None
    cfg = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = cls(cfg)
    return linear_weight_names(model)
