"""The logit capture reproduces the model's outputs and the true pre-softmax logits, on every family and kernel."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, tiny_batch, tiny_model, tiny_peft_model

from hf_obliviate.capture import AttentionCaptureError, AttentionLogitCapture, CaptureRecord


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_capture_keeps_outputs_and_restores_config(family, impl):
    model = tiny_model(family, impl).eval()
    batch = tiny_batch(family=family)
    batch.pop("labels")
    reference = model(**batch).logits
    capture = AttentionLogitCapture(model)
    assert any(config is model.config for config in capture.configs)  # the configs it switches, read-only copy
    capture.configs.clear()
    assert capture.configs
    with capture.record(attention_mask=batch["attention_mask"]) as record:
        assert model.config._attn_implementation == f"obliviate:{impl}"
        logits = model(**batch).logits
    assert model.config._attn_implementation == impl
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)
    assert len(record.layers) == model.config.num_hidden_layers
    assert torch.isfinite(record.loss())


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_logits_are_the_pre_softmax_scores(family):
    """softmax(captured sdpa-path logits) equals the eager path's attention probabilities of the summary row."""
    sdpa = tiny_model(family, "sdpa").eval()
    eager = tiny_model(family, "eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    batch = tiny_batch(family=family)
    batch.pop("labels")
    capture = AttentionLogitCapture(sdpa, keep_logits=True)
    with capture.record(attention_mask=batch["attention_mask"]) as record:
        sdpa(**batch)
    attentions = eager(**batch, output_attentions=True).attentions
    lengths = batch["attention_mask"].sum(1)
    for layer, probs in zip(record.layers, attentions):
        rows = layer.rows[:, 0]
        if family == "llama":
            torch.testing.assert_close(rows, lengths - 1)  # last non-pad token
        else:
            assert rows.eq(0).all()  # CLS
        ours = torch.softmax(layer.logits[:, :, 0, :], dim=-1)
        theirs = probs[torch.arange(len(rows)), :, rows, :]
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        # Raw logits are not probabilities: they are not normalised.
        assert not torch.allclose(layer.logits.exp().nan_to_num().sum(-1), torch.ones(()))


def test_norm_matches_hand_computation_and_masks_padding():
    model = tiny_model("bert", "eager").eval()
    batch = tiny_batch()
    batch.pop("labels")
    queries, keys = [], []
    layer0 = model.bert.encoder.layer[0].attention.self
    h1 = layer0.query.register_forward_hook(lambda m, a, o: queries.append(o))
    h2 = layer0.key.register_forward_hook(lambda m, a, o: keys.append(o))
    capture = AttentionLogitCapture(model, query="first")
    with capture.record(attention_mask=batch["attention_mask"]) as record:
        model(**batch)
    h1.remove()
    h2.remove()
    b, length = batch["input_ids"].shape
    heads, dim = 4, 8
    q = queries[0].view(b, length, heads, dim).transpose(1, 2)[:, :, 0, :]
    k = keys[0].view(b, length, heads, dim).transpose(1, 2)
    scores = torch.einsum("bhd,bhkd->bhk", q, k) / dim**0.5
    scores = scores * batch["attention_mask"][:, None, :]  # zero the padded keys
    expected = scores.norm(dim=-1).mean()
    torch.testing.assert_close(record.layers[0].norm, expected, rtol=1e-5, atol=1e-6)


def test_prefix_keys_count_and_padding_is_excluded():
    model = tiny_peft_model("bert", "prefix")
    batch = tiny_batch()
    capture = AttentionLogitCapture(model, keep_logits=True)
    with capture.record(attention_mask=batch["attention_mask"]) as record:
        model(**batch)
    layer = record.layers[0]
    n_prefix, length = 4, batch["input_ids"].shape[1]
    assert layer.logits.shape == (4, 4, 1, n_prefix + length)  # O(rows x keys), prefix keys first
    expected = torch.cat([torch.ones(4, n_prefix, dtype=torch.bool), batch["attention_mask"].bool()], dim=1)
    torch.testing.assert_close(layer.key_mask[:, 0, :], expected)
    assert torch.isinf(layer.logits[~expected[:, None, None, :].expand_as(layer.logits)]).all()


@pytest.mark.parametrize("with_mask", [True, False])
def test_prefix_keys_skipped_with_virtual_keys_skip(with_mask):
    """`virtual_keys="skip"` leaves prefix tuning's virtual keys out of the penalised norm (the named variant for
    prefix tuning), with or without an attention mask; the sequence's own keys count as before."""
    model = tiny_peft_model("bert", "prefix")
    batch = tiny_batch()
    if not with_mask:
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    norms = {}
    for mode in ("count", "skip"):
        capture = AttentionLogitCapture(model, keep_logits=True, virtual_keys=mode)
        with capture.record(attention_mask=batch["attention_mask"] if with_mask else None) as record:
            model(**batch)
        layer = record.layers[0]
        n_prefix = layer.logits.shape[-1] - batch["input_ids"].shape[1]
        assert n_prefix == 4
        real = batch["attention_mask"].bool()
        virtual = torch.full((4, n_prefix), mode == "count")
        torch.testing.assert_close(layer.key_mask[:, 0, :], torch.cat([virtual, real], dim=1))
        norms[mode] = record.loss()
        if mode == "skip":  # the norm over the real keys alone, from the kept logits
            logits = layer.logits[..., n_prefix:].masked_fill(~real[:, None, None, :], 0.0)
            torch.testing.assert_close(layer.norm, logits.norm(dim=-1).mean(), rtol=1e-5, atol=1e-6)
    assert norms["skip"] < norms["count"]
    with pytest.raises(ValueError, match="virtual_keys"):
        AttentionLogitCapture(model, virtual_keys="drop")


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_centred_rows_subtract_the_mean_over_counted_keys(family, with_mask):
    """``centre=True`` (the `centred` variant): the norm of each summary row minus its mean over the counted keys,
    padded (and, causally, future) keys still left out; gradients stay finite."""
    model = tiny_peft_model(family, "lora")
    batch = tiny_batch(family=family)
    if not with_mask:
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    norms = {}
    for centre in (False, True):
        capture = AttentionLogitCapture(model, keep_logits=True, centre=centre)
        with capture.record(attention_mask=batch["attention_mask"] if with_mask else None) as record:
            model(**batch)
        for layer in record.layers:
            counted = layer.key_mask[:, None, :, :].expand_as(layer.logits)
            values = layer.logits.masked_fill(~counted, 0.0)
            if centre:
                mean = values.sum(-1, keepdim=True) / counted.sum(-1, keepdim=True)
                values = (values - mean).masked_fill(~counted, 0.0)
            torch.testing.assert_close(layer.norm, values.norm(dim=-1).mean(), rtol=1e-4, atol=1e-5)
        norms[centre] = record.loss()
    assert norms[True] < norms[False]  # the mean carries part of the reference norm
    norms[True].backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_auto_centres_summary_rows_only():
    """``centre=None`` (``ObliviateConfig(attn_centre=None)``): a summary row is centred, many
    completion rows keep the reference norm."""
    model = tiny_model("llama").eval()
    batch = tiny_batch(family="llama")
    batch.pop("labels")
    query_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    query_mask[:, 1:4] = True
    losses = {}
    for centre in (None, True, False):
        for query in ("last", "rows"):
            if centre is True and query == "rows":
                continue
            capture = AttentionLogitCapture(model, query=query, centre=centre)
            with capture.record(attention_mask=batch["attention_mask"], query_mask=query_mask) as record:
                model(**batch)
            losses[centre, query] = record.loss()
    torch.testing.assert_close(losses[None, "last"], losses[True, "last"])
    torch.testing.assert_close(losses[None, "rows"], losses[False, "rows"])
    assert losses[True, "last"] < losses[False, "last"]
    with pytest.raises(ValueError, match="True, False or None"):
        AttentionLogitCapture(model, centre="yes")
    from hf_obliviate import ObliviateConfig

    assert ObliviateConfig().attn_centre is False  # the reference norm won the validation split over POR + NeuBA
    assert ObliviateConfig(attn_centre=None).attn_centre is None
    with pytest.raises(ValueError, match="True, False or None"):
        ObliviateConfig(attn_centre="auto")


def test_centred_rows_are_refused_for_many_query_rows():
    model = tiny_model("llama").eval()
    batch = tiny_batch(family="llama")
    query_mask = torch.ones_like(batch["attention_mask"], dtype=torch.bool)
    capture = AttentionLogitCapture(model, query="rows", centre=True)
    with pytest.raises(AttentionCaptureError, match="attn_centre=False"):
        with capture.record(attention_mask=batch["attention_mask"], query_mask=query_mask):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_gradients_flow_and_are_finite_with_padding():
    model = tiny_peft_model("llama", "lora", attn_implementation="eager")
    batch = tiny_batch(family="llama")
    capture = AttentionLogitCapture(model)
    with capture.record(attention_mask=batch["attention_mask"]) as record:
        model(**batch)
    record.loss().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    query_grads = [g for n, g in grads.items() if "q_proj" in n]
    assert len(query_grads) == 2 and all(g is not None and torch.isfinite(g).all() for g in query_grads)
    assert all(g.abs().sum() > 0 for g in query_grads)
    # The logits depend on queries and keys only: the last layer's value projection gets no gradient.
    assert [g is None for n, g in grads.items() if "v_proj" in n] == [False, True]


def test_rows_mode_selects_given_rows_causally():
    model = tiny_model("llama").eval()
    batch = tiny_batch(family="llama")
    query_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    query_mask[:, 1:3] = True
    capture = AttentionLogitCapture(model, query="rows", keep_logits=True)
    with capture.record(attention_mask=batch["attention_mask"], query_mask=query_mask) as record:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    layer = record.layers[0]
    assert layer.rows.tolist() == [[1, 2]] * 4
    # Row at position 1 sees keys 0 and 1 only.
    assert layer.key_mask[0, 0].nonzero().flatten().tolist() == [0, 1]


def test_errors_are_clear():
    with pytest.raises(ValueError, match="Unknown query mode"):
        AttentionLogitCapture(tiny_model("bert"), query="middle")
    with pytest.raises(AttentionCaptureError, match="no transformers PreTrainedModel"):
        AttentionLogitCapture(torch.nn.Linear(2, 2))
    with pytest.raises(AttentionCaptureError, match="AttentionInterface"):
        CaptureRecord().loss()
    model = tiny_model("bert")
    capture = AttentionLogitCapture(model)
    batch = tiny_batch()
    with pytest.raises(AttentionCaptureError, match="2D"):
        with capture.record(attention_mask=batch["attention_mask"][0]):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert model.config._attn_implementation == "sdpa"  # restored after the error
    with pytest.raises(AttentionCaptureError, match="nested"):
        with capture.record(), capture.record():
            pass


@pytest.mark.slow
def test_bundled_minilm_capture_matches_eager_probabilities():
    """On the real bundled MiniLM-L6: SDPA outputs unchanged under capture, logits equal the eager scores."""
    from hf_obliviate.data import load_movie_reviews
    from hf_obliviate.models import load_classifier

    sdpa, tokenizer = load_classifier(attn_implementation="sdpa")
    eager, _ = load_classifier(attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    sdpa.eval()
    eager.eval()
    texts = [e["text"] for e in load_movie_reviews("test", n=6)]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    reference = sdpa(**batch).logits
    capture = AttentionLogitCapture(sdpa, keep_logits=True)
    with capture.record(attention_mask=batch["attention_mask"]) as record:
        logits = sdpa(**batch).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)
    attentions = eager(**batch, output_attentions=True).attentions
    assert len(record.layers) == 6
    for layer, probs in zip(record.layers, attentions):
        torch.testing.assert_close(torch.softmax(layer.logits[:, :, 0], -1), probs[:, :, 0], rtol=1e-4, atol=1e-5)
