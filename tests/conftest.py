"""Shared test set-up: offline by default, small threads, deterministic seeds."""

from __future__ import annotations

import os

# huggingface_hub reads these at import time: set them before anything imports it. A test that talks to its own
# local Hub server on 127.0.0.1 overrides HF_ENDPOINT / HF_HUB_OFFLINE in a subprocess or with monkeypatch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
