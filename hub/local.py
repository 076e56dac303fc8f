"""A local, Hub-compatible HTTP endpoint for development and tests (``hf-obliviate hub serve``).

**Not a Hub replacement.** [`LocalHub`] serves, on 127.0.0.1, the small part of the Hugging Face Hub HTTP API that
``huggingface_hub`` (tested with 2.4) calls when our push and pull flows run against ``HF_ENDPOINT``: create/delete a
repo, ``preupload`` + the NDJSON ``commit`` endpoint (``create_commit``, ``upload_file``, ``upload_folder``), repo
info, tree listing, ``paths-info``, commit history, refs and branches, ``resolve`` downloads (HEAD and GET, with
``ETag``, ``X-Repo-Commit`` and byte ranges), ``whoami-v2`` and ``validate-yaml``. It keeps every repo on disk
under ``root`` (content-addressed blobs plus one JSON file per repo holding its commits and branches), so a restarted
server serves the same repos and revisions.

What it deliberately leaves out: pull requests, tags, discussions, gated repos, search, Xet and Git LFS storage. The
``preupload`` answer decides how a client sends file contents; ``huggingface_hub`` routes every file the server calls
``"lfs"`` through Xet storage when ``hf_xet`` is installed, which needs a CAS server, so this endpoint answers
``"regular"`` for every file and clients send the contents base64-encoded inside the commit (one file in memory at
a time on the server side). That suits deltas and small models, not multi-GB checkpoints. There is no TLS: keep it on
the loopback interface. With ``require_token`` set, writes, ``whoami`` and reads of private repos need
``Authorization: Bearer <token>``; without it, anyone who can reach the port may write.

Example:

```python
>>> import json, tempfile, urllib.request
>>> from hf_obliviate.hub.local import LocalHub
>>> with LocalHub(tempfile.mkdtemp(), require_token="hf_dev") as hub:
...     request = urllib.request.Request(f"{hub.endpoint}/api/whoami-v2", headers={"Authorization": "Bearer hf_dev"})
...     json.load(urllib.request.urlopen(request))["name"]
'local-user'

```

Point a client at it with ``HF_ENDPOINT=<hub.endpoint> HF_TOKEN=hf_dev`` (``huggingface_hub`` reads ``HF_ENDPOINT``
when it is imported) or ``HfApi(endpoint=hub.endpoint)``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LocalHub", "LocalHubError"]

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
_MARKER = "local_hub.json"
_REPO_FILE = "repo.json"
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CHUNK = 1 << 20


class LocalHubError(RuntimeError):
    """The local endpoint cannot start (its folder is in use or holds something else)."""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_NAME.fullmatch(p) and ".." not in p for p in parts) or repo_id.endswith(".git"):
        raise _HttpError(400, f"Invalid repo id {repo_id!r}: use 'namespace/name' (letters, digits, '-', '_', '.').")
    return repo_id


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or len(path) > 1000 or "\\" in path or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise _HttpError(400, f"Invalid path in repo: {path!r}.")
    return path


# --------------------------------------------------------------------------------------------------------- storage
class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Store:
    """Repos on disk: ``blobs/<sha256[:2]>/<sha256>`` (immutable) and ``repos/<type>s/<ns>/<name>/repo.json``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / _MARKER
        if marker.is_file():
            info = json.loads(marker.read_text())
            if info.get("format") != STORE_FORMAT:
                raise LocalHubError(f"{self.root} holds a LocalHub store of format {info.get('format')!r}.")
        elif any(p.name not in ("blobs", "repos", "tmp", ".lock") for p in self.root.iterdir()):
            raise LocalHubError(
                f"{self.root} is not empty and is not a LocalHub folder: pick an empty or new folder for --root."
            )
        else:
            marker.write_text(json.dumps({"format": STORE_FORMAT, "created_at": _now()}) + "\n")
        for sub in ("blobs", "repos", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)
        self.lock = threading.RLock()

    # ------------------------------------------------------------------------------------------------- repos
    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / _check_repo_id(repo_id)

    def load(self, repo_type: str, repo_id: str) -> dict | None:
        path = self.repo_dir(repo_type, repo_id) / _REPO_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, state: dict) -> None:
        folder = self.repo_dir(state["type"], state["id"])
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1, sort_keys=True)
        os.replace(tmp, folder / _REPO_FILE)

    def repo_ids(self, repo_type: str) -> list[str]:
        base = self.root / "repos" / f"{repo_type}s"
        return sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in base.glob(f"*/*/{_REPO_FILE}"))

    # ------------------------------------------------------------------------------------------------- blobs
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def put_blob(self, data: bytes) -> dict[str, Any]:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # the git blob id, as the Hub reports it
        return {"sha256": sha256, "size": len(data), "blob_id": git}


