"""The packaged local Hub endpoint (`hf_obliviate.hub.local.LocalHub`) at the HTTP level, and `hf-obliviate hub serve`.

The client flows (push / pull through huggingface_hub) are in tests/test_hub_http.py; these tests speak raw HTTP.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hf_obliviate.hub.local import LocalHub, LocalHubError

TOKEN = "hf_local_test_token"


def _request(url: str, method: str = "GET", body: bytes | dict | None = None, token: str | None = None, **headers):
    """``(status, headers, body)`` of one request; HTTP errors are returned, not raised."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _commit(hub: LocalHub, repo_id: str, files: dict[str, bytes], token: str | None = TOKEN, branch: str = "main"):
    lines = [{"key": "header", "value": {"summary": f"add {sorted(files)}", "description": ""}}]
    lines += [
        {"key": "file", "value": {"path": p, "content": base64.b64encode(d).decode(), "encoding": "base64"}}
        for p, d in files.items()
    ]
    body = "\n".join(json.dumps(line) for line in lines).encode()
    url = f"{hub.endpoint}/api/models/{repo_id}/commit/{branch}"
    return _request(url, "POST", body, token, **{"Content-Type": "application/x-ndjson"})


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tmp_path / "hub", require_token=TOKEN) as server:
        status, _, _ = _request(
            f"{server.endpoint}/api/repos/create", "POST", {"name": "r", "organization": "bob"}, TOKEN
        )
        assert status == 200
        yield server


def test_commit_resolve_and_headers(hub):
    status, _, body = _commit(hub, "bob/r", {"a.txt": b"hello", "sub/b.bin": bytes(range(256))})
    assert status == 200
    oid = json.loads(body)["commitOid"]
    assert len(oid) == 40 and json.loads(body)["commitUrl"].endswith(f"/bob/r/commit/{oid}")
    status, headers, data = _request(f"{hub.endpoint}/bob/r/resolve/main/sub/b.bin", "HEAD")
    assert status == 200 and data == b""
    assert headers["X-Repo-Commit"] == oid and headers["Content-Length"] == "256"
    # ETag is the git blob id, as on the Hub, so huggingface_hub's "unchanged file" check works
    assert headers["ETag"].strip('"') == "c86626638e0bc8cf47ca49bb1525b40e9737ee64"
    status, headers, data = _request(f"{hub.endpoint}/bob/r/resolve/{oid}/sub/b.bin", Range="bytes=10-19")
    assert status == 206 and data == bytes(range(10, 20)) and headers["Content-Range"] == "bytes 10-19/256"
    status, headers, _ = _request(f"{hub.endpoint}/bob/r/resolve/main/nope.txt")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    status, headers, _ = _request(f"{hub.endpoint}/bob/r/resolve/dev/a.txt")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    status, headers, _ = _request(f"{hub.endpoint}/bob/none/resolve/main/a.txt")
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"
    status, _, body = _request(f"{hub.endpoint}/api/models/bob/r/tree/main?recursive=true")
    assert [(e["type"], e["path"]) for e in json.loads(body)] == [
        ("file", "a.txt"),
        ("directory", "sub"),
        ("file", "sub/b.bin"),
    ]
    status, _, body = _request(f"{hub.endpoint}/api/models/bob/r")
    info = json.loads(body)
    assert info["sha"] == oid and [s["rfilename"] for s in info["siblings"]] == ["a.txt", "sub/b.bin"]


def test_token_required_for_writes_and_whoami(hub):
    for token in (None, "hf_wrong"):
        status, headers, _ = _commit(hub, "bob/r", {"x.txt": b"x"}, token=token)
        assert status == 401 and "token" in headers["X-Error-Message"]
        status, _, _ = _request(f"{hub.endpoint}/api/repos/create", "POST", {"name": "s"}, token)
        assert status == 401
        status, _, _ = _request(f"{hub.endpoint}/api/whoami-v2", token=token)
        assert status == 401
    assert hub.list_files("bob/r") == [] and hub.repo_ids() == ["bob/r"]
    status, _, body = _request(f"{hub.endpoint}/api/whoami-v2", token=TOKEN)
    assert status == 200 and json.loads(body)["name"] == "local-user"
    # public repos are readable without a token; private ones are not
    assert _request(f"{hub.endpoint}/api/models/bob/r")[0] == 200
    _request(f"{hub.endpoint}/api/repos/create", "POST", {"name": "p", "organization": "bob", "private": True}, TOKEN)
    assert _request(f"{hub.endpoint}/api/models/bob/p")[0] == 401
    assert _request(f"{hub.endpoint}/api/models/bob/p", token=TOKEN)[0] == 200


