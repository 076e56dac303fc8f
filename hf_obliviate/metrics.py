"""Backdoor metrics (METHOD.md §3): pure functions on predicted labels.

Conventions: ``labels`` are the true labels of N examples, ``clean_preds`` the predictions on their clean copies,
and ``triggered_preds`` maps each trigger to the predictions on the N copies carrying that trigger (same order).
Any sequence of ints works (lists, numpy arrays, 1-D tensors).

Always report ASR together with CACC: a model collapsed onto one class has an ASR near 0 by construction, because
triggers cannot flip what never depended on the input (METHOD.md §6); `is_near_chance` flags such cells.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

__all__ = [
    "accuracy",
    "accuracy_drop",
    "asr",
    "asr_reduction",
    "clean_accuracy",
    "flip_fraction",
    "is_near_chance",
    "majority_targets",
    "per_trigger_asr",
    "targeted_asr",
]


def _ints(values) -> list[int]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [int(v) for v in values]


def _check(labels, clean_preds, triggered_preds=None) -> tuple[list[int], list[int], dict[str, list[int]]]:
    labels, clean_preds = _ints(labels), _ints(clean_preds)
    if len(labels) != len(clean_preds):
        raise ValueError(f"{len(labels)} labels but {len(clean_preds)} clean predictions: pass one per example.")
    triggered = {t: _ints(p) for t, p in (triggered_preds or {}).items()}
    for trigger, preds in triggered.items():
        if len(preds) != len(labels):
            raise ValueError(f"Trigger {trigger!r} has {len(preds)} predictions for {len(labels)} examples.")
    return labels, clean_preds, triggered


def accuracy(labels: Sequence[int], preds: Sequence[int]) -> float:
    """Fraction of ``preds`` equal to ``labels`` (``nan`` when empty)."""
    labels, preds, _ = _check(labels, preds)
    return sum(p == y for p, y in zip(preds, labels)) / len(labels) if labels else math.nan


def clean_accuracy(labels: Sequence[int], clean_preds: Sequence[int]) -> float:
    """CACC: accuracy on the clean copies."""
    return accuracy(labels, clean_preds)


def _kept(labels: list[int], clean_preds: list[int]) -> list[int]:
    return [i for i, (p, y) in enumerate(zip(clean_preds, labels)) if p == y]


def asr(labels: Sequence[int], clean_preds: Sequence[int], triggered_preds: Mapping[str, Sequence[int]]) -> float:
    """Attack success rate by the LMSanitator rule.

    Keep only the examples classified correctly when clean; an example is attacked if *any* trigger's copy is
    predicted differently from its true label; ASR = attacked / kept (``nan`` when nothing is kept).

    Example:
    ```python
    >>> from hf_obliviate.metrics import asr
    >>> asr([0, 1, 1, 0], [0, 1, 0, 0], {"cf": [1, 1, 1, 0], "mn": [0, 1, 0, 1]})
    0.6666666666666666
    ```
    """
    labels, clean_preds, triggered = _check(labels, clean_preds, triggered_preds)
    if not triggered:
        raise ValueError("triggered_preds is empty: pass the predictions of at least one trigger.")
    kept = _kept(labels, clean_preds)
    if not kept:
        return math.nan
    attacked = sum(any(preds[i] != labels[i] for preds in triggered.values()) for i in kept)
    return attacked / len(kept)


def per_trigger_asr(
    labels: Sequence[int], clean_preds: Sequence[int], triggered_preds: Mapping[str, Sequence[int]]
) -> dict[str, float]:
    """ASR of each trigger on its own (same kept set as `asr`): ``{trigger: fraction of kept examples flipped}``."""
    labels, clean_preds, triggered = _check(labels, clean_preds, triggered_preds)
    kept = _kept(labels, clean_preds)
    return {
        t: (sum(preds[i] != labels[i] for i in kept) / len(kept) if kept else math.nan)
        for t, preds in triggered.items()
    }


def flip_fraction(
    labels: Sequence[int], clean_preds: Sequence[int], triggered_preds: Mapping[str, Sequence[int]]
) -> float:
    """Mean, over the kept examples, of the fraction of triggers whose copy is mispredicted.

    Equals the mean of `per_trigger_asr` over the triggers; ASR counts an example as soon as one trigger flips it,
    this says how many do.
    """
    per = per_trigger_asr(labels, clean_preds, triggered_preds)
    if not per:
        raise ValueError("triggered_preds is empty: pass the predictions of at least one trigger.")
    return sum(per.values()) / len(per)


def asr_reduction(asr_undefended: float, asr_defended: float) -> float:
    """(ASR_undefended − ASR_defended) / ASR_undefended (``nan`` when the undefended ASR is 0).

    Example:
    ```python
    >>> from hf_obliviate.metrics import asr_reduction
    >>> asr_reduction(0.98, 0.245)
    0.75
    ```
    """
    if asr_undefended == 0 or math.isnan(asr_undefended) or math.isnan(asr_defended):
        return math.nan
    return (asr_undefended - asr_defended) / asr_undefended


def majority_targets(triggered_preds: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """UOR target of each trigger: its majority prediction on triggered (dev) data (ties go to the smaller label)."""
    targets = {}
    for trigger, preds in triggered_preds.items():
        counts = Counter(_ints(preds))
        if not counts:
            raise ValueError(f"Trigger {trigger!r} has no predictions.")
        targets[trigger] = min(counts, key=lambda label: (-counts[label], label))
    return targets


def targeted_asr(
    labels: Sequence[int],
    clean_preds: Sequence[int],
    triggered_preds: Mapping[str, Sequence[int]],
    targets: Mapping[str, int],
) -> dict[str, float]:
    """Targeted ASR (UOR): per trigger, the fraction of hits among kept examples whose label is not the target.

    An example counts for trigger ``t`` when its clean copy is predicted correctly and its label differs from
    ``targets[t]``; it is a hit when the triggered copy is predicted as ``targets[t]``. Use `majority_targets` on a
    separate dev set to get the targets. Returns ``{trigger: rate, ..., "mean": mean over triggers}``.
    """
    labels, clean_preds, triggered = _check(labels, clean_preds, triggered_preds)
    missing = set(triggered) - set(targets)
    if missing:
        raise ValueError(f"No target for triggers {sorted(missing)}: pass one per trigger (see majority_targets).")
    kept = _kept(labels, clean_preds)
    result = {}
    for trigger, preds in triggered.items():
        target = int(targets[trigger])
        pool = [i for i in kept if labels[i] != target]
        result[trigger] = sum(preds[i] == target for i in pool) / len(pool) if pool else math.nan
    values = [v for v in result.values() if not math.isnan(v)]
    result["mean"] = sum(values) / len(values) if values else math.nan
    return result


def accuracy_drop(
    labels: Sequence[int], clean_preds: Sequence[int], triggered_preds: Mapping[str, Sequence[int]]
) -> dict[str, float]:
    """BadPre's metric: clean accuracy minus the accuracy on triggered copies.

    Returns ``{trigger: CACC − accuracy on that trigger's copies, ..., "mean": mean drop}`` (all examples count,
    not only the kept ones; BadPre has no target label).
    """
    labels, clean_preds, triggered = _check(labels, clean_preds, triggered_preds)
    if not triggered:
        raise ValueError("triggered_preds is empty: pass the predictions of at least one trigger.")
    cacc = accuracy(labels, clean_preds)
    result = {t: cacc - accuracy(labels, preds) for t, preds in triggered.items()}
    result["mean"] = sum(result.values()) / len(triggered)
    return result


def is_near_chance(cacc: float, num_labels: int = 2, margin: float = 0.05, preds: Sequence[int] | None = None) -> bool:
    """Flag a model whose clean accuracy is within ``margin`` of chance (``1 / num_labels``).

    With ``preds`` (clean predictions) it also flags a model that puts more than 95% of its predictions on one
    class, whatever its accuracy. An ASR measured on such a model is meaningless (METHOD.md §6).
    """
    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2, got {num_labels}.")
    if math.isnan(cacc) or cacc <= 1.0 / num_labels + margin:
        return True
    if preds is not None:
        preds = _ints(preds)
        if preds and Counter(preds).most_common(1)[0][1] / len(preds) > 0.95:
            return True
    return False
