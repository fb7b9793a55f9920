"""One rule for which weights a mask may cover: every mask source and the tuner pick the same modules."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import save_file

from sparse_opd import SparseDeltaConfig, SparseMask, adapter_mask
from sparse_opd.masks import near_zero_mask, random_mask
from sparse_opd.masks.targets import checkpoint_targets, linear_modules
from sparse_opd.trainer.probe import ProbeCallback
from tests.helpers.tiny_models import make_model

_LLAMA = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj"}
EXPECTED = {  # every linear layer of each block and nothing else (no embedding, no head)
    "llama": {f"model.layers.{i}.{m}" for i in range(2) for m in _LLAMA},
    "qwen2": {f"model.layers.{i}.{m}" for i in range(2) for m in _LLAMA},
    "gpt2": {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                    "mlp.c_proj")},
}


def _probe_modules(model) -> set[str]:
    probe = ProbeCallback()
    probe.on_train_begin(None, None, None, model=model)
    return set(probe.weights)


def _diff_modules(model, tmp_path, as_directory: bool) -> set[str]:
    tuned = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}  # every tensor changed
    if as_directory:
        model.save_pretrained(tmp_path / "base")
        save_file({k: v.contiguous() for k, v in tuned.items() if k in _saved(tmp_path / "base")},
                  tmp_path / "base" / "tuned.safetensors")
        model.save_pretrained(tmp_path / "tuned")
        (tmp_path / "tuned" / "model.safetensors").unlink()
        (tmp_path / "base" / "tuned.safetensors").rename(tmp_path / "tuned" / "model.safetensors")
        return set(SparseMask.from_diff(tmp_path / "base", tmp_path / "tuned").modules())
    plain = {k: v.contiguous() for k, v in model.state_dict().items() if k in _saved_names(model)}
    save_file(plain, tmp_path / "base.safetensors")
    save_file({k: tuned[k].contiguous() for k in plain}, tmp_path / "tuned.safetensors")
    return set(SparseMask.from_diff(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors").modules())


def _saved(folder) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def _saved_names(model) -> set[str]:  # state dict keys without tied duplicates (as a checkpoint holds them)
    seen, names = set(), set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            names.add(name)
    return names


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_every_mask_source_picks_the_same_default_modules(kind, tmp_path):
    model = make_model(kind)
    reference = set(linear_modules(model))
    assert reference == EXPECTED[kind]
    sources = {
        "near_zero_mask": set(near_zero_mask(model, density=0.1).modules()),
        "random_mask": set(random_mask(model, density=0.1).modules()),
        "ProbeCallback": _probe_modules(model),
        "SparseDeltaConfig()": set(adapter_mask(get_peft_model(make_model(kind), SparseDeltaConfig())).modules()),
        "from_diff (checkpoint directories)": _diff_modules(model, tmp_path, as_directory=True),
        "from_diff (bare safetensors files)": _diff_modules(model, tmp_path, as_directory=False),
    }
    for source, modules in sources.items():
        assert modules == reference, f"{source} picks {sorted(modules ^ reference)[:4]} differently"


def test_target_modules_follow_peft_matching_everywhere():
    model = make_model("llama")
    assert set(linear_modules(model, ["up_proj"])) == {f"model.layers.{i}.mlp.up_proj" for i in range(2)}
    assert set(linear_modules(model, r".*\.0\.mlp\..*")) == {f"model.layers.0.mlp.{p}" for p in
                                                            ("gate_proj", "up_proj", "down_proj")}
    assert "model.layers.0.mlp.up_proj" not in linear_modules(model, exclude_modules=["model.layers.0.mlp.up_proj"])
    assert set(near_zero_mask(model, density=0.1, target_modules=["up_proj"]).modules()) == set(
        linear_modules(model, ["up_proj"]))
    peft_model = get_peft_model(make_model("llama"), SparseDeltaConfig(target_modules=r".*\.0\.mlp\..*"))
    assert set(adapter_mask(peft_model).modules()) == set(linear_modules(model, r".*\.0\.mlp\..*"))
    shapes = {f"{n}.weight": (2, 2) for n in linear_modules(model)}
    assert set(checkpoint_targets(shapes, None, ["up_proj"])) == {
        f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)}
    with pytest.raises(ValueError, match="no linear layer matches"):
        linear_modules(model, ["nonexistent"])


def test_a_second_adapter_from_a_prior_targets_the_wrapped_layers():
    model = get_peft_model(make_model("llama"), SparseDeltaConfig(mask_init="random", mask_density=0.05))
    model.add_adapter("b", SparseDeltaConfig(mask_init="near_zero", mask_density=0.02))
    assert set(adapter_mask(model, "b").modules()) == set(adapter_mask(model, "default").modules())
    assert not any("base_layer" in name for name in adapter_mask(model, "b").modules())
    model.set_adapter("b")
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()
