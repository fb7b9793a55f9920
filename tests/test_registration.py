"""Fails loudly if a PEFT upgrade breaks how SparseDelta plugs into PEFT's registries."""

import json

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
    config = sparse_opd.SparseDeltaConfig(module_counts={"lin": 3}, module_shapes={"lin": [4, 4]})
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is sparse_opd.SparseDeltaConfig
    assert loaded.module_counts == {"lin": 3}
    assert "mask" not in json.loads((tmp_path / "adapter_config.json").read_text())


def test_model_card_says_how_to_load_the_adapter(tmp_path):
    import torch
    from peft import get_peft_model
    from tiny_models import make_model

    model = make_model("llama")
    peft_model = get_peft_model(model, sparse_opd.SparseDeltaConfig(mask={"model.layers.0.mlp.up_proj": torch.tensor([1, 5])}))
    peft_model.save_pretrained(tmp_path)
    peft_model.save_pretrained(tmp_path)  # a second save must not duplicate the section
    card = (tmp_path / "README.md").read_text()
    assert card.count("## Loading this sparse-delta adapter") == 1
    assert "import sparse_opd" in card and "AutoPeftModelForCausalLM.from_pretrained" in card
    assert "2 fixed coordinates of 1 frozen weight" in card
    assert "library_name: peft" in card


def test_push_to_hub_uploads_weights_config_and_card_in_one_commit(tmp_path, monkeypatch):
    import torch
    from huggingface_hub import HfApi
    from peft import get_peft_model
    from tiny_models import make_model

    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["repo"] = repo_id
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        calls["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        calls["kwargs"] = kwargs
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    model = make_model("llama")
    peft_model = get_peft_model(model, sparse_opd.SparseDeltaConfig(mask={"model.layers.0.mlp.up_proj": torch.tensor([1, 5])}))
    assert peft_model.push_to_hub("me/sparse-adapter", commit_message="hi") == "commit-url"
    assert calls["repo"] == "me/sparse-adapter"
    assert set(calls["files"]) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    assert b"import sparse_opd" in calls["files"]["README.md"]
    assert calls["kwargs"]["commit_message"] == "hi"
