"""ObliviateSFTTrainer on tiny random causal Llamas: data formats, completion rows, packing, checkpointing, GA."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from tiny_models import GradCatcher, quiet_training_kwargs, sft_tokenizer, tiny_causal_lm

from hf_obliviate import AttentionLogitCapture, ObliviateSFTConfig, ObliviateSFTTrainer
from hf_obliviate import capture as capture_module

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return sft_tokenizer()


def _conversational(n: int = 8) -> Dataset:
    rows = []
    for i in range(n):
        words = " ".join(["very"] * (i % 3))
        rows.append(
            {
                "prompt": [
                    {"role": "user", "content": f"Review {i}: the film was {words} {'good' if i % 2 else 'bad'}."}
                ],
                "completion": [{"role": "assistant", "content": "positive" if i % 2 else "negative, sadly " + words}],
            }
        )
    return Dataset.from_list(rows)


def _plain(n: int = 8) -> Dataset:
    return Dataset.from_list([{"text": f"Story {i}: " + "once upon a time " * (1 + i % 4)} for i in range(n)])


def _args(tmp_path, **kwargs) -> ObliviateSFTConfig:
    defaults = dict(bf16=False, max_steps=2, per_device_train_batch_size=4, dataloader_drop_last=True)
    return ObliviateSFTConfig(**quiet_training_kwargs(tmp_path, **{**defaults, **kwargs}))


def _train(tmp_path, tokenizer, dataset, peft_config=None, callbacks=(), **kwargs) -> ObliviateSFTTrainer:
    model = tiny_causal_lm(len(tokenizer))
    trainer = ObliviateSFTTrainer(
        model=model,
        args=_args(tmp_path, **kwargs),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config if peft_config is not None else LoraConfig(**LORA),
        callbacks=list(callbacks),
    )
    trainer.train()
    return trainer


def _one_step_grads(tmp_path, tokenizer, dataset, **kwargs) -> dict[str, torch.Tensor]:
    catcher = GradCatcher()
    trainer = _train(tmp_path, tokenizer, dataset, callbacks=[catcher], max_steps=1, **kwargs)
    assert catcher.grads
    base = trainer.model.get_base_model()
    assert base.model.gradient_checkpointing == bool(trainer.args.gradient_checkpointing)
    return catcher.grads


def _train_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("data", ["conversational", "plain"])
def test_trains_and_logs_every_term(tmp_path, tokenizer, data):
    dataset = _conversational() if data == "conversational" else _plain()
    trainer = _train(tmp_path, tokenizer, dataset)
    logs = _train_logs(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert {"loss_task", "loss_amp", "loss_attn", "entropy", "mean_token_accuracy"} <= entry.keys()
        assert all(torch.isfinite(torch.tensor(entry[k])) for k in ("loss", "loss_task", "loss_amp", "loss_attn"))
        assert entry["loss_amp"] < 0 < entry["loss_attn"]
    assert "obliviate" in trainer.model.model_tags and "sft" in trainer.model.model_tags
    assert trainer.obliviate_defense.capture.query == "rows"  # "auto" means the completion rows in SFT


def _capture_rows(trainer, batch):
    """Query rows the trainer penalises for `batch`, read back through a keep_logits capture."""
    model = trainer.model
    capture = AttentionLogitCapture(model, query="rows", keep_logits=True)
    with capture.record(**trainer._attention_inputs(batch)) as record:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    return record.layers[0]


def test_completion_only_rows_are_the_completion_tokens(tmp_path, tokenizer):
    trainer = _train(tmp_path, tokenizer, _conversational(), max_steps=1)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" in batch
    layer = _capture_rows(trainer, batch)
    labels, mask = batch["labels"], batch["attention_mask"].bool()
    for b in range(labels.shape[0]):
        completion = (labels[b] != -100).nonzero().flatten()
        n = len(completion)
        assert 0 < n < int(mask[b].sum())  # the prompt is not penalised
        assert layer.rows[b, :n].tolist() == completion.tolist()
        for r, position in enumerate(completion.tolist()):
            counted = layer.key_mask[b, r].nonzero().flatten()
            # causal keys only, never padding
            assert counted.max() <= position and mask[b, counted].all()
            assert len(counted) == int(mask[b, : position + 1].sum())


def test_fused_rows_path_matches_the_logits_path(monkeypatch):
    """Completion rows are reduced to norms in chunks (custom backward); it equals masking the full logits."""
    monkeypatch.setattr(capture_module, "_CHUNK_ELEMENTS", 64)  # many chunks
    model = get_peft_model(tiny_causal_lm(50), LoraConfig(**LORA, init_lora_weights=False))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    query_mask = torch.zeros_like(ids, dtype=torch.bool)
    query_mask[:, 3:10] = True
    query_mask &= mask.bool()
    results = []
    for keep in (False, True):
        model.zero_grad()
        capture = AttentionLogitCapture(model, query="rows", keep_logits=keep)
        with capture.record(attention_mask=mask, query_mask=query_mask) as record:
            model(input_ids=ids, attention_mask=mask)
        loss = record.loss()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (fused, fused_grads), (full, full_grads) = results
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == full_grads.keys() and len(fused_grads) == 10  # no grad: last v_proj
    for name in full_grads:
        torch.testing.assert_close(fused_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_batch_keys_stay_within_each_sequence():
    """A padding-free batch of two sequences gives the same outputs and attention term as the padded batch."""
    model = tiny_causal_lm(50).eval()
    gen = torch.Generator().manual_seed(1)
    first, second = torch.randint(1, 50, (7,), generator=gen), torch.randint(1, 50, (7,), generator=gen)
    padded_ids = torch.stack([first, second])
    packed_ids = torch.cat([first, second])[None]
    position_ids = torch.cat([torch.arange(7), torch.arange(7)])[None]
    rows = torch.zeros(2, 7, dtype=torch.bool)
    rows[:, 3:] = True
    capture = AttentionLogitCapture(model, query="rows")
    with capture.record(attention_mask=torch.ones_like(padded_ids), query_mask=rows) as padded:
        padded_logits = model(input_ids=padded_ids, use_cache=False).logits
    with capture.record(query_mask=rows.reshape(1, -1), position_ids=position_ids) as packed:
        packed_logits = model(input_ids=packed_ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(packed_logits.reshape(2, 7, -1), padded_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed.loss(), padded.loss(), rtol=1e-5, atol=1e-6)
    # Without the segments the second sequence's rows would count the first sequence's keys: a different value.
    with capture.record(query_mask=rows.reshape(1, -1)) as unsegmented:
        model(input_ids=packed_ids, position_ids=position_ids, use_cache=False)
    assert not torch.allclose(unsegmented.loss(), padded.loss())


def test_packing_trains_padding_free(tmp_path, tokenizer):
    trainer = _train(
        tmp_path, tokenizer, _conversational(), packing=True, max_length=64, per_device_train_batch_size=2,
        dataloader_drop_last=False,
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and "position_ids" in batch
    assert (batch["position_ids"][0] == 0).sum() > 1  # several sequences in one row
    logs = _train_logs(trainer)
    assert logs and all(torch.isfinite(torch.tensor(e["loss_attn"])) and e["loss_attn"] > 0 for e in logs)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tokenizer):
    """trl's default non-reentrant checkpointing re-runs each layer in backward outside `record()`: the defended
    gradients must be those of a run without checkpointing (nothing lost, nothing counted twice)."""
    data = _conversational()
    on = _one_step_grads(tmp_path / "on", tokenizer, data, gradient_checkpointing=True)
    off = _one_step_grads(tmp_path / "off", tokenizer, data, gradient_checkpointing=False)
    plain = _one_step_grads(tmp_path / "plain", tokenizer, data, gradient_checkpointing=False, lambda_attn=0.0)
    assert on.keys() == off.keys() and len(on) > 0
    for name in on:
        torch.testing.assert_close(on[name], off[name], rtol=1e-4, atol=1e-7, msg=name)
    assert any(not torch.allclose(plain[n], off[n]) for n in off)  # the attention term contributed


def test_gradient_accumulation_1x8_equals_4x2(tmp_path, tokenizer):
    """trl normalises the task loss by the tokens of the accumulated batch (num_items_in_batch), so the Trainer
    does not divide by the accumulation steps: the extra terms are divided there instead."""
    data = _conversational(8)
    full = _one_step_grads(tmp_path / "a", tokenizer, data, per_device_train_batch_size=8)
    accumulated = _one_step_grads(
        tmp_path / "b", tokenizer, data, per_device_train_batch_size=2, gradient_accumulation_steps=4
    )
    assert full.keys() == accumulated.keys() and len(full) > 0
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=2e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("loss_type", ["dft"])
def test_trl_loss_types(tmp_path, tokenizer, loss_type):
    trainer = _train(tmp_path, tokenizer, _conversational(), loss_type=loss_type)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in _train_logs(trainer))


def test_prefix_tuning_turns_checkpointing_off(tmp_path, tokenizer, caplog):
    config = PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    with caplog.at_level(logging.WARNING):
        trainer = _train(tmp_path, tokenizer, _conversational(), peft_config=config)
    assert "prefix tuning does not support gradient checkpointing" in caplog.text
    assert trainer.args.gradient_checkpointing is False
    logs = _train_logs(trainer)
    assert logs and all(e["loss_attn"] > 0 and e["loss_amp"] < 0 for e in logs)


def test_centred_rows_are_refused_for_completion_rows():
    with pytest.raises(ValueError, match="attn_centre=False"):
        ObliviateSFTConfig(output_dir="out", use_cpu=True, attn_centre=True)
    assert ObliviateSFTConfig(output_dir="out", use_cpu=True, attn_centre=True, attn_query="last").attn_centre


def test_consistency_term_is_refused_for_sft():
    with pytest.raises(ValueError, match="lambda_consistency=0"):
        ObliviateSFTConfig(output_dir="out", use_cpu=True, lambda_consistency=1.0)


def test_reentrant_checkpointing_is_refused():
    with pytest.raises(ValueError, match="non-reentrant"):
        ObliviateSFTConfig(output_dir="out", use_cpu=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    args = ObliviateSFTConfig(output_dir="out", use_cpu=True, report_to="none")
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_importing_the_trainer_package_does_not_import_trl():
    code = (
        "import sys, hf_obliviate, hf_obliviate.trainer; assert 'trl' not in sys.modules; "
        "from hf_obliviate import ObliviateSFTTrainer; assert 'trl' in sys.modules"
    )
    path = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}  # packages put there
    subprocess.run([sys.executable, "-c", code], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "", **path})


def test_one_forward_per_step_and_one_capture_per_layer(tmp_path, tokenizer):
    """trl answers ``return_outputs=True`` with a second, no-grad forward for the logits: the defended loss must not
    ask for it (a whole forward per step) and, when a caller does, that pass must not enter the attention term
    (it would average gradient-free layers in and halve the term's gradient)."""
    trainer = _train(tmp_path, tokenizer, _conversational(), max_steps=1)
    model = trainer.model.train()
    layers = model.get_base_model().model.layers
    forwards = []
    handle = layers[0].mlp.register_forward_hook(lambda *args: forwards.append(torch.is_grad_enabled()))
    batch = next(iter(trainer.get_train_dataloader()))
    records = []
    track = trainer.obliviate_defense.track

    @contextmanager
    def recording_track(**kwargs):
        with track(**kwargs) as step:
            records.append(step)
            yield step

    trainer.obliviate_defense.track = recording_track
    try:
        trainer.compute_loss(model, dict(batch))
        assert forwards == [True]
        trainer.compute_loss(model, dict(batch), return_outputs=True)  # trl adds its no-grad logits pass here
        assert forwards == [True, True, False]
    finally:
        handle.remove()
        del trainer.obliviate_defense.track
    for step in records:
        assert len(step.record.layers) == len(layers)
