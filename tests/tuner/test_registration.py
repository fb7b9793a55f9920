"""Fails loudly if a PEFT upgrade breaks how SparseDelta plugs into PEFT's registries; proves that importing
sparse_opd leaves PEFT's other methods exactly as they are."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import sparse_opd
from sparse_opd.tuner.registration import add_peft_type, register


def test_sparse_delta_is_a_member_of_peft_type():
    member = PeftType("SPARSE_DELTA")
    assert member is PeftType.SPARSE_DELTA
    assert member in list(PeftType)
    assert member == "SPARSE_DELTA" and member.value == "SPARSE_DELTA"


def test_registries_map_sparse_delta_to_our_classes():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SPARSE_DELTA] is sparse_opd.SparseDeltaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SPARSE_DELTA] is sparse_opd.SparseDeltaModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SPARSE_DELTA] == "sparse_delta_"


def test_registration_is_idempotent():
    assert add_peft_type() is PeftType.SPARSE_DELTA
    register(sparse_opd.SparseDeltaConfig, sparse_opd.SparseDeltaModel)
    assert sum(1 for m in PeftType if m.value == "SPARSE_DELTA") == 1


def test_peft_config_dispatches_from_a_saved_config(tmp_path):
    config = sparse_opd.SparseDeltaConfig(module_counts={"lin": 3}, module_index_bytes={"lin": 4},
                                          module_shapes={"lin": [4, 4]})
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is sparse_opd.SparseDeltaConfig
    assert loaded.module_counts == {"lin": 3}
    assert "mask" not in json.loads((tmp_path / "adapter_config.json").read_text())


def test_model_card_says_how_to_load_the_adapter(tmp_path):
    from peft import get_peft_model

    from tests.helpers.tiny_models import make_model

    model = make_model("llama")
    config = sparse_opd.SparseDeltaConfig(mask={"model.layers.0.mlp.up_proj": torch.tensor([1, 5])})
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path)
    peft_model.save_pretrained(tmp_path)  # a second save must not duplicate the section
    card = (tmp_path / "README.md").read_text()
    assert card.count("## Loading this sparse-delta adapter") == 1
    assert "import sparse_opd" in card and "AutoPeftModelForCausalLM.from_pretrained" in card
    assert "2 fixed coordinates of 1 frozen weight" in card
    assert "library_name: peft" in card


def test_push_to_hub_uploads_weights_config_and_card_in_one_commit(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from peft import get_peft_model

    from tests.helpers.tiny_models import make_model

    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["repo"] = repo_id
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):

        calls["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        calls["kwargs"] = kwargs
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    model = make_model("llama")
    config = sparse_opd.SparseDeltaConfig(mask={"model.layers.0.mlp.up_proj": torch.tensor([1, 5])})
    peft_model = get_peft_model(model, config)
    assert peft_model.push_to_hub("me/sparse-adapter", commit_message="hi", tags=["my-tag"]) == "commit-url"
    assert calls["repo"] == "me/sparse-adapter"
    assert set(calls["files"]) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    assert b"import sparse_opd" in calls["files"]["README.md"]
    assert b"- my-tag" in calls["files"]["README.md"] and b"library_name: peft" in calls["files"]["README.md"]
    assert calls["kwargs"]["commit_message"] == "hi"


def test_only_sparse_delta_models_take_the_extended_save_and_push():
    from peft import PeftModel

    from sparse_opd.tuner.peft_model_hooks import is_sparse_delta

    assert PeftModel.save_pretrained._sparse_delta and PeftModel.push_to_hub._sparse_delta
    assert not is_sparse_delta(object())


LORA_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    if sys.argv[2] == "with":
        import sparse_opd  # noqa: F401
    from peft import LoraConfig, PeftModel, get_peft_model
    from tests.helpers.tiny_models import make_model

    out = Path(sys.argv[1])
    model = get_peft_model(make_model("llama"), LoraConfig(target_modules=["up_proj", "q_proj"],
                                                            init_lora_weights=False))
    model.save_pretrained(out / "saved")
    model.save_pretrained(out / "saved")  # a second save over the first
    model.save_pretrained(out / "bin", safe_serialization=False, selected_adapters=["default"])
    loaded = PeftModel.from_pretrained(make_model("llama"), out / "saved")
    with torch.no_grad():
        torch.save(loaded(input_ids=torch.arange(3, 15).view(2, 6)).logits, out / "logits.pt")
    broken = out / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((out / "saved" / "adapter_config.json").read_bytes())
    (broken / "adapter_model.safetensors").write_bytes((out / "saved" / "adapter_model.safetensors").read_bytes()[:99])
    try:
        PeftModel.from_pretrained(make_model("llama"), broken)
    except Exception as err:
        (out / "error.txt").write_text(f"{type(err).__name__}: {err}".replace(str(out), "OUT"))
    model.push_to_hub("me/lora-" + sys.argv[2], commit_message="lora adapter", tags=["my-tag"])
    """
)


def test_lora_loads_saves_and_pushes_as_with_peft_alone(tmp_path):
    """The same LoRA script in two fresh processes, with and without `import sparse_opd`: the saved files are
    byte-identical, the loaded model gives the same logits, a broken file raises the same error, and the push sends
    the same files (tags included) in the same commit."""
    from tests.helpers.fake_hub import FakeHub

    (tmp_path / "lora.py").write_text(LORA_SCRIPT)
    outs = {}
    with FakeHub() as hub:
        for variant in ("without", "with"):
            outs[variant] = tmp_path / variant
            env = hub.env(tmp_path / f"hf-{variant}")
            env["PYTHONHASHSEED"] = "0"  # PEFT writes target_modules from a set: the same order in both processes
            result = subprocess.run([sys.executable, str(tmp_path / "lora.py"), str(outs[variant]), variant], env=env,
                                    capture_output=True, text=True, timeout=240, check=False)
            assert result.returncode == 0, result.stderr[-3000:] + f"\nunhandled: {hub.unhandled}"
    a, b = outs["without"], outs["with"]
    for folder in ("saved", "bin"):
        names = sorted(p.name for p in (a / folder).iterdir())
        assert names == sorted(p.name for p in (b / folder).iterdir()) and "adapter_config.json" in names
        for name in names:
            assert (a / folder / name).read_bytes() == (b / folder / name).read_bytes(), f"{folder}/{name} differs"
    assert torch.equal(torch.load(a / "logits.pt"), torch.load(b / "logits.pt"))
    assert (a / "error.txt").read_text() == (b / "error.txt").read_text()
    assert hub.repos["me/lora-without"] == hub.repos["me/lora-with"]
    assert b"my-tag" in hub.repos["me/lora-with"]["README.md"]
    assert [c["summary"] for c in hub.commits] == ["lora adapter", "lora adapter"]