def _resolve(state: dict, revision: str) -> str:
    rev = unquote(revision)
    rev = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
    if rev in state["refs"]:
        return state["refs"][rev]
    if _COMMIT.fullmatch(rev) and rev in state["commits"]:
        return rev
    raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


def _history(state: dict, oid: str) -> list[dict]:
    out = []
    while oid:
        commit = state["commits"][oid]
        out.append(commit)
        oid = commit["parents"][0] if commit["parents"] else None
    return out


# ------------------------------------------------------------------------------------------------------------ http
@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None
    start: int = 0
    length: int = 0


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


class _Body(io.RawIOBase):
    """The request body, limited to its ``Content-Length`` (chunked bodies are read into memory)."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data += handler.rfile.read(size)
                handler.rfile.readline()
            self._raw: BinaryIO = io.BytesIO(bytes(data))
            self._left = len(data)
        else:
            self._raw, self._left = handler.rfile, int(handler.headers.get("Content-Length") or 0)

    def readline(self, size: int | None = -1) -> bytes:
        if self._left <= 0:
            return b""
        line = self._raw.readline(self._left if size is None or size < 0 else min(size, self._left))
        self._left -= len(line)
        return line

    def read(self, size: int | None = -1) -> bytes:
        n = self._left if size is None or size < 0 else min(size, self._left)
        data = self._raw.read(n) if n > 0 else b""
        self._left -= len(data)
        return data

    def drain(self) -> None:
        while self._left > 0 and self.read(_CHUNK):
            pass

    def json(self) -> Any:
        data = self.read()
        try:
            return json.loads(data or b"{}")
        except json.JSONDecodeError as err:
            raise _HttpError(400, f"Request body is not valid JSON: {err}") from err


class LocalHub:
    """A Hub-compatible HTTP server on 127.0.0.1 that stores repos under ``root`` (development and tests only).

    Args:
        root (`str` or `os.PathLike`):
            Folder holding the repos; created if missing, reused (with all its repos and commits) when it exists.
            One server at a time per folder.
        host (`str`, *optional*, defaults to `"127.0.0.1"`):
            Interface to bind. Anything but a loopback address is logged as a warning: there is no TLS.
        port (`int`, *optional*, defaults to 0):
            TCP port; 0 picks a free one (read it back from [`~LocalHub.endpoint`]).
        require_token (`str`, *optional*):
            When set, writes, ``whoami`` and reads of private repos need ``Authorization: Bearer <require_token>``;
            other requests get 401 like the Hub. When unset, every request is allowed.
        user (`str`, *optional*, defaults to `"local-user"`):
            User name reported by ``whoami`` and used as namespace for repo ids without one.

    Example:

    ```python
    >>> import tempfile
    >>> from hf_obliviate.hub.local import LocalHub
    >>> with LocalHub(tempfile.mkdtemp()) as hub:
    ...     hub.endpoint.startswith("http://127.0.0.1:")
    True

    ```

    Attributes:
        endpoint (`str`): base URL to use as ``HF_ENDPOINT``.
        requests (`list[tuple[str, str]]`): ``(method, path)`` of every request served, oldest first.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int = 0,
        require_token: str | None = None,
        user: str = "local-user",
    ):
        if require_token is not None and not require_token:
            raise ValueError("require_token must be a non-empty string or None.")
        if not _NAME.fullmatch(user):
            raise ValueError(f"user {user!r} is not a valid Hub namespace.")
        self.store = _Store(root)
        self.root = self.store.root
        self.require_token = require_token
        self.user = user
        self.requests: list[tuple[str, str]] = []
        self._lockfile = self._acquire_root()
        with contextlib.suppress(ValueError):
            if not ipaddress.ip_address(host).is_loopback:
                logger.warning("LocalHub on %s is reachable from other machines, without TLS.", host)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 60  # close idle keep-alive connections

            def log_message(self, format: str, *args: Any) -> None:
                logger.info("%s %s", self.address_string(), format % args)

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

            def do_POST(self) -> None:
                hub._handle(self, "POST")

            def do_PUT(self) -> None:
                hub._handle(self, "PUT")

            def do_DELETE(self) -> None:
                hub._handle(self, "DELETE")

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError:
            self._release_root()
            raise
        self._server.daemon_threads = True
        bound_host, bound_port = self._server.server_address[:2]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
        self.endpoint = f"http://{shown}:{bound_port}"
        self.port = int(bound_port)
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------------------------------------- lifecycle
    def _acquire_root(self):
        handle = open(self.root / ".lock", "a+")  # noqa: SIM115 - held open while the server lives
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory lock
            return handle
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.close()
            raise LocalHubError(f"{self.root} is already served by another LocalHub process.") from err
        return handle

    def _release_root(self) -> None:
        if self._lockfile is not None:
            self._lockfile.close()  # closing the file releases the flock
            self._lockfile = None

    def start(self) -> LocalHub:
        """Serves in a background (daemon) thread; returns ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="LocalHub", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serves in the calling thread until [`~LocalHub.close`] is called from another one."""
        self._server.serve_forever()

    def close(self) -> None:
        """Stops serving and releases the port and the folder (the repos stay on disk)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()
        self._release_root()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- inspection
    def repo_ids(self, repo_type: str = "model") -> list[str]:
        """Ids of the stored repos of one type."""
        return self.store.repo_ids(repo_type)

    def _state(self, repo_id: str, repo_type: str) -> dict:
        state = self.store.load(repo_type, repo_id)
        if state is None:
            raise KeyError(f"No {repo_type} repo {repo_id!r} in {self.root}.")
        return state

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict[str, Any]]:
        """History of ``revision``, newest first: ``oid``, ``title``, ``message``, ``date``, ``changed`` (the paths
        added, modified or deleted) and ``files`` (the whole tree: ``{path: {sha256, size, blob_id}}``)."""
        with self.store.lock:
            state = self._state(repo_id, repo_type)
            return _history(state, _resolve(state, revision))

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Paths of the files of ``revision``."""
        return sorted(self.commits(repo_id, revision, repo_type)[0]["files"])

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        """Content of one file at ``revision``."""
        info = self.commits(repo_id, revision, repo_type)[0]["files"][path]
        return self.store.blob_path(info["sha256"]).read_bytes()

    # ------------------------------------------------------------------------------------------------- auth
    @staticmethod
    def _token(h: BaseHTTPRequestHandler) -> str | None:
        auth = h.headers.get("Authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        return auth[7:].strip() or None

    def _authorized(self, h: BaseHTTPRequestHandler) -> bool:
        if self.require_token is None:
            return True
        token = self._token(h)
        return token is not None and hmac.compare_digest(token.encode(), self.require_token.encode())

    def _require_write(self, h: BaseHTTPRequestHandler) -> None:
        if not self._authorized(h):
            why = "no token given" if self._token(h) is None else "invalid token"
            raise _HttpError(401, f"Invalid username or password ({why}): this endpoint needs a write token.")

    def _readable(self, h: BaseHTTPRequestHandler, repo_type: str, repo_id: str) -> dict:
        state = self.store.load(repo_type, repo_id)
        if state is None:
            raise _HttpError(404, f"Repository {repo_id} not found.", "RepoNotFound")
        if state.get("private") and not self._authorized(h):
            why = f"Repository {repo_id} not found (private repo: send a valid token)."
            raise _HttpError(401, why, "RepoNotFound")
        return state

    # --------------------------------------------------------------------------------------------- dispatch
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        self.requests.append((method, unquote(url.path)))
        body = _Body(h)
        try:
            response = self._route(h, method, url.path, parse_qs(url.query), body)
        except _HttpError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            response = _json({"error": err.message}, err.status, headers)
        except Exception as err:  # a server bug: report it to the client instead of dropping the connection
            logger.exception("LocalHub failed on %s %s", method, h.path)
            response = _json({"error": f"LocalHub internal error: {type(err).__name__}: {err}"}, 500)
        body.drain()
        self._send(h, response, head=method == "HEAD")

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, r: _Response, head: bool) -> None:
        h.send_response(r.status)
        length = r.length if r.file is not None else len(r.body)
        for key, value in r.headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        if head:
            return
        if r.file is None:
            h.wfile.write(r.body)
            return
        with open(r.file, "rb") as f:
            f.seek(r.start)
            left = r.length
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    break
                h.wfile.write(chunk)
                left -= len(chunk)

    def _route(self, h, method: str, raw_path: str, query: dict, body: _Body) -> _Response:
        parts = raw_path.strip("/").split("/")
        if parts[0] == "api":
            return self._api(h, method, parts[1:], query, body)
        repo_type = "model"
        if parts[0] in ("datasets", "spaces"):
            repo_type, parts = _TYPES[parts[0]], parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = unquote(f"{parts[0]}/{parts[1]}")
            return self._resolve_file(h, repo_type, repo_id, parts[3], "/".join(unquote(p) for p in parts[4:]))
        raise _HttpError(404, f"LocalHub does not serve {method} {unquote(raw_path)}.")

    def _api(self, h, method: str, parts: list[str], query: dict, body: _Body) -> _Response:
        route = "/".join(parts)
        if route == "whoami-v2" and method == "GET":
            return self._whoami(h)
        if route == "validate-yaml" and method == "POST":
            return _json({"errors": [], "warnings": []})
        if route == "repos/create" and method == "POST":
            return self._create_repo(h, body.json())
        if route == "repos/delete" and method == "DELETE":
            return self._delete_repo(h, body.json())
        if len(parts) < 3 or parts[0] not in _TYPES:
            raise _HttpError(404, f"LocalHub does not implement {method} /api/{route}.")
        repo_type = _TYPES[parts[0]]
        repo_id = unquote(f"{parts[1]}/{parts[2]}")
        _check_repo_id(repo_id)
        rest = parts[3:]
        action = rest[0] if rest else None
        with self.store.lock:
            if method == "GET" and action is None:
                return self._info(h, repo_type, repo_id, "main")
            if method == "GET" and action == "revision" and len(rest) == 2:
                return self._info(h, repo_type, repo_id, rest[1])
            if method == "POST" and action == "preupload" and len(rest) == 2:
                return self._preupload(h, repo_type, repo_id, rest[1], body.json())
            if method == "POST" and action == "commit" and len(rest) == 2:
                return self._commit(h, repo_type, repo_id, rest[1], query, body)
            if method == "GET" and action == "tree" and len(rest) >= 2:
                path = "/".join(unquote(p) for p in rest[2:])
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return self._tree(h, repo_type, repo_id, rest[1], path, recursive)
            if method == "POST" and action == "paths-info" and len(rest) == 2:
                return self._paths_info(h, repo_type, repo_id, rest[1], body)
            if method == "GET" and action == "commits" and len(rest) == 2:
                return self._list_commits(h, repo_type, repo_id, rest[1])
            if method == "GET" and action == "refs" and len(rest) == 1:
                return self._refs(h, repo_type, repo_id)
            if method in ("POST", "DELETE") and action == "branch" and len(rest) >= 2:
                branch = unquote("/".join(rest[1:]))
                return self._branch(h, repo_type, repo_id, branch, method, body.json() if method == "POST" else {})
        raise _HttpError(404, f"LocalHub does not implement {method} /api/{route}.")

    # ------------------------------------------------------------------------------------------- endpoints
    def _whoami(self, h) -> _Response:
        token = self._token(h)
        if token is None or not self._authorized(h):
            raise _HttpError(401, "Invalid user token." if token else "No token given: log in or set HF_TOKEN.")
        return _json(
            {
                "type": "user",
                "id": hashlib.sha1(self.user.encode()).hexdigest()[:24],
                "name": self.user,
                "fullname": self.user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "canPay": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            }
        )

    def _create_repo(self, h, payload: dict) -> _Response:
        self._require_write(h)
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HttpError(400, f"Unknown repo type {repo_type!r}.")
        name = payload.get("name") or ""
        repo_id = _check_repo_id(f"{payload.get('organization') or self.user}/{name}")
        private = payload.get("private")
        if private is None:
            private = payload.get("visibility") == "private"
        url = f"http://{h.headers.get('Host', '127.0.0.1')}/{_URL_PREFIX[repo_type]}{repo_id}"
        with self.store.lock:
            if self.store.load(repo_type, repo_id) is not None:  # the client reads "url" even from the 409
                return _json({"error": "You already created this repo.", "url": url}, 409)
            date = _now()
            initial = {"oid": "", "parents": [], "title": "initial commit", "message": "", "date": date}
            initial.update(files={}, changed=[], author=self.user)
            initial["oid"] = _commit_oid(initial)
            state = {
                "id": repo_id,
                "type": repo_type,
                "private": bool(private),
                "created_at": date,
                "refs": {"main": initial["oid"]},
                "commits": {initial["oid"]: initial},
            }
            self.store.save(state)
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, h, payload: dict) -> _Response:
        self._require_write(h)
        repo_type = payload.get("type") or "model"
        repo_id = _check_repo_id(f"{payload.get('organization') or self.user}/{payload.get('name') or ''}")
        with self.store.lock:
            if self.store.load(repo_type, repo_id) is None:
                raise _HttpError(404, f"Repository {repo_id} not found.", "RepoNotFound")
            shutil.rmtree(self.store.repo_dir(repo_type, repo_id))  # blobs stay: no garbage collection
        return _json({})

    def _info(self, h, repo_type: str, repo_id: str, revision: str) -> _Response:
        state = self._readable(h, repo_type, repo_id)
        commit = state["commits"][_resolve(state, revision)]
        files = commit["files"]
        info = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit["oid"],
            "lastModified": commit["date"],
            "createdAt": state["created_at"],
            "private": state["private"],
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [
                {"rfilename": path, "size": f["size"], "blobId": f["blob_id"]} for path, f in sorted(files.items())
            ],
            "usedStorage": sum(f["size"] for f in files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        return _json(info)

    def _preupload(self, h, repo_type: str, repo_id: str, revision: str, payload: dict) -> _Response:
        self._require_write(h)
        state = self._readable(h, repo_type, repo_id)
        files = state["commits"][_resolve(state, revision)]["files"]
        out = []
        for f in payload.get("files") or []:
            path = _check_path(f["path"])
            existing = files.get(path)
            out.append(
                {
                    "path": path,
                    "uploadMode": "regular",  # see the module docstring: no LFS / Xet storage here
                    "shouldIgnore": False,
                    "oid": existing["blob_id"] if existing else None,
                }
            )
        return _json({"files": out, "commitOid": state["refs"].get(unquote(revision))})

    def _commit(self, h, repo_type: str, repo_id: str, revision: str, query: dict, body: _Body) -> _Response:
        self._require_write(h)
        state = self._readable(h, repo_type, repo_id)
        if query.get("create_pr", ["0"])[0] in ("1", "true", "True"):
            raise _HttpError(400, "LocalHub does not support pull requests: commit to a branch instead.")
        branch = unquote(revision)
        branch = branch[len("refs/heads/") :] if branch.startswith("refs/heads/") else branch
        if branch not in state["refs"]:
            raise _HttpError(404, f"Invalid rev id: {branch} (create the branch first).", "RevisionNotFound")
        head = state["refs"][branch]
        files = dict(state["commits"][head]["files"])
        changed: set[str] = set()
        header = None
        while line := body.readline():
            if not line.strip():
                continue
            try:
                op = json.loads(line)
                key, value = op["key"], op["value"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise _HttpError(400, f"Malformed commit line: {err}") from err
            if header is None:
                if key != "header":
                    raise _HttpError(400, "The first line of a commit must be its header.")
                header = value
                parent = value.get("parentCommit")
                if parent and parent != head:
                    raise _HttpError(412, f"A commit has happened since {parent}: {branch} is now at {head}.")
                continue
            if key == "file":
                path = _check_path(value["path"])
                if value.get("encoding", "base64") != "base64":
                    raise _HttpError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}.")
                try:
                    data = base64.b64decode(value["content"], validate=True)
                except (binascii.Error, ValueError) as err:
                    raise _HttpError(400, f"Content of {path} is not valid base64: {err}") from err
                files[path] = self.store.put_blob(data)
                del data
                changed.add(path)
            elif key == "lfsFile":
                raise _HttpError(
                    422,
                    f"{value.get('path')}: LocalHub stores regular uploads only (it answers 'regular' at preupload); "
                    "LFS / Xet object references are not supported.",
                )
            elif key == "deletedFile":
                path = _check_path(value["path"])
                if path not in files:
                    raise _HttpError(404, f"Cannot delete {path}: no such file on {branch}.", "EntryNotFound")
                del files[path]
                changed.add(path)
            elif key == "deletedFolder":
                prefix = _check_path(value["path"].rstrip("/")) + "/"
                gone = [p for p in files if p.startswith(prefix)]
                for p in gone:
                    del files[p]
                changed.update(gone)
            else:
                raise _HttpError(400, f"LocalHub does not support {key!r} commit operations.")
        if header is None:
            raise _HttpError(400, "Empty commit payload.")
        commit = {
            "oid": "",
            "parents": [head],
            "title": header.get("summary") or "Update",
            "message": header.get("description") or "",
            "date": _now(),
            "author": self.user,
            "files": files,
            "changed": sorted(changed),
        }
        commit["oid"] = _commit_oid(commit)
        state["commits"][commit["oid"]] = commit
        state["refs"][branch] = commit["oid"]
        self.store.save(state)
        host = h.headers.get("Host", "127.0.0.1")
        url = f"http://{host}/{_URL_PREFIX[repo_type]}{repo_id}/commit/{commit['oid']}"
        return _json({"success": True, "commitOid": commit["oid"], "commitUrl": url})

    @staticmethod
    def _entries(files: dict, path: str, recursive: bool) -> list[dict]:
        prefix = f"{path}/" if path else ""
        out: dict[str, dict] = {}
        for p, f in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix) :].split("/")
            stop = len(rel) if recursive else 1
            for depth in range(1, min(stop, len(rel) - 1) + 1):  # parent folders of the file
                d = prefix + "/".join(rel[:depth])
                out.setdefault(d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0})
            if recursive or len(rel) == 1:
                out[p] = {"type": "file", "oid": f["blob_id"], "size": f["size"]}
        return [{**v, "path": k} for k, v in sorted(out.items())]

    def _tree(self, h, repo_type: str, repo_id: str, revision: str, path: str, recursive: bool) -> _Response:
        state = self._readable(h, repo_type, repo_id)
        files = state["commits"][_resolve(state, revision)]["files"]
        if path:
            _check_path(path)
            if not any(p.startswith(path + "/") for p in files):
                raise _HttpError(404, f"Folder {path} not found at {unquote(revision)}.", "EntryNotFound")
        return _json(self._entries(files, path, recursive))

    def _paths_info(self, h, repo_type: str, repo_id: str, revision: str, body: _Body) -> _Response:
        state = self._readable(h, repo_type, repo_id)
        files = state["commits"][_resolve(state, revision)]["files"]
        raw = body.read()
        if h.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(raw or b"{}").get("paths") or []
        else:
            paths = parse_qs(raw.decode()).get("paths", [])
        out = []
        for path in paths if isinstance(paths, list) else [paths]:
            path = path.strip("/")
            if path in files:
                out.append({"type": "file", "path": path, "oid": files[path]["blob_id"], "size": files[path]["size"]})
            elif any(p.startswith(path + "/") for p in files):
                out.append({"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()})
        return _json(out)

    def _list_commits(self, h, repo_type: str, repo_id: str, revision: str) -> _Response:
        state = self._readable(h, repo_type, repo_id)
        rows = [
            {"id": c["oid"], "title": c["title"], "message": c["message"], "date": c["date"],
             "authors": [{"user": c.get("author", self.user)}]}
            for c in _history(state, _resolve(state, revision))
        ]  # fmt: skip
        return _json(rows)

    def _refs(self, h, repo_type: str, repo_id: str) -> _Response:
        state = self._readable(h, repo_type, repo_id)
        refs = sorted(state["refs"].items())
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid} for name, oid in refs]
        return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _branch(self, h, repo_type: str, repo_id: str, branch: str, method: str, payload: dict) -> _Response:
        self._require_write(h)
        state = self._readable(h, repo_type, repo_id)
        if not branch or ".." in branch or branch.startswith(("/", "refs/")) or _COMMIT.fullmatch(branch):
            raise _HttpError(400, f"Invalid branch name {branch!r}.")
        if method == "DELETE":
            if branch == "main" or branch not in state["refs"]:
                raise _HttpError(400 if branch == "main" else 404, f"Cannot delete branch {branch!r}.")
            del state["refs"][branch]
        else:
            if branch in state["refs"]:
                raise _HttpError(409, f"Branch {branch} already exists.")
            state["refs"][branch] = _resolve(state, payload.get("startingPoint") or "main")
        self.store.save(state)
        return _json({})

    def _resolve_file(self, h, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        with self.store.lock:
            state = self._readable(h, repo_type, repo_id)
            oid = _resolve(state, revision)
            info = state["commits"][oid]["files"].get(path)
        if info is None:
            raise _HttpError(404, f"Entry {path} not found at {unquote(revision)}.", "EntryNotFound")
        size = info["size"]
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{info["blob_id"]}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{path.rsplit("/", 1)[-1]}"',
        }
        start, end, status = 0, size - 1, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", h.headers.get("Range", "").strip())
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:  # suffix range: the last N bytes
                start = max(size - int(match.group(2)), 0)
            if start >= size or start > end:
                return _Response(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        blob = self.store.blob_path(info["sha256"])
        return _Response(status, headers=headers, file=blob, start=start, length=length)


def _commit_oid(commit: dict) -> str:
    """A 40-hex commit id (like git's): the hash of the commit's content plus a random salt, so never reused."""
    blob = json.dumps({k: commit[k] for k in ("parents", "title", "message", "date", "files")}, sort_keys=True)
    return hashlib.sha1(blob.encode() + os.urandom(16)).hexdigest()
