"""Masks: checkpoint diffs (planted, fp32/bf16, single/sharded), budgets, priors, overlap, files, probe."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from sparse_opd import SparseDeltaConfig, SparseMask, adapter_mask
from sparse_opd.masks import allocate_budget, block_of, mask_overlap, near_zero_mask, random_mask
from sparse_opd.trainer.probe import ProbeCallback
from tests.helpers.tiny_models import make_model

UP = "model.layers.0.mlp.up_proj"
Q = "model.layers.1.self_attn.q_proj"


def _planted_pair(tmp_path, dtype, shard):
    """Save a base and a tuned copy with known changed coordinates; return (base_dir, tuned_dir, planted)."""
    model = make_model("llama", dtype=dtype)
    kwargs = {"max_shard_size": "20KB"} if shard else {}
    model.save_pretrained(tmp_path / "base", **kwargs)
    planted = {UP: torch.tensor([0, 17, 500, 2047]), Q: torch.tensor([3, 1000])}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, idx in planted.items():
            modules[name].weight.view(-1)[idx] += 0.01
    model.save_pretrained(tmp_path / "tuned", **kwargs)
    return tmp_path / "base", tmp_path / "tuned", planted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard", [False, True])
def test_planted_diff_is_recovered_exactly(tmp_path, dtype, shard):
    base, tuned, planted = _planted_pair(tmp_path, dtype, shard)
    if shard:
        assert len(list(base.glob("*.safetensors"))) > 1
    mask, report = SparseMask.from_diff(base, tuned, return_report=True)
    assert set(mask.modules()) == set(planted)
    for name, idx in planted.items():
        assert torch.equal(mask[name], idx)
        assert report.kept[name] == idx.numel()
    assert report.fraction(UP) == 4 / (64 * 32)
    assert "model.layers.0.self_attn.k_proj" in report.empty


def _sub_ulp_pair(tmp_path):
    """fp32 checkpoints differing by changes below half a bf16 step (and one visible change)."""
    model = make_model("llama")
    weight = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight.copy_(weight.to(torch.bfloat16).float())  # every base entry exactly representable in bf16
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        flat = weight.view(-1)
        ulp = flat[5].abs() * 2**-8
        flat[5] += ulp * 0.25  # invisible in bf16
        flat[9] += flat[9].abs() * 0.5  # visible
    model.save_pretrained(tmp_path / "tuned")
    return tmp_path / "base", tmp_path / "tuned"


def test_bf16_visible_mode_ignores_sub_ulp_changes_and_raw_keeps_them(tmp_path):
    base, tuned = _sub_ulp_pair(tmp_path)
    name = "model.layers.0.mlp.down_proj"
    raw = SparseMask.from_diff(base, tuned, mode="changed", precision="raw")
    visible = SparseMask.from_diff(base, tuned, mode="changed", precision="bf16")
    assert raw[name].tolist() == [5, 9]
    assert visible[name].tolist() == [9]


def test_relative_threshold_scales_with_weight_rms(tmp_path):
    base, tuned, planted = _planted_pair(tmp_path, torch.float32, False)
    loose = SparseMask.from_diff(base, tuned, threshold=1e-3, mode="rel")
    assert set(loose.modules()) == set(planted)
    # the planted change is 0.01 and the weights' rms is ~0.02: kept at 0.4 x rms, dropped at 0.6 x rms
    assert set(SparseMask.from_diff(base, tuned, threshold=0.4, mode="rel").modules()) == set(planted)
    with pytest.raises(ValueError, match="no coordinate changed"):
        SparseMask.from_diff(base, tuned, threshold=0.6, mode="rel")


def test_diff_errors_name_the_problem(tmp_path):
    base, tuned, _ = _planted_pair(tmp_path, torch.float32, False)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        SparseMask.from_diff(base, tuned, threshold=-1)
    with pytest.raises(ValueError, match="matches target_modules=\\['nope'\\]"):
        SparseMask.from_diff(base, tuned, target_modules=["nope"])
    other = make_model("qwen2")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="shape|missing"):
        SparseMask.from_diff(base, tmp_path / "other")
    tensors = load_file(tuned / "model.safetensors")
    del tensors[f"{UP}.weight"]
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing from the tuned one"):
        SparseMask.from_diff(base, tuned)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SparseMask.from_diff(tmp_path / "absent", tuned)


def test_budget_hits_exact_counts_and_weights_ffn_up():
    shapes = {"l.0.self_attn.q_proj": (64, 64), "l.0.mlp.up_proj": (128, 64), "l.0.mlp.down_proj": (64, 128)}
    counts = allocate_budget(shapes, total=1001, block_weights={"ffn": 2.0, "attention": 1.0})
    assert sum(counts.values()) == 1001
    dens = {n: counts[n] / math.prod(s) for n, s in shapes.items()}
    assert dens["l.0.mlp.up_proj"] == pytest.approx(2 * dens["l.0.self_attn.q_proj"], rel=0.01)
    capped = allocate_budget(shapes, total=4096 + 10000, block_weights={"ffn": 1.0, "attention": 100.0})
    assert capped["l.0.self_attn.q_proj"] == 4096 and sum(capped.values()) == 14096
    explicit = allocate_budget(shapes, module_densities=dict.fromkeys(shapes, 0.5))
    assert explicit == {n: math.prod(s) // 2 for n, s in shapes.items()}
    with pytest.raises(ValueError, match="density must be in"):
        allocate_budget(shapes, density=1.5)


def test_priors_respect_budget_and_pick_near_zero_weights():
    model = make_model("llama")
    near = near_zero_mask(model, density=0.05)
    rand = random_mask(model, density=0.05, seed=3)
    numel = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    assert near.count() == rand.count() == round(0.05 * numel)
    by_block = near.density_by("block")
    assert by_block["ffn"]["density"] > by_block["attention"]["density"]
    weight = model.model.layers[0].mlp.up_proj.weight.detach().abs().reshape(-1)
    chosen = torch.zeros_like(weight, dtype=torch.bool)
    chosen[near[UP]] = True
    assert weight[chosen].max() <= weight[~chosen].min()
    assert random_mask(model, density=0.05, seed=3) == rand


def test_overlap_matches_hand_computed_values():
    shapes = {"m.mlp.up_proj": (10, 10)}
    a = SparseMask({"m.mlp.up_proj": torch.arange(0, 20)}, shapes)  # 20 coordinates
    b = SparseMask({"m.mlp.up_proj": torch.arange(10, 50)}, shapes)  # 40, sharing 10
    o = mask_overlap(a, b)["total"]
    assert (o.intersection, o.jaccard, o.coverage_a, o.coverage_b) == (10, 10 / 50, 0.5, 0.25)
    assert o.overlap_coefficient == 0.5
    assert o.expected_intersection == pytest.approx(20 * 40 / 100)
    assert o.expected_jaccard == pytest.approx(8 / (60 - 8))
    assert o.coverage_a_lift == pytest.approx(0.5 / 0.4)
    assert a.union(b).count() == 50 and a.intersection(b).count() == 10
    c = SparseMask({"m.mlp.up_proj": torch.arange(5)}, {"m.mlp.up_proj": (5, 20)})
    with pytest.raises(ValueError, match="different shapes"):
        mask_overlap(a, c)


def test_density_by_type_block_and_layer():
    model = make_model("llama")
    mask = random_mask(model, density=0.1, block_weights="uniform")
    assert set(mask.density_by("type")) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert set(mask.density_by("layer")) == {"0", "1"}
    shares = mask.density_by("block")
    assert sum(g["share"] for g in shares.values()) == pytest.approx(1.0)
    assert block_of("model.layers.0.mlp.gate_proj") == "ffn"


def test_mask_file_round_trip_and_peft_conversion(tmp_path):
    model = make_model("gpt2")
    mask = random_mask(model, density=0.03)
    mask.save(tmp_path / "m.safetensors")
    loaded = SparseMask.load(tmp_path / "m.safetensors")
    assert loaded == mask
    peft_model = get_peft_model(model, SparseDeltaConfig(mask=tmp_path / "m.safetensors"))
    assert adapter_mask(peft_model) == mask
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors mask file"):
        SparseMask.load(tmp_path / "bad.safetensors")


def test_probe_callback_ranks_coordinates_from_a_short_trainer_run(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    data = Dataset.from_dict({"input_ids": torch.randint(0, 97, (8, 12)).tolist()})
    data = data.map(lambda r: {"labels": r["input_ids"]})
    for statistic in ("update", "grad", "adam"):
        model = make_model("llama")
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        probe = ProbeCallback(statistic=statistic)
        args = TrainingArguments(output_dir=str(tmp_path / statistic), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no")
        Trainer(model=model, args=args, train_dataset=data, callbacks=[probe]).train()
        assert probe.steps == 3
        mask = probe.to_mask(density=0.02)
        assert mask.count() == round(0.02 * mask.numel())
        if statistic == "update":  # the kept coordinates are exactly the largest cumulative updates
            moved = (model.model.layers[0].mlp.up_proj.weight.detach() - start[f"{UP}.weight"]).abs().reshape(-1)
            kept = torch.zeros_like(moved, dtype=torch.bool)
            kept[mask[UP]] = True
            assert moved[kept].min() >= moved[~kept].max()
    with pytest.raises(ValueError, match="statistic must be one of"):
        ProbeCallback(statistic="fisher")


def test_cli_diff_stats_overlap_and_combine(tmp_path, capsys):
    from sparse_opd.cli import main

    base, tuned, planted = _planted_pair(tmp_path, torch.float32, True)
    assert main(["mask", "diff", str(base), str(tuned), "--out", str(tmp_path / "d.safetensors"),
                 "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["total_fraction"] > 0
    assert SparseMask.load(tmp_path / "d.safetensors").count() == 6
    main(["mask", "stats", str(tmp_path / "d.safetensors"), "--by", "type"])
    out = capsys.readouterr().out
    assert "| up | 4 |" in out and "| q | 2 |" in out
    main(["overlap", str(tmp_path / "d.safetensors"), str(tmp_path / "d.safetensors")])
    assert "| jaccard | 1.0000 |" in capsys.readouterr().out
    main(["overlap", str(tmp_path / "d.safetensors"), str(tmp_path / "d.safetensors"), "--json"])
    assert json.loads(capsys.readouterr().out)["total"]["jaccard"] == 1.0
    main(["mask", "combine", str(tmp_path / "d.safetensors"), str(tmp_path / "d.safetensors"), "--op",
          "intersection", "--out", str(tmp_path / "i.safetensors")])
    assert SparseMask.load(tmp_path / "i.safetensors") == SparseMask.load(tmp_path / "d.safetensors")


@pytest.mark.parametrize("precision", ["raw", "bf16"])
def test_the_diff_mask_and_the_analyzer_share_one_change_rule(precision):
    from sparse_opd.analysis import metrics
    from sparse_opd.masks.changes import changed_entries, delta_of
    from sparse_opd.masks.diff import changed_coordinates

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, 8, generator=gen)
    steps = torch.tensor([0.0, 5e-6, 1.5e-5, 1e-4, 1e-2])  # below, at and above the threshold and a bf16 step
    signs = torch.sign(torch.randn(16, 8, generator=gen))
    tuned = base + steps[torch.randint(0, 5, base.shape, generator=gen)] * signs
    rule = changed_entries(base, delta_of(base, tuned), 1e-5, precision)
    assert 0 < int(rule.sum()) < base.numel()
    from_diff = changed_coordinates(base, tuned, 1e-5, "abs", precision)
    from_analyzer = torch.nonzero(metrics.changed_entries(base, tuned - base, precision, 1e-5).reshape(-1))[:, 0]
    expected = torch.nonzero(rule.reshape(-1))[:, 0]
    assert torch.equal(from_diff, expected) and torch.equal(from_analyzer, expected)
    if precision == "bf16":  # sub-step updates are invisible in bf16: fewer entries than as stored
        assert int(rule.sum()) < int(changed_entries(base, tuned - base, 1e-5, "raw").sum())
