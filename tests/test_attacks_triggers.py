"""Trigger insertion and the trigger checks against the bundled MiniLM tokenizer."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from hf_obliviate.bundled import minilm_path
from hf_obliviate.triggers import (
    BADPRE_TRIGGERS,
    DEFAULT_TRIGGERS,
    NEUBA_TRIGGERS,
    check_triggers,
    insert_trigger,
    resolve_triggers,
    triggered_copies,
)

LONG = " ".join(f"w{i}" for i in range(200))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def test_insert_is_seeded_and_keeps_words():
    text = "the film is a quiet , moving portrait of grief"
    a = insert_trigger(text, "cf", rng=3)
    assert a == insert_trigger(text, "cf", rng=random.Random(3))
    words = a.split()
    assert words.count("cf") == 1
    words.remove("cf")
    assert words == text.split()
    # different seeds give different positions somewhere
    assert len({insert_trigger(text, "cf", rng=s) for s in range(20)}) > 3


@pytest.mark.parametrize("count", [1, 2, 3])
def test_insert_stays_within_first_64_words(count):
    rng = random.Random(0)
    positions = []
    for _ in range(500):
        words = insert_trigger(LONG, "cf", rng, max_position_words=64, count=count).split()
        idx = [i for i, w in enumerate(words) if w == "cf"]
        assert len(idx) == count and max(idx) < 64
        assert [w for w in words if w != "cf"] == LONG.split()
        positions.extend(idx)
    assert min(positions) == 0 and max(positions) == 63  # the whole range is used


def test_insert_into_short_text_can_append_and_prepend():
    seen = {insert_trigger("a b", "cf", rng=s).split().index("cf") for s in range(50)}
    assert seen == {0, 1, 2}
    assert insert_trigger("", "cf", rng=0) == "cf"


def test_insert_spread_places_each_word():
    out = insert_trigger(LONG, "cf mn", rng=1, count=2, spread=True).split()
    assert out.count("cf") == 2 and out.count("mn") == 2
    # without spread the multi-word trigger stays contiguous
    joined = insert_trigger("a b c d", "cf mn", rng=1)
    assert "cf mn" in joined


def test_insert_errors():
    with pytest.raises(ValueError, match="empty"):
        insert_trigger("a b", "  ", rng=0)
    with pytest.raises(ValueError, match="count"):
        insert_trigger("a b", "cf", rng=0, count=0)
    with pytest.raises(ValueError, match="max_position_words"):
        insert_trigger("a b", "cf", rng=0, count=3, max_position_words=2)


def test_triggered_copies_are_independent_per_trigger():
    texts = ["one two three four five", "six seven eight nine ten"]
    a = triggered_copies(texts, ["cf", "mn"], seed=7)
    b = triggered_copies(texts, ["cf", "mn", "tq"], seed=7)
    assert a["cf"] == b["cf"] and a["mn"] == b["mn"]
    assert all("tq" in t.split() for t in b["tq"])


def test_minilm_trigger_checks(tokenizer):
    pieces = check_triggers(tokenizer, DEFAULT_TRIGGERS)
    assert pieces["cf"] == ["cf"] and pieces["qt"] == ["q", "##t"]
    with pytest.warns(UserWarning, match="'qt'"):
        resolved = resolve_triggers(tokenizer, DEFAULT_TRIGGERS)
    assert resolved == ["cf", "mn", "tq", "bb", "mm", "pt"]
    for trigger in resolved:
        assert len(tokenizer.tokenize(trigger)) == 1
    # NeuBA's symbols and BadPre's words are all single known pieces on MiniLM: nothing replaced
    assert resolve_triggers(tokenizer, NEUBA_TRIGGERS) == list(NEUBA_TRIGGERS)
    assert resolve_triggers(tokenizer, BADPRE_TRIGGERS) == list(BADPRE_TRIGGERS)
    for trigger in NEUBA_TRIGGERS:
        assert tokenizer.convert_tokens_to_ids(check_triggers(tokenizer, [trigger])[trigger]) != [
            tokenizer.unk_token_id
        ]


def test_minilm_trigger_policies(tokenizer):
    with pytest.raises(ValueError, match="not single known tokens"):
        resolve_triggers(tokenizer, ["cf", "qt"], policy="error")
    assert resolve_triggers(tokenizer, ["cf", "qt"], policy="keep") == ["cf", "qt"]
    with pytest.raises(ValueError, match="unknown token"):
        resolve_triggers(tokenizer, ["∑"], policy="keep")
    with pytest.warns(UserWarning):
        assert resolve_triggers(tokenizer, ["∑"]) == ["≤"]  # a symbol is replaced by a symbol
    with pytest.raises(ValueError, match="distinct"):
        resolve_triggers(tokenizer, ["cf", "cf"])
