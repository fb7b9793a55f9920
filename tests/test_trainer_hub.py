"""`SparseOPDTrainer.push_to_hub` against a local HTTP server speaking the part of the Hub API huggingface_hub uses.

The server answers repo creation, the "preupload" query (every file is a regular, inline upload), the commit
endpoint (NDJSON with base64 file contents), and the download side (model info, file tree, `resolve` HEAD/GET), and
keeps what it received. Pushes and loads run in subprocesses because huggingface_hub reads `HF_ENDPOINT` at import
time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

PUSH_SCRIPT = textwrap.dedent(
    """
    import sys
    from sparse_opd.tasks import arithmetic_dataset
    from sparse_opd.trainer import SparseOPDConfig, SparseOPDTrainer
    from test_trainer_support import tiny_llama, tiny_tokenizer

    out = sys.argv[1]
    tokenizer = tiny_tokenizer()
    args = SparseOPDConfig(
        output_dir=out, mask_strategy="near_zero", mask_density=0.1, per_device_train_batch_size=2, max_steps=2,
        max_completion_length=4, learning_rate=1e-2, use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", hub_model_id="me/tiny-sparse-opd", seed=0,
    )
    trainer = SparseOPDTrainer(model=tiny_llama(tokenizer), train_dataset=arithmetic_dataset("train", 8, 1), args=args,
                               processing_class=tokenizer)
    trainer.train()
    print("COMMIT", trainer.push_to_hub(commit_message="Sparse OPD adapter"))
    """
)


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
        instead of depending on the network (CI has none)."""
        dead_proxy = "http://127.0.0.1:9"
        return {**os.environ, "HF_ENDPOINT": self.url, "HF_TOKEN": "hf_test_token", "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
                "OMP_NUM_THREADS": "1", "HTTP_PROXY": dead_proxy, "HTTPS_PROXY": dead_proxy, "ALL_PROXY": dead_proxy,
                "NO_PROXY": "127.0.0.1,localhost", **extra}

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


@pytest.mark.slow
def test_push_to_hub_sends_the_adapter_and_its_card(tmp_path):
    script = tmp_path / "push.py"
    script.write_text(PUSH_SCRIPT)
    out = tmp_path / "out"
    with FakeHub() as hub:
        env = hub.env(tmp_path / "hf")
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
        result = subprocess.run(
            [sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=240, check=False
        )
    assert result.returncode == 0, result.stderr[-4000:] + f"\nunhandled: {hub.unhandled}"
    files = hub.repos["me/tiny-sparse-opd"]
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(files)
    assert not any(name.startswith("checkpoint-") for name in files)
    assert len(hub.commits) == 1 and hub.commits[0]["summary"] == "Sparse OPD adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert files[name] == (out / name).read_bytes(), f"{name} differs from the saved adapter"
    card = files["README.md"].decode()
    assert "import sparse_opd" in card and "AutoPeftModelForCausalLM.from_pretrained" in card
    assert "## Training" in card and "near_zero, ffn-weighted, density 0.1" in card
    assert "the student's own base weights" in card
    assert json.loads(files["adapter_config.json"])["peft_type"] == "SPARSE_DELTA"
    assert "sparse-opd" in hub.card_metadata.get("tags", []), "the card's YAML metadata was validated and tagged"

    # what was uploaded loads back onto the same base and reproduces the trained values
    from peft import PeftModel
    from test_trainer_support import tiny_llama, tiny_tokenizer

    import sparse_opd  # noqa: F401

    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (downloaded / name).write_bytes(files[name])
    loaded = PeftModel.from_pretrained(tiny_llama(tiny_tokenizer()), downloaded)
    saved = PeftModel.from_pretrained(tiny_llama(tiny_tokenizer()), out)
    a = {n: p for n, p in loaded.named_parameters() if "sparse_delta_values" in n}
    b = {n: p for n, p in saved.named_parameters() if "sparse_delta_values" in n}
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a) and any(bool((a[n] != 0).any()) for n in a)


ROUND_TRIP_PUSH = textwrap.dedent(
    """
    import sys, tempfile
    import torch
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sparse_opd.tasks import arithmetic_dataset
    from sparse_opd.trainer import SparseOPDConfig, SparseOPDTrainer
    from test_trainer_support import tiny_llama, tiny_tokenizer

    out = sys.argv[1]
    with tempfile.TemporaryDirectory() as base_dir:  # someone publishes a base model
        tokenizer = tiny_tokenizer()
        tiny_llama(tokenizer).save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        HfApi().create_repo("me/tiny-base")
        HfApi().upload_folder(repo_id="me/tiny-base", folder_path=base_dir)
    # "me/tiny-base" is the repo just pushed to the local stand-in (HF_ENDPOINT), not the real Hub
    student = AutoModelForCausalLM.from_pretrained("me/tiny-base")  # we train a sparse delta of it
    tokenizer = AutoTokenizer.from_pretrained("me/tiny-base", padding_side="left")
    args = SparseOPDConfig(
        output_dir=out, mask_strategy="near_zero", mask_density=0.1, per_device_train_batch_size=2, max_steps=2,
        max_completion_length=4, learning_rate=1e-2, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        hub_model_id="me/tiny-sparse-opd", push_to_hub=True, seed=0,
    )
    trainer = SparseOPDTrainer(model=student, train_dataset=arithmetic_dataset("train", 8, 1), args=args,
                               processing_class=tokenizer)
    trainer.train()
    trainer.push_to_hub(commit_message="Sparse OPD adapter")
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        torch.save(trainer.model(input_ids=ids).logits, out + "/logits.pt")
    """
)

ROUND_TRIP_LOAD = textwrap.dedent(
    """
    import re, sys
    import torch
    from huggingface_hub import hf_hub_download

    card = open(hf_hub_download("me/tiny-sparse-opd", "README.md")).read()
    snippet = re.search(r"```python\\n(.*?)```", card, re.S).group(1)
    snippet = snippet.replace("<this repo or folder>", "me/tiny-sparse-opd")
    scope = {}
    exec(snippet, scope)  # the card's own loading instructions, with only the repo id
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        logits = scope["model"](input_ids=ids).logits
    expected = torch.load(sys.argv[1] + "/logits.pt")
    print("MAX_DIFF", float((logits - expected).abs().max()))
    """
)


@pytest.mark.slow
def test_a_pushed_adapter_loads_anywhere_from_its_repo_id_as_its_card_says(tmp_path):
    """Push a base and an adapter trained on it from one process; in a fresh process with an empty cache, run the
    card's loading snippet with the repo id: the merged model reproduces the trained model's logits."""
    out = tmp_path / "out"
    (tmp_path / "push.py").write_text(ROUND_TRIP_PUSH)
    (tmp_path / "load.py").write_text(ROUND_TRIP_LOAD)
    with FakeHub() as hub:
        for step, script, cache in (("push", "push.py", "cache-a"), ("load", "load.py", "cache-b")):
            env = hub.env(tmp_path / cache)
            env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
            result = subprocess.run([sys.executable, str(tmp_path / script), str(out)], env=env, capture_output=True,
                                    text=True, timeout=240, check=False)
            assert result.returncode == 0, f"{step}: " + result.stderr[-4000:] + f"\nunhandled: {hub.unhandled}"
    config = json.loads(hub.repos["me/tiny-sparse-opd"]["adapter_config.json"])
    assert config["base_model_name_or_path"] == "me/tiny-base"
    assert hub.card_metadata.get("base_model") == "me/tiny-base"
    max_diff = float(result.stdout.split("MAX_DIFF")[1])
    assert max_diff < 1e-5, max_diff
