"""No file, however broken, corrupts a model or loads as something it is not; saving never leaves a broken pair."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from sparse_opd import SparseDeltaConfig, SparseMask
from sparse_opd.masks import random_mask
from tests.helpers import HELPERS
from tests.helpers.tiny_models import make_model


def _trained(model, seed=0, scale=0.02):
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=random_mask(model, density=0.1, seed=seed),
                                                         init_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "sparse_delta_values" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * scale)
    return peft_model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


def test_loading_over_a_merged_adapter_is_refused_and_changes_nothing(tmp_path):
    other = _trained(make_model("llama"), seed=1)
    other.save_pretrained(tmp_path / "other")
    model = _trained(make_model("llama"), seed=0)
    model.merge_adapter()
    before = _state(model)
    with pytest.raises(ValueError, match="merged into the base weights.*unmerge_adapter"):
        model.load_adapter(tmp_path / "other", adapter_name="default")
    _assert_unchanged(model, before)
    model.unmerge_adapter()
    plain = make_model("llama").state_dict()
    for key, value in model.get_base_model().state_dict().items():
        key = key.replace(".base_layer", "")
        if key in plain and "sparse_delta" not in key:
            assert torch.equal(value, plain[key]), f"{key}: unmerge did not restore the base exactly"


def test_a_failed_load_over_an_existing_adapter_leaves_it_whole(tmp_path):
    other = _trained(make_model("llama"), seed=1)
    other.save_pretrained(tmp_path / "other")
    tensors = load_file(tmp_path / "other" / "adapter_model.safetensors")
    key = max(k for k in tensors if k.endswith("sparse_delta_values"))  # the last module: a late failure
    tensors[key][0] = float("nan")
    save_file(tensors, tmp_path / "other" / "adapter_model.safetensors", metadata={"format": "pt"})
    model = _trained(make_model("llama"), seed=0)
    before = _state(model)
    with pytest.raises(ValueError):
        model.load_adapter(tmp_path / "other", adapter_name="default")
    _assert_unchanged(model, before)


def test_transformers_load_adapter_refuses_nan_or_missing_values_at_first_use(tmp_path, tokens):
    _trained(make_model("llama")).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    up = next(k for k in tensors if k.endswith("layers.0.mlp.up_proj.sparse_delta_values"))
    for case, edit in (("nan", lambda t: t[up].__setitem__(0, float("nan"))), ("missing", lambda t: t.pop(up))):
        edited = {k: v.clone() for k, v in tensors.items()}
        edit(edited)
        folder = tmp_path / case
        folder.mkdir()
        save_file(edited, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text((tmp_path / "adapter_config.json").read_text())
        model = make_model("llama")
        model.load_adapter(str(folder))
        with pytest.raises(RuntimeError, match="up_proj.*non-finite"):
            model(tokens)


def test_an_exception_while_saving_leaves_the_old_adapter_intact(tmp_path, monkeypatch, tokens):
    first = _trained(make_model("llama"), seed=0)
    first.save_pretrained(tmp_path)
    expected = PeftModel.from_pretrained(make_model("llama"), tmp_path)(tokens).logits
    from peft.config import PeftConfigMixin

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PeftConfigMixin, "save_pretrained", fail)  # fails after the new weights were written
    with pytest.raises(OSError, match="disk full"):
        _trained(make_model("llama"), seed=1, scale=0.5).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(PeftModel.from_pretrained(make_model("llama"), tmp_path)(tokens).logits, expected)


def test_a_save_killed_between_its_renames_is_finished_by_the_next_load(tmp_path, monkeypatch):
    _trained(make_model("llama"), seed=0).save_pretrained(tmp_path)
    new = _trained(make_model("llama"), seed=1, scale=0.5)
    expected = {k: v.clone() for k, v in new.state_dict().items() if "sparse_delta" in k}
    real_replace, moved = os.replace, []

    def replace_then_die(src, dst):
        if moved:  # the weights were replaced; the process dies before the config follows
            raise KeyboardInterrupt
        moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert moved and moved[0].endswith("adapter_model.safetensors")
    assert any(name.startswith(".sparse-delta-commit-") for name in os.listdir(tmp_path))
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items()), "the new adapter, exactly"
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_same_checkpoint_in_any_precision_matches_the_fingerprint_and_a_few_rounding_steps_off_does_not(
        tmp_path, dtype):
    """The fingerprint compares within one rounding step of the coarser dtype: the fp32 checkpoint rounded to
    ``dtype`` is the same base (and loads the saved values), the same weights scaled by 1 + 2^-(mantissa - 2), i.e.
    2 to 4 rounding steps of ``dtype``, are another base in that precision."""
    trained = _trained(make_model("llama"))
    trained.save_pretrained(tmp_path)
    saved = {k: v for k, v in trained.state_dict().items() if "sparse_delta_values" in k}
    loaded = PeftModel.from_pretrained(make_model("llama", dtype=dtype), tmp_path).state_dict()
    assert saved and all(torch.equal(loaded[k], v) for k, v in saved.items()), "the saved values, exactly"
    mantissa = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[dtype]
    nearby = make_model("llama")
    with torch.no_grad():
        for param in nearby.parameters():
            param.copy_(param.double() * (1 + 2.0 ** -(mantissa - 2)))
    with pytest.raises(ValueError, match="same shapes but different weights"):
        PeftModel.from_pretrained(nearby.to(dtype), tmp_path)


def test_other_weights_and_the_merged_checkpoint_are_refused(tmp_path):
    trained = _trained(make_model("llama"), scale=1e-3)
    trained.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="same shapes but different weights"):
        PeftModel.from_pretrained(make_model("llama", seed=1), tmp_path / "adapter")
    merged = trained.merge_and_unload()
    with pytest.raises(ValueError, match="already contains.*apply the delta twice"):
        PeftModel.from_pretrained(merged, tmp_path / "adapter")


def test_hostile_adapter_config_sizes_are_bounded_before_allocation(tmp_path):
    _trained(make_model("llama")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    module = next(iter(config["module_index_bytes"]))
    config["module_index_bytes"][module] = 2 * 1024**3  # a 3 KB config claiming a 2 GB stream
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="index stream.*corrupted"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100 * 1024, "more than 100 MiB allocated"


def test_mask_names_that_normalize_to_one_module_are_an_error():
    idx = torch.tensor([1, 2])
    for names in (("x", "x.weight"), ("x", "base_model.model.x"), ("a.b", "a.b.base_layer")):
        with pytest.raises(ValueError, match="name the same module"):
            SparseMask(dict.fromkeys(names, idx), dict.fromkeys(names, (4, 4)))
        with pytest.raises(ValueError, match="name the same module"):
            SparseMask.from_dict(dict.fromkeys(names, idx), {"x": (4, 4), "a.b": (4, 4)})


@pytest.mark.parametrize("shape", [(-4, 4), (0, 4), (4,), (2, 2, 2), ("a", 4)])
def test_bad_mask_shapes_are_an_error(shape):
    with pytest.raises(ValueError, match="shape"):
        SparseMask({"x": torch.tensor([0])}, {"x": shape})


def test_resaving_a_tiny_mask_that_claims_a_huge_shape_stays_small(tmp_path):
    mask = SparseMask({"x": torch.tensor([0, 7, 10**9])}, {"x": (50_000, 50_000)})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mask.save(tmp_path / "m.safetensors")
    assert SparseMask.load(tmp_path / "m.safetensors") == mask
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 50 * 1024, "a bitmap was built"
    assert os.path.getsize(tmp_path / "m.safetensors") < 1024


def test_concurrent_saves_into_one_folder_never_mix(tmp_path):
    """Two threads saving different adapters (other coordinates) into one folder 8 times each: the folder always
    ends as exactly one of them (commits are serialized by a lock on the folder)."""
    import threading

    models = [_trained(make_model("llama"), seed=s, scale=0.01 * (s + 1)) for s in (0, 1)]
    expected = [{k: v.clone() for k, v in m.state_dict().items() if "sparse_delta" in k} for m in models]
    errors = []

    def save(model):
        try:
            for _ in range(8):
                model.save_pretrained(tmp_path)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=save, args=(m,)) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    state = PeftModel.from_pretrained(make_model("llama"), tmp_path).state_dict()
    assert any(all(k in state and torch.equal(state[k], v) for k, v in e.items()) for e in expected)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".sparse-delta-")]


def test_an_oversized_adapter_config_is_refused_by_name(tmp_path):
    _trained(make_model("llama")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["padding"] = "x" * (17 << 20)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="adapter_config.json is 17 MiB.*limit 16 MiB"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_a_save_loop_killed_at_random_moments_always_loads(tmp_path):
    """60 SIGKILLs of a process saving adapters (two masks, alternating) in a loop, each at a random moment of a
    save: after every kill the folder loads as exactly the previous or the new version, with no leftovers
    (tests/helpers/save_kill_worker.py; ~10 s)."""
    worker = str(HELPERS / "save_kill_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, worker, str(tmp_path / "adapter"), "60", "0"], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["kills"] == 60 and sum(summary["loaded"][k] for k in ("previous", "new")) == 60


def test_saved_files_get_the_permissions_open_gives(tmp_path):
    _trained(make_model("llama")).save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["README.md", "adapter_config.json", "adapter_model.safetensors"], 0o666 & ~umask)
