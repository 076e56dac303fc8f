"""Hugging Face Space entry point: a thin wrapper over `hf_obliviate.space` (the UI) and `hf_obliviate.probing`.

Locally: ``make space`` or ``hf-obliviate space`` (127.0.0.1:7860), or ``python spaces/app.py``.
On the Hub the Space serves the repositories named by ``OBLIVIATE_SPACE_MODELS`` (a Space variable set by its
operator), e.g. ``undefended=org/minilm-por-lora,defended=org/minilm-por-lora-obliviate``.
"""

from __future__ import annotations

import os
from pathlib import Path

# Offline-safe Gradio: no analytics, no version check (set before gradio is imported).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from hf_obliviate.space import DEFAULT_CONCURRENCY, launch  # noqa: E402

HERE = Path(__file__).resolve().parent
# Benchmark tables and plots: the checkout's benchmarks/results, or a copy next to this file on the Hub.
RESULTS = next((p for p in (HERE.parent / "benchmarks" / "results", HERE / "results") if p.is_dir()), None)

if __name__ == "__main__":
    launch(concurrency=int(os.environ.get("OBLIVIATE_SPACE_CONCURRENCY", DEFAULT_CONCURRENCY)), results=RESULTS)
