"""Verified loading: base weights + a compressed delta (or a stored adapter) → a ready model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hf_obliviate.delta import (
    DELTA_CONFIG_NAME,
    BaseMismatchError,
    CompressedDelta,
    fingerprint_checkpoint,
    fingerprint_state_dict,
    read_delta_metadata,
)
from hf_obliviate.delta.format import label_kwargs

from .push import load_base_model

__all__ = ["download_delta", "load_compressed"]

DELTA_PATTERNS = [
    DELTA_CONFIG_NAME,
    "delta-*.safetensors",
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",
]


def download_delta(
    repo_id_or_dir: str | os.PathLike, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """Local folder of a delta: the folder itself, or a Hub snapshot of only the delta's files (no pickles)."""
    path = Path(repo_id_or_dir)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(repo_id_or_dir), revision=revision, token=token, allow_patterns=DELTA_PATTERNS))


def load_compressed(
    base_model: str | os.PathLike | torch.nn.Module,
    repo_id_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    verify: bool = True,
    **from_pretrained_kwargs: Any,
) -> torch.nn.Module:
    """Returns ``base + decompressed delta``, after checking that the base is the one the delta was made for.

    Args:
        base_model (`str` or `torch.nn.Module`):
            Hub id or folder of the base weights, or an already loaded base model (modified in place). The
            fingerprint of a folder or repo is computed over its safetensors files; that of a loaded model over its
            state dict, which matches when the checkpoint holds exactly the model's tensors (pass the folder or id
            when it does not, e.g. a checkpoint with extra heads).
        repo_id_or_dir (`str`):
            Hub repo or local folder holding ``obliviate_delta.json`` and its shards.
        revision / base_revision (`str`, *optional*):
            Revisions of the delta repo and of the base repo.
        verify (`bool`, *optional*, defaults to `True`):
            Check the base fingerprint (and shard checksums). Leave it on.
        from_pretrained_kwargs:
            Passed to the transformers ``from_pretrained`` of the base (``trust_remote_code`` is ignored).

    Returns:
        The rebuilt model in eval mode: a transformers model, or a ``peft.PeftModel`` when the delta is an adapter
        stored as raw factors.

    Raises:
        [`BaseMismatchError`] (another base), [`CorruptDeltaError`], [`ShapeMismatchError`],
        [`UnsupportedFormatVersionError`], all subclasses of ``ValueError``.

    Example:

    ```python
    >>> import tempfile, torch
    >>> from transformers import BertConfig, BertModel
    >>> from hf_obliviate.hub import load_compressed, push_compressed_delta
    >>> cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    >>> d = tempfile.mkdtemp()
    >>> BertModel(cfg).save_pretrained(f"{d}/base")
    >>> ft = BertModel.from_pretrained(f"{d}/base")
    >>> _ = push_compressed_delta(ft, f"{d}/base", "me/ft-delta", dry_run_dir=f"{d}/out", progress=False)
    >>> type(load_compressed(f"{d}/base", f"{d}/out")).__name__
    'BertModel'

    ```
    """
    folder = download_delta(repo_id_or_dir, revision, token)
    meta = read_delta_metadata(folder, verify=verify)
    expected = meta["base_fingerprint"]
    if isinstance(base_model, torch.nn.Module):
        model = base_model
        found_id = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        found = fingerprint_state_dict(model.state_dict()) if verify else expected
        missing: list[str] = []
    else:
        from hf_obliviate.delta.checkpoint import resolve_checkpoint

        base_dir, _ = resolve_checkpoint(base_model, base_revision, token)
        found_id = str(base_model)
        found = fingerprint_checkpoint(base_dir) if verify else expected
    if found != expected:
        raise BaseMismatchError(
            f"The delta in {repo_id_or_dir} was made for base model {meta.get('base_model')!r} "
            f"(revision {meta.get('base_revision')!r}, fingerprint {expected}), but the base given is {found_id!r} "
            f"with fingerprint {found}. Load it with the base it was made for."
        )
    delta = CompressedDelta.load(folder, verify_checksums=verify)  # verify shards before loading the base
    if not isinstance(base_model, torch.nn.Module):
        # a classifier's label names and count come from the fine-tune (the base's config may have none or others)
        model, _, _, missing = load_base_model(
            base_dir, meta.get("model_class"), None, token, **{**label_kwargs(meta), **from_pretrained_kwargs}
        )
    if meta["method"] == "lora_factors":
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder), is_trainable=False).eval()
    not_restored = sorted(set(missing) - {n for n, e in delta.entries.items() if e.kind == "full"})
    if not_restored:
        import logging

        logging.getLogger(__name__).warning(
            "%d parameters are missing from the base checkpoint and absent from the delta (left at random init): %s",
            len(not_restored),
            not_restored[:5],
        )
    return delta.apply(model).eval()
