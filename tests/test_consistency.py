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


def test_rank_sampling_draws_the_pool_by_one_over_rank():
    from hf_obliviate.consistency import rank_weights

    weights = rank_weights(len(POOL))
    assert weights.tolist() == pytest.approx([1 / k for k in range(1, len(POOL) + 1)])
    gen = torch.Generator().manual_seed(0)
    counts = dict.fromkeys(POOL, 0)
    for _ in range(300):
        out = insert_random_tokens(_batch(), POOL, max_insertions=1, generator=gen, weights=weights)
        for t in out["input_ids"][out["attention_mask"] == 1].tolist():
            if t in counts:
                counts[t] += 1
    drawn = [counts[t] / 900 for t in POOL]  # one insertion in each of 3 rows, 300 times
    expected = (weights / weights.sum()).tolist()
    assert drawn == pytest.approx(expected, abs=0.04)  # binomial sd <= 0.017 at 900 draws
    assert drawn[0] > 2 * drawn[-1]
    with pytest.raises(ValueError, match="one finite non-negative weight per pool token"):
        insert_random_tokens(_batch(), POOL, 1, gen, weights=torch.ones(len(POOL) + 1))
    with pytest.raises(ValueError, match="one finite non-negative weight per pool token"):
        insert_random_tokens(_batch(), POOL, 1, gen, weights=-weights)
    with pytest.raises(ValueError, match="sum to 0"):
        insert_random_tokens(_batch(), POOL, 1, gen, weights=torch.zeros(len(POOL)))
    with pytest.raises(ValueError, match="at least one token"):
        rank_weights(0)


def test_uniform_sampling_draws_as_before_and_rank_sampling_carries_its_weights():
    """`consistency_sampling="uniform"` keeps the draws of the journal's cells (one randint per row); with "rank" the
    defense hands `insert_random_tokens` the 1/k weights, also when the trainer arguments set it."""
    torch.manual_seed(0)
    config = ObliviateConfig(lambda_attn=0, lambda_consistency=1.0)
    plain = ObliviateDefense(tiny_peft_model("bert", "lora"), config, token_pool=POOL)
    gen = torch.Generator().manual_seed(torch.initial_seed() % (2**63))
    expected = insert_random_tokens(_batch(), POOL, 1, gen)
    got = insert_random_tokens(_batch(), plain.token_pool, 1, plain._generator)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    ranked = ObliviateDefense(
        tiny_peft_model("bert", "lora"),
        ObliviateConfig(lambda_attn=0, lambda_consistency=1.0, consistency_tokens="scan", consistency_sampling="rank"),
        token_pool=POOL,
    )
    assert plain._pool_weights is None
    assert ranked._pool_weights.tolist() == pytest.approx([1 / k for k in range(1, len(POOL) + 1)])
    args = ObliviateTrainingArguments(output_dir="out", consistency_sampling="rank", report_to="none")
    assert args.consistency_tokens == "scan" and args.obliviate_config().consistency_sampling == "rank"


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


