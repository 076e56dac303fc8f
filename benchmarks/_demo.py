"""The `make demo` fine-tunes, for the benchmark scripts that study them (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations


def load_demo_model(role: str):
    """``(model, tokenizer, info)`` of the demo's ``undefended`` or ``defended`` LoRA fine-tune (saved merged), or a
    clear exit telling to run ``make demo`` first."""
    from hf_obliviate.artifacts import load_artifact

    try:
        return load_artifact(f"demo-{role}")
    except FileNotFoundError as error:
        raise SystemExit(f"{error}\nRun `make demo` first: this script reads its two fine-tunes.") from error
