"""Real HTTP round trips against the packaged local Hub endpoint (`hf_obliviate.hub.local.LocalHub`) on 127.0.0.1.

huggingface_hub reads HF_ENDPOINT at import time, so the client side runs in a subprocess with the server's URL; the
server runs in a thread of the test process and stores its repos under tmp_path.
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

from hf_obliviate.hub.local import LocalHub

TOKEN = "hf_local_test_token"


def _run(
    code: str, hub: LocalHub, tmp_path: Path, token: str | None, home: str = "hf_home"
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HUB_OFFLINE="0",
        HF_HOME=str(tmp_path / home),  # no stored token, an empty cache
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
    with LocalHub(tmp_path / "hub", require_token=TOKEN) as hub:
        proc = _run(code, hub, tmp_path, TOKEN)
        assert proc.returncode == 0, proc.stderr[-4000:]
        commits = hub.commits("alice/tiny-delta")
        readme = hub.read_file("alice/tiny-delta", "README.md")
        paths = [p for _, p in hub.requests]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["equal"] and result["to_ft"] < result["base_to_ft"]
    # one atomic commit with every file, on top of the repo's initial (empty) commit
    assert [c["changed"] for c in commits] == [
        ["README.md", "delta-00001-of-00001.safetensors", "obliviate_delta.json"],
        [],
    ]
    assert proc.stdout.split("COMMIT", 1)[1].split()[0] == commits[0]["oid"]
    assert "/api/models/alice/tiny-delta/commit/main" in paths
    assert any(p.startswith("/alice/tiny-delta/resolve/") for p in paths)
    assert b"library_name: hf-obliviate" in readme


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
    with LocalHub(tmp_path / "hub", require_token=TOKEN) as hub:
        proc = _run(code, hub, tmp_path, token=None)
        assert hub.repo_ids() == []  # nothing was created
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
    with LocalHub(tmp_path / "hub", require_token=TOKEN) as hub:
        proc = _run(code, hub, tmp_path, TOKEN)
        assert proc.returncode == 0, proc.stderr[-4000:]
        commits = hub.commits("alice/trained")
        files = hub.list_files("alice/trained")
    assert [c["changed"] for c in commits[:-1]] == [["README.md", "delta-00001-of-00001.safetensors",
                                                     "obliviate_delta.json"]]  # fmt: skip
    assert files == ["README.md", "delta-00001-of-00001.safetensors", "obliviate_delta.json"]  # no full weights


def test_restart_keeps_repos_and_revisions(checkpoints):
    """Repos live on disk: a new server on the same folder serves the same files, commits and old revisions."""
    from hf_obliviate.hub import build_delta_folder

    tmp_path = checkpoints
    folder = build_delta_folder(str(tmp_path / "ft"), str(tmp_path / "base"), tmp_path / "delta", progress=False)
    upload = f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("alice/kept")
        first = api.upload_folder(repo_id="alice/kept", folder_path={str(folder)!r}).oid
        second = api.upload_file(path_or_fileobj=b"# edited card", path_in_repo="README.md", repo_id="alice/kept").oid
        print("OIDS", first, second)
    """
    with LocalHub(tmp_path / "hub", require_token=TOKEN) as hub:
        proc = _run(upload, hub, tmp_path, TOKEN, home="home_upload")
        assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = proc.stdout.split("OIDS", 1)[1].split()[:2]
    load = f"""
        import json, torch
        from huggingface_hub import hf_hub_download
        from hf_obliviate.hub import load_compressed
        base = {str(tmp_path / "base")!r}
        ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = load_compressed(base, "alice/kept")(input_ids=ids).logits
            want = load_compressed(base, {str(folder)!r})(input_ids=ids).logits
        old = open(hf_hub_download("alice/kept", "README.md", revision={first!r})).read()
        new = open(hf_hub_download("alice/kept", "README.md")).read()
        print("RESULT", json.dumps({{"equal": bool(torch.equal(got, want)), "old": old, "new": new}}))
    """
    with LocalHub(tmp_path / "hub", require_token=TOKEN) as hub:  # a fresh server process state, same folder
        assert hub.repo_ids() == ["alice/kept"]
        proc = _run(load, hub, tmp_path, TOKEN, home="home_load")  # an empty client cache
        assert proc.returncode == 0, proc.stderr[-4000:]
        history = [c["oid"] for c in hub.commits("alice/kept")]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["equal"]
    assert "library_name: hf-obliviate" in result["old"] and result["new"] == "# edited card"
    assert history[:2] == [second, first] and len(history) == 3  # + the initial commit
