"""Bad input gets a clear error naming the module and the problem; nothing is half-applied."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from sparse_opd import SparseDeltaConfig
from sparse_opd.masks import random_mask
from tests.helpers.tiny_models import make_model

UP = "model.layers.0.mlp.up_proj"


def test_mask_naming_a_missing_module():
    model = make_model("llama")
    with pytest.raises(ValueError, match="not linear layers of this model.*model.layers.9.mlp.up_proj"):
        get_peft_model(model, SparseDeltaConfig(mask={"model.layers.9.mlp.up_proj": torch.tensor([1, 2])}))


def test_mask_naming_an_unsupported_layer():
    model = make_model("llama")
    with pytest.raises(ValueError, match="model.embed_tokens"):
        get_peft_model(model, SparseDeltaConfig(mask={"model.embed_tokens": torch.tensor([1, 2])}))


def test_boolean_mask_of_the_wrong_shape():
    model = make_model("llama")
    with pytest.raises(ValueError, match=f"{UP}: boolean mask has shape \\(3, 3\\)"):
        get_peft_model(model, SparseDeltaConfig(mask={UP: torch.ones(3, 3, dtype=torch.bool)}))


@pytest.mark.parametrize(
    "indices, message",
    [
        (torch.tensor([0, 64 * 32]), "must lie in \\[0, 2048\\)"),
        (torch.tensor([-1, 3]), "must lie in"),
        (torch.tensor([5, 5, 7]), "1 duplicated"),
        (torch.tensor([], dtype=torch.long), "selects no coordinate"),
        (torch.tensor([0.5, 1.0]), "integer tensor"),
    ],
)
def test_bad_flat_indices(indices, message):
    model = make_model("llama")
    with pytest.raises((ValueError, TypeError), match=message):
        get_peft_model(model, SparseDeltaConfig(mask={UP: indices}))


def test_empty_mask_and_contradictory_coordinates():
    with pytest.raises(ValueError, match="mask is empty"):
        SparseDeltaConfig(mask={})
    with pytest.raises(ValueError, match="not both"):
        SparseDeltaConfig(mask={UP: torch.tensor([0, 1])}, mask_init="random")
    with pytest.raises(ValueError, match="mask_density must be in"):
        SparseDeltaConfig(mask_init="near_zero", mask_density=0)


def test_mask_built_for_another_shape():
    other = make_model("qwen2")
    mask = random_mask(other, density=0.1)
    with pytest.raises(ValueError, match="shape"):
        get_peft_model(make_model("llama"), SparseDeltaConfig(mask={UP: mask.to_bool("model.layers.0.mlp.up_proj")}))


def _saved_adapter(tmp_path, model=None):
    model = model or make_model("llama")
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=random_mask(model, density=0.1), init_weights=False))
    peft_model.save_pretrained(tmp_path)
    return tmp_path / "adapter_model.safetensors"


def test_non_finite_values_in_the_adapter_file(tmp_path):
    path = _saved_adapter(tmp_path)
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("up_proj.sparse_delta_values"))
    tensors[key][3] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="up_proj: the adapter file holds 1 non-finite values"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_truncated_adapter_file_missing_a_module(tmp_path):
    path = _saved_adapter(tmp_path)
    tensors = {k: v for k, v in load_file(path).items() if "layers.1.mlp.down_proj" not in k}
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no sparse-delta indices for 1 module.*truncated"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_corrupted_index_stream(tmp_path):
    path = _saved_adapter(tmp_path)
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("up_proj.sparse_delta_index_stream"))
    tensors[key][0] = 9  # unknown encoding code
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="corrupted or foreign.*unknown index encoding"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_truncated_bytes_are_rejected(tmp_path):
    path = _saved_adapter(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(Exception, match="(?i)(incomplete|truncat|invalid|deserializ|metadata)"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_foreign_adapter_file_from_another_method(tmp_path):
    from peft import LoraConfig

    lora = get_peft_model(make_model("llama"), LoraConfig(target_modules=["up_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    _saved_adapter(tmp_path / "sd")
    (tmp_path / "sd" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "lora" / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="lora_A.weight, which is not a tensor of sparse-delta adapter 'default'"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path / "sd")


def test_loading_onto_a_different_base_model(tmp_path):
    _saved_adapter(tmp_path, make_model("llama", seed=0))
    with pytest.raises(ValueError, match="same shapes but different weights"):
        PeftModel.from_pretrained(make_model("llama", seed=1), tmp_path)


def test_loading_onto_a_base_with_other_shapes(tmp_path):
    _saved_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["base_model_fingerprint"]["shapes"] = "0" * 16
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="other adapted weights or shapes"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
