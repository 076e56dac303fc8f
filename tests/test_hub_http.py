"""Real HTTP round trip against a local Hub-compatible server on 127.0.0.1 (tests/hub_server.py).

huggingface_hub reads HF_ENDPOINT at import time, so the client side runs in a subprocess with the server's URL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub  # noqa: E402

TOKEN = "hf_local_test_token"


def _run(code: str, hub: FakeHub, tmp_path: Path, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_OFFLINE="0",
        HF_HOME=str(tmp_path / "hf_home"),  # no stored token, an empty cache
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=240
    )


@pytest.fixture
def checkpoints(tmp_path):
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=100,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    ft = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ft.save_pretrained(tmp_path / "ft", max_shard_size="30KB")
    return tmp_path


def test_push_and_pull_over_http(checkpoints):
    tmp_path = checkpoints
    code = f"""
        import torch, json
        from transformers import LlamaForCausalLM
        from hf_obliviate.hub import push_compressed_delta, load_compressed, build_delta_folder
        base, ft = {str(tmp_path / "base")!r}, {str(tmp_path / "ft")!r}
        info = push_compressed_delta(ft, base, "alice/tiny-delta", progress=False)
        print("COMMIT", info.oid)
        model = load_compressed(base, "alice/tiny-delta")
        local = build_delta_folder(ft, base, {str(tmp_path / "local")!r}, progress=False)
        expected = load_compressed(base, local)
        ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = model(input_ids=ids).logits, expected(input_ids=ids).logits
            c = LlamaForCausalLM.from_pretrained(ft)(input_ids=ids).logits
            d = LlamaForCausalLM.from_pretrained(base)(input_ids=ids).logits
        print("RESULT", json.dumps({{"equal": bool(torch.equal(a, b)), "to_ft": float((a - c).norm()),
                                     "base_to_ft": float((d - c).norm())}}))
    """
    with FakeHub(require_token=TOKEN) as hub:
        proc = _run(code, hub, tmp_path, TOKEN)
        assert proc.returncode == 0, proc.stderr[-4000:]
        repo = hub.repos["alice/tiny-delta"]
        paths = [p for _, p in hub.requests]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["equal"] and result["to_ft"] < result["base_to_ft"]
    assert len(repo.commits) == 1  # one atomic commit with every file
    assert repo.commits[0]["files"] == ["README.md", "delta-00001-of-00001.safetensors", "obliviate_delta.json"]
    assert "/api/models/alice/tiny-delta/commit/main" in paths
    assert any(p.startswith("/alice/tiny-delta/resolve/") for p in paths)
    assert b"library_name: hf-obliviate" in repo.files["README.md"]


def test_push_without_token_fails_clearly(checkpoints):
    tmp_path = checkpoints
    code = f"""
        from hf_obliviate.hub import HubAuthError, push_compressed_delta
        try:
            push_compressed_delta({str(tmp_path / "ft")!r}, {str(tmp_path / "base")!r}, "alice/x", progress=False)
        except HubAuthError as err:
            print("AUTH_ERROR", err, "END")
        try:
            push_compressed_delta({str(tmp_path / "ft")!r}, {str(tmp_path / "base")!r}, "alice/x", token="hf_wrong")
        except HubAuthError as err:
            print("BAD_TOKEN", err)
    """
    with FakeHub(require_token=TOKEN) as hub:
        proc = _run(code, hub, tmp_path, token=None)
        assert "alice/x" not in hub.repos
    assert proc.returncode == 0, proc.stderr[-4000:]
    message = proc.stdout.split("AUTH_ERROR", 1)[1].split("END")[0]
    assert "no Hugging Face token was found" in message
    assert "hf auth login" in message and "HF_TOKEN" in message
    assert "the token was refused" in proc.stdout.split("BAD_TOKEN", 1)[1]


def test_trainer_push_over_http(checkpoints):
    """The mixin's end-of-training push creates the repo and uploads only the delta + card."""
    tmp_path = checkpoints
    code = f"""
        import torch, transformers
        from dataclasses import dataclass, field
        from transformers import LlamaForCausalLM, TrainingArguments
        from hf_obliviate.trainer.hub_mixin import CompressedPushMixin

        @dataclass
        class Args(TrainingArguments):
            delta_compression: str | None = field(default=None)

        class T(CompressedPushMixin, transformers.Trainer):
            pass

        ids = torch.randint(0, 100, (4, 8))
        data = [{{"input_ids": i, "labels": i}} for i in ids]
        args = Args(output_dir={str(tmp_path / "run")!r}, max_steps=1, per_device_train_batch_size=4, report_to="none",
                    use_cpu=True, disable_tqdm=True, save_strategy="no", push_to_hub=True,
                    hub_model_id="alice/trained", delta_compression="bitdelta")
        trainer = T(model=LlamaForCausalLM.from_pretrained({str(tmp_path / "base")!r}), args=args, train_dataset=data)
        trainer.train()
        print("COMMIT", trainer.push_to_hub().oid)
    """
    with FakeHub(require_token=TOKEN) as hub:
        proc = _run(code, hub, tmp_path, TOKEN)
        assert proc.returncode == 0, proc.stderr[-4000:]
        repo = hub.repos["alice/trained"]
    assert [c["files"] for c in repo.commits] == [["README.md", "delta-00001-of-00001.safetensors",
                                                    "obliviate_delta.json"]]  # fmt: skip
