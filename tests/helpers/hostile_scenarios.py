"""Scenarios of the fuzz battery beyond a damaged file: interrupted and refused saves, merged and tied weights,
adapters built from a config alone, modules_to_save (run by tests/helpers/hostile_files.py `run_all`).

Each scenario takes a fresh folder and returns ``(model, adapter, act)``: ``act()`` must raise a clear error and
leave ``model``'s tensors outside ``adapter`` untouched, or return a string saying what holds (an AssertionError when
what must hold does not). The comment above each names the item of issue 21 it guards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from sparse_opd import SparseDeltaConfig
from sparse_opd.masks import random_mask
from tests.helpers.tiny_models import make_model

TOKENS = torch.tensor([[1, 2, 3]])


def _adapter(seed: int = 0, scale: float = 0.02, **config):
    model = make_model("llama")
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=random_mask(model, density=0.1, seed=seed),
                                                         init_weights=False, **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "sparse_delta_values" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * scale)
    return peft_model


def _values(model, adapter: str = "default") -> dict:
    return {k.replace(f".{adapter}", ""): v.detach().clone() for k, v in model.state_dict().items()
            if f"sparse_delta_values.{adapter}" in k or f"modules_to_save.{adapter}." in k}


def _loads_as(folder: Path, expected: dict, **kwargs) -> None:
    loaded = PeftModel.from_pretrained(make_model("llama"), folder, **kwargs)
    got = _values(loaded)
    assert got.keys() == expected.keys(), "the folder loads as an adapter of other modules"
    assert all(torch.equal(got[k], expected[k]) for k in expected), "the folder loads as other values"
    leftovers = [n for n in os.listdir(folder) if n.startswith(".sparse-delta-")]
    assert not leftovers, f"leftovers after loading: {leftovers}"


# 21.3 ---------------------------------------------------------------------------------------------------------------
def killed_while_staging(folder: Path):
    previous = _adapter(seed=0)
    previous.save_pretrained(folder)
    staging = folder / ".sparse-delta-save-dead1"  # what a save killed before its commit leaves
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes()[:50])

    def act():
        _loads_as(folder, _values(previous))
        return "loads the previous adapter; the dead staging folder is removed"
    return None, "default", act


def killed_between_renames(folder: Path):
    _adapter(seed=0).save_pretrained(folder)
    new = _adapter(seed=1, scale=0.05)  # other coordinates: the config must change with the weights
    new.save_pretrained(folder.parent / f"{folder.name}-new")
    commit = folder / ".sparse-delta-commit-dead2"  # a save killed after its weights replaced the old ones
    commit.mkdir()
    for name in ("adapter_config.json", "README.md"):
        shutil.copy(folder.parent / f"{folder.name}-new" / name, commit / name)
    shutil.copy(folder.parent / f"{folder.name}-new" / "adapter_model.safetensors", folder)

    def act():
        _loads_as(folder, _values(new))
        return "loads the new adapter: the load finishes the killed save's commit"
    return None, "default", act


# 21.4 ---------------------------------------------------------------------------------------------------------------
def _refused_save(folder: Path, model, **save_kwargs):
    previous = _adapter(seed=0)
    previous.save_pretrained(folder)
    expected = _values(previous)

    def act():
        try:
            model.save_pretrained(folder, **save_kwargs)
        except ValueError:
            _loads_as(folder, expected)  # the previous adapter is kept
            raise
        raise AssertionError("save_pretrained wrote an adapter that no loader accepts")
    return model, "default", act


def save_with_a_nan_value(folder: Path):
    model = _adapter(seed=1)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "sparse_delta_values" in n)[0] = float("nan")
    return _refused_save(folder, model)


def save_overflowing_float16(folder: Path):
    model = _adapter(seed=1, save_dtype="float16")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "sparse_delta_values" in n)[0] = 1e5  # inf in float16
    return _refused_save(folder, model)


def save_bin_over_safetensors(folder: Path):
    _adapter(seed=0).save_pretrained(folder)
    new = _adapter(seed=1, scale=0.05)

    def act():
        new.save_pretrained(folder, safe_serialization=False)
        assert not (folder / "adapter_model.safetensors").exists(), "the stale .safetensors is still there"
        _loads_as(folder, _values(new))
        return "loads the new adapter from adapter_model.bin; the old .safetensors is gone"
    return new, "default", act


# 21.5 ---------------------------------------------------------------------------------------------------------------
def saved_while_merged(folder: Path):
    model = get_peft_model(make_model("llama"), SparseDeltaConfig(init_weights=False))  # the default: 1%
    model.merge_adapter()
    model.save_pretrained(folder)
    merged = model.merge_and_unload()  # the adapter's own merged checkpoint
    return merged, "default", lambda: PeftModel.from_pretrained(merged, folder)


# 21.6 ---------------------------------------------------------------------------------------------------------------
def tied_output_head(folder: Path):
    model = make_model("gpt2")  # lm_head.weight is transformer.wte.weight
    mask = {"lm_head": torch.tensor([1, 5, 9])}
    return model, "default", lambda: get_peft_model(model, SparseDeltaConfig(mask=mask, init_weights=False))


# 21.7 ---------------------------------------------------------------------------------------------------------------
def _placeholder(folder: Path):
    _adapter(seed=0).save_pretrained(folder)
    return get_peft_model(make_model("llama"), PeftConfig.from_pretrained(folder))  # coordinates never loaded


def placeholder_adapter_mask(folder: Path):
    from sparse_opd import adapter_mask

    model = _placeholder(folder)
    return model, "default", lambda: adapter_mask(model)


def placeholder_add_weighted_adapter(folder: Path):
    model = _placeholder(folder)
    return model, "default", lambda: model.add_weighted_adapter(["default"], [1.0], "mix")


def placeholder_merge_adapter(folder: Path):
    model = _placeholder(folder)
    return model, "default", model.merge_adapter


def placeholder_save(folder: Path):
    model = _placeholder(folder)
    return model, "default", lambda: model.save_pretrained(folder / "copy")


def add_weighted_adapter_nan_weight(folder: Path):
    model = _adapter(seed=0)
    return model, "mix", lambda: model.add_weighted_adapter(["default"], [float("nan")], "mix")


# 21.8 ---------------------------------------------------------------------------------------------------------------
def _with_head(folder: Path, edit, digest_follows: bool):
    _adapter(seed=0, modules_to_save=["lm_head"]).save_pretrained(folder)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors["base_model.model.lm_head.weight"])
    save_file(tensors, path, metadata={"format": "pt"})
    if digest_follows:  # a forger who recomputes the digest: the values themselves must still be checked
        from sparse_opd.tuner.loading import adapter_digest, state_entries

        config = json.loads((folder / "adapter_config.json").read_text())
        model = get_peft_model(make_model("llama"), PeftConfig.from_pretrained(folder))
        config["weights_digest"] = adapter_digest(state_entries(tensors, model, "default"))
        (folder / "adapter_config.json").write_text(json.dumps(config))


def _load_both_ways(folder: Path, how: str):
    model = make_model("llama")
    if how == "transformers":
        def act():
            model.load_adapter(str(folder))
            model(input_ids=TOKENS)
        return model, "default", act
    return model, "default", lambda: PeftModel.from_pretrained(model, folder)(input_ids=TOKENS)


def head_nan(how: str):
    def scenario(folder: Path):
        _with_head(folder, lambda t: t.__setitem__((0, 0), float("nan")), digest_follows=True)
        return _load_both_ways(folder, how)
    return scenario


def head_swapped(how: str):
    def scenario(folder: Path):
        _with_head(folder, lambda t: t.mul_(2), digest_follows=False)
        return _load_both_ways(folder, how)
    return scenario


# 21.10 --------------------------------------------------------------------------------------------------------------
def float64_low_cpu_mem_usage(folder: Path):
    good = _adapter(seed=0)
    good.save_pretrained(folder)
    path = folder / "adapter_model.safetensors"  # the same numbers in float64: the same adapter, the same digest
    tensors = {k: v.double() if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})

    def act():
        loaded = PeftModel.from_pretrained(make_model("llama"), folder, low_cpu_mem_usage=True)
        dtypes = {p.dtype for n, p in loaded.named_parameters() if "sparse_delta_values" in n}
        assert dtypes == {torch.float32}, f"values loaded as {dtypes}, the config says float32"
        _loads_as(folder, _values(good), low_cpu_mem_usage=True)
        return "float32 values, as the config says, equal to the file's"
    return None, "default", act


# scenarios that must end in their expected result (a clear error is a failure there)
MUST_SUCCEED = {"interrupted save: killed while staging (21.3)", "interrupted save: killed between its renames (21.3)",
                "save: safe_serialization=False over a .safetensors adapter (21.4)",
                "values: float64 file with low_cpu_mem_usage=True (21.10)"}


def scenarios() -> dict:
    return {
        "interrupted save: killed while staging (21.3)": killed_while_staging,
        "interrupted save: killed between its renames (21.3)": killed_between_renames,
        "save: a NaN value over a good adapter (21.4)": save_with_a_nan_value,
        "save: a value that overflows save_dtype float16 (21.4)": save_overflowing_float16,
        "save: safe_serialization=False over a .safetensors adapter (21.4)": save_bin_over_safetensors,
        "saved while merged, loaded onto its merged checkpoint (21.5)": saved_while_merged,
        "mask on GPT-2's tied output head (21.6)": tied_output_head,
        "config-only adapter: adapter_mask (21.7)": placeholder_adapter_mask,
        "config-only adapter: add_weighted_adapter (21.7)": placeholder_add_weighted_adapter,
        "config-only adapter: merge_adapter (21.7)": placeholder_merge_adapter,
        "config-only adapter: save_pretrained (21.7)": placeholder_save,
        "add_weighted_adapter with a NaN weight (21.7)": add_weighted_adapter_nan_weight,
        "modules_to_save: NaN head, digest recomputed [from_pretrained] (21.8)": head_nan("from_pretrained"),
        "modules_to_save: NaN head, digest recomputed [transformers] (21.8)": head_nan("transformers"),
        "modules_to_save: head changed, digest kept [from_pretrained] (21.8)": head_swapped("from_pretrained"),
        "modules_to_save: head changed, digest kept [transformers] (21.8)": head_swapped("transformers"),
        "values: float64 file with low_cpu_mem_usage=True (21.10)": float64_low_cpu_mem_usage,
    }
