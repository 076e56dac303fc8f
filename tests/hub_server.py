"""A tiny Hub-compatible HTTP server for tests (stdlib only, 127.0.0.1, in a thread).

It implements just what huggingface_hub 2.4 calls for ``create_repo``, ``create_commit`` (``preupload`` answered
with ``"regular"`` for every file, then the NDJSON ``commit`` endpoint with base64 contents), ``repo_info``,
``list_repo_tree`` and file ``resolve`` (HEAD + GET), plus ``validate-yaml``. Write endpoints can require a token.

Usage::

    with FakeHub(require_token="hf_test") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test"}

or ``python tests/hub_server.py`` to run one in the foreground.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

__all__ = ["FakeHub"]


class _Repo:
    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        self.files: dict[str, bytes] = {}
        self.commits: list[dict] = []
        self.sha = hashlib.sha1(repo_id.encode()).hexdigest()


class FakeHub:
    """The server; ``requests`` logs ``(method, path)`` of every request, ``repos`` holds the stored files."""

    def __init__(self, require_token: str | None = None):
        self.require_token = require_token
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                hub._dispatch(self, "GET")

            def do_HEAD(self):
                hub._dispatch(self, "HEAD")

            def do_POST(self):
                hub._dispatch(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --------------------------------------------------------------------------------------------------- plumbing
    @staticmethod
    def _send(h, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _json(self, h, status: int, obj, head: bool = False) -> None:
        body = json.dumps(obj).encode()
        self._send(h, status, body, {"Content-Type": "application/json"}, head=head)

    def _authorized(self, h) -> bool:
        if self.require_token is None:
            return True
        return h.headers.get("authorization", "") == f"Bearer {self.require_token}"

    def _deny(self, h) -> None:
        self._json(h, 401, {"error": "Invalid username or password."})

    def _dispatch(self, h, method: str) -> None:
        path = unquote(urlparse(h.path).path)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self.lock:
            self.requests.append((method, path))
        try:
            self._route(h, method, path, body)
        except Exception as err:  # pragma: no cover - surfaces server bugs in the client error
            self._json(h, 500, {"error": f"{type(err).__name__}: {err}"})

    # ----------------------------------------------------------------------------------------------------- routes
    def _route(self, h, method: str, path: str, body: bytes) -> None:
        if method == "POST" and path == "/api/repos/create":
            if not self._authorized(h):
                return self._deny(h)
            payload = json.loads(body or b"{}")
            org = payload.get("organization")
            repo_id = f"{org}/{payload['name']}" if org else payload["name"]
            with self.lock:
                if repo_id in self.repos:
                    return self._json(h, 409, {"error": "You already created this model repo", "url": repo_id})
                self.repos[repo_id] = _Repo(repo_id)
            return self._json(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":
            return self._json(h, 200, {"errors": [], "warnings": []})

        m = re.fullmatch(r"/api/models/(.+?)/preupload/([^/]+)", path)
        if m and method == "POST":
            if not self._authorized(h):
                return self._deny(h)
            if m.group(1) not in self.repos:
                return self._json(h, 404, {"error": "Repository not found"})
            files = json.loads(body)["files"]
            return self._json(
                h, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        m = re.fullmatch(r"/api/models/(.+?)/commit/([^/]+)", path)
        if m and method == "POST":
            if not self._authorized(h):
                return self._deny(h)
            repo = self.repos.get(m.group(1))
            if repo is None:
                return self._json(h, 404, {"error": "Repository not found"})
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            added = {}
            for line in lines:
                if line["key"] == "file":
                    added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                elif line["key"] != "header":
                    return self._json(h, 400, {"error": f"FakeHub does not support {line['key']} operations"})
            with self.lock:
                repo.files.update(added)
                repo.sha = hashlib.sha1((repo.sha + json.dumps(sorted(added))).encode()).hexdigest()
                repo.commits.append({"oid": repo.sha, "files": sorted(added), "message": lines[0]["value"]["summary"]})
            return self._json(
                h, 200, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{repo.sha}", "commitOid": repo.sha}
            )
        m = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(/.*)?", path)
        if m and method == "GET":
            repo = self.repos.get(m.group(1))
            if repo is None:
                return self._json(h, 404, {"error": "Repository not found"})
            tree = [
                {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for p, b in sorted(repo.files.items())
            ]
            return self._json(h, 200, tree)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m and method == "GET":
            repo = self.repos.get(m.group(1))
            if repo is None:
                return self._json(h, 404, {"error": "Repository not found"})
            return self._json(
                h,
                200,
                {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": repo.sha,
                    "private": False,
                    "siblings": [{"rfilename": p} for p in sorted(repo.files)],
                },
            )
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            repo = self.repos.get(m.group(1))
            if repo is None or m.group(3) not in repo.files:
                headers = {"X-Error-Code": "EntryNotFound" if repo else "RepoNotFound", "Content-Type": "text/plain"}
                return self._send(h, 404, b"not found", headers, head=method == "HEAD")
            data = repo.files[m.group(3)]
            headers = {
                "X-Repo-Commit": repo.sha,
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Content-Type": "application/octet-stream",
                "Content-Length": str(len(data)),
            }
            return self._send(h, 200, data, headers, head=method == "HEAD")
        return self._json(h, 404, {"error": f"FakeHub: no route for {method} {path}"})


if __name__ == "__main__":  # pragma: no cover
    import time

    with FakeHub() as hub:
        print(f"FakeHub listening on {hub.url}")
        while True:
            time.sleep(3600)
