"""A small stand-in for the Hugging Face Hub, served on 127.0.0.1 from a thread.

It answers the HTTP API huggingface_hub 2.x speaks, as far as moemerge uses it:

- downloads: `GET /api/models/{repo}[/revision/{rev}]` (repo info with the commit sha),
  `GET /api/models/{repo}/tree/{rev}` (file listing), `HEAD`/`GET /{repo}/resolve/{rev}/{file}`
  (with `X-Repo-Commit` and `ETag`); unknown repos, revisions and files get the Hub's 404s with
  `X-Error-Code` RepoNotFound / RevisionNotFound / EntryNotFound;
- uploads: `POST /api/repos/create`, `POST /api/models/{repo}/branch/{branch}`,
  `POST /api/models/{repo}/preupload/{rev}`, `POST /api/models/{repo}/commit/{rev}` (ndjson),
  `POST /api/models/{repo}/discussions` and `GET .../discussions/{n}` (pull requests),
  `POST /api/validate-yaml` (a README's metadata must parse).
- large files, with `FakeHub(large_files=True)`: preupload answers "lfs" for weight files (as the Hub's
  .gitattributes says), and the Git LFS batch API takes them: `POST /{repo}.git/info/lfs/objects/batch`
  answers "already stored" (no actions) for objects it has, a single PUT for smaller ones, and the Hub's
  multipart transfer for objects of `multipart_from` bytes or more (`chunk_size` in the upload header, one
  PUT URL per part, each answered with an ETag, then a completion POST listing the parts); a verify POST
  follows each upload. Objects are checked against their sha256 before they are stored, and a commit's
  `lfsFile` lines must name stored objects. `fail_lfs` holds oids whose PUTs are refused (403), to
  interrupt an upload. Without large_files every file is "regular" and travels inline in the commit (what
  the Xet-enabled client needs: this server does not speak Xet).

Every request is logged, with the Authorization header it carried, so tests can assert exactly which
files were fetched and what was sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin", ".gguf", ".pth", ".pt", ".model"))


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch or ref → commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha → files
    pulls: int = 0

    def commit(self, branch: str, files: dict[str, bytes], message: str = "") -> str:
        digest = hashlib.sha1(f"{self.repo_id}\0{branch}\0{len(self.commits)}\0{message}".encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + git_blob_sha1(files[name]).encode())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    """Models in memory; `add_model` publishes a folder as a commit on a branch."""

    def __init__(self, large_files: bool = False, multipart_from: int = 1 << 62, chunk_size: int = 1 << 20) -> None:
        self.large_files = large_files
        self.multipart_from = multipart_from
        self.chunk_size = chunk_size
        self.lfs_objects: dict[str, bytes] = {}  # sha256 → content
        self.lfs_parts: dict[str, dict[int, bytes]] = {}  # multipart uploads in progress
        self.lfs_puts: list[tuple[str, int]] = []  # (oid, bytes) of every accepted PUT, parts included
        self.fail_lfs: set[str] = set()
        self.committed: list[tuple[str, str]] = []  # (ndjson key, path) of every commit line that adds a file
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.created: list[dict] = []  # create-repo payloads
        self.fail_commits: tuple[int, str] | None = None  # (status, message) for every commit POST
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._url = ""

    # -- content ---------------------------------------------------------------------------------

    def add_model(self, repo_id: str, folder: Path | None = None, branch: str = "main", extra=None) -> str:
        """Publish every file under `folder` (plus `extra` {name: bytes}) as a new commit on `branch`."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id))
        files: dict[str, bytes] = {}
        if folder is not None:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    files[path.relative_to(folder).as_posix()] = path.read_bytes()
        files.update(extra or {})
        files.setdefault(".gitattributes", b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
        return repo.commit(branch, files, f"add {branch}")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    def downloaded(self, repo_id: str | None = None) -> list[str]:
        """File names fetched with GET .../resolve/... (in request order), for one repo or all."""
        names = []
        for request in self.requests:
            parts = request.path.split("/")
            if request.method == "GET" and len(parts) > 4 and parts[3] == "resolve":
                repo = f"{parts[1]}/{parts[2]}"
                if repo_id is None or repo == repo_id:
                    names.append("/".join(unquote(p) for p in parts[5:]))
        return names

    # -- server ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        host, port = self._server.server_address[:2]
        self._url = f"http://{host}:{port}"
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    # -- plumbing ----------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict[str, str] | None = None, head: bool = False):
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False, commit: str | None = None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._json(status, {"error": message}, headers, head)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]  # each chunk ends with CRLF
                if not size:
                    return b"".join(chunks)
                chunks.append(chunk)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _log(self) -> list[str]:
        path = urlsplit(self.path).path
        with self.fake.lock:
            self.fake.requests.append(Request(self.command, path, self.headers.get("Authorization")))
        return path.split("/")

    def _repo(self, parts: list[str], head: bool = False) -> Repo | None:
        repo = self.fake.repos.get(f"{parts[0]}/{parts[1]}")
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
        return repo

    # -- verbs -------------------------------------------------------------------------------------

    def do_HEAD(self):  # noqa: N802
        self._get(head=True)

    def do_GET(self):  # noqa: N802
        self._get(head=False)

    def _get(self, head: bool):
        parts = self._log()[1:]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self._repo(parts[2:4], head)
            if repo is None:
                return
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                return self._info(repo, unquote("/".join(rest[1:])) if rest else "main", head)
            if rest[0] == "tree":
                return self._tree(repo, unquote(rest[1]), head)
            if rest[0] == "discussions":
                return self._discussion(repo, int(rest[1]))
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo(parts[:2], head)
            if repo is None:
                return
            return self._resolve(repo, unquote(parts[3]), "/".join(unquote(p) for p in parts[4:]), head)
        self._error(404, None, f"no route for {self.path}", head)

    def _info(self, repo: Repo, revision: str, head: bool):
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        siblings = [{"rfilename": name} for name in sorted(repo.commits[commit])]
        self._json(200, {"id": repo.repo_id, "sha": commit, "private": repo.private, "siblings": siblings}, head=head)

    def _tree(self, repo: Repo, revision: str, head: bool):
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        entries = []
        for name, data in sorted(repo.commits[commit].items()):
            entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
            if is_lfs(name):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries, head=head)

    def _resolve(self, repo: Repo, revision: str, name: str, head: bool):
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        data = repo.commits[commit].get(name)
        if data is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist", head, commit)
        etag = hashlib.sha256(data).hexdigest() if is_lfs(name) else git_blob_sha1(data)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
        start = 0
        ranged = self.headers.get("Range")
        if ranged and ranged.startswith("bytes=") and not head:
            start = int(ranged.removeprefix("bytes=").split("-")[0] or 0)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(206 if start else 200, data[start:], headers, head)

    def _discussion(self, repo: Repo, num: int):
        self._json(
            200,
            {
                "title": "moemerge upload",
                "num": num,
                "author": {"name": "tester"},
                "createdAt": "2026-01-01T00:00:00.000Z",
                "status": "draft",
                "repo": {"name": repo.repo_id, "type": "model"},
                "isPullRequest": True,
                "changes": {"base": "refs/heads/main"},
                "filesWithConflicts": [],
                "events": [],
            },
        )

    def do_POST(self):  # noqa: N802
        parts = self._log()[1:]
        body = self._body()
        if parts == ["api", "repos", "create"]:
            payload = json.loads(body)
            with self.fake.lock:
                self.fake.created.append(payload)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in self.fake.repos:
                url = f"{self.fake.url}/{repo_id}"
                return self._json(409, {"error": "You already created this model repo", "url": url})
            repo = self.fake.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
            repo.commit("main", {".gitattributes": b""}, "initial commit")
            return self._json(200, {"url": f"{self.fake.url}/{repo_id}"})
        if parts == ["api", "validate-yaml"]:  # the Hub checks a README's metadata before a commit
            content = json.loads(body)["content"]
            header = content.split("---\n")[1] if content.startswith("---\n") else ""
            try:
                metadata = yaml.safe_load(header) or {}
                assert isinstance(metadata, dict), "metadata must be a mapping"
            except (yaml.YAMLError, AssertionError) as exc:
                return self._json(400, {"errors": [{"message": str(exc)}]}, {"X-Error-Message": "Invalid YAML"})
            return self._json(200, {"errors": [], "warnings": []})
        if parts[2:] == ["info", "lfs", "objects", "batch"] and parts[1].endswith(".git"):
            return self._lfs_batch(json.loads(body))
        if parts[:2] == ["lfs", "complete"]:
            return self._lfs_complete(parts[2], json.loads(body))
        if parts[:2] == ["lfs", "verify"]:
            request = json.loads(body)
            stored = self.fake.lfs_objects.get(request["oid"])
            if stored is None or len(stored) != request["size"]:
                return self._error(404, None, "object not stored")
            return self._json(200, {})
        if parts[:2] != ["api", "models"] or len(parts) < 5:
            return self._error(404, None, f"no route for {self.path}")
        repo = self._repo(parts[2:4])
        if repo is None:
            return
        action, revision = parts[4], unquote("/".join(parts[5:]))
        if action == "branch":
            if revision in repo.branches:
                return self._error(409, None, "Reference already exists")
            repo.branches[revision] = repo.branches["main"]
            return self._json(200, {})
        if action == "discussions":
            repo.pulls += 1
            repo.branches[f"refs/pr/{repo.pulls}"] = repo.branches["main"]
            return self._json(200, {"num": repo.pulls, "url": f"{self.fake.url}/{repo.repo_id}/discussions/1"})
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if action == "preupload":
            files = repo.commits[commit]
            answer = []
            for f in json.loads(body)["files"]:
                lfs = self.fake.large_files and is_lfs(f["path"])
                data = files.get(f["path"])
                oid = None if data is None else hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
                answer.append(
                    {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
                )
            return self._json(200, {"files": answer, "commitOid": commit})
        if action == "commit":
            if self.fake.fail_commits is not None:
                status, message = self.fake.fail_commits
                return self._error(status, None, message)
            files = dict(repo.commits[commit])
            summary = ""
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    summary = item["value"]["summary"]
                if item["key"] in ("file", "lfsFile"):
                    self.fake.committed.append((item["key"], item["value"]["path"]))
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "lfsFile":
                    stored = self.fake.lfs_objects.get(item["value"]["oid"])
                    if stored is None or len(stored) != item["value"]["size"]:
                        return self._error(422, None, f"LFS object of {item['value']['path']} was never uploaded")
                    files[item["value"]["path"]] = stored
                elif item["key"] == "deletedFile":
                    files.pop(item["value"]["path"], None)
            sha = repo.commit(revision, files, summary)
            url = f"{self.fake.url}/{repo.repo_id}/commit/{sha}"
            return self._json(200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": None})
        self._error(404, None, f"no route for {self.path}")

    # -- Git LFS -----------------------------------------------------------------------------------

    def _lfs_batch(self, request: dict):
        objects = []
        transfer = "basic"
        for item in request["objects"]:
            oid, size = item["oid"], item["size"]
            entry: dict = {"oid": oid, "size": size}
            verify = {"href": f"{self.fake.url}/lfs/verify"}
            if oid in self.fake.lfs_objects:
                pass  # already stored: no actions, the client skips it
            elif size >= self.fake.multipart_from:
                transfer = "multipart"
                count = -(-size // self.fake.chunk_size)
                header = {"chunk_size": str(self.fake.chunk_size)}
                header.update({f"{n:05d}": f"{self.fake.url}/lfs/part/{oid}/{n}" for n in range(1, count + 1)})
                upload = {"href": f"{self.fake.url}/lfs/complete/{oid}", "header": header}
                entry["actions"] = {"upload": upload, "verify": verify}
            else:
                entry["actions"] = {"upload": {"href": f"{self.fake.url}/lfs/upload/{oid}"}, "verify": verify}
            objects.append(entry)
        self._json(200, {"transfer": transfer, "objects": objects})

    def _lfs_complete(self, oid: str, request: dict):
        parts = self.fake.lfs_parts.pop(oid, {})
        numbers = [p["partNumber"] for p in request["parts"]]
        if numbers != list(range(1, len(parts) + 1)) or any(
            p["etag"] != _etag(parts[p["partNumber"]]) for p in request["parts"]
        ):
            return self._error(400, None, "parts do not match the uploaded ones")
        return self._store(oid, b"".join(parts[n] for n in numbers))

    def _store(self, oid: str, data: bytes):
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, None, "content does not match its sha256")
        self.fake.lfs_objects[oid] = data
        return self._json(200, {})

    def do_PUT(self):  # noqa: N802 - the storage side of LFS uploads
        parts = self._log()[1:]
        body = self._body()
        oid = parts[2] if len(parts) > 2 else ""
        if oid in self.fake.fail_lfs:
            return self._error(403, None, "upload refused")
        with self.fake.lock:
            self.fake.lfs_puts.append((oid, len(body)))
        if parts[:2] == ["lfs", "upload"]:
            return self._store(oid, body)
        if parts[:2] == ["lfs", "part"]:
            self.fake.lfs_parts.setdefault(oid, {})[int(parts[3])] = body
            return self._send(200, b"", {"ETag": _etag(body)})
        self._error(404, None, f"no route for {self.path}")


def _etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'
