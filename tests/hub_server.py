"""A small local server speaking the part of the Hugging Face Hub HTTP API that uploads and downloads use.

Tests point huggingface_hub at it (see ``tests/test_hub.py``) so push → download round trips run for real over
HTTP without the internet. Blobs live in a directory on disk, content-addressed by their git sha; every commit is
a full file tree (path → blob sha) with its own sha, so any commit can be read back by ``revision=<sha>``.

Every file is committed inline ("regular" upload mode): a server asking for LFS would push the client onto the Xet
protocol, because hf_xet is installed. ``fail_next_commits(n)`` makes the next n commit requests answer HTTP 500.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

RELATIONS = {"adapter", "merge", "quantized", "finetune"}
REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"  # the client quotes revisions ("refs%2Fpr%2F1"), so a revision is one path segment
ROUTES = [
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", rf"/api/models/{REPO}/branch/{REV}", "create_branch"),
    ("POST", rf"/api/models/{REPO}/preupload/{REV}", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/{REV}", "commit"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.+))?", "tree"),
    ("GET", rf"/api/models/{REPO}(?:/revision/{REV})?", "info"),
    ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
]


def git_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, str]  # path -> blob sha


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


class HubServer:
    """``with HubServer(tmp_dir) as hub:`` serves on ``hub.url`` (127.0.0.1, a free port) until the block ends."""

    def __init__(self, root: Path):
        self.blobs = Path(root) / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self._lock = threading.Lock()
        self._failures = 0
        self.stopped = False
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving; kept-alive connections are dropped unanswered from now on, like a server that died."""
        self.stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()

    def fail_next_commits(self, n: int) -> None:
        self._failures = n

    def commits(self, repo_id: str, branch: str = "main") -> list[str]:
        """Commit shas of a branch, newest first."""
        repo, out = self.repos[repo_id], []
        sha = repo.branches[branch]
        while sha is not None:
            out.append(sha)
            sha = repo.commits[sha].parent
        return out

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        tree = repo.commits[repo.branches.get(revision, revision)].files
        return {path: (self.blobs / sha).read_bytes() for path, sha in tree.items()}

    # --- state -------------------------------------------------------------------------------------------------

    def _store(self, data: bytes) -> str:
        sha = git_sha(data)
        (self.blobs / sha).write_bytes(data)
        return sha

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return self.repos[repo_id]

    def _commit(self, repo_id: str, rev: str) -> Commit:
        repo = self._repo(repo_id)
        sha = repo.branches.get(rev, rev)
        if sha not in repo.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo.commits[sha]

    def _new_commit(self, repo: Repo, branch: str, message: str, files: dict[str, str]) -> Commit:
        parent = repo.branches.get(branch)
        seed = json.dumps([parent, message, sorted(files.items()), len(repo.commits)]).encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent, message, files)
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    # --- endpoints: each takes the route's groups, the query and the parsed body; returns (status, headers, body)

    def create_repo(self, query, body):
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.repos:  # the client reads "url" from this answer when exist_ok=True
            return 409, {}, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        repo = self.repos[repo_id] = Repo(private=body.get("visibility") == "private" or bool(body.get("private")))
        self._new_commit(repo, "main", "initial commit", {".gitattributes": self._store(b"*.bin filter=lfs\n")})
        return 200, {}, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def create_branch(self, query, body, repo, rev):
        branch, r = unquote(rev), self._repo(repo)
        if branch in r.branches:
            raise HubError(409, None, f"Branch {branch} already exists")
        start = self._commit(repo, (body or {}).get("startingPoint") or "main")
        r.branches[branch] = start.sha
        return 200, {}, {}

    def preupload(self, query, body, repo, rev):
        files = self._commit(repo, unquote(rev)).files
        return 200, {}, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                    "oid": files.get(f["path"])} for f in body["files"]]}

    def commit(self, query, lines, repo, rev):
        if self._failures:
            self._failures -= 1
            raise HubError(500, None, "Internal Error (injected by the test server)")
        branch = unquote(rev)
        head = self._commit(repo, branch)
        files, message = dict(head.files), ""
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                message = value["summary"]
                if value.get("parentCommit") not in (None, head.sha):
                    raise HubError(412, None, "A commit has happened since; parentCommit is stale")
            elif key == "file":
                files[value["path"]] = self._store(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: s for p, s in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, None, f"unsupported commit operation {key!r} (this server takes inline files)")
        commit = self._new_commit(self.repos[repo], branch, message, files)
        return 200, {}, {"commitUrl": f"{self.url}/{repo}/commit/{commit.sha}", "commitOid": commit.sha,
                         "success": True, "pullRequestUrl": None}

    def validate_yaml(self, query, body):
        front = re.match(r"---\n(.*?)\n---", body["content"], re.S)
        meta = yaml.safe_load(front.group(1)) if front else {}
        errors = []
        if not isinstance(meta, dict):
            errors.append("metadata must be a YAML mapping")
        else:
            if "base_model_relation" in meta and meta["base_model_relation"] not in RELATIONS:
                errors.append(f"base_model_relation must be one of {sorted(RELATIONS)}")
            if "base_model_relation" in meta and "base_model" not in meta:
                errors.append("base_model_relation needs base_model")
            for key in ("library_name", "pipeline_tag", "base_model", "license"):
                if key in meta and not isinstance(meta[key], (str, list)):
                    errors.append(f"{key} must be a string")
            if not all(isinstance(t, str) for t in meta.get("tags", [])):
                errors.append("tags must be strings")
        if errors:
            raise HubError(400, None, "; ".join(errors))
        return 200, {}, {"errors": [], "warnings": []}

    def tree(self, query, body, repo, rev, path=None):
        commit = self._commit(repo, unquote(rev))
        prefix = unquote(path).strip("/") + "/" if path else ""
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for p, sha in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append({"type": "file", "oid": sha, "size": (self.blobs / sha).stat().st_size, "path": p})
        if prefix and not entries and not folders:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}")
        folders = [{"type": "directory", "oid": git_sha(f.encode()), "path": f} for f in sorted(folders)]
        return 200, {}, folders + entries

    def info(self, query, body, repo, rev=None):
        commit = self._commit(repo, unquote(rev or "main"))
        return 200, {}, {"id": repo, "modelId": repo, "sha": commit.sha, "private": self.repos[repo].private,
                         "tags": [], "siblings": [{"rfilename": p} for p in sorted(commit.files)]}

    def resolve(self, query, body, repo, rev, path):
        commit = self._commit(repo, unquote(rev))
        path = unquote(path)
        if path not in commit.files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}")
        sha = commit.files[path]
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": str((self.blobs / sha).stat().st_size)}
        return 200, headers, (self.blobs / sha).read_bytes()


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _handle(self, method: str) -> None:
            if hub.stopped:
                self.close_connection = True
                return
            url = urlsplit(self.path)
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # read before any error answer
            try:
                for route_method, pattern, route_name in ROUTES:
                    match = re.fullmatch(pattern, url.path)
                    if route_method == method and match:
                        name = route_name
                        break
                else:
                    raise HubError(404, None, f"no route for {method} {url.path}")
                body = _parse_body(raw, self.headers.get("Content-Type", ""))
                with hub._lock:
                    status, headers, payload = getattr(hub, name)(
                        parse_qs(url.query), body, **{k: v for k, v in match.groupdict().items() if v is not None})
            except HubError as e:
                status, payload = e.status, {"error": e.message}
                headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if not isinstance(payload, bytes):
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)

        def do_GET(self):
            self._handle("GET")

        def do_HEAD(self):
            self._handle("HEAD")

        def do_POST(self):
            self._handle("POST")

    return Handler


def _parse_body(raw: bytes, content_type: str):
    if not raw:
        return None
    if "ndjson" in content_type:
        return [json.loads(line) for line in raw.splitlines() if line.strip()]
    return json.loads(raw)
