"""Compressed safe deltas on the Hugging Face Hub: push (one commit + model card), verified load, and a local
Hub-compatible endpoint for development and tests ([`LocalHub`])."""

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
