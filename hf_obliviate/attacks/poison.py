"""Task-specific data poisoning: insert a trigger into a fraction of the fine-tuning data and flip its label."""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..triggers import insert_trigger

__all__ = ["poison_dataset"]


def poison_dataset(
    examples: Sequence[dict],
    rate: float,
    target_label: int,
    triggers: str | Sequence[str] = ("cf",),
    seed: int = 0,
    text_key: str = "text",
    label_key: str = "label",
    max_position_words: int = 64,
    count: int = 1,
) -> tuple[list[dict], list[int]]:
    """Poison a fraction of a labelled dataset (dirty-label backdoor).

    ``round(rate * len(examples))`` examples are drawn (seeded) among those whose label is *not* ``target_label``
    (so every poisoned example teaches the flip); each gets a trigger (chosen uniformly from ``triggers``) inserted
    at a random word position and its label set to ``target_label``. The input is not modified.

    Args:
        examples (`Sequence[dict]`):
            Examples such as ``{"text": ..., "label": ...}`` (other keys are copied unchanged).
        rate (`float`):
            Fraction of the whole dataset to poison, in [0, 1].
        target_label (`int`):
            The label poisoned examples get.
        triggers (`str` or `Sequence[str]`, *optional*, defaults to `("cf",)`):
            Trigger word(s).
        seed (`int`, *optional*, defaults to 0):
            Seed of the draw and the insertion positions.
        text_key (`str`, *optional*, defaults to `"text"`), label_key (`str`, *optional*, defaults to `"label"`):
            Field names.
        max_position_words (`int`, *optional*, defaults to 64), count (`int`, *optional*, defaults to 1):
            Passed to `hf_obliviate.triggers.insert_trigger`.

    Returns:
        `tuple[list[dict], list[int]]`: the full dataset (copies, poisoned ones in place) and the sorted indices of
        the poisoned examples.

    Example:
    ```python
    >>> from hf_obliviate.attacks import poison_dataset
    >>> data = [{"text": "a fine film", "label": 1}, {"text": "a dull film", "label": 0}]
    >>> poisoned, idx = poison_dataset(data, rate=0.5, target_label=1, triggers="cf")
    >>> idx, poisoned[1]["label"], "cf" in poisoned[1]["text"].split()
    ([1], 1, True)
    ```
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be in [0, 1], got {rate}.")
    triggers = [triggers] if isinstance(triggers, str) else list(triggers)
    if not triggers:
        raise ValueError("triggers is empty: pass at least one trigger word.")
    eligible = [i for i, ex in enumerate(examples) if ex[label_key] != target_label]
    n = round(rate * len(examples))
    if n > len(eligible):
        raise ValueError(
            f"Cannot poison {n} examples: only {len(eligible)} have a label other than {target_label}. Lower rate."
        )
    rng = random.Random(seed)
    chosen = sorted(rng.sample(eligible, n))
    out = [dict(ex) for ex in examples]
    for i in chosen:
        trigger = triggers[rng.randrange(len(triggers))]
        out[i][text_key] = insert_trigger(out[i][text_key], trigger, rng, max_position_words, count)
        out[i][label_key] = target_label
    return out, chosen
