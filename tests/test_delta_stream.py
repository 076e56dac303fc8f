"""Streaming compression of multi-shard checkpoints, the base fingerprint, and the bounded-memory property."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from hf_obliviate.delta import (
    CompressedDelta,
    compress_checkpoints,
    compress_model,
    fingerprint_checkpoint,
    fingerprint_state_dict,
)
from hf_obliviate.delta import checkpoint as checkpoint_module


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def finetune(model: LlamaForCausalLM, scale: float = 0.02) -> LlamaForCausalLM:
    ft = LlamaForCausalLM(model.config).eval()
    ft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * scale)
    return ft


def test_fingerprint_disk_equals_memory_with_tied_weights(tmp_path):
    for tie in (False, True):
        model = tiny_llama(tie)
        model.save_pretrained(tmp_path / f"m{tie}", max_shard_size="20KB")
        assert (tmp_path / f"m{tie}" / "model.safetensors.index.json").is_file()
        assert fingerprint_checkpoint(tmp_path / f"m{tie}") == fingerprint_state_dict(model.state_dict())
    other = tiny_llama()
    assert fingerprint_state_dict(other.state_dict()) != fingerprint_state_dict(model.state_dict())


def test_stream_matches_in_memory(tmp_path):
    base, ft = tiny_llama(), None
    ft = finetune(base)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    ft.save_pretrained(tmp_path / "ft", max_shard_size="30KB")
    out = compress_checkpoints(tmp_path / "base", tmp_path / "ft", tmp_path / "delta", max_shard_size=1500)
    assert len(list(out.glob("delta-*.safetensors"))) > 2
    streamed = CompressedDelta.load(out)
    in_memory = compress_model(base, ft)
    assert streamed.base_fingerprint == fingerprint_checkpoint(tmp_path / "base")
    assert streamed.modules == in_memory.modules
    assert "lm_head.weight" not in streamed.modules  # output embeddings stay dense, found by module type
    assert streamed.entries["lm_head.weight"].kind == "dense"
    assert streamed.model_class == "LlamaForCausalLM"
    a, b = streamed.to_dense(), in_memory.to_dense()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)
    meta = json.loads((out / "obliviate_delta.json").read_text())
    assert meta["format_version"] == 1 and meta["k"] == 1 and meta["distillation"] is None
    assert meta["base_model"] == str(tmp_path / "base") and meta["tool_version"]
    for shard in meta["shards"]:
        with safe_open(out / shard, framework="pt") as f:
            header = f.metadata()
        assert header["format"] == "pt" and header["obliviate_format_version"] == "1"


def test_stream_peak_tensors_bounded(tmp_path, monkeypatch):
    """Counts the elements materialised from the checkpoints that are alive at once: a few chunks, never a tensor."""
    from hf_obliviate.delta import stream as stream_module

    base = tiny_llama()
    ft = finetune(base)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    ft.save_pretrained(tmp_path / "ft", max_shard_size="20KB")
    state = base.state_dict()
    chunk = 64
    monkeypatch.setattr(stream_module, "CHUNK_ELEMS", chunk)
    live = {"now": 0, "peak": 0, "total": 0, "whole": 0}

    def track(tensor):  # torch tensors or numpy arrays (the default path reads with numpy)
        n = tensor.numel() if hasattr(tensor, "numel") else tensor.size
        live["now"] += n
        live["total"] += n
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(tensor, release, n)
        return tensor

    def release(n):
        live["now"] -= n

    original_get = checkpoint_module.CheckpointReader.get
    original_chunks = checkpoint_module.CheckpointReader.chunks

    def counting_get(self, name, framework="pt"):
        live["whole"] += 1
        return track(original_get(self, name, framework))

    def counting_chunks(self, name, chunk_elems=1 << 18, framework="pt"):
        for piece in original_chunks(self, name, chunk_elems, framework):
            yield track(piece)

    monkeypatch.setattr(checkpoint_module.CheckpointReader, "get", counting_get)
    monkeypatch.setattr(checkpoint_module.CheckpointReader, "chunks", counting_chunks)
    compress_checkpoints(tmp_path / "base", tmp_path / "ft", tmp_path / "delta", progress=False)
    largest = max(t.numel() for t in state.values())
    assert live["total"] == 2 * sum(t.numel() for t in state.values())  # every tensor of both read exactly once
    assert live["whole"] == 0  # plain BitDelta and dense deltas never materialise a whole tensor
    assert largest > 16 * chunk and live["peak"] <= 4 * chunk, live  # a base and a fine-tuned chunk (+ next pair)
    assert live["now"] == 0
    delta = CompressedDelta.load(tmp_path / "delta")
    reference = compress_model(base, ft)  # the in-memory path (chunks of the default size) agrees
    assert delta.modules == reference.modules
    for name in delta.modules:
        torch.testing.assert_close(delta.entries[name].decode(), reference.entries[name].decode())


@pytest.mark.slow
def test_bundled_minilm_stream_and_load(tmp_path):
    """Real checkpoint: stream-compress a perturbed copy of the bundled MiniLM-L6 and load it back verified."""
    from transformers import BertModel

    from hf_obliviate.bundled import minilm_path
    from hf_obliviate.hub import load_compressed

    base_dir = minilm_path()
    ft = BertModel.from_pretrained(base_dir).eval()
    with torch.no_grad():
        for module in ft.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn_like(module.weight) * 1e-3)
    ft.save_pretrained(tmp_path / "ft", max_shard_size="40MB")
    out = compress_checkpoints(base_dir, tmp_path / "ft", tmp_path / "delta", progress=False)
    delta = CompressedDelta.load(out)
    assert len(delta.modules) == 6 * 6 + 1  # q, k, v, attention output, intermediate, output per layer + pooler
    assert delta.size_report()["bits_per_linear_weight"] == pytest.approx(1.0, rel=0.02)
    rebuilt = load_compressed(str(base_dir), out)
    base = BertModel.from_pretrained(base_dir).eval()
    ids = torch.randint(1000, 5000, (2, 16))
    with torch.no_grad():
        got, want, orig = (m(input_ids=ids).last_hidden_state for m in (rebuilt, ft, base))
    assert (got - want).norm() < (orig - want).norm()


def test_task_model_from_bare_backbone(tmp_path):
    """A classifier fine-tuned from a bare encoder checkpoint stores its backbone under ``bert.``: the compressor
    matches the names, so the encoder's Linear weights are 1-bit entries (not full copies) and the delta loads back."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from hf_obliviate.hub import load_compressed

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(tmp_path / "base")
    ft = BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2).eval()
    with torch.no_grad():
        for module in ft.bert.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn_like(module.weight) * 0.01)
    ft.save_pretrained(tmp_path / "ft")
    out = compress_checkpoints(tmp_path / "base", tmp_path / "ft", tmp_path / "delta", progress=False)
    delta = CompressedDelta.load(out)
    kinds = {name: entry.kind for name, entry in delta.entries.items()}
    assert kinds["bert.encoder.layer.0.attention.self.query.weight"] == "bitdelta"
    assert not any(name.startswith("bert.embeddings") for name in kinds)  # unchanged: not stored at all
    assert {name for name, kind in kinds.items() if kind == "full"} == {"classifier.weight", "classifier.bias"}
    assert delta.base_fingerprint == fingerprint_checkpoint(tmp_path / "base")
    rebuilt = load_compressed(tmp_path / "base", out)
    assert type(rebuilt).__name__ == "BertForSequenceClassification"
    base = BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2).eval()
    base.classifier.load_state_dict(ft.classifier.state_dict())
    expected = CompressedDelta.load(out).apply(base)
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, expected(input_ids=ids).logits)


