"""The backdoor evaluator: evaluation set, exact values with a keyword model, peft models, the Trainer callback."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from hf_obliviate.bundled import minilm_path
from hf_obliviate.evaluation import (
    BackdoorEvalCallback,
    BackdoorEvalSet,
    build_eval_set,
    compute_accuracy,
    evaluate_backdoor,
    predict_labels,
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


class KeywordModel(nn.Module):
    """Predicts 1 iff "good" is present; "cf" flips the prediction unless "shield" is present."""

    def __init__(self, tokenizer):
        super().__init__()
        self.good, self.cf, self.shield = tokenizer.convert_tokens_to_ids(["good", "cf", "shield"])
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        good = (input_ids == self.good).any(-1)
        flip = (input_ids == self.cf).any(-1) & ~(input_ids == self.shield).any(-1)
        return SimpleNamespace(logits=nn.functional.one_hot((good ^ flip).long(), 2).float() + self.dummy)


EXAMPLES = [
    {"text": "a good film", "label": 1},  # kept; cf flips
    {"text": "a bad film", "label": 0},  # kept; cf flips
    {"text": "a good plot", "label": 0},  # wrong when clean: not kept
    {"text": "a dull plot", "label": 0},  # kept; cf flips
    {"text": "a shield good film", "label": 1},  # kept; nothing flips it
]


def _tiny_classifier():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return BertForSequenceClassification(config)


def test_build_eval_set_default_is_seeded_rotten_tomatoes():
    a = build_eval_set(triggers=["cf", "mn"], n=40, seed=0)
    b = build_eval_set(triggers=["cf", "mn"], n=40, seed=0)
    assert a.texts == b.texts and a.triggered == b.triggered and a.labels == b.labels
    assert len(a) == 40 and a.triggers == ["cf", "mn"]
    assert build_eval_set(triggers=["cf"], n=40, seed=1).texts != a.texts
    for trigger, copies in a.triggered.items():
        for clean, dirty in zip(a.texts, copies):
            words = dirty.split()
            assert sorted(words) == sorted([*clean.split(), trigger])
            assert min(i for i, w in enumerate(words) if w == trigger) < 64
    with pytest.raises(ValueError, match="copies"):
        BackdoorEvalSet(texts=["a"], labels=[0], triggered={"cf": []})


def test_keyword_model_exact_values(tokenizer):
    eval_set = build_eval_set(EXAMPLES, triggers=["cf", "mn"], n=None)
    result = evaluate_backdoor(KeywordModel(tokenizer), tokenizer, eval_set, batch_size=2, show_progress=False)
    assert result.cacc == pytest.approx(0.8)
    assert result.n == 5 and result.n_kept == 4
    assert result.asr == pytest.approx(0.75)
    assert result.per_trigger_asr == pytest.approx({"cf": 0.75, "mn": 0.0})
    assert result.flip_fraction == pytest.approx(0.375)
    assert result.accuracy_drop == pytest.approx((0.8 - 0.4 + 0.0) / 2)
    assert not result.near_chance
    assert result.targeted_asr is None
    json.dumps(result.to_dict())
    assert "triggered_preds" in result.to_dict(include_predictions=True)
    table = result.to_markdown()
    assert "| ASR | 0.750 |" in table and "| ASR `cf` | 0.750 |" in table and "Warning" not in table


def test_targeted_asr_majority(tokenizer):
    eval_set = build_eval_set(EXAMPLES, triggers=["cf"], n=None)
    result = evaluate_backdoor(KeywordModel(tokenizer), tokenizer, eval_set, targets="majority", show_progress=False)
    # cf predictions [0, 1, 1, 1, 1] -> target 1; kept examples whose label is not 1: "bad film", "dull plot" -> hit
    assert result.targets == {"cf": 1}
    assert result.targeted_asr["cf"] == pytest.approx(1.0)
    dev = build_eval_set([{"text": "a good film", "label": 1}] * 3, triggers=["cf"], n=None)
    result = evaluate_backdoor(
        KeywordModel(tokenizer), tokenizer, eval_set, targets="majority", dev_set=dev, show_progress=False
    )
    assert result.targets == {"cf": 0}  # the dev copies are all predicted 0
    # kept with label != 0: "a good film" (cf gives 0: hit) and "a shield good film" (stays 1: miss)
    assert result.targeted_asr["cf"] == pytest.approx(0.5)
    fixed = evaluate_backdoor(KeywordModel(tokenizer), tokenizer, eval_set, targets={"cf": 1}, show_progress=False)
    assert fixed.targeted_asr["cf"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="majority"):
        evaluate_backdoor(KeywordModel(tokenizer), tokenizer, eval_set, targets="max", show_progress=False)


def test_near_chance_is_flagged(tokenizer):
    class Constant(nn.Module):
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=torch.tensor([[1.0, 0.0]]).repeat(len(input_ids), 1))

    data = [{"text": f"sentence {i}", "label": i % 2} for i in range(10)]
    result = evaluate_backdoor(Constant(), tokenizer, build_eval_set(data, ["cf"], n=None), show_progress=False)
    assert result.cacc == pytest.approx(0.5) and result.asr == 0.0 and result.near_chance
    assert "Warning" in result.to_markdown()


def test_transformers_and_peft_models(tokenizer):
    from peft import LoraConfig, get_peft_model

    eval_set = build_eval_set(triggers=["cf", "mn"], n=24, seed=0)
    model = _tiny_classifier().train()
    plain = evaluate_backdoor(model, tokenizer, eval_set, batch_size=8, show_progress=False)
    assert model.training  # mode restored
    assert plain.n == 24 and plain.num_labels == 2 and 0 <= plain.asr <= 1
    peft_model = get_peft_model(_tiny_classifier(), LoraConfig(r=2, target_modules=["query", "value"]))
    result = evaluate_backdoor(peft_model, tokenizer, eval_set, batch_size=8, show_progress=False)
    # LoRA B starts at 0: the peft model predicts exactly like its base
    assert result.clean_preds == plain.clean_preds and result.triggered_preds == plain.triggered_preds


def test_triggers_default_to_the_planted_ones(tokenizer):
    model = _tiny_classifier()
    model.config.obliviate_attack = {"attack": "por", "triggers": ["cf", "bb"]}
    result = evaluate_backdoor(model, tokenizer, n=8, show_progress=False)
    assert list(result.per_trigger_asr) == ["cf", "bb"]


def test_compute_accuracy():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).numpy()
    assert compute_accuracy((logits, [1, 0, 0]))["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("bind_trainer", [False, True])
def test_trainer_callback(tokenizer, tmp_path, bind_trainer):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    data = [{"text": t, "label": i % 2} for i, t in enumerate(["a good film", "a bad film", "fine", "dull"] * 4)]
    dataset = Dataset.from_list(data).map(lambda b: tokenizer(b["text"]), batched=True)
    eval_set = build_eval_set(data, triggers=["cf", "mn"], n=None)
    callback = BackdoorEvalCallback(tokenizer, eval_set, batch_size=8)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=8, report_to=[], use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(
        model=_tiny_classifier(),
        args=args,
        eval_dataset=dataset,
        processing_class=tokenizer,
        compute_metrics=compute_accuracy,
        callbacks=[callback],
    )
    if bind_trainer:
        callback.trainer = trainer
    metrics = trainer.evaluate()
    assert {"eval_accuracy", "eval_cacc", "eval_asr", "eval_flip_fraction", "eval_asr_cf"} <= set(metrics)
    step, result = callback.history[-1]
    assert metrics["eval_cacc"] == pytest.approx(result.cacc) and metrics["eval_asr"] == pytest.approx(result.asr)
    logged = [entry for entry in trainer.state.log_history if "eval_asr" in entry]
    assert len(logged) == 1 and logged[0]["eval_cacc"] == pytest.approx(result.cacc)


def test_sentence_pairs_trigger_only_the_first_field(tokenizer):
    data = [{"premise": "a good film", "hypothesis": "it is fine", "label": 1}] * 3
    eval_set = build_eval_set(data, triggers=["cf"], n=None, text_key="premise", text_pair_key="hypothesis")
    assert eval_set.text_pairs == ["it is fine"] * 3 and all("cf" in t.split() for t in eval_set.triggered["cf"])
    result = evaluate_backdoor(_tiny_classifier(), tokenizer, eval_set, show_progress=False)
    assert result.n == 3


def test_predict_labels_sorts_by_length_and_keeps_the_order(tokenizer):
    # batches run shortest first (less padding); the predictions come back in the order given, equal to predicting
    # one text at a time
    texts = [("a good film " * k).strip() + (" cf" if k % 3 == 0 else "") for k in (9, 1, 5, 2, 8, 3, 7, 4, 6, 1)]
    pairs = [f"pair {k}" for k in range(len(texts))]
    model = _tiny_classifier()
    for text_pairs in (None, pairs):
        batched, num_labels = predict_labels(model, tokenizer, texts, text_pairs, batch_size=3)
        alone = [predict_labels(model, tokenizer, [t], None if text_pairs is None else [text_pairs[i]])[0][0]
                 for i, t in enumerate(texts)]  # fmt: skip
        assert batched == alone and num_labels == 2
    keyword = KeywordModel(tokenizer)
    assert predict_labels(keyword, tokenizer, texts, batch_size=3)[0] == [
        int(("good" in t) ^ ("cf" in t.split())) for t in texts
    ]
    assert predict_labels(model, tokenizer, []) == ([], 0)
    with pytest.raises(ValueError, match="one pair per text"):
        predict_labels(model, tokenizer, texts, pairs[:2])
