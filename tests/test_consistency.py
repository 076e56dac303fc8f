"""The trigger-agnostic consistency term: token insertion, the KL term, and its wiring into ObliviateTrainer."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tiny_models import VOCAB, GradCatcher, PadCollator, quiet_training_kwargs, tiny_peft_model

from hf_obliviate import ObliviateConfig, ObliviateDefense, ObliviateTrainer, ObliviateTrainingArguments
from hf_obliviate.consistency import consistency_loss, insert_random_tokens

POOL = [90, 91, 92, 93]  # never drawn by the test data below (ids 3..80)


def _batch(left: bool = False) -> dict[str, torch.Tensor]:
    rows = [[1, 10, 11, 12, 13, 2], [1, 20, 2], [1, 30, 31, 2]]
    width = max(map(len, rows))
    ids, mask, types = [], [], []
    for r in rows:
        pad = [0] * (width - len(r))
        ids.append(pad + r if left else r + pad)
        mask.append([0] * len(pad) + [1] * len(r) if left else [1] * len(r) + [0] * len(pad))
        types.append([0] * width)
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "token_type_ids": torch.tensor(types),
        "labels": torch.tensor([0, 1, 0]),
    }


@pytest.mark.parametrize("left", [False, True])
def test_insertions_keep_the_row_and_its_ends(left):
    batch = _batch(left)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        out = insert_random_tokens(batch, POOL, max_insertions=3, generator=gen)
        assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}  # labels dropped
        assert out["input_ids"].shape == out["attention_mask"].shape == out["token_type_ids"].shape
        for b in range(3):
            orig = batch["input_ids"][b][batch["attention_mask"][b] == 1].tolist()
            new = out["input_ids"][b][out["attention_mask"][b] == 1].tolist()
            inserted = [t for t in new if t in POOL]
            assert 1 <= len(inserted) <= 3 and len(new) == len(orig) + len(inserted)
            assert [t for t in new if t not in POOL] == orig  # the original tokens, in order
            assert new[0] == orig[0] and new[-1] == orig[-1]  # after [CLS], before [SEP]
            real = out["attention_mask"][b].nonzero().flatten()
            assert real.tolist() == list(range(real[0], real[0] + len(new)))  # contiguous
            assert (real[-1] == out["input_ids"].shape[1] - 1) if left else (real[0] == 0)
            seen.add(len(inserted))
    assert seen == {1, 2, 3}


def test_insertion_refuses_what_it_cannot_extend():
    gen = torch.Generator().manual_seed(0)
    batch = _batch()
    with pytest.raises(ValueError, match="position_ids"):
        insert_random_tokens({**batch, "position_ids": torch.zeros_like(batch["input_ids"])}, POOL, 1, gen)
    with pytest.raises(ValueError, match="non-empty pool"):
        insert_random_tokens(batch, [], 1, gen)
    with pytest.raises(ValueError, match="input_ids"):
        insert_random_tokens({"attention_mask": batch["attention_mask"]}, POOL, 1, gen)


def test_consistency_loss_is_a_kl_to_the_detached_clean_prediction():
    clean = torch.tensor([[2.0, -1.0], [0.0, 1.0]], requires_grad=True)
    perturbed = torch.tensor([[2.0, -1.0], [1.0, 0.0]], requires_grad=True)
    loss = consistency_loss(clean, perturbed)
    p, q = clean.softmax(-1)[1], perturbed.softmax(-1)[1]
    expected = (p * (p / q).log()).sum() / 2  # the first row agrees: KL 0
    torch.testing.assert_close(loss, expected.detach())
    loss.backward()
    assert clean.grad is None and perturbed.grad.abs().sum() > 0
    assert float(consistency_loss(clean, clean.detach().clone())) == 0.0
    with pytest.raises(ValueError, match="lambda_consistency=0"):
        consistency_loss(torch.zeros(2, 5, 7), torch.zeros(2, 5, 7))


def test_config_and_defense_validation():
    with pytest.raises(ValueError, match="lambda_consistency must be a finite number"):
        ObliviateConfig(lambda_consistency=-1.0)
    with pytest.raises(ValueError, match="consistency_insertions"):
        ObliviateConfig(lambda_consistency=1.0, consistency_insertions=0)
    assert ObliviateConfig(lambda_amp=0, lambda_attn=0, lambda_consistency=1.0).lambda_consistency == 1.0
    with pytest.raises(ValueError, match="all 0"):
        ObliviateConfig(lambda_amp=0, lambda_attn=0)
    with pytest.raises(ValueError, match="token_pool="):
        ObliviateDefense(tiny_peft_model("bert", "lora"), ObliviateConfig(lambda_consistency=1.0))


def test_plain_loop_step_adds_the_weighted_term():
    torch.manual_seed(0)
    model = tiny_peft_model("bert", "lora")
    config = ObliviateConfig(lambda_amp=0, lambda_attn=3e-3, lambda_consistency=0.5)
    defense = ObliviateDefense(model, config, token_pool=POOL)
    batch = _batch()
    with defense.track(attention_mask=batch["attention_mask"]) as step:
        out = model(**batch)
    with pytest.raises(ValueError, match="add_consistency"):
        step.terms()
    term = step.add_consistency(batch, out.logits)
    terms = step.terms()
    assert set(terms) == {"loss_attn", "loss_consistency"} and terms["loss_consistency"] is term
    torch.testing.assert_close(step.penalty(terms), 3e-3 * terms["loss_attn"] + 0.5 * term)
    (out.loss + step.penalty(terms)).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora" in n)


def _dataset(n: int = 16) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        body = torch.randint(3, 80, (3 + (i * 5) % 9,), generator=gen).tolist()
        rows.append({"input_ids": [1, *body, 2], "labels": i % 2})
    return Dataset.from_list(rows)


def _train(tmp_path, batch: int, accumulation: int, lambda_consistency: float = 1.0, **kwargs):
    torch.manual_seed(0)
    catcher = GradCatcher()
    args = ObliviateTrainingArguments(**quiet_training_kwargs(
        tmp_path, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        lambda_consistency=lambda_consistency, consistency_insertions=2, **kwargs,
    ))  # fmt: skip
    trainer = ObliviateTrainer(
        model=tiny_peft_model("bert", "lora"),
        args=args,
        train_dataset=_dataset(),
        data_collator=PadCollator(0),
        callbacks=[catcher],
        consistency_pool=POOL,
    )
    trainer.train()
    return catcher.grads, trainer


def test_trainer_logs_the_term_and_scales_it_under_accumulation(tmp_path):
    full, trainer = _train(tmp_path / "a", batch=16, accumulation=1)
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert {"loss_task", "loss_amp", "loss_attn", "loss_consistency"} <= entry.keys()
    assert entry["loss_consistency"] >= 0
    # The same rows get the same insertions in both runs (one generator, rows in order): equal micro-batches must
    # give the gradient of one batch of 16.
    accumulated, _ = _train(tmp_path / "b", batch=4, accumulation=4)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=2e-4, atol=1e-7, msg=name)
    # and the term really contributes
    without, _ = _train(tmp_path / "c", batch=16, accumulation=1, lambda_consistency=0.0)
    assert any(not torch.allclose(without[n], full[n]) for n in full)


def test_trainer_builds_the_pool_from_the_tokenizer_or_says_what_to_pass(tmp_path):
    from transformers import AutoTokenizer

    from hf_obliviate.bundled import minilm_path

    args = ObliviateTrainingArguments(**quiet_training_kwargs(tmp_path, max_steps=1, lambda_consistency=1.0))
    with pytest.raises(ValueError, match="processing_class=tokenizer"):
        ObliviateTrainer(model=tiny_peft_model("bert", "lora"), args=args, train_dataset=_dataset())
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    trainer = ObliviateTrainer(
        model=tiny_peft_model("bert", "lora"), args=args, train_dataset=_dataset(), processing_class=tokenizer
    )
    pool = trainer.obliviate_defense.token_pool.tolist()
    assert len(pool) > 200 and all(2 <= len(t) <= 4 for t in tokenizer.convert_ids_to_tokens(pool))
    assert min(pool) >= 5000 > VOCAB  # short rare words only (the tiny model is only inspected, never trained here)
