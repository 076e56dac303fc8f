"""ObliviateTrainer: every PEFT type and family end to end, gradient accumulation, logging, saving, card."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tiny_models import FAMILIES, TUNERS, GradCatcher, PadCollator, quiet_training_kwargs, tiny_peft_model
from transformers import DataCollatorWithPadding, TrainingArguments

from hf_obliviate import ObliviateTrainer, ObliviateTrainingArguments


def _dataset(n: int = 16, family: str = "bert", seed: int = 0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 4 + (i * 5) % 9
        ids = torch.randint(3, 100, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": i % 2})
    return Dataset.from_list(rows)


def _args(tmp_path, **kwargs) -> ObliviateTrainingArguments:
    return ObliviateTrainingArguments(**quiet_training_kwargs(tmp_path, **kwargs))


def _grads_after_one_step(tmp_path, family, batch, accumulation, tuner="lora", **kwargs):
    torch.manual_seed(0)
    model = tiny_peft_model(family, tuner)
    catcher = GradCatcher()
    args = _args(
        tmp_path, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, **kwargs
    )
    pad = 1 if family == "roberta" else 0
    trainer = ObliviateTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(16, family),
        data_collator=PadCollator(pad),
        callbacks=[catcher],
    )
    trainer.train()
    return catcher.grads, trainer


@pytest.mark.parametrize("family", ["bert", "llama"])  # BERT's loss ignores num_items_in_batch, Llama's uses it
def test_gradient_accumulation_1x16_equals_4x4(tmp_path, family):
    full, t1 = _grads_after_one_step(tmp_path / "a", family, batch=16, accumulation=1)
    accumulated, t4 = _grads_after_one_step(tmp_path / "b", family, batch=4, accumulation=4)
    assert full.keys() == accumulated.keys() and len(full) > 0
    # Equal micro-batch sizes: the mean of per-micro-batch means is the global mean, so gradients must match.
    # The attention term is a mean over examples and heads of per-example norms: same argument.
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=2e-4, atol=1e-7, msg=name)
    # The defense terms really contributed: without them the gradient differs.
    plain, _ = _grads_after_one_step(tmp_path / "c", family, batch=16, accumulation=1, obliviate=False)
    assert any(not torch.allclose(plain[n], full[n]) for n in full)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tuner", TUNERS)
def test_every_tuner_and_family_trains_end_to_end(tmp_path, family, tuner):
    model = tiny_peft_model(family, tuner)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = _args(tmp_path, max_steps=3, per_device_train_batch_size=4)
    pad = 1 if family == "roberta" else 0
    trainer = ObliviateTrainer(
        model=model, args=args, train_dataset=_dataset(12, family), data_collator=PadCollator(pad)
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert {"loss_task", "loss_amp", "loss_attn"} <= entry.keys()
        assert all(torch.isfinite(torch.tensor(entry[k])) for k in ("loss", "loss_task", "loss_amp", "loss_attn"))
        assert entry["loss_amp"] < 0 < entry["loss_attn"]
    after = dict(model.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n].detach().to(before[n].device))]
    assert changed, "no trainable tensor moved"
    trainer.save_model(str(tmp_path / "saved"))
    saved = {p.name for p in (tmp_path / "saved").iterdir()}
    assert "adapter_model.safetensors" in saved and "adapter_config.json" in saved


def test_defense_changes_training_and_eval_is_untouched(tmp_path):
    model = tiny_peft_model("bert", "lora")
    data = _dataset(8)
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=4, eval_strategy="no")
    trainer = ObliviateTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=PadCollator(0)
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and not any(k.startswith("eval_loss_") for k in metrics)


def test_rows_query_on_a_classifier_penalises_every_real_token(tmp_path):
    """attn_query="rows" on a classifier: the trainer passes the attention mask as the rows (every real token), so
    the logged term equals the defense computed by hand with query_mask = attention_mask, and differs from CLS's."""
    from hf_obliviate import ObliviateConfig, ObliviateDefense

    torch.manual_seed(0)
    model = tiny_peft_model("bert", "lora")
    data = _dataset(4)
    batch = PadCollator(0)([data[i] for i in range(4)])
    expected = {}
    for query, mask in (("rows", batch["attention_mask"]), ("first", None)):
        defense = ObliviateDefense(model, ObliviateConfig(lambda_amp=0.0, lambda_attn=1.0, attn_query=query))
        with torch.no_grad(), defense.track(attention_mask=batch["attention_mask"], query_mask=mask) as step:
            model(**batch)
        expected[query] = step.terms()["loss_attn"].item()
    assert abs(expected["rows"] - expected["first"]) > 1e-3 * expected["first"]
    args = _args(tmp_path, max_steps=1, per_device_train_batch_size=4, lambda_amp=0.0, attn_query="rows")
    trainer = ObliviateTrainer(model=model, args=args, train_dataset=data, data_collator=PadCollator(0))
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss_attn" in entry)
    assert logged["loss_attn"] == pytest.approx(expected["rows"], rel=1e-4)
    # Without an attention mask every token is real: all rows count.
    same_length = Dataset.from_list([{"input_ids": list(range(5 + i, 11 + i)), "labels": i % 2} for i in range(4)])
    device = next(model.parameters()).device  # the Trainer moved it (HF_OBLIVIATE_TEST_DEVICE)
    unmasked = {k: v.to(device) for k, v in PadCollator(0)([same_length[i] for i in range(4)]).items()
                if k != "attention_mask"}  # fmt: skip
    defense = ObliviateDefense(model, ObliviateConfig(lambda_amp=0.0, lambda_attn=1.0, attn_query="rows"))
    with torch.no_grad(), defense.track(query_mask=torch.ones_like(unmasked["input_ids"])) as step:
        model(**unmasked)
    expected_unmasked = step.terms()["loss_attn"].item()

    def no_mask(features):
        return {k: v for k, v in PadCollator(0)(features).items() if k != "attention_mask"}

    args = _args(tmp_path / "b", max_steps=1, per_device_train_batch_size=4, lambda_amp=0.0, attn_query="rows")
    trainer = ObliviateTrainer(model=model, args=args, train_dataset=same_length, data_collator=no_mask)
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss_attn" in entry)
    assert logged["loss_attn"] == pytest.approx(expected_unmasked, rel=1e-4)


