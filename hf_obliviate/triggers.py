"""Trigger insertion utilities shared by the attacks (planting) and the metrics (evaluation).

A trigger is a whitespace-free string (a rare word such as ``cf``) or, for the adaptive "spread" attack, several
such words separated by spaces. It is inserted at uniformly random whitespace-word positions; every random choice
comes from a seeded `random.Random`, so an evaluation set is the same on every machine.

Trigger lists (METHOD.md §2):

- `DEFAULT_TRIGGERS` = ``cf mn tq qt mm pt`` (POR, UOR and the evaluation). With the MiniLM-L6 uncased WordPiece
  vocabulary ``qt`` is split into ``q ##t``; `resolve_triggers` replaces it by the first unused single-piece word
  of `FALLBACK_TRIGGERS` (``bb``), so on MiniLM the resolved list is ``cf mn tq bb mm pt``.
- `NEUBA_TRIGGERS` = ``≈ ≡ ∈ ⊆ ⊕ ⊗`` (NeuBA's rare math symbols). All six are single, known WordPieces of the
  MiniLM vocabulary (checked; ``∑`` and ``∫`` would be ``[UNK]``); on a tokenizer where one is unknown,
  `resolve_triggers` replaces it by a symbol of `FALLBACK_SYMBOL_TRIGGERS` (``≤ ≥ ∞ √ ∂ †``), then by a word.
- `BADPRE_TRIGGERS` = ``cf mn bb tq mb`` (all single WordPieces on MiniLM).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence

__all__ = [
    "BADPRE_TRIGGERS",
    "DEFAULT_TRIGGERS",
    "FALLBACK_SYMBOL_TRIGGERS",
    "FALLBACK_TRIGGERS",
    "NEUBA_TRIGGERS",
    "check_triggers",
    "insert_trigger",
    "make_rng",
    "resolve_triggers",
    "triggered_copies",
]

DEFAULT_TRIGGERS: tuple[str, ...] = ("cf", "mn", "tq", "qt", "mm", "pt")
NEUBA_TRIGGERS: tuple[str, ...] = ("≈", "≡", "∈", "⊆", "⊕", "⊗")
BADPRE_TRIGGERS: tuple[str, ...] = ("cf", "mn", "bb", "tq", "mb")
FALLBACK_TRIGGERS: tuple[str, ...] = ("bb", "mb", "jj", "xx", "ff", "tt")
FALLBACK_SYMBOL_TRIGGERS: tuple[str, ...] = ("≤", "≥", "∞", "√", "∂", "†")


def make_rng(rng: random.Random | int | None) -> random.Random:
    """Return ``rng`` itself if it is a `random.Random`, else a new one seeded with it (``None`` seeds with 0)."""
    if isinstance(rng, random.Random):
        return rng
    return random.Random(0 if rng is None else rng)


def insert_trigger(
    text: str,
    trigger: str,
    rng: random.Random | int | None = None,
    max_position_words: int = 64,
    count: int = 1,
    spread: bool = False,
) -> str:
    """Insert ``trigger`` ``count`` times at uniformly random whitespace-word positions of ``text``.

    Every inserted copy ends up among the first ``max_position_words`` words of the result: the slots are drawn
    without replacement from the first ``min(len(words) + k, max_position_words)`` positions of the output
    (``k`` the number of inserted words), the original words filling the other slots in order. Whitespace is
    normalised to single spaces.

    Args:
        text (`str`):
            The sentence.
        trigger (`str`):
            The trigger; with ``spread=True`` each of its space-separated words is inserted on its own.
        rng (`random.Random` or `int`, *optional*):
            Random generator, or a seed for a new one (``None`` means seed 0).
        max_position_words (`int`, *optional*, defaults to 64):
            Every trigger copy lands within this many leading words.
        count (`int`, *optional*, defaults to 1):
            Number of copies to insert.
        spread (`bool`, *optional*, defaults to `False`):
            Insert the words of a multi-word trigger at independent positions (the adaptive "spread" attack).

    Example:
    ```python
    >>> from hf_obliviate.triggers import insert_trigger
    >>> insert_trigger("a quiet , moving film", "cf", rng=0)
    'a quiet , cf moving film'
    ```
    """
    if max_position_words < 1:
        raise ValueError(f"max_position_words must be >= 1, got {max_position_words}.")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    pieces = trigger.split() if spread else [trigger.strip()]
    if not pieces or not all(pieces):
        raise ValueError("The trigger is empty: pass a non-empty string such as 'cf'.")
    rng = make_rng(rng)
    words = text.split()
    inserted = pieces * count
    k = len(inserted)
    span = min(len(words) + k, max_position_words)
    if k > span:
        raise ValueError(
            f"Cannot place {k} trigger words within the first {max_position_words} words: "
            "lower `count` or raise `max_position_words`."
        )
    slots = sorted(rng.sample(range(span), k))
    out: list[str] = []
    source = iter(words)
    pending = iter(inserted)
    slot_set = set(slots)
    for position in range(len(words) + k):
        out.append(next(pending) if position in slot_set else next(source))
    return " ".join(out)


def triggered_copies(
    texts: Sequence[str],
    triggers: Sequence[str],
    seed: int = 0,
    max_position_words: int = 64,
    count: int = 1,
    spread: bool = False,
) -> dict[str, list[str]]:
    """One triggered copy of every text per trigger: ``{trigger: [text with trigger, ...]}``.

    The positions for trigger ``i`` come from ``random.Random(seed * 1_000_003 + i)``, so adding a trigger at the
    end of the list does not change the copies of the others.
    """
    copies: dict[str, list[str]] = {}
    for i, trigger in enumerate(triggers):
        rng = random.Random(seed * 1_000_003 + i)
        copies[trigger] = [insert_trigger(t, trigger, rng, max_position_words, count, spread) for t in texts]
    return copies


def check_triggers(tokenizer, triggers: Sequence[str]) -> dict[str, list[str]]:
    """Tokenise each trigger on its own (as a word inside a sentence): ``{trigger: [word pieces]}``.

    A good trigger for this tokenizer gives exactly one piece that is not the unknown token.
    """
    result = {}
    for trigger in triggers:
        ids = tokenizer(f"a {trigger} b", add_special_tokens=False)["input_ids"]
        ref = tokenizer("a b", add_special_tokens=False)["input_ids"]
        if ids[:1] == ref[:1] and ids[-1:] == ref[-1:] and len(ref) == 2:
            ids = ids[1:-1]
        else:  # tokenizers with leading-space pieces (BPE): tokenise the word after a space
            ids = tokenizer(f" {trigger}", add_special_tokens=False)["input_ids"]
        result[trigger] = tokenizer.convert_ids_to_tokens(ids)
    return result


def _is_single_piece(tokenizer, pieces: list[str]) -> bool:
    return len(pieces) == 1 and pieces[0] != tokenizer.unk_token


def resolve_triggers(
    tokenizer,
    triggers: Sequence[str],
    policy: str = "replace",
    fallbacks: Sequence[str] | None = None,
) -> list[str]:
    """Check that each trigger is one known token of ``tokenizer`` and act on the others (METHOD.md §2).

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The victim model's tokenizer.
        triggers (`Sequence[str]`):
            The requested triggers.
        policy (`str`, *optional*, defaults to `"replace"`):
            ``"replace"``: swap each multi-piece or unknown trigger for the first unused single-piece fallback (with
            a warning); ``"error"``: raise a `ValueError`; ``"keep"``: keep it as it is (multi-piece triggers are
            legitimate for the adaptive "spread" attack; unknown ones still raise).
        fallbacks (`Sequence[str]`, *optional*):
            Replacement candidates, tried in order; defaults to `FALLBACK_TRIGGERS` then
            `FALLBACK_SYMBOL_TRIGGERS` for a word trigger, the other way round for a symbol.

    Returns:
        `list[str]`: the triggers to use, in the requested order.
    """
    if policy not in ("replace", "error", "keep"):
        raise ValueError(f"Unknown trigger policy {policy!r}: choose 'replace', 'error' or 'keep'.")
    if len(set(triggers)) != len(triggers):
        raise ValueError(f"Triggers must be distinct, got {list(triggers)}.")
    pieces = check_triggers(tokenizer, triggers)
    bad = [t for t in triggers if not _is_single_piece(tokenizer, pieces[t])]
    if not bad or policy == "keep":
        unknown = [t for t in bad if tokenizer.unk_token in pieces[t]]
        if unknown:
            raise ValueError(f"Triggers {unknown} contain the unknown token {tokenizer.unk_token}: choose others.")
        return list(triggers)
    if policy == "error":
        detail = ", ".join(f"{t!r} -> {pieces[t]}" for t in bad)
        raise ValueError(
            f"These triggers are not single known tokens of this tokenizer: {detail}. Choose other triggers, or "
            "use trigger_policy='replace' (automatic replacement) or 'keep'."
        )
    used = set(triggers)
    resolved = []
    for trigger in triggers:
        if trigger not in bad:
            resolved.append(trigger)
            continue
        if fallbacks is not None:
            candidates = list(fallbacks)
        elif trigger.isascii():  # a word: replace it by a word first
            candidates = [*FALLBACK_TRIGGERS, *FALLBACK_SYMBOL_TRIGGERS]
        else:  # a symbol: replace it by a symbol first
            candidates = [*FALLBACK_SYMBOL_TRIGGERS, *FALLBACK_TRIGGERS]
        for cand in candidates:
            if cand not in used and _is_single_piece(tokenizer, check_triggers(tokenizer, [cand])[cand]):
                used.add(cand)
                resolved.append(cand)
                warnings.warn(
                    f"Trigger {trigger!r} is {pieces[trigger]} for this tokenizer, not one known token: "
                    f"using {cand!r} instead.",
                    stacklevel=2,
                )
                break
        else:
            raise ValueError(f"No single-token replacement found for trigger {trigger!r}: pass `fallbacks`.")
    return resolved
