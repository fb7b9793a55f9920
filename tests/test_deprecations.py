"""Old spellings keep working, each with a FutureWarning that names the new one."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from peft import get_peft_model
from tiny_models import make_model

from sparse_opd import SparseDeltaConfig, SparseMask, adapter_mask
from sparse_opd.masks import random_mask


def test_old_sparse_delta_config_names_map_to_the_new_ones():
    with pytest.warns(FutureWarning, match="near_zero.*mask_density.*mask_block_weights"):
        config = SparseDeltaConfig(mask_init="magnitude", density=0.05, block_weights="uniform")
    assert (config.mask_init, config.mask_density, config.mask_block_weights) == ("near_zero", 0.05, "uniform")
    assert "density" not in config.to_dict() and "block_weights" not in config.to_dict()


def test_an_adapter_config_saved_with_the_old_names_loads_silently(recwarn):
    saved = {"mask_init": "magnitude", "density": 0.05, "module_counts": {"a": 3}, "module_index_bytes": {"a": 4}}
    config = SparseDeltaConfig(**saved)
    assert config.mask_init is None and config.mask_density == 0.05
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_sparse_mask_from_peft_model_still_reads_an_adapter():
    model = make_model("llama")
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=random_mask(model, density=0.1)))
    with pytest.warns(FutureWarning, match="adapter_mask"):
        assert SparseMask.from_peft_model(peft_model) == adapter_mask(peft_model)


def test_dense_opd_trainer_and_the_models_module_are_renamed():
    from sparse_opd.trainer import DenseOPDTrainer, OPDTrainer

    assert issubclass(DenseOPDTrainer, OPDTrainer)
    sys.modules.pop("sparse_opd.models", None)
    with pytest.warns(FutureWarning, match="sparse_opd.embedded"):
        module = importlib.import_module("sparse_opd.models")
    from sparse_opd import embedded

    assert module.resolve_model_path is embedded.resolve_model_path


def test_old_cli_spellings(tmp_path, capsys):
    from sparse_opd.cli import main

    model = make_model("llama")
    mask = random_mask(model, density=0.1)
    mask.save(tmp_path / "m.safetensors")
    assert main(["mask", "overlap", str(tmp_path / "m.safetensors"), str(tmp_path / "m.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "| jaccard | 1.0000 |" in captured.out and "sparse-opd overlap A B" in captured.err
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=mask, init_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.warns(FutureWarning, match="--base BASE"):
        assert main(["overlap", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "adapter"),
                     "--no-null"]) == 0
    assert "| total |" in capsys.readouterr().out
    tuned = make_model("llama")
    with torch.no_grad():
        tuned.model.layers[0].mlp.up_proj.weight.view(-1)[:3] += 1.0
    tuned.save_pretrained(tmp_path / "tuned")
    with pytest.warns(FutureWarning, match="--json"):
        assert main(["mask", "diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--out",
                     str(tmp_path / "d.safetensors"), "--report", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "r.json").is_file()