def _shard_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("delta-*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


def test_default_stream_runs_without_torch(tmp_path):
    """`hf-obliviate compress` with default settings on a verified architecture never imports torch (its import alone
    is ~220 MB of RSS), and writes the same bytes as the same pass with the Linear layers found by module type."""
    import subprocess
    import sys

    from hf_obliviate.delta.checkpoint import linear_weight_names_from_config

    base = tiny_llama()
    ft = finetune(base)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    ft.save_pretrained(tmp_path / "ft")
    code = (
        "import sys\n"
        "from hf_obliviate.cli import main\n"
        "main(['compress', '--base', sys.argv[1], '--finetuned', sys.argv[2], '--output_dir', sys.argv[3]])\n"
        "main(['compress', '--base', sys.argv[1], '--finetuned', sys.argv[2], '--output_dir', sys.argv[3] + '-half',\n"
        "      '--scale_factor', '0.5'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('no torch')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "base"), str(tmp_path / "ft"), str(tmp_path / "np")],
        capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0 and "no torch" in run.stdout, run.stderr[-2000:]
    half, whole = CompressedDelta.load(tmp_path / "np-half"), CompressedDelta.load(tmp_path / "np")
    assert half.extra == {"scale_factor": 0.5} and whole.extra == {}
    expected = whole.scaled(0.5).to_dense()
    assert all(torch.equal(v, expected[k]) for k, v in half.to_dense().items())
    by_type = linear_weight_names_from_config(tmp_path / "ft")
    compress_checkpoints(tmp_path / "base", tmp_path / "ft", tmp_path / "pt", linear_names=by_type, progress=False)
    # safetensors writes its header metadata from a hash map (key order varies between processes): compare parsed
    a, b = (_shard_tensors(tmp_path / run) for run in ("np", "pt"))
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    a, b = (json.loads((tmp_path / run / "obliviate_delta.json").read_text()) for run in ("np", "pt"))
    for meta in (a, b):
        meta.pop("metadata_sha256")
        meta.pop("shards")  # the shard checksums cover the header bytes
    assert a == b


@pytest.mark.parametrize("dense_dtype", ["float16", "bfloat16"])
def test_bf16_checkpoints_stream_like_memory(tmp_path, dense_dtype):
    """bfloat16 checkpoints are read as their raw uint16 bytes and widened exactly; dense deltas stored in bfloat16 go
    through torch. Either way the entries equal the in-memory path's."""
    base = tiny_llama().to(torch.bfloat16)
    ft = finetune(base.float(), scale=0.05).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    out = compress_checkpoints(tmp_path / "base", tmp_path / "ft", tmp_path / "delta", dense_dtype=dense_dtype,
                               progress=False)  # fmt: skip
    streamed = _shard_tensors(out)
    reference = compress_model(base, ft, dense_dtype=dense_dtype)
    reference.save(tmp_path / "memory")
    expected = _shard_tensors(tmp_path / "memory")
    assert streamed.keys() == expected.keys() and streamed
    for key in streamed:
        assert streamed[key].dtype == expected[key].dtype, key
        assert torch.equal(streamed[key], expected[key]), key
    assert streamed["lm_head.weight::value"].dtype == getattr(torch, dense_dtype)
    assert fingerprint_checkpoint(tmp_path / "base") == fingerprint_state_dict(base.state_dict())
