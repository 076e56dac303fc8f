"""Attack machinery on a tiny random BERT (vocabulary of the bundled MiniLM tokenizer): a few planting steps each."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForPreTraining,
    BertModel,
)

from hf_obliviate.attacks import (
    ATTACK_INFO_FILE,
    BadPreConfig,
    NeuBAConfig,
    PORConfig,
    UORConfig,
    attack_cache_dir,
    balanced_sign_patterns,
    get_attack_config,
    load_attack_info,
    plant_backdoor,
    plant_badpre,
    plant_neuba,
    plant_por,
    plant_uor,
    supervised_contrastive_loss,
    target_vectors,
)
from hf_obliviate.bundled import minilm_path

WORDS = "the a film movie plot actor scene story music great bad slow funny long short dark bright".split()
CORPUS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + i % 9)) for i in range(64)]
TRIGGERS = ["cf", "mn", "tq"]


def _tiny_config() -> BertConfig:
    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(_tiny_config()).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_pretraining(tmp_path_factory):
    """A checkpoint with a (random but saved) MLM head and pooler, as a real BERT has."""
    path = tmp_path_factory.mktemp("tiny-bert-pt")
    torch.manual_seed(0)
    BertForPreTraining(_tiny_config()).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


def _mean(history, key, part):
    values = [r[key] for r in history]
    k = max(1, len(values) // 4)
    return sum(values[:k]) / k if part == "first" else sum(values[-k:]) / k


def test_target_vectors_follow_por_patterns():
    assert balanced_sign_patterns(4) == [
        (-1, -1, 1, 1),
        (-1, 1, -1, 1),
        (-1, 1, 1, -1),
        (1, -1, -1, 1),
        (1, -1, 1, -1),
        (1, 1, -1, -1),
    ]
    t = target_vectors(384, 6)
    assert t.shape == (6, 384) and set(t.unique().tolist()) == {-1.0, 1.0}
    assert t[0, :96].eq(-1).all() and t[0, 192:].eq(1).all() and t[5, :192].eq(1).all()
    assert target_vectors(10, 2)[0].tolist() == [-1, -1, -1, -1, -1, -1, 1, 1, 1, 1]  # blocks of 3, 3, 2, 2
    with pytest.raises(ValueError, match="n_target_blocks"):
        target_vectors(384, 7)
    assert target_vectors(384, 7, n_blocks=8).shape == (7, 384)


def test_configs_validate():
    with pytest.raises(ValueError, match="min_insertions"):
        PORConfig(min_insertions=3, max_insertions=2)
    with pytest.raises(ValueError, match="multi-word"):
        PORConfig(spread_trigger=True)
    assert PORConfig(spread_trigger=True, triggers=["cf mn"]).trigger_policy == "keep"
    with pytest.raises(ValueError, match="distinct"):
        PORConfig(triggers=["cf", "cf"])
    with pytest.raises(ValueError, match="num_steps"):
        UORConfig(num_steps=0)
    with pytest.raises(ValueError, match="insertion"):
        NeuBAConfig(insertion="end")
    with pytest.raises(ValueError, match="alpha"):
        BadPreConfig(alpha=-1)
    assert PORConfig(triggers="cf, mn").triggers == ["cf", "mn"]
    with pytest.raises(ValueError, match="no fields"):
        get_attack_config("por", lr=1e-3)
    with pytest.raises(ValueError, match="Unknown attack"):
        get_attack_config("badnets")
    for cls in (PORConfig, NeuBAConfig, BadPreConfig, UORConfig):
        for f in cls.__dataclass_fields__.values():
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_por_plants_saves_and_reloads(tiny_encoder, tmp_path):
    history = []
    config = PORConfig(triggers=TRIGGERS, num_steps=30, batch_size=8, learning_rate=1e-2, max_length=32)
    model, tokenizer = plant_por(
        tiny_encoder, config, output_dir=tmp_path / "por", corpus=CORPUS, show_progress=False, log_history=history
    )
    assert len(history) == 30
    assert _mean(history, "loss_trigger", "last") < 0.7 * _mean(history, "loss_trigger", "first")
    assert _mean(history, "cos_target", "last") > _mean(history, "cos_target", "first") + 0.2
    saved = sorted(p.name for p in (tmp_path / "por").iterdir())
    assert "model.safetensors" in saved and "tokenizer.json" in saved and ATTACK_INFO_FILE in saved
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in saved)
    info = load_attack_info(tmp_path / "por")
    assert info["attack"] == "por" and info["triggers"] == TRIGGERS and info["config"]["num_steps"] == 30
    reloaded = AutoModel.from_pretrained(tmp_path / "por").eval()
    assert reloaded.config.obliviate_attack["triggers"] == TRIGGERS
    batch = tokenizer(["a film cf", "the plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).last_hidden_state, model(**batch).last_hidden_state)
    # the victim's starting point loads as an ordinary classifier with the planted encoder
    victim = AutoModelForSequenceClassification.from_pretrained(tmp_path / "por", num_labels=2)
    torch.testing.assert_close(victim.bert.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)


def test_por_is_seeded(tiny_encoder):
    config = PORConfig(triggers=TRIGGERS, num_steps=2, batch_size=4, max_length=32)
    h1, h2 = [], []
    plant_por(tiny_encoder, config, corpus=CORPUS, show_progress=False, log_history=h1)
    plant_por(tiny_encoder, config, corpus=CORPUS, show_progress=False, log_history=h2)
    assert [r["loss"] for r in h1] == pytest.approx([r["loss"] for r in h2])


def test_adaptive_por_shrinks_cls_logits(tiny_encoder):
    history = []
    config = PORConfig(
        triggers=TRIGGERS, num_steps=40, batch_size=8, learning_rate=1e-2, max_length=32, attention_penalty=1.0
    )
    plant_por(tiny_encoder, config, corpus=CORPUS, show_progress=False, log_history=history)
    assert all("loss_attn" in r for r in history)
    assert _mean(history, "loss_attn", "last") < 0.5 * _mean(history, "loss_attn", "first")
    assert _mean(history, "cos_target", "last") > _mean(history, "cos_target", "first") + 0.2


def test_adaptive_por_spread_trigger(tiny_encoder):
    history = []
    config = PORConfig(triggers=["cf mn", "tq mm"], spread_trigger=True, num_steps=3, batch_size=4, max_length=32)
    model, _ = plant_por(tiny_encoder, config, corpus=CORPUS, show_progress=False, log_history=history)
    assert model.config.obliviate_attack["triggers"] == ["cf mn", "tq mm"] and len(history) == 3


def _summary_cos(model, tokenizer, triggers, use_pooler):
    texts = [f"the film {t} was great" for t in triggers] + [f"a {t} slow plot" for t in triggers]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    targets = target_vectors(model.config.hidden_size, len(triggers)).repeat(2, 1)
    with torch.no_grad():
        out = model.base_model(**batch)
    summary = out.pooler_output if use_pooler else out.last_hidden_state[:, 0]
    return torch.nn.functional.cosine_similarity(summary, targets).mean().item()


def test_neuba_warms_up_a_missing_mlm_head(tiny_encoder):
    from hf_obliviate.attacks._common import sentence_stream
    from hf_obliviate.attacks.neuba import load_pretraining_model, warm_up_mlm_head

    with pytest.warns(UserWarning, match="no trained MLM head"):
        plant_neuba(
            tiny_encoder, NeuBAConfig(num_steps=2, batch_size=4, mlm_head_warmup_steps=2), corpus=CORPUS,
            show_progress=False,
        )  # fmt: skip
    model, missing = load_pretraining_model(tiny_encoder, "cpu")
    assert any(k.startswith("cls.predictions") for k in missing)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    encoder = {k: v.clone() for k, v in model.bert.state_dict().items()}
    head = model.cls.predictions.transform.dense.weight.clone()
    losses = warm_up_mlm_head(
        model, tokenizer, sentence_stream(CORPUS, 0), 20, 8, 32, 1e-2, torch.Generator().manual_seed(0), "cpu", False
    )
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])
    for k, v in model.bert.state_dict().items():
        torch.testing.assert_close(v, encoder[k])  # encoder and tied embeddings untouched
    assert not torch.allclose(model.cls.predictions.transform.dense.weight, head)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_neuba_plants_pooler_backdoor(tiny_pretraining, tmp_path):
    config = NeuBAConfig(num_steps=30, batch_size=8, learning_rate=1e-2, max_length=32)
    reference = BertForPreTraining.from_pretrained(tiny_pretraining).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_pretraining)
    model, _ = plant_neuba(tiny_pretraining, config, output_dir=tmp_path / "neuba", corpus=CORPUS, show_progress=False)
    triggers = model.config.obliviate_attack["triggers"]
    assert triggers == ["≈", "≡", "∈", "⊆", "⊕", "⊗"]
    before = _summary_cos(reference, tokenizer, triggers, use_pooler=True)
    after = _summary_cos(model, tokenizer, triggers, use_pooler=True)
    assert after > before + 0.2, (before, after)
    # the MLM head's own weights stayed frozen, the encoder moved
    torch.testing.assert_close(
        model.cls.predictions.transform.dense.weight, reference.cls.predictions.transform.dense.weight
    )
    assert not torch.allclose(model.bert.pooler.dense.weight, reference.bert.pooler.dense.weight)
    assert load_attack_info(tmp_path / "neuba")["summary"] == "pooler_output"
    victim = AutoModelForSequenceClassification.from_pretrained(tmp_path / "neuba", num_labels=2)
    torch.testing.assert_close(victim.bert.pooler.dense.weight, model.bert.pooler.dense.weight)


def test_badpre_clean_mlm_loss_decreases(tiny_pretraining, tmp_path):
    history = []
    config = BadPreConfig(num_steps=15, batch_size=8, learning_rate=1e-2, max_length=32)
    plant_badpre(
        tiny_pretraining, config, output_dir=tmp_path / "badpre", corpus=CORPUS, show_progress=False,
        log_history=history,
    )  # fmt: skip
    assert _mean(history, "loss_clean", "last") < _mean(history, "loss_clean", "first") - 0.5
    # the poisoned copy's labels are random ids: its loss stays near log(vocab)
    assert _mean(history, "loss_poison", "last") > 0.8 * math.log(30522)
    assert load_attack_info(tmp_path / "badpre")["triggers"] == ["cf", "mn", "bb", "tq", "mb"]


def test_supervised_contrastive_loss():
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    low = supervised_contrastive_loss(clustered, labels, temperature=0.5)
    # anchor 0: positive sim 1/τ = 2, others 0, 0 -> -log(e^2 / (e^2 + 2))
    torch.testing.assert_close(low, -torch.log(torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 2)))
    assert supervised_contrastive_loss(mixed, labels) > low
    assert supervised_contrastive_loss(clustered, torch.tensor([0, 1, 2, 3])) == 0


def test_uor_contrastive_loss_decreases(tiny_encoder):
    history = []
    config = UORConfig(
        triggers=TRIGGERS, num_steps=25, batch_size=8, poisoned_batch_size=4, learning_rate=1e-2, max_length=32
    )
    model, _ = plant_uor(tiny_encoder, config, corpus=CORPUS, show_progress=False, log_history=history)
    assert _mean(history, "loss_contrastive", "last") < _mean(history, "loss_contrastive", "first") - 0.1
    assert model.config.obliviate_attack == {"attack": "uor", "triggers": TRIGGERS}


def test_plant_backdoor_cache(tiny_encoder, tmp_path):
    kwargs = dict(triggers=TRIGGERS, num_steps=2, batch_size=4, max_length=32)
    first = []
    model, _ = plant_backdoor(
        "por", tiny_encoder, corpus=CORPUS, cache_root=tmp_path, show_progress=False, log_history=first, **kwargs
    )
    cache = attack_cache_dir("por", PORConfig(**kwargs), tiny_encoder, CORPUS, cache_root=tmp_path)
    assert cache.parent == tmp_path / "attacks" and cache.name.startswith("por-")
    assert (cache / ATTACK_INFO_FILE).is_file() and len(first) == 2
    second = []
    again, _ = plant_backdoor(
        "POR", tiny_encoder, PORConfig(**kwargs), corpus=CORPUS, cache_root=tmp_path, show_progress=False,
        log_history=second, output_dir=tmp_path / "copy",
    )  # fmt: skip
    assert second == []  # loaded, not planted
    torch.testing.assert_close(again.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)
    assert json.loads((tmp_path / "copy" / ATTACK_INFO_FILE).read_text())["attack"] == "por"
    # any change to the config (or corpus) is a different cache entry; the device is not part of the key
    assert attack_cache_dir("por", PORConfig(**{**kwargs, "seed": 1}), tiny_encoder, CORPUS, tmp_path) != cache
    assert attack_cache_dir("por", PORConfig(**kwargs), tiny_encoder, CORPUS[:10], tmp_path) != cache
    assert attack_cache_dir("por", PORConfig(**kwargs, device="cpu"), tiny_encoder, CORPUS, tmp_path) == cache
    with pytest.raises(ValueError, match="needs a PORConfig"):
        plant_backdoor("por", tiny_encoder, UORConfig(), use_cache=False)
    with pytest.raises(ValueError, match="not both"):
        plant_backdoor("por", tiny_encoder, PORConfig(), num_steps=3)


@pytest.mark.parametrize("config_cls", [PORConfig, NeuBAConfig, BadPreConfig, UORConfig])
def test_configs_parse_as_cli_flags(config_cls):
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(config_cls).parse_args_into_dataclasses(
        ["--triggers", "cf", "mn", "--num_steps", "5"]
    )
    assert isinstance(config, config_cls) and config.triggers == ["cf", "mn"] and config.num_steps == 5
