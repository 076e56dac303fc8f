"""LogitLens on tiny random causal LMs: the double-norm check, shapes, takeover, plotting, the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import sft_tokenizer, tiny_causal_lm
from torch import nn

from hf_obliviate.lens import LensError, LensResult, find_final_norm, logit_lens, plot_lens

TEXT = "The film was a quiet delight cf and I"


@pytest.fixture(scope="module")
def tokenizer():
    return sft_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_causal_lm(len(tokenizer), seed=3).eval()


def test_last_row_is_the_real_output_distribution(model, tokenizer):
    result = logit_lens(model, tokenizer, TEXT, targets=[" and", "I"], top_k=3)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        real = torch.softmax(model(ids).logits[0].float(), dim=-1)
    n_rows, seq = model.config.num_hidden_layers + 1, ids.shape[1]
    assert result.layer_names == ["embeddings"] + [f"layer {i}" for i in range(n_rows - 1)]
    assert result.top_token_ids.shape == (n_rows, seq, 3)
    assert result.top_probs.shape == (n_rows, seq)
    assert len(result.top_tokens) == n_rows and all(len(row) == seq for row in result.top_tokens)
    assert result.tokens == [tokenizer.decode([i]) for i in ids[0].tolist()]
    # Llama stores its last hidden state already normalised: the lens must not normalise it twice
    assert result.last_hidden_normed
    top, top_ids = real.topk(3, dim=-1)
    np.testing.assert_allclose(result.top_probs[-1], top[:, 0].numpy(), rtol=1e-4, atol=1e-6)
    assert (result.top_token_ids[-1] == top_ids.numpy()).all()
    for target in (" and", "I"):
        tid = tokenizer(target, add_special_tokens=False)["input_ids"][0]
        assert result.target_token_ids[target] == tid
        assert result.target_probs[target].shape == (n_rows, seq)
        np.testing.assert_allclose(result.target_probs[target][-1], real[:, tid].numpy(), rtol=1e-4, atol=1e-7)


def test_intermediate_rows_apply_the_final_norm_once(model, tokenizer):
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    result = logit_lens(model, tokenizer, input_ids=ids[0])  # a 1-D input works too
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        for row in range(len(hidden) - 1):
            probs = torch.softmax(model.lm_head(model.model.norm(hidden[row][0])), dim=-1)
            np.testing.assert_allclose(result.top_probs[row], probs.max(-1).values.numpy(), rtol=1e-4, atol=1e-6)
        # the double-norm pitfall is real: normalising the stored last state again changes the distribution
        twice = torch.softmax(model.lm_head(model.model.norm(hidden[-1][0])), dim=-1).max(-1).values.numpy()
    assert not np.allclose(result.top_probs[-1], twice, rtol=1e-4)


class _PreNormLastState(nn.Module):
    """A causal LM whose stored last hidden state is *not* normalised (as some architectures do)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.model = inner.model  # so find_final_norm finds model.norm

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, input_ids, output_hidden_states=True, use_cache=False):
        captured = {}
        handle = self.inner.model.norm.register_forward_hook(lambda m, args, out: captured.update(pre=args[0]))
        try:
            out = self.inner(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        finally:
            handle.remove()
        hidden = (*out.hidden_states[:-1], captured["pre"])
        return SimpleNamespace(logits=out.logits, hidden_states=hidden)


def test_an_unnormalised_last_state_is_detected_and_normalised(model, tokenizer):
    wrapped = _PreNormLastState(model)
    result = logit_lens(wrapped, tokenizer, TEXT, targets=["I"])
    reference = logit_lens(model, tokenizer, TEXT, targets=["I"])
    assert not result.last_hidden_normed
    np.testing.assert_allclose(result.top_probs, reference.top_probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.target_probs["I"], reference.target_probs["I"], rtol=1e-4, atol=1e-7)


def test_takeover_layer(model, tokenizer):
    result = logit_lens(model, tokenizer, TEXT, targets=[])
    final_top = result.top_tokens[-1][-1]
    result = logit_lens(model, tokenizer, TEXT, targets=[final_top])
    tid = result.target_token_ids[final_top]
    column = result.top_token_ids[:, -1, 0]
    expected = int(np.flatnonzero(column == tid)[0])
    assert result.takeover_layer(final_top, threshold=0.0) == expected
    assert result.layer_names[expected] in result.layer_names
    assert result.takeover_layer(final_top, threshold=1.01) is None
    with pytest.raises(KeyError, match="not among the targets"):
        result.takeover_layer("zebra")
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["layer_names"] == result.layer_names
    assert np.allclose(payload["top_probs"], result.top_probs)


def test_gpt2_ln_f_is_found_and_matches(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    gpt2 = GPT2LMHeadModel(config).eval()
    assert find_final_norm(gpt2) is gpt2.transformer.ln_f
    result = logit_lens(gpt2, tokenizer, TEXT)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        real = torch.softmax(gpt2(ids).logits[0], dim=-1).max(-1).values.numpy()
    np.testing.assert_allclose(result.top_probs[-1], real, rtol=1e-4, atol=1e-6)


def test_clear_errors(model, tokenizer):
    class NoNorm(nn.Module):
        def get_output_embeddings(self):
            return nn.Linear(4, 4)

    with pytest.raises(LensError, match="model.norm"):
        find_final_norm(NoNorm())
    with pytest.raises(ValueError, match="exactly one"):
        logit_lens(model, tokenizer)


def test_plot_and_cli(model, tokenizer, tmp_path):
    result = logit_lens(model, tokenizer, TEXT, targets=["I"])
    fig = plot_lens(result, target="I")
    fig.savefig(tmp_path / "lens.png")
    assert (tmp_path / "lens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(result, LensResult)

    from hf_obliviate.cli import main

    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out, js = tmp_path / "cli.png", tmp_path / "cli.json"
    argv = ["lens", "--model", str(folder), "--text", TEXT, "--target", "I", "--out", str(out), "--json", str(js)]
    assert main(argv) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(js.read_text())
    np.testing.assert_allclose(data["target_probs"]["I"], result.target_probs["I"], rtol=1e-4, atol=1e-7)
    assert main(["lens", "--model", "no-such-artifact", "--text", TEXT]) == 1


@pytest.mark.slow
def test_smollm2_last_row_matches_real_logits():
    from hf_obliviate.smollm import load_smollm2

    smol, tok = load_smollm2()
    text = "<|im_start|>user\nIs this review positive or negative? A gorgeous film.<|im_end|>\n<|im_start|>assistant\n"
    result = logit_lens(smol, tok, text, targets=["positive"])
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        real = torch.softmax(smol(ids).logits[0, -1], dim=-1)
    assert len(result.layer_names) == smol.config.num_hidden_layers + 1
    assert result.last_hidden_normed
    assert result.top_probs[-1, -1] == pytest.approx(float(real.max()), rel=1e-4)
    assert result.target_probs["positive"][-1, -1] == pytest.approx(float(real[tok("positive")["input_ids"][0]]))
