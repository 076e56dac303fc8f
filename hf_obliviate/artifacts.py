"""Named artifacts that one pipeline produces and another consumes (the demo's fine-tunes, the free-lunch models).

An artifact is a directory under ``<cache>/artifacts/<name>`` holding an ordinary transformers checkpoint (a PEFT
model is merged first, so anything that loads transformers checkpoints loads it) and ``obliviate_artifact.json``
with what produced it: its ``kind`` (``classifier``, ``causal-lm`` or ``delta``), the base or encoder it came
from, the triggers it was attacked with, measured metrics. ``make demo`` writes ``demo-undefended`` and
``demo-defended``; the Space lists whatever is there.

Example::

    from hf_obliviate.artifacts import list_artifacts, load_artifact

    for name, info in list_artifacts(kind="classifier").items():
        model, tokenizer, info = load_artifact(name)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from torch import nn

INFO_FILE = "obliviate_artifact.json"
KINDS = ("classifier", "causal-lm", "delta")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def settings_hash(settings: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of SHA-256 over ``settings`` as canonical JSON (keys sorted, anything JSON does
    not know written with ``str``): the cache key of everything cached by its settings (attacks, fine-tunes, scans)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:length]


def artifacts_root() -> Path:
    """``<cache>/artifacts``, where ``<cache>`` is ``$HF_OBLIVIATE_CACHE`` or ``~/.cache/hf_obliviate``."""
    from .smollm import cache_dir

    return cache_dir() / "artifacts"


def artifact_path(name: str) -> Path:
    """The directory of artifact ``name``; the name is checked, so it can never point outside the root."""
    if not _NAME.match(name) or ".." in name:
        raise ValueError(f"Invalid artifact name {name!r}: use letters, digits, '.', '_' and '-' (at most 100).")
    return artifacts_root() / name


def save_artifact(model: nn.Module, tokenizer, name: str, kind: str, info: dict | None = None) -> Path:
    """Save ``model`` (a PEFT model is merged into its base first) and ``tokenizer`` as artifact ``name``.

    Written to a temporary sibling directory and renamed, so a reader never sees half an artifact.

    Args:
        kind (`str`): ``classifier`` (sequence classification), ``causal-lm`` or ``delta`` (a compressed-delta
            directory already written by :mod:`hf_obliviate.delta`; pass ``model=None`` and ``info["path"]``).
        info (`dict`, *optional*): JSON-serialisable facts kept with it (encoder, triggers, metrics, ...).
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown artifact kind {kind!r}: choose one of {', '.join(KINDS)}.")
    path = artifact_path(name)
    tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if model is not None:
        if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / INFO_FILE).write_text(json.dumps({"name": name, "kind": kind, **(info or {})}, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def read_artifact_info(name: str) -> dict:
    """The ``obliviate_artifact.json`` of artifact ``name``."""
    path = artifact_path(name)
    info_file = path / INFO_FILE
    if not info_file.is_file():
        raise FileNotFoundError(
            f"No artifact {name!r} under {artifacts_root()}: run `make demo` (classifiers) or "
            "`hf-obliviate freelunch` (causal LMs) to produce it."
        )
    return json.loads(info_file.read_text())


def list_artifacts(kind: str | None = None) -> dict[str, dict]:
    """All complete artifacts (optionally of one ``kind``), name → info, sorted by name."""
    root = artifacts_root()
    found: dict[str, dict] = {}
    if not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not (child / INFO_FILE).is_file():
            continue
        info = json.loads((child / INFO_FILE).read_text())
        if kind is None or info.get("kind") == kind:
            found[child.name] = info
    return found


def load_artifact(name: str, attn_implementation: str = "sdpa"):
    """Load artifact ``name`` → ``(model, tokenizer, info)`` in eval mode (safetensors only, no remote code)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    info = read_artifact_info(name)
    path = artifact_path(name)
    auto = {"classifier": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM}.get(info["kind"])
    if auto is None:
        raise ValueError(f"Artifact {name!r} is a {info['kind']!r}; load it with hf_obliviate.hub.load_compressed.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = auto.from_pretrained(path, attn_implementation=attn_implementation, use_safetensors=True)
    return model.eval(), tokenizer, info
