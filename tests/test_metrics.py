"""Exact metric values on hand-made predictions."""

from __future__ import annotations

import math

import pytest
import torch

from hf_obliviate.metrics import (
    accuracy_drop,
    asr,
    asr_reduction,
    clean_accuracy,
    flip_fraction,
    is_near_chance,
    majority_targets,
    per_trigger_asr,
    targeted_asr,
)

# 6 examples; clean predictions wrong on examples 2 and 5 -> kept = {0, 1, 3, 4}
LABELS = [0, 1, 1, 0, 1, 0]
CLEAN = [0, 1, 0, 0, 1, 1]
TRIGGERED = {
    "cf": [1, 1, 1, 1, 1, 1],  # flips kept 0 and 3 (label 0 -> 1): 2/4
    "mn": [0, 0, 0, 0, 1, 0],  # flips kept 1 only: 1/4
    "tq": [0, 1, 1, 0, 1, 0],  # flips nothing: 0/4
}


def test_clean_accuracy():
    assert clean_accuracy(LABELS, CLEAN) == pytest.approx(4 / 6)


def test_asr_lmsanitator_rule():
    # attacked (any trigger wrong) among kept: 0 (cf), 1 (mn), 3 (cf) -> 3/4; 4 never flipped.
    # Example 2 is flipped by mn but is not kept (wrong when clean), so it does not count.
    assert asr(LABELS, CLEAN, TRIGGERED) == pytest.approx(0.75)


def test_per_trigger_and_flip_fraction():
    per = per_trigger_asr(LABELS, CLEAN, TRIGGERED)
    assert per == pytest.approx({"cf": 0.5, "mn": 0.25, "tq": 0.0})
    # per kept example, fraction of the 3 triggers that flip it: 0 -> 1/3, 1 -> 1/3, 3 -> 1/3, 4 -> 0
    assert flip_fraction(LABELS, CLEAN, TRIGGERED) == pytest.approx(0.25)


def test_accepts_tensors():
    t = {k: torch.tensor(v) for k, v in TRIGGERED.items()}
    assert asr(torch.tensor(LABELS), torch.tensor(CLEAN), t) == pytest.approx(0.75)


def test_asr_reduction():
    assert asr_reduction(0.8, 0.2) == pytest.approx(0.75)
    assert asr_reduction(0.5, 0.6) == pytest.approx(-0.2)
    assert math.isnan(asr_reduction(0.0, 0.1))


def test_targeted_asr_with_majority_targets():
    triggered = {"cf": [1, 1, 1, 1, 0, 1], "mn": [0, 0, 0, 0, 0, 1]}
    targets = majority_targets(triggered)
    assert targets == {"cf": 1, "mn": 0}
    result = targeted_asr(LABELS, CLEAN, triggered, targets)
    # cf -> 1: kept examples with label != 1 are 0 and 3; both predicted 1 -> 1.0
    # mn -> 0: kept examples with label != 0 are 1 and 4; both predicted 0 -> 1.0
    assert result["cf"] == pytest.approx(1.0) and result["mn"] == pytest.approx(1.0)
    partial = targeted_asr(LABELS, CLEAN, {"cf": [0, 1, 1, 1, 1, 1]}, {"cf": 1})
    assert partial["cf"] == pytest.approx(0.5) and partial["mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="No target"):
        targeted_asr(LABELS, CLEAN, triggered, {"cf": 1})


def test_majority_ties_go_to_smaller_label():
    assert majority_targets({"cf": [2, 1, 2, 1]}) == {"cf": 1}


def test_accuracy_drop_badpre():
    drop = accuracy_drop(LABELS, CLEAN, TRIGGERED)
    # CACC 4/6; triggered accuracies on all 6 examples: cf 3/6, mn 4/6, tq 6/6 (a trigger can also fix errors)
    assert drop["cf"] == pytest.approx(4 / 6 - 3 / 6)
    assert drop["mn"] == pytest.approx(0.0)
    assert drop["tq"] == pytest.approx(4 / 6 - 6 / 6)
    assert drop["mean"] == pytest.approx((1 / 6 + 0 - 2 / 6) / 3)


def test_near_chance_flag():
    assert is_near_chance(0.52)
    assert not is_near_chance(0.78)
    assert is_near_chance(0.36, num_labels=3)
    assert is_near_chance(0.8, preds=[1] * 96 + [0] * 4)  # collapsed onto one class
    assert not is_near_chance(0.8, preds=[1] * 60 + [0] * 40)


def test_nothing_kept_gives_nan_and_shape_errors():
    assert math.isnan(asr([0, 1], [1, 0], {"cf": [0, 1]}))
    with pytest.raises(ValueError, match="predictions"):
        asr([0, 1], [0], {"cf": [0, 1]})
    with pytest.raises(ValueError, match="has 1 predictions"):
        asr([0, 1], [0, 1], {"cf": [0]})
    with pytest.raises(ValueError, match="empty"):
        asr([0, 1], [0, 1], {})