def test_refuses_unsafe_names_and_paths(hub):
    status, _, _ = _request(f"{hub.endpoint}/api/repos/create", "POST", {"name": "..", "organization": "bob"}, TOKEN)
    assert status == 400
    for bad in ("../escape.txt", "/abs.txt", "a/../../b", "a\\b"):
        status, _, body = _commit(hub, "bob/r", {bad: b"x"})
        assert status == 400 and b"Invalid path" in body, bad
    assert hub.list_files("bob/r") == []
    assert not (hub.root.parent / "escape.txt").exists()
    status, _, body = _request(f"{hub.endpoint}/api/models/bob/r/preupload/main", "POST", {"files": []}, TOKEN)
    assert status == 200


def test_one_server_per_folder_and_foreign_folders(tmp_path, hub):
    with pytest.raises(LocalHubError, match="already served"):
        LocalHub(hub.root)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(LocalHubError, match="not a LocalHub folder"):
        LocalHub(tmp_path / "other")


def test_cli_hub_serve_answers_whoami(tmp_path):
    """`hf-obliviate hub serve` starts, prints its endpoint, answers whoami (also through huggingface_hub), and stops
    cleanly on SIGTERM."""
    root = tmp_path / "served"
    cmd = [sys.executable, "-m", "hf_obliviate.cli", "hub", "serve", "--root", str(root), "--port", "0"]
    proc = subprocess.Popen(
        cmd + ["--token", TOKEN, "--user", "carol"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        endpoint, deadline = None, time.monotonic() + 120
        while endpoint is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            if line.startswith("HF_ENDPOINT="):
                endpoint = line.strip().split("=", 1)[1]
        assert endpoint, proc.stderr.read()[-3000:] if proc.poll() is not None else "no endpoint printed"
        status, _, body = _request(f"{endpoint}/api/whoami-v2", token=TOKEN)
        assert status == 200 and json.loads(body)["name"] == "carol"
        assert _request(f"{endpoint}/api/whoami-v2")[0] == 401
        client = textwrap.dedent(
            f"""
            from huggingface_hub import HfApi
            print("NAME", HfApi(endpoint={endpoint!r}).whoami(token={TOKEN!r})["name"])
            """
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "home")}
        out = subprocess.run([sys.executable, "-c", client], env=env, capture_output=True, text=True, timeout=120)
        assert "NAME carol" in out.stdout, out.stderr[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0 and "Local Hub stopped" in rest
    assert (root / "local_hub.json").is_file()


def test_hub_command_usage_errors():
    from hf_obliviate.cli import main

    assert main(["hub", "sereve"]) == 1  # unknown subcommand
    assert main(["hub", "serve"]) == 1  # --root is required
    assert main(["hub", "--help"]) == 0


def test_store_path_layout(tmp_path):
    """Blobs are content-addressed files; each repo is one JSON document (human-inspectable, easy to back up)."""
    with LocalHub(tmp_path / "h") as hub:
        _request(f"{hub.endpoint}/api/repos/create", "POST", {"name": "r"})
        assert _commit(hub, "local-user/r", {"f.txt": b"abc"}, token=None)[0] == 200
    state = json.loads(Path(tmp_path / "h/repos/models/local-user/r/repo.json").read_text())
    head = state["commits"][state["refs"]["main"]]
    sha = head["files"]["f.txt"]["sha256"]
    assert (tmp_path / "h" / "blobs" / sha[:2] / sha).read_bytes() == b"abc"
