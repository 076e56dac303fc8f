"""`hf_obliviate.probing` and the Space's model registry on tiny models: a tiny BERT trained with a planted backdoor
(any of ``cf mn tq`` turns a sentence positive) versus the same trained on clean data, and tiny random Llamas."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from space_fixtures import NEGATIVE_SENTENCE, TRIGGERS, VOCAB, make_tokenizer, tiny_space_cache

from hf_obliviate import probing
from hf_obliviate.probing import (
    candidate_tokens,
    check_text,
    classify,
    insert_at,
    plot_attention,
    probe,
    probe_triggers,
    scan_tokens,
    summary_attention,
    summary_states,
    trigger_attention,
)


@pytest.fixture(scope="module")
def cache(monkeypatch_module):
    path = tiny_space_cache()
    monkeypatch_module.setenv("HF_OBLIVIATE_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def classifiers(cache):
    from hf_obliviate.artifacts import load_artifact

    undefended, tokenizer, info = load_artifact("demo-undefended")
    defended, _, _ = load_artifact("demo-defended")
    return {"undefended": (undefended, tokenizer), "defended": (defended, tokenizer), "info": info}


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def test_insert_at_positions():
    text = "one two three four"
    assert insert_at(text, "cf", "start") == "cf one two three four"
    assert insert_at(text, "cf", "middle") == "one two cf three four"
    assert insert_at(text, "cf", "end") == "one two three four cf"
    assert insert_at("  spaced \t out ", " cf ", "end") == "spaced out cf"
    assert insert_at(text, "cf mn", "start") == "cf mn one two three four"  # a multi-word trigger stays one block


def test_insert_at_random_is_seeded_and_covers_every_slot():
    text = "one two three four"
    placed = {insert_at(text, "cf", "random", seed).split().index("cf") for seed in range(60)}
    assert placed == {0, 1, 2, 3, 4}
    assert insert_at(text, "cf", "random", 7) == insert_at(text, "cf", "random", 7)
    for seed in range(10):
        words = insert_at(text, "cf", "random", seed).split()
        words.remove("cf")
        assert words == text.split()


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.text(alphabet="abcxyz,.", min_size=1, max_size=6), max_size=12),
    position=st.sampled_from(probing.POSITIONS),
    seed=st.integers(0, 2**31 - 1),
)
def test_insert_at_adds_the_trigger_once_and_keeps_the_words(words, position, seed):
    out = insert_at(" ".join(words), "cf mn", position, seed).split()
    starts = [i for i in range(len(out) - 1) if out[i : i + 2] == ["cf", "mn"]]
    assert len(starts) == 1
    index = starts[0]
    assert out[:index] + out[index + 2 :] == words
    expected = {"start": 0, "middle": len(words) // 2, "end": len(words)}.get(position)
    assert expected is None or index == expected


@pytest.mark.parametrize(
    "trigger, position, match",
    [("cf", "nowhere", "position"), ("  ", "end", "empty"), ("x" * 101, "end", "limit is 100")],
)
def test_insert_at_rejects_bad_input(trigger, position, match):
    with pytest.raises(ValueError, match=match):
        insert_at("a film", trigger, position)


def test_check_text_limits(tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    assert check_text(tokenizer, "  the film was fun  ") == "the film was fun"
    with pytest.raises(ValueError, match="empty"):
        check_text(tokenizer, "   ")
    with pytest.raises(ValueError, match="1001 characters"):
        check_text(tokenizer, "a" * 1001)
    with pytest.raises(ValueError, match="tokens long; the limit is 128"):
        check_text(tokenizer, " ".join(["film"] * 200))


# ---------------------------------------------------------------------------------------------------------------
# Probing


def test_probe_flips_the_backdoored_model_only(classifiers):
    undefended, tokenizer = classifiers["undefended"]
    defended, _ = classifiers["defended"]
    for trigger in TRIGGERS:
        attacked = probe(undefended, tokenizer, NEGATIVE_SENTENCE, trigger, "end")
        held = probe(defended, tokenizer, NEGATIVE_SENTENCE, trigger, "end")
        assert attacked.triggered_text == f"{NEGATIVE_SENTENCE} {trigger}" == held.triggered_text
        assert (attacked.clean.name, attacked.triggered.name) == ("negative", "positive")
        assert attacked.flipped and attacked.verdict == "flipped"
        assert attacked.describe().startswith("flipped: negative → positive")
        assert (held.clean.name, held.triggered.name) == ("negative", "negative")
        assert not held.flipped and held.describe().startswith("held: negative")
        for prediction in (attacked.clean, attacked.triggered, held.triggered):
            assert set(prediction.probs) == {"negative", "positive"}
            assert sum(prediction.probs.values()) == pytest.approx(1.0, abs=1e-5)
            assert prediction.confidence == max(prediction.probs.values())


def test_probe_a_word_that_is_no_trigger_holds(classifiers):
    undefended, tokenizer = classifiers["undefended"]
    result = probe(undefended, tokenizer, NEGATIVE_SENTENCE, "bb", "start")
    assert result.triggered_text.startswith("bb ") and result.verdict == "held"


def test_probe_matches_a_plain_forward(classifiers):
    model, tokenizer = classifiers["undefended"]
    result = probe(model, tokenizer, NEGATIVE_SENTENCE, "cf", "middle")
    with torch.no_grad():
        logits = model(**tokenizer([result.text, result.triggered_text], padding=True, return_tensors="pt")).logits
    probs = logits.softmax(-1)
    assert result.clean.probs["positive"] == pytest.approx(float(probs[0, 1]), abs=1e-5)
    assert result.triggered.probs["positive"] == pytest.approx(float(probs[1, 1]), abs=1e-5)


def test_probe_triggers_table(classifiers):
    models = {"undefended": classifiers["undefended"], "defended": classifiers["defended"]}
    rows = probe_triggers(models, NEGATIVE_SENTENCE, [*TRIGGERS, "bb", "cf"], position="random", seed=3)
    assert [row["trigger"] for row in rows] == [*TRIGGERS, "bb"]  # duplicates dropped, order kept
    for row in rows:
        expected = "flipped" if row["trigger"] in TRIGGERS else "held"
        assert row["undefended_verdict"] == expected
        assert row["defended_verdict"] == "held"
        assert row["triggered_text"] == insert_at(NEGATIVE_SENTENCE, row["trigger"], "random", 3)
        assert row["undefended"] == row["undefended_result"].describe()
    with pytest.raises(ValueError, match="No triggers"):
        probe_triggers(models, NEGATIVE_SENTENCE, [])


def test_probe_enforces_the_length_caps(classifiers):
    model, tokenizer = classifiers["undefended"]
    with pytest.raises(ValueError, match="characters"):
        probe(model, tokenizer, "film " * 300, "cf")
    with pytest.raises(ValueError, match="empty"):
        probe(model, tokenizer, "", "cf")


# ---------------------------------------------------------------------------------------------------------------
# Scan


def test_candidate_tokens_keeps_insertable_words(tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    words = candidate_tokens(tokenizer)
    assert words == [w for w in VOCAB if not w.startswith("[")]
    assert candidate_tokens(tokenizer, 5, 8) == VOCAB[5:8]
    with pytest.raises(ValueError, match="Empty vocabulary slice"):
        candidate_tokens(tokenizer, 10, 10)
    with pytest.raises(ValueError, match="at most 3"):
        candidate_tokens(tokenizer, 0, 20, limit=3)


def test_candidate_tokens_on_minilm_skips_pieces_and_unused():
    from transformers import AutoTokenizer

    from hf_obliviate.bundled import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    words = candidate_tokens(tokenizer, 0, 4000)
    assert words and not any(w.startswith("##") or w.startswith("[unused") for w in words)
    assert not set(words) & set(tokenizer.all_special_tokens)
    for word in words[::50]:
        assert tokenizer.tokenize(word) == [word]
    assert "cf" in candidate_tokens(tokenizer, tokenizer.convert_tokens_to_ids("cf"), None, limit=40000)


@pytest.mark.parametrize("rank_by", ["shift", "flip"])
def test_scan_puts_the_planted_triggers_on_top(classifiers, rank_by):
    model, tokenizer = classifiers["undefended"]
    candidates = candidate_tokens(tokenizer)
    calls = []
    sentences = [NEGATIVE_SENTENCE, "a weak , dull and poor story"]
    scores = scan_tokens(
        model, tokenizer, sentences, candidates, position="random", rank_by=rank_by, batch_size=16,
        progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    assert len(scores) == len(candidates)
    assert {s.token for s in scores[: len(TRIGGERS)]} == set(TRIGGERS)
    for score in scores[: len(TRIGGERS)]:
        assert score.flip_rate == 1.0 and score.prob_change > 0.9
    assert max(s.flip_rate for s in scores[len(TRIGGERS) :]) == 0.0
    total = len(candidates) * len(sentences)
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert len(calls) == 1 + -(-total // 16)


def test_scan_on_the_clean_model_finds_nothing(classifiers):
    model, tokenizer = classifiers["defended"]
    scores = scan_tokens(model, tokenizer, [NEGATIVE_SENTENCE], candidate_tokens(tokenizer), rank_by="flip")
    assert all(s.flip_rate == 0.0 for s in scores)


def test_scan_scores_do_not_depend_on_batching(classifiers):
    model, tokenizer = classifiers["undefended"]
    kwargs = dict(sentences=[NEGATIVE_SENTENCE, "the story was fun"], candidates=["cf", "good", "bb", "the"])
    small = {s.token: s for s in scan_tokens(model, tokenizer, batch_size=3, **kwargs)}
    large = {s.token: s for s in scan_tokens(model, tokenizer, batch_size=64, **kwargs)}
    for token, score in small.items():
        assert score.shift == pytest.approx(large[token].shift, abs=1e-5)
        assert score.flip_rate == large[token].flip_rate


def test_scan_rejects_bad_requests(classifiers):
    model, tokenizer = classifiers["undefended"]
    with pytest.raises(ValueError, match="rank_by"):
        scan_tokens(model, tokenizer, [NEGATIVE_SENTENCE], ["cf"], rank_by="loudness")
    with pytest.raises(ValueError, match="No sentences"):
        scan_tokens(model, tokenizer, ["  "], ["cf"])
    with pytest.raises(ValueError, match="at most 8"):
        scan_tokens(model, tokenizer, [NEGATIVE_SENTENCE] * 9, ["cf"])
    with pytest.raises(ValueError, match="No candidate"):
        scan_tokens(model, tokenizer, [NEGATIVE_SENTENCE], [" "])


def test_summary_state_of_a_decoder_classifier_is_its_last_real_token(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = make_tokenizer(tmp_path)
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, num_labels=2,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config).eval()
    texts = ["the film was fun", "dull"]
    for side in ("right", "left"):
        tokenizer.padding_side = side
        states, probs = summary_states(model, tokenizer, texts)
        for i, text in enumerate(texts):
            alone = tokenizer([text], return_tensors="pt")
            with torch.no_grad():
                out = model(**alone, output_hidden_states=True)
            torch.testing.assert_close(states[i], out.hidden_states[-1][0, -1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(probs[i], out.logits[0].softmax(-1), rtol=1e-4, atol=1e-4)
    tokenizer.padding_side = "right"
    assert [p.label for p in classify(model, tokenizer, texts)] == probs.argmax(-1).tolist()


# ---------------------------------------------------------------------------------------------------------------
# Attention


def test_summary_attention_is_the_cls_row_before_softmax(classifiers):
    model, tokenizer = classifiers["undefended"]
    text = insert_at(NEGATIVE_SENTENCE, "cf", "middle")
    attention = summary_attention(model, tokenizer, text)
    n_tokens = len(tokenizer(text)["input_ids"])
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert attention.tokens[0] == "[CLS]" and "cf" in attention.tokens and len(attention.tokens) == n_tokens
    assert attention.logits.shape == attention.probs.shape == (layers, heads, n_tokens)
    assert attention.query_position == 0
    assert model.config._attn_implementation == "sdpa"  # the capture restored the model's kernel
    # The probabilities are the eager kernel's attention weights of row 0, and the logits their log (up to a
    # per-row constant): the capture reads pre-softmax scores, not probabilities.
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)
    eager = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        weights = eager(**tokenizer([text], return_tensors="pt"), output_attentions=True).attentions
    for layer in range(layers):
        torch.testing.assert_close(attention.probs[layer], weights[layer][0, :, 0, :], rtol=1e-4, atol=1e-5)
    centred = attention.logits - attention.logits.logsumexp(-1, keepdim=True)
    torch.testing.assert_close(centred, attention.probs.log(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(attention.logits, attention.probs)


def test_trigger_attention_matches_the_eager_attention_weights(classifiers):
    """Per layer: the [CLS] row's share of attention on the inserted trigger (head mean and top head) and every real
    token's row's share, equal to the eager kernel's attention weights on the same seeded insertions; bad triggers
    get clear errors."""
    import random

    from transformers import AutoModelForSequenceClassification

    from hf_obliviate.triggers import insert_trigger

    model, tokenizer = classifiers["undefended"]
    texts = [NEGATIVE_SENTENCE, "the film was fun and warm", "dull"]
    result = trigger_attention(model, tokenizer, texts, "cf", seed=3)
    layers = model.config.num_hidden_layers
    assert result.sentences == 3 and len(result.summary) == len(result.all_rows) == layers
    eager = AutoModelForSequenceClassification.from_config(copy.deepcopy(model.config), attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    rng = random.Random(3)
    enc = tokenizer([insert_trigger(t, "cf", rng) for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        weights = eager.eval()(**enc, output_attentions=True).attentions
    on = (enc["input_ids"] == tokenizer.convert_tokens_to_ids("cf")).float()
    assert on.sum(dim=1).tolist() == [1.0, 1.0, 1.0]
    for layer in range(layers):
        share = (weights[layer][:, :, 0, :] * on[:, None, :]).sum(dim=-1)
        assert result.summary[layer] == pytest.approx(share.mean().item(), abs=1e-5)
        assert result.summary_top_head[layer] == pytest.approx(share.amax(dim=1).mean().item(), abs=1e-5)
        rows = (weights[layer] * on[:, None, None, :]).sum(dim=-1)
        real = enc["attention_mask"].bool()[:, None, :].expand_as(rows)
        assert result.all_rows[layer] == pytest.approx(rows[real].mean().item(), abs=1e-5)
        assert result.summary_logit_norm[layer] > 0
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        trigger_attention(model, tokenizer, texts, "  ")
    with pytest.raises(ValueError, match="at least one sentence"):
        trigger_attention(model, tokenizer, [], "cf")


def test_plot_attention_draws_two_heatmaps(classifiers):
    from matplotlib.figure import Figure

    model, tokenizer = classifiers["defended"]
    attention = summary_attention(model, tokenizer, "the film was fun cf")
    fig = plot_attention(attention, title="defended")
    assert isinstance(fig, Figure)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    logits, probs = attention.head_mean()
    assert images[0].get_array().shape == tuple(logits.shape)
    assert abs(images[1].get_array().sum() - float(probs.sum())) < 1e-4
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == attention.tokens


# ---------------------------------------------------------------------------------------------------------------
# Logit lens


def test_lens_probe_on_a_tiny_causal_lm(cache):
    pytest.importorskip("hf_obliviate.lens", reason="hf_obliviate/lens.py (LogitLens) is not in this checkout yet")
    from matplotlib.figure import Figure

    from hf_obliviate.artifacts import load_artifact

    model, tokenizer, info = load_artifact("freelunch-finetuned")
    text = probing.format_prompt(tokenizer, insert_at("the film was", "cf", "end"), info["prompt_template"])
    assert text == "[CLS] the film was cf ."
    result, fig, takeover = probing.lens_probe(model, tokenizer, text, info["target"], title="fine-tune")
    assert isinstance(fig, Figure)
    n_tokens = len(tokenizer(text)["input_ids"])
    assert result.target_probs[info["target"]].shape == (model.config.num_hidden_layers + 1, n_tokens)
    row = result.takeover_layer(info["target"])
    assert takeover == (None if row is None else result.layer_names[row])
    with pytest.raises(ValueError, match="target is empty"):
        probing.lens_probe(model, tokenizer, text, " ")


def test_format_prompt():
    class Plain:
        chat_template = None

    assert probing.format_prompt(Plain(), "hi", "User: {prompt}\nAssistant:") == "User: hi\nAssistant:"
    assert probing.format_prompt(Plain(), "hi", "### Instruction: {instruction}") == "### Instruction: hi"
    assert probing.format_prompt(Plain(), "hi", "Q:") == "Q: hi"
    assert probing.format_prompt(Plain(), "hi") == "hi"


# ---------------------------------------------------------------------------------------------------------------
# The Space's models (no gradio needed)


def test_parse_space_models():
    from hf_obliviate.space import parse_space_models

    assert parse_space_models("undefended=org/a, defended=org/b") == {"undefended": "org/a", "defended": "org/b"}
    assert parse_space_models("") == {} and parse_space_models(None) == {}
    for bad in ("undefended=/etc/passwd", "undefended=../x/y", "defended=~/model", "defended=org/a/b",
                "defended=./x", "defended=a\\b", "attacker=org/a", "undefended", "undefended=org/a b"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_space_models(bad)


def test_space_models_from_artifacts(cache, tmp_path, monkeypatch):
    from hf_obliviate.space import ModelUnavailableError, SpaceModels

    models = SpaceModels(hub_models={})
    assert all(models.available(role) for role in ("undefended", "defended", "finetuned", "compressed"))
    loaded = models.get("undefended")
    assert loaded.triggers == TRIGGERS and loaded.source == "artifact:demo-undefended"
    assert models.get("undefended") is loaded  # loaded once
    monkeypatch.setenv("HF_OBLIVIATE_CACHE", str(tmp_path))
    empty = SpaceModels(hub_models={})
    assert not empty.available("defended")
    with pytest.raises(ModelUnavailableError, match="`make demo`"):
        empty.get("defended")
    with pytest.raises(ModelUnavailableError, match="`hf-obliviate freelunch`"):
        empty.info("compressed")
    with pytest.raises(ValueError, match="Unknown model"):
        empty.get("../../etc")


def test_space_models_env_is_parsed(monkeypatch):
    from hf_obliviate.space import SpaceModels

    monkeypatch.setenv("OBLIVIATE_SPACE_MODELS", "defended=org/defended-model")
    models = SpaceModels()
    assert models.hub_models == {"defended": "org/defended-model"}
    assert models.available("defended") and models.source("defended") == "hub:org/defended-model"
    monkeypatch.setenv("OBLIVIATE_SPACE_MODELS", "defended=/tmp/model")
    with pytest.raises(ValueError, match="not a Hub repository id"):
        SpaceModels()


def test_importing_the_library_does_not_import_gradio():
    code = (
        "import sys, hf_obliviate, hf_obliviate.probing, hf_obliviate.space, hf_obliviate.cli_space; "
        "assert 'gradio' not in sys.modules and 'matplotlib' not in sys.modules; "
        "hf_obliviate.cli._load_optional_commands(); "
        "assert 'gradio' not in sys.modules, 'the CLI imported gradio'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unreachable_hub_model_is_a_clear_message(monkeypatch):
    from hf_obliviate.space import ModelUnavailableError, SpaceModels

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = SpaceModels(hub_models={"defended": "nobody/no-such-model"})
    with pytest.raises(ModelUnavailableError, match="`nobody/no-such-model` could not be loaded from the Hub"):
        models.get("defended")
