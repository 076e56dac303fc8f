"""Pushing: dry runs, the model card, the trainer mixin and the CLI functions (no network)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from hf_obliviate.delta import CompressedDelta
from hf_obliviate.hub import load_compressed, push_compressed_delta
from hf_obliviate.hub.cli import CompressConfig, PullConfig, PushConfig, compress_main, pull_main, push_main
from hf_obliviate.trainer.hub_mixin import CompressedPushMixin


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=100,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def base_and_ft(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    ft = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return tmp_path, ft


def test_dry_run_files_and_card(base_and_ft):
    tmp_path, ft = base_and_ft
    out = push_compressed_delta(
        ft, str(tmp_path / "base"), "me/delta", dry_run_dir=tmp_path / "dry", progress=False,
        defense={"lambda_amp": 3e-4, "lambda_attn": 3e-3}, evaluation={"asr": 0.12, "cacc": 0.8},
        calibration_ids=torch.randint(0, 100, (4, 8)),
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "delta-00001-of-00001.safetensors",
        "obliviate_delta.json",
    ]
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "hf-obliviate"
    assert {"obliviate", "bitdelta"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is not a Hub id
    text = card.text
    for needle in ("BitDelta", "dense fp16 delta", "ratio", "relative error", "logit MSE", "lambda_attn", "asr"):
        assert needle in text, needle
    assert "Warnings" not in text  # plain k=1, no distillation
    meta = json.loads((out / "obliviate_delta.json").read_text())
    assert meta["size"]["ratio_vs_dense_fp16"] > 2  # tiny model: the dense embeddings and head dominate


def test_card_base_model_for_hub_ids():
    from hf_obliviate.hub import build_model_card

    meta = {"method": "svd", "base_model": "HuggingFaceTB/SmolLM2-135M", "method_config": {"rank": 4}}
    card = build_model_card(meta, repo_id="me/x")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M" and "svd" in card.data.tags
    assert "comparison baseline" in card.text


@dataclass
class _Args(TrainingArguments):
    delta_compression: str | None = field(default=None)
    delta_k: int = field(default=1)
    delta_distill_steps: int = field(default=0)
    delta_base_model: str | None = field(default=None)
    delta_dry_run_dir: str | None = field(default=None)


class _Trainer(CompressedPushMixin, transformers.Trainer):
    pass


def _train_data(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, 100, (8,), generator=g)), "labels": ids} for _ in range(n)]


def _trainer(tmp_path, **kw) -> _Trainer:
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    args = _Args(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="steps", save_steps=2,
        hub_model_id="me/trained", **kw,
    )  # fmt: skip
    return _Trainer(model=model, args=args, train_dataset=_train_data())


def test_trainer_mixin_pushes_compressed_delta(base_and_ft):
    tmp_path, _ = base_and_ft
    dry = tmp_path / "pushed"
    trainer = _trainer(
        tmp_path, push_to_hub=True, hub_strategy="every_save", delta_compression="bitdelta", delta_dry_run_dir=str(dry)
    )
    trainer.train()  # the save at step 2 triggers _push_from_checkpoint
    meta = json.loads((dry / "obliviate_delta.json").read_text())
    assert meta["method"] == "bitdelta" and meta["base_model"] == str(tmp_path / "base")
    (dry / "obliviate_delta.json").unlink()
    trainer.push_to_hub()  # end of training
    assert (dry / "obliviate_delta.json").is_file() and (dry / "README.md").is_file()
    assert not list(dry.glob("model*.safetensors"))  # no full weights
    rebuilt = load_compressed(str(tmp_path / "base"), dry)
    delta = CompressedDelta.load(dry)
    trained = trainer.model.eval()
    name = delta.modules[0]
    d = trained.state_dict()[name] - LlamaForCausalLM.from_pretrained(tmp_path / "base").state_dict()[name]
    got = rebuilt.state_dict()[name] - LlamaForCausalLM.from_pretrained(tmp_path / "base").state_dict()[name]
    assert torch.allclose(got.abs().mean(), d.abs().mean(), rtol=1e-3)
    assert torch.equal(got >= 0, d >= 0) or (torch.sign(got) == torch.sign(d)).float().mean() > 0.99


def test_trainer_mixin_without_option_calls_super(base_and_ft, monkeypatch):
    tmp_path, _ = base_and_ft
    calls = []
    monkeypatch.setattr(transformers.Trainer, "push_to_hub", lambda self, *a, **k: calls.append("push") or "super")
    monkeypatch.setattr(transformers.Trainer, "_push_from_checkpoint", lambda self, f: calls.append("ckpt"))
    trainer = _trainer(tmp_path)
    assert trainer.push_to_hub() == "super"
    trainer._push_from_checkpoint(str(tmp_path))
    assert calls == ["push", "ckpt"]


def test_cli_functions(base_and_ft):
    tmp_path, ft = base_and_ft
    ft.save_pretrained(tmp_path / "ft")
    out = compress_main(CompressConfig(base=str(tmp_path / "base"), finetuned=str(tmp_path / "ft"),
                                       output_dir=str(tmp_path / "c"), non_linear="revert"))  # fmt: skip
    assert CompressedDelta.load(out).non_linear == "revert"
    dry = push_main(PushConfig(model=str(tmp_path / "ft"), base_model=str(tmp_path / "base"), repo_id="me/x",
                               dry_run_dir=str(tmp_path / "p")))  # fmt: skip
    assert (dry / "README.md").is_file()
    saved = pull_main(PullConfig(base_model=str(tmp_path / "base"), repo_id=str(dry), output_dir=str(tmp_path / "r")))
    assert (saved / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="--k must be >= 1"):
        CompressConfig(base="a", finetuned="b", output_dir="c", k=0)
    with pytest.raises(ValueError, match="--lora must be"):
        PushConfig(model="a", repo_id="b", lora="both")


def test_trainer_push_distills_scales_on_calibration_text(tmp_path):
    """delta_distill_steps > 0: the push trains the scales on (bundled IMDB) calibration text and the card warns."""
    from transformers import AutoTokenizer

    from hf_obliviate.bundled import minilm_path
    from hf_obliviate.trainer import ObliviateTrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    dry = tmp_path / "pushed"
    args = ObliviateTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", push_to_hub=True,
        hub_model_id="me/distilled", delta_compression="bitdelta", delta_dry_run_dir=str(dry),
        delta_distill_steps=6, delta_distill_lr=1e-3, delta_calibration_sequences=8, delta_calibration_seq_len=16,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(0, 2000, (8,), generator=g)), "labels": ids} for _ in range(12)]
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    trainer = _Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.push_to_hub()

    meta = json.loads((dry / "obliviate_delta.json").read_text())
    assert meta["distillation"]["steps"] == 6 and meta["distillation"]["lr"] == 1e-3
    assert meta["distillation"]["num_sequences"] == 8 and meta["distillation"]["seq_len"] == 16
    stats = meta["stats"]
    assert stats["logit_mse"] < stats["logit_mse_before_distillation"]  # the scales were trained
    # the stored scales are no longer the plain BitDelta ones (mean |Δ|)
    delta = CompressedDelta.load(dry)
    name = delta.modules[0]
    base_w = LlamaForCausalLM.from_pretrained(tmp_path / "base").state_dict()[name]
    plain_alpha = (trainer.model.state_dict()[name].cpu() - base_w).abs().mean()
    assert not torch.allclose(delta.entries[name].tensors["alpha"][0], plain_alpha, rtol=1e-4)
    card = ModelCard.load(dry / "README.md").text
    assert "Warnings" in card and "distilled" in card and "METHOD §7" in card
    assert load_compressed(str(tmp_path / "base"), dry) is not None  # the distilled delta loads and verifies

    # calibration sources: explicit texts win; then a file with a column; a tokenizer is required
    args.delta_calibration_texts = ["a first text", "a second one"]
    assert trainer.delta_calibration_texts() == ["a first text", "a second one"]
    args.delta_calibration_texts = None
    (tmp_path / "calib.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    args.delta_calibration_dataset, args.delta_calibration_column = str(tmp_path / "calib.jsonl"), "body"
    assert trainer.delta_calibration_texts() == ["one", "two"]
    trainer.processing_class = None
    with pytest.raises(ValueError, match="needs a tokenizer"):
        trainer._delta_distillation()


def test_shrunk_delta_streamed_in_memory_and_from_the_cli(base_and_ft):
    """``scale_factor`` shrinks the BitDelta delta the same way on every route (streaming checkpoints, an in-memory
    model, the CLI): the scales and dense deltas times the factor, the signs untouched; the card says so."""
    tmp_path, ft = base_and_ft
    ft.save_pretrained(tmp_path / "ft")
    plain = CompressedDelta.load(compress_main(CompressConfig(
        base=str(tmp_path / "base"), finetuned=str(tmp_path / "ft"), output_dir=str(tmp_path / "c1"))))  # fmt: skip
    streamed = CompressedDelta.load(compress_main(CompressConfig(
        base=str(tmp_path / "base"), finetuned=str(tmp_path / "ft"), output_dir=str(tmp_path / "c2"),
        scale_factor=0.5)))  # fmt: skip
    in_memory = push_compressed_delta(
        ft, str(tmp_path / "base"), "me/shrunk", dry_run_dir=tmp_path / "dry", scale_factor=0.5, progress=False,
        calibration_ids=torch.randint(0, 100, (2, 8)),
    )  # fmt: skip
    from_model = CompressedDelta.load(in_memory)
    expected = plain.scaled(0.5).to_dense()
    for delta in (streamed, from_model):
        assert delta.extra["scale_factor"] == 0.5
        got = delta.to_dense()
        assert got.keys() == expected.keys()
        for name in got:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-6, msg=name)
        name = plain.modules[0]
        assert torch.equal(delta.entries[name].tensors["signs"], plain.entries[name].tensors["signs"])
    card = (in_memory / "README.md").read_text()
    assert "Shrunk ×0.5" in card and "logit MSE" in card
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    rebuilt = load_compressed(str(tmp_path / "base"), str(in_memory))
    name = plain.modules[0]
    torch.testing.assert_close(rebuilt.state_dict()[name] - base.state_dict()[name], expected[name].to(torch.float32))
    with pytest.raises(ValueError, match="--scale_factor shrinks a BitDelta delta"):
        CompressConfig(base="a", finetuned="b", output_dir="c", method="svd", scale_factor=0.5)
    with pytest.raises(ValueError, match="--scale_factor must be a finite number"):
        CompressConfig(base="a", finetuned="b", output_dir="c", scale_factor=float("nan"))
    with pytest.raises(ValueError, match="method='bitdelta'"):
        push_compressed_delta(ft, str(tmp_path / "base"), "me/x", dry_run_dir=tmp_path / "d2", method="svd",
                              scale_factor=0.5, progress=False)  # fmt: skip


def test_cli_push_distills_on_a_calibration_file(tmp_path):
    """``hf-obliviate push --distill_steps N --calibration_file F``: the scales are trained on F's text, tokenised with
    the base's tokenizer when the fine-tune folder has none, and the card warns; --calibration_file alone measures the
    logit MSE without distilling."""
    from transformers import AutoTokenizer

    from hf_obliviate.bundled import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    ft = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ft.save_pretrained(tmp_path / "ft")  # no tokenizer here: the base's is used
    (tmp_path / "calib.txt").write_text("a quiet film about grief and hope\n" * 40)
    common = dict(
        model=str(tmp_path / "ft"), base_model=str(tmp_path / "base"), repo_id="me/x",
        calibration_file=str(tmp_path / "calib.txt"), calibration_sequences=4, calibration_seq_len=16,
    )  # fmt: skip
    dry = push_main(PushConfig(**common, distill_steps=5, distill_lr=1e-3, dry_run_dir=str(tmp_path / "d")))
    meta = json.loads((dry / "obliviate_delta.json").read_text())
    assert meta["distillation"]["steps"] == 5 and meta["distillation"]["num_sequences"] == 4
    assert meta["distillation"]["seq_len"] == 16
    assert meta["stats"]["logit_mse"] < meta["stats"]["logit_mse_before_distillation"]
    assert "distilled" in ModelCard.load(dry / "README.md").text
    measured = push_main(PushConfig(**common, dry_run_dir=str(tmp_path / "m")))
    meta = json.loads((measured / "obliviate_delta.json").read_text())
    assert meta["distillation"] is None and meta["stats"]["logit_mse"] > 0
    with pytest.raises(ValueError, match="--distill_steps trains BitDelta scales"):
        PushConfig(**common, distill_steps=5, lora="factors")
    with pytest.raises(ValueError, match="--distill_steps trains BitDelta scales"):
        PushConfig(**common, distill_steps=5, method="svd")
    with pytest.raises(ValueError, match="does not exist"):
        PushConfig(**{**common, "calibration_file": str(tmp_path / "missing.txt")}, distill_steps=5)
    with pytest.raises(ValueError, match="--lora factors stores the adapter as is"):
        PushConfig(**common, lora="factors")
    with pytest.raises(ValueError, match="--distill_steps must be >= 0"):
        PushConfig(**common, distill_steps=-1)
