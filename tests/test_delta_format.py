"""The verified loader refuses: another base, corrupt/truncated shards, unknown versions, shape mismatches."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertModel

from hf_obliviate.delta import (
    BaseMismatchError,
    CompressedDelta,
    CorruptDeltaError,
    DeltaFormatError,
    ShapeMismatchError,
    UnsupportedFormatVersionError,
    compress_model,
)
from hf_obliviate.delta.format import metadata_checksum
from hf_obliviate.hub import load_compressed, push_compressed_delta


def tiny_bert(hidden: int = 32) -> BertModel:
    cfg = BertConfig(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    return BertModel(cfg).eval()


@pytest.fixture
def delta_dir(tmp_path):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    ft = BertModel.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    push_compressed_delta(ft, str(tmp_path / "base"), "me/delta", dry_run_dir=tmp_path / "delta", progress=False)
    return tmp_path, ft


def test_errors_are_value_errors():
    for cls in (BaseMismatchError, CorruptDeltaError, ShapeMismatchError, UnsupportedFormatVersionError):
        assert issubclass(cls, DeltaFormatError) and issubclass(cls, ValueError)


def test_load_ok_and_never_unpickles(delta_dir, monkeypatch):
    tmp_path, ft = delta_dir

    def no_pickle(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_pickle)
    model = load_compressed(str(tmp_path / "base"), tmp_path / "delta")
    ids = torch.randint(0, 100, (2, 9))
    base = BertModel.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        got, want, orig = (m(input_ids=ids).last_hidden_state for m in (model, ft, base))
    assert (got - want).norm() < (orig - want).norm()  # closer to the fine-tune than the base is


def test_fingerprint_mismatch_refused(delta_dir):
    tmp_path, _ = delta_dir
    tiny_bert().save_pretrained(tmp_path / "other")
    expected = json.loads((tmp_path / "delta" / "obliviate_delta.json").read_text())["base_fingerprint"]
    with pytest.raises(BaseMismatchError) as err:
        load_compressed(str(tmp_path / "other"), tmp_path / "delta")
    msg = str(err.value)
    assert str(tmp_path / "base") in msg and str(tmp_path / "other") in msg and expected in msg
    assert msg.count("sha256:") == 2
    with pytest.raises(BaseMismatchError):  # an in-memory base is checked too
        load_compressed(tiny_bert(), tmp_path / "delta")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_or_truncated_shard_refused(delta_dir, damage):
    tmp_path, _ = delta_dir
    shard = next((tmp_path / "delta").glob("delta-*.safetensors"))
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        shard.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        shard.unlink()
    with pytest.raises(CorruptDeltaError):
        load_compressed(str(tmp_path / "base"), tmp_path / "delta")
    if damage == "truncate":  # even without checksums, safetensors refuses a truncated file
        with pytest.raises(CorruptDeltaError, match="truncated or corrupt"):
            CompressedDelta.load(tmp_path / "delta", verify_checksums=False)


def test_truncated_metadata_refused(delta_dir):
    tmp_path, _ = delta_dir
    meta = tmp_path / "delta" / "obliviate_delta.json"
    meta.write_text(meta.read_text()[:100])
    with pytest.raises(CorruptDeltaError, match="not valid JSON"):
        load_compressed(str(tmp_path / "base"), tmp_path / "delta")


def test_unknown_format_version_refused(delta_dir):
    tmp_path, _ = delta_dir
    path = tmp_path / "delta" / "obliviate_delta.json"
    meta = json.loads(path.read_text())
    meta["format_version"] = 99
    path.write_text(json.dumps(meta))
    with pytest.raises(UnsupportedFormatVersionError, match="Upgrade hf-obliviate"):
        load_compressed(str(tmp_path / "base"), tmp_path / "delta")


def test_shape_mismatch_refused(delta_dir):
    tmp_path, _ = delta_dir
    path = tmp_path / "delta" / "obliviate_delta.json"
    meta = json.loads(path.read_text())
    name = "encoder.layer.0.attention.self.query.weight"
    meta["entries"][name]["shape"] = [16, 32]
    path.write_text(json.dumps(meta))
    with pytest.raises(CorruptDeltaError, match="own checksum"):  # a hand edit breaks the metadata checksum
        CompressedDelta.load(tmp_path / "delta")
    meta["metadata_sha256"] = metadata_checksum(meta)  # a consistently written file with a wrong shape
    path.write_text(json.dumps(meta))
    with pytest.raises(ShapeMismatchError, match=name):
        CompressedDelta.load(tmp_path / "delta")
    # a delta applied to a model of another size
    small, big = tiny_bert(32), tiny_bert(48)
    cd = compress_model(small, BertModel(small.config))
    with pytest.raises(ShapeMismatchError, match="does not fit this model"):
        cd.apply(big)
