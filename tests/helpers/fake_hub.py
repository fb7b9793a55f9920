"""A local HTTP server speaking the part of the Hub API huggingface_hub uses, for tests that push and download.

The server answers repo creation, the "preupload" query (every file is a regular, inline upload), the commit
endpoint (NDJSON with base64 file contents), and the download side (model info, file tree, `resolve` HEAD/GET), and
keeps what it received. Clients run in subprocesses (`FakeHub.env`) because huggingface_hub reads `HF_ENDPOINT` at
import time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.helpers import with_root_on_path


class FakeHub:
    """A minimal Hub: repos, preupload and commits; `repos[repo_id][path] = bytes`."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.unhandled: list[str] = []
        self.card_metadata: dict | None = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                parts = self.path.split("?")[0].strip("/").split("/")
                base = f"http://{self.headers['Host']}"
                if parts[:3] == ["api", "repos", "create"]:
                    data = json.loads(body)
                    repo_id = f"{data.get('organization') or 'me'}/{data['name']}"
                    hub.repos.setdefault(repo_id, {})
                    return self._reply(200, {"url": f"{base}/{repo_id}", "name": repo_id, "id": repo_id})
                if parts[:2] == ["api", "validate-yaml"]:
                    import yaml

                    content = json.loads(body)["content"]
                    front = content.split("---")[1] if content.startswith("---") else ""
                    try:
                        hub.card_metadata = yaml.safe_load(front) or {}
                    except yaml.YAMLError as error:
                        return self._reply(400, {"errors": [{"message": str(error)}]})
                    return self._reply(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                for f in files
                            ]
                        },
                    )
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
                    repo_id = f"{parts[2]}/{parts[3]}"
                    if repo_id not in hub.repos:
                        return self._reply(404, {"error": f"Repository {repo_id} not found"})
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(line["value"] for line in lines if line["key"] == "header")
                    files = {}
                    for line in lines:
                        if line["key"] == "file":
                            value = line["value"]
                            assert value.get("encoding", "base64") == "base64"
                            files[value["path"]] = base64.b64decode(value["content"])
                    hub.repos[repo_id].update(files)
                    hub.commits.append({"repo": repo_id, "summary": header.get("summary"), "files": sorted(files)})
                    oid = f"{len(hub.commits):040x}"
                    return self._reply(200, {"commitUrl": f"{base}/{repo_id}/commit/{oid}", "commitOid": oid})
                hub.unhandled.append(f"POST {self.path}")
                return self._reply(404, {"error": "not implemented by the test hub"})

            def _not_found(self, code):
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _file(self, with_body: bool):
                parts = self.path.split("?")[0].strip("/").split("/")
                repo_id, path = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                if repo_id not in hub.repos:
                    return self._not_found("RepoNotFound")
                if path not in hub.repos[repo_id]:
                    return self._not_found("EntryNotFound")
                data = hub.repos[repo_id][path]
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub.head(repo_id))
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if with_body:
                    self.wfile.write(data)

            def do_HEAD(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._file(with_body=False)
                hub.unhandled.append(f"HEAD {self.path}")
                return self._not_found("EntryNotFound")

            def do_GET(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._file(with_body=True)
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id = f"{parts[2]}/{parts[3]}"
                    if repo_id not in hub.repos:
                        return self._not_found("RepoNotFound")
                    files = hub.repos[repo_id]
                    if len(parts) == 4 or parts[4] == "revision":
                        return self._reply(200, {"id": repo_id, "modelId": repo_id, "sha": hub.head(repo_id),
                                                 "private": False, "siblings": [{"rfilename": f} for f in files]})
                    if parts[4] == "tree":
                        prefix = "/".join(parts[6:])
                        entries = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                   for f, d in files.items() if not prefix or f.startswith(prefix + "/")]
                        return self._reply(200, entries) if entries else self._not_found("EntryNotFound")
                hub.unhandled.append(f"GET {self.path}")
                return self._reply(404, {"error": "not implemented by the test hub"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        """Environment of a subprocess that talks to this stand-in and nothing else: `HF_ENDPOINT` points here, and
        every other HTTP(S) request goes to a dead proxy, so a request that would reach the real Hub fails at once
        instead of depending on the network (CI has none). The repository root is on PYTHONPATH, for
        `tests.helpers`."""
        dead_proxy = "http://127.0.0.1:9"
        return {**with_root_on_path(dict(os.environ)), "HF_ENDPOINT": self.url, "HF_TOKEN": "hf_test_token",
                "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
                "HF_HOME": str(home), "OMP_NUM_THREADS": "1", "HTTP_PROXY": dead_proxy, "HTTPS_PROXY": dead_proxy,
                "ALL_PROXY": dead_proxy, "NO_PROXY": "127.0.0.1,localhost", **extra}

    def head(self, repo_id: str) -> str:
        """The commit id of a repo's latest commit (a fixed id before any)."""
        count = sum(c["repo"] == repo_id for c in self.commits)
        return hashlib.sha1(f"{repo_id}@{count}".encode()).hexdigest()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