def test_plain_mode_logs_no_terms(tmp_path):
    model = tiny_peft_model("bert", "lora")
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=4, obliviate=False)
    trainer = ObliviateTrainer(model=model, args=args, train_dataset=_dataset(8), data_collator=PadCollator(0))
    trainer.train()
    assert trainer.obliviate_defense is None
    assert not any("loss_attn" in entry for entry in trainer.state.log_history)


def test_plain_training_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="ObliviateTrainingArguments"):
        ObliviateTrainer(
            model=tiny_peft_model("bert", "lora"),
            args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
        )


def test_non_peft_model_gets_clear_error(tmp_path):
    from tiny_models import tiny_model

    with pytest.raises(ValueError, match="get_peft_model"):
        ObliviateTrainer(model=tiny_model("bert"), args=_args(tmp_path, max_steps=1))


def test_model_card_carries_tag(tmp_path):
    model = tiny_peft_model("bert", "lora")
    args = _args(tmp_path, max_steps=1, per_device_train_batch_size=4)
    trainer = ObliviateTrainer(model=model, args=args, train_dataset=_dataset(4), data_collator=PadCollator(0))
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert "obliviate" in card and "backdoor-defense" in card


def test_works_with_tokenizer_collator(tmp_path):
    """The usual pipeline: a tokenizer, DataCollatorWithPadding, a text dataset."""
    from transformers import AutoTokenizer

    from hf_obliviate.bundled import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = ["a gorgeous film", "dull and tedious", "i loved every minute", "a waste of time"] * 2
    data = Dataset.from_dict({"text": texts, "label": [1, 0, 1, 0] * 2})
    data = data.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=16), batched=True, remove_columns=["text"]
    )
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    base = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=4)
    trainer = ObliviateTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))


def test_compressed_push_dry_run_from_defended_lora(tmp_path, caplog):
    """push_to_hub with delta_compression: the merged LoRA delta is written BitDelta-compressed, card included, with a
    warning that compression can undo the defense; delta_lora="factors" uploads the exact adapter instead."""
    import json
    import logging

    from hf_obliviate.hub import load_compressed

    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    model = tiny_peft_model("bert", "lora")
    model.get_base_model().save_pretrained(base_dir)
    dry = tmp_path / "dry"
    args = _args(
        tmp_path / "run", max_steps=2, per_device_train_batch_size=4, push_to_hub=True, hub_model_id="me/tiny",
        delta_compression="bitdelta", delta_base_model=str(base_dir), delta_dry_run_dir=str(dry),
        delta_scale_factor=0.8,
    )  # fmt: skip
    trainer = ObliviateTrainer(model=model, args=args, train_dataset=_dataset(8), data_collator=PadCollator(0))
    trainer.train()
    with caplog.at_level(logging.WARNING):
        trainer.push_to_hub()
    assert "compression can undo it" in caplog.text and "delta_lora='factors'" in caplog.text
    meta = json.loads((dry / "obliviate_delta.json").read_text())
    assert meta["method"] == "bitdelta" and meta["k"] == 1 and meta["extra"]["scale_factor"] == 0.8
    card = (dry / "README.md").read_text()
    assert "obliviate" in card and "lambda_attn" in card
    rebuilt = load_compressed(str(base_dir), str(dry))
    assert rebuilt is not None
    with pytest.raises(ValueError, match="delta_scale_factor"):
        _args(tmp_path / "bad", delta_scale_factor=-0.5)
    with pytest.raises(ValueError, match="delta_lora"):
        _args(tmp_path / "bad", delta_lora="dense")
    with pytest.raises(ValueError, match="delta_lora='factors' stores the adapter as is"):
        _args(tmp_path / "bad", delta_lora="factors", delta_distill_steps=5)

    # The exact adapter: no warning, and the rebuilt model is the fine-tune (fp16 factors).
    caplog.clear()
    args.delta_lora, args.delta_scale_factor, args.delta_dry_run_dir = "factors", 1.0, str(tmp_path / "factors")
    with caplog.at_level(logging.WARNING):
        trainer.push_to_hub()
    assert "compression can undo it" not in caplog.text
    assert json.loads((tmp_path / "factors" / "obliviate_delta.json").read_text())["extra"]["lora_mode"] == "factors"
    exact = load_compressed(str(base_dir), str(tmp_path / "factors")).eval()
    batch = PadCollator(0)([_dataset(4)[i] for i in range(4)])
    with torch.no_grad():
        device = next(trainer.model.parameters()).device  # the Trainer moved it (HF_OBLIVIATE_TEST_DEVICE)
        expected = trainer.model.eval()(**{k: v.to(device) for k, v in batch.items()}).logits.cpu()
        torch.testing.assert_close(exact(**batch).logits, expected, rtol=1e-2, atol=1e-3)
