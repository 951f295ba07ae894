"""A stand-in for the Hugging Face Hub's HTTP API, so that push_to_hub and from_pretrained(repo) run without network.

What is real: huggingface_hub's client code on both sides (HfApi.create_repo; create_commit with its YAML check,
its preupload request and its NDJSON commit carrying base64 file contents; hf_hub_download with its HEAD request,
ETag / X-Repo-Commit checks, download and cache layout; snapshot_download's file listing; ModelCard.load),
transformers' push_to_hub, save_pretrained(push_to_hub=True) and from_pretrained(repo_id) code, and our
serialization, model card and checkpoint converter.

What is stood in: the server. `FakeHub` keeps model repositories in memory, each a chain of commits on one branch
("main"), accepts any bearer token, answers "regular" to every preupload (so files travel base64-encoded inside
the commit: no LFS or Xet storage), and serves files back with the headers the client checks. It implements
only the routes listed in `FakeHub.routes`; anything else is answered 404 and recorded in `unhandled`, so a test
can assert that the client asked for nothing the stand-in does not know.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


@dataclass
class Repo:
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, files), oldest first

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.commits[-1]
        return next(((sha, files) for sha, files in self.commits if sha == revision), None)


class FakeHub:
    """An in-memory Hub on 127.0.0.1, served from a daemon thread. Use as a context manager."""

    user = "tester"

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.unhandled: list[tuple[str, str]] = []
        self.routes = [
            ("GET", re.compile(r"/api/agent-harnesses"), self.agent_harnesses),
            ("POST", re.compile(r"/api/repos/create"), self.create_repo),
            ("POST", re.compile(r"/api/validate-yaml"), self.validate_yaml),
            ("POST", re.compile(rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)"), self.preupload),
            ("POST", re.compile(rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)"), self.commit),
            ("GET", re.compile(rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)"), self.tree),
            ("GET", re.compile(rf"/api/models/{REPO}(?:/revision/(?P<revision>[^/]+))?"), self.model_info),
            ("HEAD", re.compile(rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)"), self.resolve),
            ("GET", re.compile(rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)"), self.resolve),
        ]
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].files_at(revision)[1])

    # --- routes: each takes the match and the request body, returns (status, headers, body) --------------------
    def agent_harnesses(self, match, body):
        # The registry huggingface_hub reads (best effort) to describe its caller in the user agent: none known here.
        return _json(200, {"standardEnvVars": [], "harnesses": {}})

    def create_repo(self, match, body):
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return _json(409, {"error": "You already created this model repo", "url": url})
        # A new repository starts with one commit holding .gitattributes, as on the Hub.
        self.repos[repo_id] = Repo([(_sha("init", repo_id), {".gitattributes": b"*.safetensors filter=lfs\n"})])
        return _json(200, {"url": url, "name": repo_id})

    def validate_yaml(self, match, body):
        return _json(200, {"errors": [], "warnings": []})

    def preupload(self, match, body):
        if (found := self._revision(match)) is not None:
            return found
        files = json.loads(body)["files"]
        modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
        return _json(200, {"files": modes})

    def commit(self, match, body):
        if (found := self._revision(match)) is not None:
            return found
        repo_id = match["repo"]
        repo = self.repos[repo_id]
        parent_sha, parent_files = repo.files_at(match["revision"])
        files = dict(parent_files)
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                if value.get("parentCommit") not in (None, parent_sha):
                    return _json(412, {"error": "parent commit is not the head of the branch"})
            elif key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:  # lfsFile, deletedFolder, copies: never asked for by a preupload that answers "regular"
                return _json(400, {"error": f"the fake Hub does not handle commit items of kind {key!r}"})
        sha = _sha(parent_sha, *(f"{path}:{_sha(content)}" for path, content in sorted(files.items())))
        repo.commits.append((sha, files))
        return _json(200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha})

    def model_info(self, match, body):
        if (found := self._revision(match)) is not None:
            return found
        sha, files = self.repos[match["repo"]].files_at(match["revision"] or "main")
        siblings = [{"rfilename": path, "size": len(content)} for path, content in sorted(files.items())]
        info = {"id": match["repo"], "modelId": match["repo"], "sha": sha, "private": False, "siblings": siblings}
        return _json(200, info)

    def tree(self, match, body):
        # snapshot_download's listing of a revision's files (recursive, one page: no Link header)
        if (found := self._revision(match)) is not None:
            return found
        _, files = self.repos[match["repo"]].files_at(match["revision"])
        entries = [{"type": "file", "path": path, "size": len(content), "oid": _sha(content)}
                   for path, content in sorted(files.items())]  # fmt: skip
        return _json(200, entries)

    def resolve(self, match, body):
        if (found := self._revision(match)) is not None:
            return found
        sha, files = self.repos[match["repo"]].files_at(match["revision"])
        path = unquote(match["path"])
        if path not in files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, b"Entry not found"
        content = files[path]
        return 200, {"ETag": f'"{_sha(content)}"', "X-Repo-Commit": sha}, content

    def _revision(self, match):
        """The error response when the repository or revision does not exist, else None."""
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found"
        if repo.files_at(match.groupdict().get("revision") or "main") is None:
            return 404, {"X-Error-Code": "RevisionNotFound"}, b"Revision not found"
        return None


def _sha(*parts) -> str:
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
    return digest.hexdigest()


def _json(status: int, payload) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str):
            path = urlsplit(self.path).path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with hub._lock:
                hub.requests.append((method, path))
                for route_method, pattern, route in hub.routes:
                    if route_method == method and (match := pattern.fullmatch(path)):
                        status, headers, content = route(match, body)
                        break
                else:
                    hub.unhandled.append((method, path))
                    status, headers, content = 404, {}, b"not implemented by the fake Hub"
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(content)

        def do_GET(self):
            self._serve("GET")

        def do_HEAD(self):
            self._serve("HEAD")

        def do_POST(self):
            self._serve("POST")

        def log_message(self, format, *args):  # keep test output clean
            pass

    return Handler
