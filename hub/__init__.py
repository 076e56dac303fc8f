"""Compressed safe deltas on the Hugging Face Hub: push (one commit + model card), verified load, and a local
Hub-compatible endpoint for development and tests ([`LocalHub`]).

Exports are lazy, so that ``hf-obliviate compress`` (which lives in ``hf_obliviate.hub.cli``) starts without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hf_obliviate._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "HubAuthError": ".push",
    "LocalHub": ".local",
    "build_delta_folder": ".push",
    "build_model_card": ".card",
    "download_delta": ".load",
    "ensure_repo": ".push",
    "load_base_model": ".push",
    "load_compressed": ".load",
    "push_compressed_delta": ".push",
    "upload_delta_folder": ".push",
}

__all__ = [
    "HubAuthError",
    "LocalHub",
    "build_delta_folder",
    "build_model_card",
    "download_delta",
    "ensure_repo",
    "load_base_model",
    "load_compressed",
    "push_compressed_delta",
    "upload_delta_folder",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .card import build_model_card
    from .load import download_delta, load_compressed
    from .local import LocalHub
    from .push import (
        HubAuthError,
        build_delta_folder,
        ensure_repo,
        load_base_model,
        push_compressed_delta,
        upload_delta_folder,
    )