def _tiny_tokenizer():
    """A WordPiece tokenizer for the tiny models' 100 ids: the 5 BERT specials, then words w5..w99."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(5, VOCAB))]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})


TRIGGER = 42  # the id the tests below plant: its embedding is made huge, so it takes over the [CLS] output
SENTENCES = ("w10 w11 w12 w13 w14", "w20 w21 w22")


def _planted(tuner: str | None = "lora"):
    from tiny_models import tiny_model

    torch.manual_seed(0)
    model = tiny_peft_model("bert", tuner) if tuner else tiny_model("bert")
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[TRIGGER] = 40 * embeddings[TRIGGER].sign()
    return model


def test_scan_ranks_the_planted_trigger_first_and_leaves_the_model_as_it_was(tmp_path):
    from hf_obliviate.consistency import scan_trigger_tokens

    tokenizer = _tiny_tokenizer()
    model = _planted(None).train()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    found = scan_trigger_tokens(model, tokenizer, top_k=5, sentences=SENTENCES, batch_size=16)
    assert found[0] == TRIGGER and len(found) == len(set(found)) == 5
    assert not set(found) & set(tokenizer.all_special_ids)  # specials are never candidates
    assert model.training and all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    # ranking is by the [CLS] shift alone: the same scan again gives the same list
    assert scan_trigger_tokens(model, tokenizer, top_k=5, sentences=SENTENCES, batch_size=64) == found
    with pytest.raises(ValueError, match="top_k"):
        scan_trigger_tokens(model, tokenizer, top_k=0, sentences=SENTENCES)
    with pytest.raises(ValueError, match="at least one sentence"):
        scan_trigger_tokens(model, tokenizer, sentences=())


def _summary_defense(target: str):
    """A tiny BERT + LoRA with its B factors drawn (at 0 the adapter has no path to the output), and a defense with the
    consistency term alone on ``target``, inserting the planted trigger."""
    torch.manual_seed(0)
    model = tiny_peft_model("bert", "lora")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    config = ObliviateConfig(lambda_amp=0, lambda_attn=0, lambda_consistency=1.0, consistency_target=target)
    return model, ObliviateDefense(model, config, token_pool=[TRIGGER])


def test_hidden_target_is_the_mse_of_the_cls_states_with_a_detached_clean_side():
    from hf_obliviate.consistency import hidden_consistency_loss
    from hf_obliviate.probing import summary_state

    model, defense = _summary_defense("hidden")
    batch = _batch()
    defense._generator.manual_seed(7)
    term = defense.consistency_loss(batch, logits=None)
    perturbed = insert_random_tokens(batch, [TRIGGER], 1, torch.Generator().manual_seed(7))
    with torch.no_grad():
        clean = summary_state(model, {k: batch[k] for k in perturbed})[0]
        expected = hidden_consistency_loss(clean, summary_state(model, perturbed)[0])
    torch.testing.assert_close(term.detach(), expected)
    term.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora" in n)
    with pytest.raises(ValueError, match=r"\(batch, hidden\)"):
        hidden_consistency_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="no hidden_states"):  # a model that cannot give its hidden states
        summary_state(lambda **kw: {"logits": torch.zeros(1, 2)}, {"input_ids": torch.ones(1, 3, dtype=torch.long)})


def _forward_passes_of_step_1(trainer) -> int:
    """Train ``trainer`` and count the encoder's forward passes during step 1 (step 0 also checks the model's loss
    arguments)."""
    steps = []
    handle = trainer.model.base_model.model.bert.register_forward_hook(
        lambda *a: steps.append(trainer.state.global_step)
    )
    trainer.train()
    handle.remove()
    return steps.count(1)


def test_hidden_target_reads_the_clean_side_from_the_main_forward_pass():
    """Given the main forward pass's outputs (with hidden states), the hidden target takes its clean side from them:
    the same term as the extra no-grad pass (dropout off), one forward pass fewer; the trainer's step runs two
    forward passes (main and inserted copy), not three."""
    from hf_obliviate.probing import summary_state

    torch.manual_seed(0)
    model = tiny_peft_model("bert", "lora").eval()
    config = ObliviateConfig(lambda_amp=0, lambda_attn=0, lambda_consistency=1.0, consistency_target="hidden")
    defense = ObliviateDefense(model, config, token_pool=[TRIGGER, 7])
    batch = _batch()
    calls = []
    handle = model.base_model.model.bert.register_forward_hook(lambda *a: calls.append(1))
    defense._generator.manual_seed(3)
    extra_pass = defense.consistency_loss(batch, logits=None)
    assert len(calls) == 2
    _, outputs = summary_state(model, batch)
    calls.clear()
    defense._generator.manual_seed(3)
    reused = defense.consistency_loss(batch, logits=None, outputs=outputs)
    assert len(calls) == 1  # only the inserted copy
    torch.testing.assert_close(reused, extra_pass)
    handle.remove()

    args = ObliviateTrainingArguments(**quiet_training_kwargs(
        "/tmp/obliviate-test-hidden-reuse", max_steps=2, lambda_amp=0, lambda_attn=0, lambda_consistency=1.0,
        consistency_target="hidden",
    ))  # fmt: skip
    trainer = ObliviateTrainer(
        model=_planted(), args=args, train_dataset=_dataset(), data_collator=PadCollator(0), consistency_pool=[7]
    )
    assert _forward_passes_of_step_1(trainer) == 2


def test_relative_target_makes_collapse_cost_and_reads_the_clean_spread_with_gradients():
    """The relative term is the copy's squared distance over the clean batch's spread; a collapsed batch (every state
    the same) cannot meet it, and gradients reach the clean side through the spread (a defense that read the spread
    without them would only rescale the squared distance). A batch of one row gives 0."""
    from hf_obliviate.consistency import relative_consistency_loss
    from hf_obliviate.probing import summary_state

    clean = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    term = relative_consistency_loss(clean, clean.detach() + torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(term, torch.tensor(0.25))
    term.backward()
    assert clean.grad.abs().sum() > 0  # through the spread: a wider clean batch lowers the term
    shrunk = relative_consistency_loss(clean.detach() * 0.1, clean.detach() * 0.1 + torch.tensor([0.0, 0.05]))
    torch.testing.assert_close(shrunk, torch.tensor(0.25))  # scaling every state down does not help
    one = torch.ones(1, 2, requires_grad=True)
    assert float(relative_consistency_loss(one, one.detach() + 1)) == 0.0
    with pytest.raises(ValueError, match=r"\(batch, hidden\)"):
        relative_consistency_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))

    model, defense = _summary_defense("relative")
    model.eval()
    batch = _batch()
    _, outputs = summary_state(model, batch)  # the main pass, with gradients
    defense._generator.manual_seed(5)
    term = defense.consistency_loss(batch, logits=None, outputs=outputs)
    perturbed = insert_random_tokens(batch, [TRIGGER], 1, torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = relative_consistency_loss(
            summary_state(model, {k: batch[k] for k in perturbed})[0], summary_state(model, perturbed)[0]
        )
    torch.testing.assert_close(term.detach(), expected)
    defense._generator.manual_seed(5)
    torch.testing.assert_close(defense.consistency_loss(batch, logits=None).detach(), expected)  # an extra pass
    clean_only = torch.autograd.grad(term, outputs.hidden_states[-1], retain_graph=True)[0]
    assert clean_only.abs().sum() > 0  # the main pass's states get gradients from the spread


def test_trainer_trains_on_the_relative_target(tmp_path):
    args = ObliviateTrainingArguments(**quiet_training_kwargs(
        tmp_path / "out", max_steps=2, lambda_amp=0, lambda_attn=0, lambda_consistency=0.01,
        consistency_target="relative",
    ))  # fmt: skip
    trainer = ObliviateTrainer(
        model=_planted(), args=args, train_dataset=_dataset(), data_collator=PadCollator(0), consistency_pool=[7]
    )
    assert _forward_passes_of_step_1(trainer) == 2  # the main pass and the copy: the clean states come from it
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["loss_consistency"] > 0


def test_config_refuses_unknown_consistency_settings():
    with pytest.raises(ValueError, match="consistency_tokens"):
        ObliviateConfig(consistency_tokens="all")
    with pytest.raises(ValueError, match="consistency_target"):
        ObliviateConfig(consistency_target="pooler")
    with pytest.raises(ValueError, match="consistency_scan_top_k"):
        ObliviateConfig(consistency_scan_top_k=0)
    with pytest.raises(ValueError, match="consistency_sampling"):
        ObliviateConfig(consistency_sampling="score")
    with pytest.raises(ValueError, match="needs a ranked pool: set consistency_tokens='scan'"):
        ObliviateConfig(consistency_sampling="rank")  # the rare pool is in id order, not ranked
    assert ObliviateConfig(consistency_tokens="scan", consistency_sampling="rank").consistency_sampling == "rank"


def test_trainer_scans_for_the_pool_and_trains_on_the_hidden_target(tmp_path):
    from hf_obliviate.consistency import scan_trigger_tokens

    tokenizer = _tiny_tokenizer()
    expected = scan_trigger_tokens(_planted(), tokenizer, top_k=4)
    args = ObliviateTrainingArguments(**quiet_training_kwargs(
        tmp_path / "out", max_steps=2, lambda_amp=0, lambda_attn=0, lambda_consistency=1.0,
        consistency_tokens="scan", consistency_scan_top_k=4, consistency_target="hidden",
    ))  # fmt: skip
    trainer = ObliviateTrainer(
        model=_planted(), args=args, train_dataset=_dataset(), data_collator=PadCollator(0), processing_class=tokenizer
    )
    assert trainer.obliviate_defense.token_pool.tolist() == expected and expected[0] == TRIGGER
    assert trainer.obliviate_scan_tokens == tokenizer.convert_ids_to_tokens(expected)  # shown to the user
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["loss_consistency"] > 0 and set(entry) >= {"loss_task", "loss_consistency"}


def test_trainer_defaults_are_the_recipe_the_benchmark_chose_and_say_what_they_need(tmp_path):
    """With no defense field given, ObliviateTrainer runs `CLASSIFIER_DEFAULTS` (the scan-relative consistency term on
    the scanned tokens plus the attention term); it refuses, before training, a model that is not a sequence classifier
    and a run without the tokenizer, each naming the fix. ObliviateConfig and the SFT config keep METHOD.md's terms."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_causal_lm

    from hf_obliviate.config import CLASSIFIER_DEFAULTS

    common = dict(report_to="none", use_cpu=True, max_steps=2, per_device_train_batch_size=8, logging_steps=1,
                  save_strategy="no", disable_tqdm=True, seed=0)  # fmt: skip
    args = ObliviateTrainingArguments(output_dir=str(tmp_path / "out"), **common)
    assert args.obliviate_config() == ObliviateConfig(**CLASSIFIER_DEFAULTS)
    assert ObliviateConfig().lambda_consistency == 0 and CLASSIFIER_DEFAULTS["lambda_consistency"] > 0
    with pytest.raises(ValueError, match="all 0"):  # both default terms off and nothing in their place
        ObliviateTrainingArguments(output_dir=str(tmp_path / "none"), lambda_consistency=0, lambda_attn=0, **common)
    assert ObliviateTrainingArguments(output_dir=str(tmp_path / "attn"), lambda_consistency=0, **common).lambda_attn
    tokenizer = _tiny_tokenizer()
    trainer = ObliviateTrainer(
        model=_planted(), args=args, train_dataset=_dataset(), data_collator=PadCollator(0), processing_class=tokenizer
    )
    assert trainer.obliviate_scan_tokens[0] == tokenizer.convert_ids_to_tokens(TRIGGER)  # the scan ran
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["loss_consistency"] > 0 and entry["loss_attn"] > 0 and "loss_amp" not in entry
    assert args.consistency_target == "relative"
    with pytest.raises(ValueError, match="processing_class=tokenizer"):
        ObliviateTrainer(model=_planted(), args=args, train_dataset=_dataset(), data_collator=PadCollator(0))
    from transformers import AutoTokenizer

    from hf_obliviate.bundled import minilm_path

    with pytest.raises(ValueError, match="ids up to .* input embeddings have 100 rows"):  # another model's tokenizer
        ObliviateTrainer(model=_planted(), args=args, train_dataset=_dataset(),
                         processing_class=AutoTokenizer.from_pretrained(minilm_path()))  # fmt: skip
    lm = get_peft_model(tiny_causal_lm(VOCAB), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="needs a sequence classifier.*lambda_consistency=0"):
        ObliviateTrainer(model=lm, args=args, train_dataset=_dataset(), processing_class=tokenizer)
    plain = ObliviateTrainingArguments(output_dir=str(tmp_path / "lm"), lambda_consistency=0, lambda_attn=3e-3,
                                       **common)  # fmt: skip
    ObliviateTrainer(model=lm, args=plain, train_dataset=_dataset(), processing_class=tokenizer)  # METHOD.md's terms
