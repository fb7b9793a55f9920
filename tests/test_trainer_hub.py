"""`SparseOPDTrainer.push_to_hub` against a local HTTP server speaking the part of the Hub API huggingface_hub uses.

The server answers repo creation, the "preupload" query (every file is a regular, inline upload) and the commit
endpoint (NDJSON with base64 file contents), and keeps what it received. The push runs in a subprocess because
huggingface_hub reads `HF_ENDPOINT` at import time.
"""

from __future__ import annotations

import base64
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

            def do_GET(self):
                hub.unhandled.append(f"GET {self.path}")
                return self._reply(404, {"error": "not implemented by the test hub"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

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
        env = dict(os.environ)
        env.update(
            HF_ENDPOINT=hub.url,
            HF_TOKEN="hf_test_token",
            HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            OMP_NUM_THREADS="1",
        )
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
    assert "## Sparse on-policy distillation" in card and "near_zero, density 0.1" in card
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
