"""The torch-free name rule for Linear weights agrees with the by-type selection on tiny saved checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import transformers  # noqa: E402

from hf_obliviate.delta.checkpoint import linear_weight_names  # noqa: E402
from hf_obliviate.delta.linear_names import VERIFIED_MODEL_TYPES, linear_weight_names_by_name  # noqa: E402

MODULE_PATH = Path(__file__).resolve().parents[1] / "hf_obliviate" / "delta" / "linear_names.py"

DECODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=64,
    pad_token_id=0,
)
ENCODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=64,
    pad_token_id=0,
)

# model_type -> (config class, config kwargs, class-name prefix, head suffixes)
DECODER_HEADS = ("Model", "ForCausalLM", "ForSequenceClassification")
ENCODER_HEADS = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")
SPECS = {
    "llama": ("LlamaConfig", DECODER, "Llama", DECODER_HEADS),
    "mistral": ("MistralConfig", DECODER, "Mistral", DECODER_HEADS),
    "qwen2": ("Qwen2Config", DECODER, "Qwen2", DECODER_HEADS),
    "qwen3": ("Qwen3Config", {**DECODER, "head_dim": 8}, "Qwen3", DECODER_HEADS),
    "gemma": ("GemmaConfig", {**DECODER, "head_dim": 8}, "Gemma", DECODER_HEADS),
    "gemma2": ("Gemma2Config", {**DECODER, "head_dim": 8}, "Gemma2", DECODER_HEADS),
    "phi3": ("Phi3Config", DECODER, "Phi3", DECODER_HEADS),
    "olmo": ("OlmoConfig", DECODER, "Olmo", DECODER_HEADS),
    "bert": ("BertConfig", ENCODER, "Bert", ENCODER_HEADS),
    "roberta": ("RobertaConfig", {**ENCODER, "pad_token_id": 1}, "Roberta", ENCODER_HEADS),
    "xlm-roberta": ("XLMRobertaConfig", {**ENCODER, "pad_token_id": 1}, "XLMRoberta", ENCODER_HEADS),
    "distilbert": (
        "DistilBertConfig",
        dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100, max_position_embeddings=64, pad_token_id=0),
        "DistilBert",
        ENCODER_HEADS,
    ),
    "electra": ("ElectraConfig", {**ENCODER, "embedding_size": 16}, "Electra", ENCODER_HEADS),
}
CASES = [
    pytest.param(model_type, prefix + head, tie, id=f"{model_type}-{head}-{'tied' if tie else 'untied'}")
    for model_type, (_, _, prefix, heads) in SPECS.items()
    for head in heads
    for tie in ((True, False) if head in ("ForCausalLM", "ForMaskedLM") else (None,))
]


def read_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (stdlib only)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {name: info["shape"] for name, info in header.items()}


def test_specs_cover_verified_types():
    assert set(SPECS) == VERIFIED_MODEL_TYPES
    assert "gpt2" not in VERIFIED_MODEL_TYPES


@pytest.mark.parametrize("model_type, class_name, tie", CASES)
def test_name_rule_matches_module_types(model_type, class_name, tie, tmp_path):
    config_cls, kwargs, _, _ = SPECS[model_type]
    kwargs = dict(kwargs)
    if tie is not None:
        kwargs["tie_word_embeddings"] = tie
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, class_name)(config)
    model.save_pretrained(tmp_path, safe_serialization=True)
    shapes = read_shapes(tmp_path / "model.safetensors")
    config_dict = json.loads((tmp_path / "config.json").read_text())
    assert config_dict["model_type"] == model_type
    expected = linear_weight_names(model) & set(shapes)
    assert expected  # the test would prove nothing on a model without Linear weights
    assert linear_weight_names_by_name(shapes, config_dict) == expected
    if tie is False:  # the untied output embeddings are stored, and must be left out
        assert any(len(s) == 2 and name not in expected and "embed" not in name for name, s in shapes.items())


def test_unverified_configs_give_none():
    shapes = {"h.0.attn.c_attn.weight": [32, 96], "wte.weight": [100, 32]}
    assert linear_weight_names_by_name(shapes, None) is None
    assert linear_weight_names_by_name(shapes, {"model_type": "gpt2"}) is None
    assert linear_weight_names_by_name(shapes, {"model_type": "no-such-model"}) is None
    assert linear_weight_names_by_name(shapes, {}) is None


def test_gpt2_conv1d_is_not_verified(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path, safe_serialization=True)
    shapes = read_shapes(tmp_path / "model.safetensors")
    assert linear_weight_names_by_name(shapes, json.loads((tmp_path / "config.json").read_text())) is None


def test_module_does_not_import_torch():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('linear_names', {str(MODULE_PATH)!r})\n"
        "m = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "assert m.linear_weight_names_by_name({'a.weight': [2, 2]}, {'model_type': 'llama'}) == {'a.weight'}\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'numpy'))\n"
        "assert not bad, bad\n"
    )
    assert importlib.util.find_spec("torch") is not None
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
