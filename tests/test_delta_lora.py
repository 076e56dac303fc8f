"""LoRA deltas (merged and raw factors, with the size trade-off) and opt-in scale distillation."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_obliviate.delta import (
    CompressedDelta,
    DistillConfig,
    compress_model,
    distill_scales,
    logit_mse,
    lora_size_tradeoff,
    merge_lora,
)
from hf_obliviate.hub import load_compressed, push_compressed_delta


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=100,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def lora_setup(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # test set-up only: give B a non-zero value
                p.normal_(0, 0.1)
    return tmp_path, peft_model.eval()


def test_size_tradeoff_formula(lora_setup):
    _, peft_model = lora_setup
    report = lora_size_tradeoff(peft_model)
    assert len(report["modules"]) == 4  # q and v in two layers
    row = report["modules"][0]
    d_in, d_out, r = row["d_in"], row["d_out"], row["r"]
    assert (d_in, d_out, r) == (32, 32, 4)
    assert row["adapter_fp16_bytes"] == 2 * r * (d_in + d_out)
    assert row["break_even_rank"] == pytest.approx(d_in * d_out / (16 * (d_in + d_out)))
    assert row["bitdelta_smaller"] == (r > row["break_even_rank"])  # r=4 > 1 here: 1-bit B·A is smaller


def test_merged_lora_path(lora_setup):
    tmp_path, peft_model = lora_setup
    base_dir = str(tmp_path / "base")
    out = push_compressed_delta(peft_model, base_dir, "me/lora", dry_run_dir=tmp_path / "d", progress=False)
    meta = json.loads((out / "obliviate_delta.json").read_text())
    assert meta["extra"]["lora_mode"] == "merged" and meta["extra"]["lora_tradeoff"]["modules"]
    assert meta["model_class"] == "LlamaForCausalLM"
    # only the LoRA-targeted projections changed
    assert meta["modules"] == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qv")
    model = load_compressed(str(tmp_path / "base"), out)
    assert type(model) is LlamaForCausalLM
    merged = merge_lora(peft_model)
    expected = compress_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), merged).apply(
        LlamaForCausalLM.from_pretrained(tmp_path / "base")
    )
    for (n, a), (_, b) in zip(model.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(a, b), n
    card = (out / "README.md").read_text()
    assert "LoRA trade-off" in card and "library_name: hf-obliviate" in card


def test_raw_factor_path(lora_setup):
    tmp_path, peft_model = lora_setup
    out = push_compressed_delta(
        peft_model, str(tmp_path / "base"), "me/lora", lora="factors", dry_run_dir=tmp_path / "f", progress=False
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "obliviate_delta.json"]
    assert "library_name: peft" in (out / "README.md").read_text()
    model = load_compressed(str(tmp_path / "base"), out)
    assert isinstance(model, PeftModel)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5)
    # Raw factors are not compressed: calibration text (a logit MSE) or distillation would be silently unused.
    for extra in ({"calibration_ids": ids}, {"distill": DistillConfig(steps=2)}):
        with pytest.raises(ValueError, match="lora='factors' stores the adapter as is"):
            push_compressed_delta(
                peft_model, str(tmp_path / "base"), "me/lora", lora="factors", dry_run_dir=tmp_path / "g",
                progress=False, **extra,
            )  # fmt: skip
    assert not (tmp_path / "g").exists()


def test_scale_distillation_reduces_logit_mse_and_card_warns(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    ft = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    calib = torch.randint(0, 100, (16, 12))
    cd = compress_model(base, ft)
    cfg = DistillConfig(steps=15, batch_size=4, lr=5e-3, num_sequences=16, seq_len=12)
    healed = distill_scales(cd, base, ft, calib, cfg, progress=False)
    assert healed.stats["logit_mse"] < healed.stats["logit_mse_before_distillation"]
    assert healed.distillation["steps"] == 15 and cd.distillation is None  # the input is left untouched
    rebuilt = healed.apply(LlamaForCausalLM.from_pretrained(tmp_path / "base").eval())
    assert logit_mse(rebuilt, ft, calib) == pytest.approx(healed.stats["logit_mse"], rel=1e-4)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        DistillConfig(steps=-1)

    out = push_compressed_delta(
        ft, str(tmp_path / "base"), "me/d", k=2, calibration_ids=calib, distill=cfg, dry_run_dir=tmp_path / "o",
        progress=False,
    )  # fmt: skip
    meta = json.loads((out / "obliviate_delta.json").read_text())
    assert meta["k"] == 2 and meta["distillation"]["steps"] == 15 and "logit_mse" in meta["stats"]
    card = (out / "README.md").read_text()
    assert "k = 2 masks" in card and "**distilled**" in card and "logit MSE" in card
    assert CompressedDelta.load(out).distillation["lr"] == 5e-3


@pytest.fixture
def classifier_setup(tmp_path):
    """A 3-label LoRA classifier fine-tuned from a plain encoder checkpoint (as from a planted MiniLM): its config
    still says ``architectures=["BertModel"]`` and the base has no head."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from hf_obliviate.models import wrap_peft

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(cfg).save_pretrained(tmp_path / "base")
    labels = ["negative", "neutral", "positive"]
    clf = BertForSequenceClassification.from_pretrained(
        tmp_path / "base", id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    peft_model = wrap_peft(clf, "lora")
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:  # test set-up only: move the factors and the head off their init
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path, peft_model.eval()


@pytest.mark.parametrize("source", ["model", "adapter folder"])
@pytest.mark.parametrize("lora", ["factors", "merged"])
def test_classifier_from_encoder_checkpoint_rebuilds_with_its_head(classifier_setup, source, lora):
    """The delta of a classifier built on a headless encoder records the classifier's class and labels, so the pulled
    model is that classifier (it used to come back as a BertModel: the head was lost, or the delta did not apply)."""
    tmp_path, peft_model = classifier_setup
    model_or_dir = peft_model if source == "model" else str(tmp_path / "adapter")
    out = push_compressed_delta(
        model_or_dir, str(tmp_path / "base"), "me/clf", lora=lora, dry_run_dir=tmp_path / "out", progress=False
    )
    meta = json.loads((out / "obliviate_delta.json").read_text())
    assert meta["model_class"] == "BertForSequenceClassification"
    rebuilt = load_compressed(str(tmp_path / "base"), out)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        expected, got = peft_model(input_ids=ids).logits, rebuilt(input_ids=ids).logits
    assert got.shape == (2, 3)
    if lora == "factors":
        assert torch.allclose(got, expected, atol=1e-5)
    else:  # 1-bit B·A; the head is stored dense (fp16)
        assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9
    if source == "model":  # the label names live in the model's config (an adapter folder does not keep them)
        assert rebuilt.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
        assert meta["extra"]["labels"]["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}


def test_classifier_checkpoint_folder_keeps_its_labels(classifier_setup):
    """The streaming path (a saved full classifier) records the label names, so a base without them rebuilds the
    fine-tune's head size and names."""
    tmp_path, peft_model = classifier_setup
    merge_lora(peft_model).save_pretrained(tmp_path / "merged")
    out = push_compressed_delta(
        str(tmp_path / "merged"), str(tmp_path / "base"), "me/clf", dry_run_dir=tmp_path / "out", progress=False
    )
    rebuilt = load_compressed(str(tmp_path / "base"), out)
    assert type(rebuilt).__name__ == "BertForSequenceClassification"
    assert rebuilt.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert rebuilt.classifier.weight.shape == (3, 32)
