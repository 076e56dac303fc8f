"""The loss terms and the selection of the tuner's own tensors."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from tiny_models import tiny_model, tiny_peft_model

from hf_obliviate.defense import ObliviateDefense
from hf_obliviate.losses import amplification_loss, attention_logit_loss
from hf_obliviate.tuners import UnsupportedTunerError, describe_tuner, prepare_prefix_tuning, tuner_parameters


def test_amplification_value_and_zero_gradient_at_zero():
    a = torch.full((2, 2), 1.0, requires_grad=True)
    b = torch.zeros(3, 4, requires_grad=True)
    loss = amplification_loss([a, b])
    assert loss.item() == pytest.approx(-2.0)
    loss.backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() == 0  # not NaN at θ = 0 (LoRA B at init)
    torch.testing.assert_close(a.grad, -a.detach() / 2.0)


def test_amplification_cap_stops_pushing_large_tensors():
    big = torch.full((4,), 10.0, requires_grad=True)
    small = torch.full((4,), 0.1, requires_grad=True)
    loss = amplification_loss([big, small], norm_cap=1.0)
    assert loss.item() == pytest.approx(-(1.0 + 0.2))
    loss.backward()
    assert big.grad.abs().sum() == 0 and small.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="norm_cap"):
        amplification_loss([big], norm_cap=0)
    with pytest.raises(ValueError, match="no trainable PEFT"):
        amplification_loss([])


def test_attention_loss_is_mean_over_layers():
    assert attention_logit_loss([torch.tensor(1.0), torch.tensor(3.0)]).item() == 2.0
    with pytest.raises(ValueError):
        attention_logit_loss([])


def test_attention_loss_layer_weights():
    """`attn_layer_weights`: a weighted mean of the layer norms, through the defense on a real (tiny) BERT too; one
    weight per captured layer or a clear error; bad weights are refused when the config is built."""
    from hf_obliviate import ObliviateConfig

    norms = [torch.tensor(1.0), torch.tensor(3.0)]
    assert attention_logit_loss(norms, [1.0, 1.0]).item() == 2.0
    assert attention_logit_loss(norms, [0.0, 2.0]).item() == 3.0
    with pytest.raises(ValueError, match="one weight per layer"):
        attention_logit_loss(norms, [1.0])
    for bad in ([], [0.0, 0.0], [1.0, -1.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match="attn_layer_weights"):
            ObliviateConfig(attn_layer_weights=bad)
    torch.manual_seed(0)
    model = tiny_peft_model("bert", "lora")
    ids = torch.randint(3, 100, (2, 7))
    values = {}
    with pytest.raises(ValueError, match="has 1 weights but the model has 2 attention layers"):
        ObliviateDefense(model, ObliviateConfig(lambda_amp=0.0, attn_layer_weights=[1.0]))  # before any training
    for weights in (None, [1.0, 0.0], [0.0, 1.0]):
        defense = ObliviateDefense(model, ObliviateConfig(lambda_amp=0.0, attn_layer_weights=weights))
        with defense.track() as step:
            model(input_ids=ids)
        values[None if weights is None else weights.index(1.0)] = step.terms()["loss_attn"]
        assert len(step.record.layers) == 2
    layer_norms = [layer.norm for layer in step.record.layers]
    torch.testing.assert_close(values[0], layer_norms[0])
    torch.testing.assert_close(values[1], layer_norms[1])
    torch.testing.assert_close(values[None], (values[0] + values[1]) / 2)
    assert not torch.allclose(values[0], values[1])


def _kinds(names):
    return sorted({n.split(".")[-3] if ".default." in n else n for n in names})


def test_lora_selects_factors_not_head():
    model = tiny_peft_model("bert", "lora")
    names = [n for n, _ in tuner_parameters(model)]
    assert len(names) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not any("classifier" in n for n in names)
    # The head is trainable (modules_to_save) but never amplified.
    assert any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)
    assert describe_tuner(model) == "LORA"


def test_dora_adds_magnitude_and_ia3_bottleneck_prefix():
    dora = [n for n, _ in tuner_parameters(tiny_peft_model("bert", "dora"))]
    assert sum("lora_magnitude_vector" in n for n in dora) == 4
    ia3 = [n for n, _ in tuner_parameters(tiny_peft_model("bert", "ia3"))]
    assert ia3 and all(".ia3_l." in n for n in ia3)
    bottleneck = tiny_peft_model("bert", "bottleneck")
    names = [n for n, _ in tuner_parameters(bottleneck)]
    assert len(names) == 2 * 2 * 4  # 2 layers x 2 adapters x (down, up) x (weight, bias)
    assert describe_tuner(bottleneck) == "BOTTLENECK"
    prefix = [n for n, _ in tuner_parameters(tiny_peft_model("bert", "prefix"))]
    assert prefix and all(".transform." in n for n in prefix)  # projection MLP, not the embedding


def test_prefix_without_projection_uses_embedding():
    model = get_peft_model(tiny_model("bert"), PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    names = [n for n, _ in tuner_parameters(model)]
    assert names == ["prompt_encoder.default.embedding.weight"]


def test_prompt_tuning_moves_summary_row():
    model = get_peft_model(tiny_model("bert"), PromptTuningConfig(num_virtual_tokens=5, task_type="SEQ_CLS"))
    defense = ObliviateDefense(model, lambda_amp=1e-3, lambda_attn=1e-3, attn_query="first")
    assert defense.capture.query_offset == 5


def test_unsupported_model_gets_clear_error():
    with pytest.raises(UnsupportedTunerError, match="get_peft_model"):
        tuner_parameters(tiny_model("bert"))
    model = tiny_model("bert")
    model.requires_grad_(False)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["query"]))
    lora.requires_grad_(False)
    with pytest.raises(UnsupportedTunerError, match="lambda_amp=0"):
        tuner_parameters(lora)


def _with_cache_argument(module: torch.nn.Module) -> None:
    """Give ``module`` the forward signature of transformers 5.24 (``cache`` in place of ``past_key_values``), as its
    class does there: a subclass, so that a deep copy of the model keeps it."""
    cls = type(module)

    def forward(self, input_ids=None, attention_mask=None, cache=None, **kwargs):
        return cls.forward(self, input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, **kwargs)

    module.__class__ = type(cls.__name__, (cls,), {"forward": forward})


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_prefix_tuning_reaches_a_model_whose_forward_takes_a_cache_argument():
    """transformers 5.24 renamed the forward argument `past_key_values` to `cache`, and peft 0.21.2 still looks for
    the old name: `prepare_prefix_tuning` gives that module a forward that takes the old name as well (its signature
    the old one's plus `past_key_values`), so the prefix reaches the attention layers exactly as before; a deep copy of
    the model runs on its own weights. Below 5.24 the rename is simulated; from 5.24 on it is the installed one."""
    import copy
    import inspect

    model = tiny_peft_model("bert", "prefix", prepare=False).eval()
    bert = model.base_model.bert
    batch = {"input_ids": torch.tensor([[2, 5, 6, 7, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    before = None
    if "past_key_values" in inspect.signature(bert.forward).parameters:  # transformers < 5.24
        before = _logits(model, batch)
        prepare_prefix_tuning(model)  # nothing to change
        assert "forward" not in vars(bert)
        _with_cache_argument(bert)  # peft tries the classifier first, which takes neither, then this
    with pytest.raises(ValueError, match="past key values"):
        _logits(model, batch)
    prepare_prefix_tuning(model)
    prepare_prefix_tuning(model)  # again: nothing more to do
    taken = inspect.signature(bert.forward).parameters
    assert {"input_ids", "attention_mask", "cache", "past_key_values"} <= set(taken)
    after = _logits(model, batch)
    if before is not None:
        assert torch.equal(after, before)
    with torch.no_grad():  # the prefix reaches the attention: another prefix, other logits
        model.prompt_encoder.default.embedding.weight.add_(1.0)
    moved = _logits(model, batch)
    assert not torch.equal(moved, after)
    ObliviateDefense(model, lambda_amp=1e-3, lambda_attn=1e-3)  # accepted
    twin = copy.deepcopy(model)
    with torch.no_grad():  # the backbone's own weights: a forward still bound to the original would not see this
        twin.base_model.bert.embeddings.word_embeddings.weight.mul_(3.0)
    assert not torch.equal(_logits(twin, batch), moved) and torch.equal(_logits(model, batch), moved)
    prepare_prefix_tuning(tiny_peft_model("bert", "lora"))  # other tuners never need the argument


def test_prefix_tuning_on_a_model_that_takes_no_cache_is_refused_before_training():
    model = tiny_peft_model("bert", "prefix", prepare=False)
    for module in (model.base_model, model.base_model.bert):
        original = module.forward
        module.forward = lambda input_ids=None, attention_mask=None, _f=original, **kw: _f(input_ids, attention_mask)
    with pytest.raises(UnsupportedTunerError, match=r"does not take \(nor a `cache`\). Choose another tuner") as error:
        prepare_prefix_tuning(model)
    assert "BertForSequenceClassification with transformers" in str(error.value)
    with pytest.raises(UnsupportedTunerError, match="past_key_values"):
        ObliviateDefense(model, lambda_amp=1e-3, lambda_attn=1e-3)


def test_top_level_exports_are_lazy_and_complete():
    import subprocess
    import sys

    import hf_obliviate

    assert hf_obliviate.__all__ == sorted(hf_obliviate.__all__)
    assert set(hf_obliviate.__all__) == set(hf_obliviate._EXPORTS) | {"__version__"}
    for name in hf_obliviate.__all__:
        assert getattr(hf_obliviate, name) is not None
    heavy = "('torch', 'transformers', 'peft', 'trl', 'gradio')"
    code = f"import sys, hf_obliviate; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
