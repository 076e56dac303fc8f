"""Calibration text for scale distillation: read it from a file or dataset, or take the bundled IMDB sentences, and
cut it into token windows. Used by the trainer's push (``delta_distill_steps``) and ``hf-obliviate push
--distill_steps``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["calibration_ids", "calibration_texts", "read_texts", "token_windows"]

# bundled IMDB sentences are about 20 tokens long: 8 of them fill a window of the default 128 tokens
SENTENCES_PER_WINDOW = 8


def read_texts(source: str | Path, column: str = "text") -> list[str]:
    """Texts from a .txt (one per line), .jsonl or .csv file, or a `datasets` folder saved with ``save_to_disk``.

    Raises:
        ``ValueError``: the path does not exist, has another format, or lacks ``column``.
    """
    path = Path(source)
    if path.is_dir():
        from datasets import load_from_disk

        data = load_from_disk(str(path))
        if column not in data.column_names:
            raise ValueError(f"{path} has no column {column!r} (columns: {data.column_names}).")
        return [str(t) for t in data[column]]
    if not path.is_file():
        raise ValueError(f"Calibration data {source} does not exist.")
    if path.suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        raise ValueError(f"Cannot read {path}: use .txt, .jsonl, .csv or a `datasets` folder.")
    if rows and column not in rows[0]:
        raise ValueError(f"{path} has no column {column!r}: name the text column.")
    return [str(r[column]) for r in rows]


def calibration_texts(
    texts: list[str] | None = None,
    source: str | Path | None = None,
    column: str = "text",
    num_sequences: int = 800,
    seed: int = 0,
) -> list[str]:
    """``texts``, else the texts of the file or dataset ``source`` (column ``column``), else bundled IMDB sentences,
    enough for ``num_sequences`` windows of 128 tokens."""
    if texts is not None and source is not None:
        raise ValueError("Pass calibration texts or a calibration file, not both.")
    if texts is not None:
        return [str(t) for t in texts]
    if source is not None:
        return read_texts(source, column)
    from hf_obliviate.data import load_imdb_sentences

    return load_imdb_sentences(n=SENTENCES_PER_WINDOW * num_sequences, seed=seed)


def token_windows(tokenizer, texts: list[str], n: int, seq_len: int) -> torch.Tensor:
    """Tokenises ``texts`` (joined with EOS, else SEP) into at most ``n`` windows of ``seq_len`` tokens (shorter when
    the text is short): a ``[n, seq_len]`` long tensor.

    Raises:
        ``ValueError``: no text, or fewer than 2 tokens in all.
    """
    import torch

    if not texts:
        raise ValueError("No calibration text for scale distillation.")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(int(eos))
        if len(ids) >= n * seq_len:
            break
    seq_len = min(seq_len, len(ids))
    if seq_len < 2:
        raise ValueError("The calibration text is too short for scale distillation (fewer than 2 tokens).")
    count = max(1, min(n, len(ids) // seq_len))
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).reshape(count, seq_len)


def calibration_ids(
    tokenizer,
    texts: list[str] | None = None,
    source: str | Path | None = None,
    column: str = "text",
    num_sequences: int = 800,
    seq_len: int = 128,
    seed: int = 0,
) -> torch.Tensor:
    """Token windows of [`calibration_texts`]: at most ``num_sequences`` × ``seq_len`` (METHOD §4: 800 × 128)."""
    texts = calibration_texts(texts, source, column, num_sequences, seed)
    return token_windows(tokenizer, texts, num_sequences, seq_len)
