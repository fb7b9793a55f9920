"""`SparseOPDTrainer.push_to_hub` against a local stand-in of the Hub (`tests/helpers/fake_hub.py`). Pushes and loads
run in subprocesses because huggingface_hub reads `HF_ENDPOINT` at import time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers.fake_hub import FakeHub

PUSH_SCRIPT = textwrap.dedent(
    """
    import sys
    from sparse_opd.tasks import arithmetic_dataset
    from sparse_opd.trainer import SparseOPDConfig, SparseOPDTrainer
    from tests.helpers.tiny_opd import tiny_llama, tiny_tokenizer

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


@pytest.mark.slow
def test_push_to_hub_sends_the_adapter_and_its_card(tmp_path):
    script = tmp_path / "push.py"
    script.write_text(PUSH_SCRIPT)
    out = tmp_path / "out"
    with FakeHub() as hub:
        env = hub.env(tmp_path / "hf")
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

    import sparse_opd  # noqa: F401
    from tests.helpers.tiny_opd import tiny_llama, tiny_tokenizer

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
    from tests.helpers.tiny_opd import tiny_llama, tiny_tokenizer

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
            result = subprocess.run([sys.executable, str(tmp_path / script), str(out)], env=env, capture_output=True,
                                    text=True, timeout=240, check=False)
            assert result.returncode == 0, f"{step}: " + result.stderr[-4000:] + f"\nunhandled: {hub.unhandled}"
    config = json.loads(hub.repos["me/tiny-sparse-opd"]["adapter_config.json"])
    assert config["base_model_name_or_path"] == "me/tiny-base"
    assert hub.card_metadata.get("base_model") == "me/tiny-base"
    max_diff = float(result.stdout.split("MAX_DIFF")[1])
    assert max_diff < 1e-5, max_diff
