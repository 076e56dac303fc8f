"""Codec round trips: sign packing, BitDelta scales and masks, baselines, sizes, in-memory compression."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from hf_obliviate.delta import (
    BitDeltaCompressor,
    CompressedDelta,
    DareCompressor,
    DeltaCompressor,
    MagnitudeCompressor,
    ShapeMismatchError,
    SVDCompressor,
    available_methods,
    bitdelta_decode,
    bitdelta_encode,
    compress_delta,
    compress_model,
    get_compressor,
    pack_signs,
    unpack_signs,
)


def tiny_bert(**kw) -> BertModel:
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, **kw
    )
    return BertModel(cfg).eval()


def perturbed_copy(model: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    ft = type(model)(model.config).eval()
    ft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * scale)
    return ft


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (16, 33), (2, 3, 4)])
def test_pack_unpack_exact(shape):
    delta = torch.randn(shape)
    delta.view(-1)[0] = 0.0  # sign(0) = +1
    packed = pack_signs(delta)
    assert packed.dtype == torch.uint8 and packed.numel() == (delta.numel() + 7) // 8
    signs = unpack_signs(packed, shape)
    expected = torch.where(delta >= 0, 1.0, -1.0)
    assert torch.equal(signs, expected)
    assert signs.view(-1)[0] == 1.0


def test_bitdelta_k1_scale_is_mean_abs():
    delta = torch.randn(24, 40, dtype=torch.float64).to(torch.bfloat16)
    signs, alphas = bitdelta_encode(delta, k=1)
    assert alphas.dtype == torch.float32 and alphas.shape == (1,)
    assert torch.allclose(alphas[0], delta.float().abs().mean())
    dec = bitdelta_decode(signs, alphas, tuple(delta.shape))
    assert torch.equal(dec, alphas[0] * torch.where(delta.float() >= 0, 1.0, -1.0))


def test_bitdelta_mask_residual_decreases():
    delta = torch.randn(64, 48) * torch.rand(64, 1)
    errors = []
    for k in (1, 2, 3, 4):
        entry = BitDeltaCompressor(k=k).encode(delta)
        assert entry.tensors["signs"].shape == (k, (delta.numel() + 7) // 8)
        errors.append(float((entry.decode() - delta).norm() / delta.norm()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    # each mask compresses the residual of the previous ones: alpha_2 = mean |delta - alpha_1 sign(delta)|
    entry = BitDeltaCompressor(k=2).encode(delta)
    a1 = delta.abs().mean()
    assert torch.allclose(entry.tensors["alpha"][1], (delta - a1 * torch.where(delta >= 0, 1.0, -1.0)).abs().mean())


@pytest.mark.parametrize("k", [1, 3])
def test_bitdelta_decode_whole_and_chunked_agree(k):
    # bitdelta_decode (whole tensor) and DeltaEntry.add_to_ (chunk by chunk) share one decoder; both equal the sum
    # of the unpacked masks, for a size that is not a multiple of 8 and chunks that split the packed bytes
    delta = torch.randn(37, 29)
    entry = BitDeltaCompressor(k=k).encode(delta)
    signs, alphas = entry.tensors["signs"], entry.tensors["alpha"]
    expected = sum(unpack_signs(signs[j], delta.shape) * alphas[j] for j in range(k))
    assert torch.equal(bitdelta_decode(signs, alphas, tuple(delta.shape)), expected)
    target = torch.randn(37, 29)
    assert torch.equal(entry.add_to_(target.clone(), chunk_elems=100), target + expected)
    with pytest.raises(ShapeMismatchError, match="corrupt"):
        bitdelta_decode(signs[:, :-1], alphas, tuple(delta.shape))


def test_svd_baseline():
    low_rank = torch.randn(20, 3) @ torch.randn(3, 30)
    entry = SVDCompressor(rank=3, dtype="float32").encode(low_rank)
    assert torch.allclose(entry.decode(), low_rank, atol=1e-4)
    full = torch.randn(20, 30)
    errs = [float((SVDCompressor(rank=r).encode(full).decode() - full).norm()) for r in (1, 5, 20)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.01 * float(full.norm())


def test_dare_baseline_seeded_and_rescaled():
    delta = torch.randn(50, 60)
    a = DareCompressor(p=0.8, seed=3).encode(delta, param_name="x")
    b = DareCompressor(p=0.8, seed=3).encode(delta, param_name="x")
    c = DareCompressor(p=0.8, seed=4).encode(delta, param_name="x")
    assert torch.equal(a.decode(), b.decode()) and not torch.equal(a.decode(), c.decode())
    dec = a.decode()
    kept = dec != 0
    assert abs(kept.float().mean().item() - 0.2) < 0.03
    assert torch.allclose(dec[kept], (delta / 0.2)[kept].half().float())
    with pytest.raises(ValueError, match="p must be in"):
        DareCompressor(p=1.0)


def test_magnitude_baseline_keeps_largest():
    delta = torch.randn(10, 10)
    dec = MagnitudeCompressor(density=0.1, dtype="float32").encode(delta).decode()
    assert int((dec != 0).sum()) == 10
    top = delta.abs().reshape(-1).topk(10).indices
    assert torch.equal(dec.reshape(-1)[top], delta.reshape(-1)[top])


def test_registry():
    assert available_methods() == ["bitdelta", "dare", "magnitude", "svd"]
    assert isinstance(get_compressor("bitdelta", k=2), DeltaCompressor)
    with pytest.raises(ValueError, match="Unknown compression method"):
        get_compressor("nope")


def test_compress_model_linear_by_type_and_dense_rest():
    base = tiny_bert()
    ft = perturbed_copy(base)
    cd = compress_model(base, ft)
    linear = {f"{n}.weight" for n, m in ft.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(cd.modules) == linear
    kinds = {n: e.kind for n, e in cd.entries.items()}
    assert kinds["embeddings.word_embeddings.weight"] == "dense"
    assert kinds["embeddings.LayerNorm.weight"] == "dense"
    assert cd.entries["embeddings.LayerNorm.weight"].tensors["value"].dtype == torch.float16
    stats = cd.stats["rel_error"]
    assert stats["matrices"] == len(linear) and 0.5 < stats["mean"] < 0.7  # ~sqrt(1 - 2/pi) for Gaussian deltas
    # rebuilt = base + alpha * sign(delta) for Linear weights; near-exact elsewhere
    rebuilt = cd.apply(perturbed_copy(base, 0.0))
    name = "encoder.layer.0.attention.self.query.weight"
    d = ft.state_dict()[name] - base.state_dict()[name]
    got = rebuilt.state_dict()[name] - base.state_dict()[name]
    assert torch.allclose(got, d.abs().mean() * torch.where(d >= 0, 1.0, -1.0), atol=1e-6)
    ln = "embeddings.LayerNorm.bias"
    assert torch.allclose(rebuilt.state_dict()[ln], ft.state_dict()[ln], atol=1e-3)


def test_revert_and_unchanged_and_full_entries():
    base = tiny_bert()
    ft = tiny_bert()
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        ft.encoder.layer[0].output.dense.weight.add_(0.1)
        ft.embeddings.LayerNorm.weight.add_(0.1)
    ft_state = dict(ft.state_dict())
    ft_state["classifier.weight"] = torch.randn(2, 32)  # a head the base lacks
    linear = {"encoder.layer.0.output.dense.weight"}
    cd = compress_delta(base.state_dict(), ft_state, linear_names=linear, non_linear="revert")
    assert set(cd.entries) == {"encoder.layer.0.output.dense.weight", "classifier.weight"}
    assert cd.entries["classifier.weight"].kind == "full"
    assert cd.reverted == ["embeddings.LayerNorm.weight"]
    dense = compress_delta(base.state_dict(), ft_state, linear_names=linear)
    assert dense.entries["embeddings.LayerNorm.weight"].kind == "dense"
    with pytest.raises(ValueError, match="non_linear must be one of"):
        compress_delta(base.state_dict(), ft_state, non_linear="drop")


def test_size_within_two_percent_of_one_bit(tmp_path):
    torch.manual_seed(1)
    names = [f"layer{i}.weight" for i in range(4)]
    base = {n: torch.zeros(512, 512) for n in names}
    ft = {n: torch.randn(512, 512) for n in names}
    cd = compress_delta(base, ft, linear_names=set(names))
    report = cd.size_report()
    assert report["bits_per_linear_weight"] == pytest.approx(1.0, rel=0.02)
    assert report["ratio_vs_dense_fp16"] == pytest.approx(16.0, rel=0.02)
    files = cd.save(tmp_path)
    shard_bytes = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    n_weights = 4 * 512 * 512
    assert shard_bytes * 8 / n_weights == pytest.approx(1.0, rel=0.02)
    assert CompressedDelta.load(tmp_path).modules == sorted(names)


@pytest.mark.parametrize("method,kw", [("bitdelta", {"k": 2}), ("svd", {"rank": 4}), ("dare", {"p": 0.5}),
                                       ("magnitude", {"density": 0.3})])  # fmt: skip
def test_save_load_roundtrip_all_methods(tmp_path, method, kw):
    base = tiny_bert()
    ft = perturbed_copy(base)
    cd = compress_model(base, ft, method, **kw)
    cd.save(tmp_path, max_shard_size=2000)
    assert len(list(tmp_path.glob("delta-*.safetensors"))) > 1
    loaded = CompressedDelta.load(tmp_path)
    assert loaded.method == method and loaded.method_config == cd.method_config
    a, b = cd.to_dense(), loaded.to_dense()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rewrite_removes_stale_shards(tmp_path):
    base = {"a.weight": torch.zeros(64, 64), "b.weight": torch.zeros(64, 64)}
    ft = {k: torch.randn(64, 64) for k in base}
    compress_delta(base, ft, linear_names=set(base)).save(tmp_path, max_shard_size=100)
    assert len(list(tmp_path.glob("delta-*.safetensors"))) == 2
    compress_delta(base, ft, linear_names=set(base)).save(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("delta-*")) == ["delta-00001-of-00001.safetensors"]


def test_scaled_shrinks_bitdelta_and_dense_entries_and_keeps_full_ones(tmp_path):
    base = tiny_bert()
    ft = perturbed_copy(base)
    ft_state = dict(ft.state_dict())
    ft_state["classifier.weight"] = torch.randn(2, 32)  # a head the base lacks: a "full" entry
    linear = {"encoder.layer.0.output.dense.weight"}
    cd = compress_delta(base.state_dict(), ft_state, linear_names=linear)
    half = cd.scaled(0.5)
    dense, shrunk = cd.to_dense(), half.to_dense()
    assert dense.keys() == shrunk.keys()
    for name in dense:
        torch.testing.assert_close(shrunk[name], 0.5 * dense[name], rtol=1e-3, atol=1e-6)
    assert torch.equal(half.entries["classifier.weight"].decode(), cd.entries["classifier.weight"].decode())
    # the signs are shared, so the size does not change; the original is untouched; the factor is recorded
    assert half.size_report() == cd.size_report()
    assert torch.equal(
        cd.to_dense()["encoder.layer.0.output.dense.weight"], dense["encoder.layer.0.output.dense.weight"]
    )
    assert half.scaled(0.5).extra["scale_factor"] == 0.25 and "scale_factor" not in cd.extra
    half.save(tmp_path)
    loaded = CompressedDelta.load(tmp_path)
    assert loaded.extra["scale_factor"] == 0.5
    assert torch.equal(
        loaded.to_dense()["encoder.layer.0.output.dense.weight"], shrunk["encoder.layer.0.output.dense.weight"]
    )
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            cd.scaled(bad)
    svd = compress_model(base, ft, "svd", rank=2)
    with pytest.raises(ValueError, match="method='bitdelta' to shrink"):
        svd.scaled(0.5)
