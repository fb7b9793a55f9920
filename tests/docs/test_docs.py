"""Every ```python block of README.md and docs/*.md runs, offline, as a user would paste it.

The blocks of one file run in order, in one namespace, in a fresh Python process started in an empty directory. That
process never reaches the real Hub: `HF_ENDPOINT` points at a local stand-in (`FakeHub` of tests/helpers/fake_hub.py,
an HTTP server on 127.0.0.1) which serves tiny models built here under the Hub ids the docs name (`STAND_INS`) and
accepts pushes, and every other request goes to a dead proxy (`FakeHub.env`). So
`from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")` in a doc runs huggingface_hub's real download code against
a tiny local model. A block that cannot run here is preceded by
``<!-- docs-test: skip REASON -->``; the reasons are listed at the end of the run.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.fake_hub import FakeHub
from tests.helpers.tiny_opd import tiny_llama, tiny_tokenizer

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- docs-test: (?P<marker>[^>]*?) -->\s*\n)?```python\n(?P<code>.*?)```", re.DOTALL)
# Hub ids used in the docs -> the seed of a tiny Llama (tests/helpers/tiny_opd.py) served under that id; all
# share one tokenizer, so any of them can teach any other
STAND_INS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": 0,
    "HuggingFaceTB/SmolLM2-360M-Instruct": 1,
    "Qwen/Qwen3-1.7B": 2,
    "Qwen/Qwen3-8B": 3,
}


def blocks(path: Path) -> list[tuple[str | None, str]]:
    return [(m["marker"], m["code"]) for m in BLOCK.finditer(path.read_text())]


def _repo_files(seed: int) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer()
        tiny_llama(tokenizer, seed=seed).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server:
        for repo_id, seed in STAND_INS.items():
            server.repos[repo_id] = _repo_files(seed)
        yield server


def test_the_docs_have_runnable_blocks():
    counts = {path.name: len(blocks(path)) for path in DOCS}
    skipped = [marker for path in DOCS for marker, _ in blocks(path) if marker and marker.startswith("skip")]
    how_to = {"README.md", "tuner.md", "masks.md", "trainer.md", "analysis.md", "recipes.md", "serving.md"}
    assert {name for name, n in counts.items() if n} >= how_to, counts  # every how-to page shows runnable code
    assert len(skipped) <= 3, skipped  # few blocks may opt out, each with its reason


@pytest.mark.parametrize("doc", [p for p in DOCS if blocks(p)], ids=lambda p: p.name)
def test_every_python_block_runs(doc, hub, tmp_path):
    script = io.StringIO()
    script.write("import torch\ntorch.set_num_threads(1)\n")
    for number, (marker, code) in enumerate(blocks(doc), 1):
        if marker and marker.startswith("skip"):
            continue
        script.write(f"print('--- block {number}', flush=True)\n{code}\n")
    (tmp_path / "doc_blocks.py").write_text(script.getvalue())
    env = hub.env(tmp_path / "hf", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # the blocks see the installed package only, as a user does
    result = subprocess.run([sys.executable, "doc_blocks.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    ran = re.findall(r"--- block (\d+)", result.stdout)
    assert result.returncode == 0, (f"{doc.name}: block {ran[-1] if ran else '?'} failed\n" + result.stderr[-5000:]
                                    + f"\nunhandled Hub requests: {hub.unhandled}")


def test_the_parameter_reference_is_generated_from_the_code():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_reference", ROOT / "docs" / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "reference.md").read_text() == module.reference(), (
        "docs/reference.md is stale: run python docs/make_reference.py")


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith(("http://", "https://")) and not (doc.parent / target).exists():
                broken.append(f"{doc.name}: {target}")
    assert not broken, broken
