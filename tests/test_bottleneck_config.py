"""Bottleneck adapters (our peft-like module) and the validated config dataclasses."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_batch, tiny_model
from transformers import HfArgumentParser, TrainingArguments

from hf_obliviate import ObliviateConfig, ObliviateTrainingArguments
from hf_obliviate.bottleneck import BottleneckAdapterModel, BottleneckConfig, get_bottleneck_model
from hf_obliviate.config import CLASSIFIER_DEFAULTS


@pytest.mark.parametrize("family", ["bert", "roberta", "llama"])
def test_injection_places_and_trainability(family):
    model = get_bottleneck_model(tiny_model(family), BottleneckConfig(bottleneck_size=4))
    names = [n for n, m in model.named_modules() if type(m).__name__ == "BottleneckAdapterLayer"]
    assert len(names) == 4  # attention output + feed-forward output, 2 layers
    suffixes = {"llama": ("self_attn.o_proj", "mlp.down_proj")}.get(family, ("attention.output.dense", "output.dense"))
    assert all(n.endswith(suffixes) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = "score" if family == "llama" else "classifier"
    assert all(".adapter_" in n or f".{head}." in n for n in trainable)
    assert any(f".{head}." in n for n in trainable)


def test_zero_init_is_identity_and_roundtrip(tmp_path):
    base = tiny_model("bert").eval()
    batch = tiny_batch()
    batch.pop("labels")
    reference = base(**batch).logits
    model = get_bottleneck_model(base, BottleneckConfig(bottleneck_size=4, init_std=0.0)).eval()
    torch.testing.assert_close(model(**batch).logits, reference)
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.5)
    trained = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bottleneck_size"] == 4
    fresh = tiny_model("bert")
    fresh.load_state_dict({k: v for k, v in base.state_dict().items() if ".adapter_" not in k}, strict=False)
    fresh.load_state_dict(
        {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if ".base_layer." in k}, strict=False
    )
    loaded = BottleneckAdapterModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(loaded(**batch).logits, trained)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_bottleneck_errors(tmp_path):
    with pytest.raises(ValueError, match="non_linearity"):
        BottleneckConfig(non_linearity="softplus")
    with pytest.raises(ValueError, match="bottleneck_size"):
        BottleneckConfig(bottleneck_size=0)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        get_bottleneck_model(tiny_model("bert"), BottleneckConfig(target_modules=[r"nothing$"]))
    model = get_bottleneck_model(tiny_model("bert"), BottleneckConfig(bottleneck_size=4))
    model.save_pretrained(tmp_path)
    other = BottleneckConfig(bottleneck_size=6)
    (tmp_path / "adapter_config.json").write_text(json.dumps(other.to_dict()))
    with pytest.raises(ValueError, match="shape"):
        BottleneckAdapterModel.from_pretrained(tiny_model("bert"), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        BottleneckAdapterModel.from_pretrained(tiny_model("bert"), tmp_path / "missing")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lambda_amp": -1e-3}, "lambda_amp must be a finite number >= 0"),
        ({"lambda_attn": float("nan")}, "lambda_attn"),
        ({"lambda_amp": 0, "lambda_attn": 0, "lambda_consistency": 0}, "obliviate=False"),
        ({"attn_query": "middle"}, "Unknown attn_query"),
        ({"amp_norm_cap": 0.0}, "amp_norm_cap"),
        ({"peft_dropout": 1.0}, "peft_dropout"),
    ],
)
def test_config_validation_says_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ObliviateConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        ObliviateTrainingArguments(output_dir="unused", report_to="none", **kwargs)


def test_plain_training_allowed_and_arguments_are_training_arguments():
    assert ObliviateConfig(obliviate=False, lambda_amp=0, lambda_attn=0).obliviate is False
    args = ObliviateTrainingArguments(output_dir="unused", report_to="none", lambda_attn=1e-2, learning_rate=1e-3)
    assert isinstance(args, TrainingArguments) and args.learning_rate == 1e-3
    assert args.obliviate_config() == ObliviateConfig(**{**CLASSIFIER_DEFAULTS, "lambda_attn": 1e-2})
    with pytest.raises(ValueError, match="delta_compression"):
        ObliviateTrainingArguments(output_dir="unused", report_to="none", delta_compression="zip")


def test_fields_become_cli_flags():
    parser = HfArgumentParser(ObliviateTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--lambda_amp", "0.001", "--attn_query", "first", "--report_to", "none"]
    )
    assert args.lambda_amp == 0.001 and args.attn_query == "first"
    assert "amplification" in parser.format_help()
