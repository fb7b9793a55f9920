"""Analyzer metrics on constructed deltas with known answers, the adapter paths, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sparse_opd import SparseDeltaConfig
from sparse_opd.analysis import analyze_delta, analyze_matrix
from sparse_opd.analysis import metrics as M
from tests.helpers.tiny_models import make_model

GEN = torch.Generator().manual_seed(0)


def share_of_one(m: int, n: int):
    """An energy share that is 1 in exact arithmetic, computed from float32 singular vectors of an m x n matrix: those
    are orthonormal only to about max(m, n) * eps32 (the backward error of LAPACK's SVD and of a symmetric eigensolver,
    with a constant of order 1 that depends on the CPU's kernels), and the share moves from 1 by as much (above 1 it is
    clipped). The tolerance is that bound, not the 1e-6 of pytest.approx that one CPU happened to meet."""
    return pytest.approx(1.0, rel=max(m, n) * torch.finfo(torch.float32).eps)


def _w(m=64, n=48):
    return torch.randn(m, n, generator=GEN)


def test_rank_r_delta_has_rank_r_and_all_energy_in_top_r():
    d = torch.randn(64, 3, generator=GEN) @ torch.randn(3, 48, generator=GEN)
    s = M.singular_values(d)
    assert M.numerical_rank(s) == 3
    assert M.top_k_energy(s, (2, 4))[4] == pytest.approx(1.0)
    assert M.top_k_energy(s, (2,))[2] < 1.0


def test_delta_inside_the_top_r_subspace_is_fully_aligned():
    w = _w()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    d = u[:, :4] @ torch.randn(4, 4, generator=GEN) @ vh[:4]
    align = M.subspace_alignment(u, vh.T, d, r=4)
    assert align["both"] == share_of_one(64, 48) and align["left"] == share_of_one(64, 48)


def test_isotropic_delta_aligns_at_its_random_expectation():
    w = torch.randn(256, 192, generator=GEN)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    align = M.subspace_alignment(u, vh.T, M.isotropic_like(torch.ones(256, 192), GEN), r=19)
    assert align["left"] == pytest.approx(align["expected_left"], rel=0.2)
    assert align["right"] == pytest.approx(align["expected_right"], rel=0.2)


def test_planted_sparse_delta_gives_exact_unchanged_fractions():
    d = torch.zeros(10, 10)
    d.view(-1)[:5] = 1e-6
    d.view(-1)[5:8] = 1e-3
    frac = M.fraction_unchanged(d)
    assert frac[0.0] == 0.92 and frac[1e-6] == 0.97 and frac[1e-5] == 0.97 and frac[1e-4] == 0.97


def test_sub_ulp_delta_is_changed_raw_and_invisible_in_bf16():
    w = torch.randn(32, 32, generator=GEN).to(torch.bfloat16).float()
    d = M.bf16_step(w) * 0.25
    assert M.fraction_unchanged(d)[0.0] == 0.0
    assert M.fraction_unchanged(M.bf16_visible(w, d))[0.0] == 1.0
    row = analyze_matrix("model.layers.0.mlp.up_proj", w, d)
    assert row["unchanged_half_step"] == 1.0 and row["unchanged_bf16_0"] == 1.0


def test_near_zero_lift_detects_changes_on_small_weights():
    w = torch.randn(100, 100, generator=GEN)
    small = w.abs() <= w.abs().reshape(-1).kthvalue(1000).values
    assert M.near_zero_lift(w, small.float(), "raw", 1e-5, (0.1,))[0.1] == pytest.approx(10.0)
    assert M.near_zero_lift(w, torch.ones_like(w), "raw", 1e-5, (0.1,))[0.1] == pytest.approx(1.0, rel=0.01)
    assert M.near_zero_lift(w, small.float(), "top", 0.5, (0.1,))[0.1] == pytest.approx(10.0)


def test_module_type_split_with_known_energies():
    up, q = "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    base = {up: torch.ones(8, 4), q: torch.ones(4, 4)}
    tuned = {up: torch.ones(8, 4) + 3.0, q: torch.ones(4, 4) + 1.0}
    report = analyze_delta(base, tuned, progress=False, rank_fraction=0.25)
    blocks = report.aggregates["by_block"]
    assert blocks["ffn"]["energy_share"] == pytest.approx(288 / 304)  # 32 entries moved by 3 against 16 moved by 1
    assert blocks["attention"]["energy_share"] == pytest.approx(16 / 304)
    assert blocks["ffn"]["entry_share"] == pytest.approx(2 / 3)
    assert blocks["attention"]["entry_share"] == pytest.approx(1 / 3)
    assert report.aggregates["global_rel_norm"] == pytest.approx((304 / 48) ** 0.5)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["sparse_delta", "lora"])
def test_adapter_deltas_equal_the_merged_model_diff(tmp_path, method):
    model = make_model("gpt2" if method == "lora" else "llama")
    model.save_pretrained(tmp_path / "base")
    base_state = _state(model)
    if method == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
                            fan_in_fan_out=True)
    else:
        config = SparseDeltaConfig(mask_init="random", mask_density=0.05, init_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = _state(peft_model.merge_and_unload())
    from_adapter = analyze_delta(tmp_path / "base", tmp_path / "adapter", progress=False)
    from_merged = analyze_delta(base_state, merged, progress=False)
    rows = {r["name"]: r for r in from_merged.rows if r["d_energy"] > 0}
    assert {r["name"] for r in from_adapter.rows} == set(rows)
    for r in from_adapter.rows:
        assert r["d_energy"] == pytest.approx(rows[r["name"]]["d_energy"], rel=1e-5)
        assert r["unchanged_raw_0"] == pytest.approx(rows[r["name"]]["unchanged_raw_0"])


def test_bad_inputs_are_listed_not_fatal(tmp_path):
    base = {"a.weight": torch.ones(3, 3), "b.weight": torch.ones(3, 3), "c.weight": torch.ones(2, 2),
            "i.weight": torch.ones(2, 2, dtype=torch.int64)}
    tuned = {"a.weight": torch.ones(3, 3) * 2, "c.weight": torch.ones(3, 3),
             "i.weight": torch.ones(2, 2, dtype=torch.int64), "extra.weight": torch.ones(1, 1)}
    report = analyze_delta(base, tuned, progress=False)
    reasons = dict(report.skipped)
    assert [r["name"] for r in report.rows] == ["a"]
    assert "missing from the tuned" in reasons["b.weight"] and "shape" in reasons["c.weight"]
    assert "not floating point" in reasons["i.weight"] and "missing from the base" in reasons["extra.weight"]
    (tmp_path / "notpeft").mkdir()
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        from sparse_opd.analysis.sources import AdapterDeltas

        AdapterDeltas(base, tmp_path / "notpeft")


def test_cli_analyze_and_compare_write_reports_and_plots(tmp_path, capsys):
    from sparse_opd.cli import main

    model = make_model("llama")
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, SparseDeltaConfig(mask_init="near_zero", mask_density=0.05, init_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "adapter"), "--out", str(tmp_path / "r")]) == 0
    for name in ("report.json", "report.md", "energy_by_type.png", "spectra.png", "sparsity_by_precision.png"):
        assert (tmp_path / "r" / name).is_file(), name
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["aggregates"]["unchanged"]["raw"]["0"] == pytest.approx(0.95, abs=0.01)
    assert data["aggregates"]["median"]["near_zero_lift_raw_q0.1"] > 5  # near-zero mask = the smallest weights
    assert "Source-subspace alignment by subspace size" in (tmp_path / "r" / "report.md").read_text()
    main(["compare", str(tmp_path / "r" / "report.json"), str(tmp_path / "r" / "report.json")])
    assert "FFN energy share" in capsys.readouterr().out
    main(["overlap", str(tmp_path / "adapter"), str(tmp_path / "adapter"), "--base", str(tmp_path / "base"),
          "--threshold", "0", "--json", str(tmp_path / "overlap.json")])
    total = json.loads((tmp_path / "overlap.json").read_text())["total"]
    assert total["intersection"] == total["size_a"] == total["size_b"] > 0
    assert total["jaccard_vs_null"] > 1  # identical deltas overlap more than two random ones
    assert "| total |" in capsys.readouterr().out
    main(["overlap", str(tmp_path / "adapter"), str(tmp_path / "adapter"), "--base", str(tmp_path / "base"),
          "--no-null", "--json", str(tmp_path / "overlap.json")])
    assert "null_jaccard" not in json.loads((tmp_path / "overlap.json").read_text())["total"]
    assert "Jaccard / that" not in capsys.readouterr().out


def test_gram_route_matches_lapack_for_large_matrices(monkeypatch):
    monkeypatch.setattr(M, "GRAM_ABOVE", 100)
    d = torch.randn(300, 40, generator=GEN) @ torch.diag(torch.logspace(0, -2, 40))
    torch.testing.assert_close(M.singular_values(d), torch.linalg.svdvals(d.double()), rtol=1e-5, atol=1e-9)
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    for w in (d, d.T):
        ur, vr = M.top_singular_subspaces(w, 5)
        ref_u, ref_v = (u, vh.T) if w is d else (vh.T, u)
        assert (ur.double().T @ ref_u[:, :5]).abs().diag().min() > 0.999
        assert (vr.double().T @ ref_v[:, :5]).abs().diag().min() > 0.999


def test_alignment_sweep_matches_single_r_and_saturates_inside_the_subspace():
    w = _w(96, 80)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    d = u[:, :8] @ torch.randn(8, 8, generator=GEN) @ vh[:8]  # inside the top-8 subspaces
    sweep = M.alignment_sweep(u, vh.T, d, [1, 4, 8, 20])
    for r in (1, 4, 8, 20):
        single = M.subspace_alignment(u, vh.T, d, r)
        assert sweep[r] == pytest.approx(single)
    assert sweep[8]["both"] == share_of_one(96, 80) and sweep[20]["both"] == share_of_one(96, 80)
    assert sweep[1]["both"] < sweep[4]["both"] < 1.0
    assert all(0.0 <= sweep[r][k] <= 1.0 for r in sweep for k in ("left", "right", "both")), "a share above 1"
    row = analyze_matrix("model.layers.0.mlp.up_proj", w, d * 1e-3)
    assert row["align_both_f0.1"] == share_of_one(96, 80)  # r = 8 = 0.1 * 80
    assert row["expected_align_both_f0.25"] == pytest.approx(20 * 20 / (96 * 80))


def test_numerical_rank_at_several_thresholds():
    u, _ = torch.linalg.qr(torch.randn(64, 4, generator=GEN))
    v, _ = torch.linalg.qr(torch.randn(48, 4, generator=GEN))
    d = u @ torch.diag(torch.tensor([1.0, 3e-3, 3e-4, 3e-5])) @ v.T  # one singular value per decade
    row = analyze_matrix("model.layers.0.mlp.up_proj", _w(), d)
    assert [row[f"rank_ratio_tau{t:g}"] * 48 for t in M.RANK_TAUS] == pytest.approx([1, 2, 3, 4])


def _planted(base, rows, value):
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.layers.0.mlp.up_proj.weight"][rows] += value
    return tuned


def test_delta_overlap_counts_shared_changes_against_the_random_expectation(tmp_path):
    from sparse_opd.analysis import delta_overlap, overlap_markdown

    base = {"model.layers.0.mlp.up_proj.weight": torch.ones(8, 10),
            "model.layers.0.self_attn.q_proj.weight": torch.ones(10, 10)}
    a = _planted(base, slice(0, 4), 1e-2)  # rows 0-3 changed: 40 entries
    b = _planted(base, slice(2, 6), 1e-2)  # rows 2-5: 40 entries, 20 shared
    result = delta_overlap(base, a, b)
    total = result["total"]
    assert (total.size_a, total.size_b, total.intersection) == (40, 40, 20)
    assert total.expected_intersection == pytest.approx(40 * 40 / 80)
    assert total.jaccard == pytest.approx(20 / 60) and result["by_block"]["ffn"].intersection == 20
    assert "| total | 40 | 40 | 20 |" in overlap_markdown(result)
    # 1e-4 on weights of 1.0 is below half a bf16 step (2^-8): changed as stored, invisible in bf16
    tiny = _planted(base, slice(0, 4), 1e-4)
    assert delta_overlap(base, tiny, b)["total"].size_a == 40
    assert delta_overlap(base, tiny, b, precision="bf16")["total"].size_a == 0
    with pytest.raises(ValueError, match="precision"):
        delta_overlap(base, a, b, precision="fp8")


def test_delta_overlap_null_is_the_chance_level_of_bf16_visibility():
    from sparse_opd.analysis import delta_overlap, overlap_markdown

    g = torch.Generator().manual_seed(0)
    # weights spanning four decades: in bf16 a small update shows only on the small ones, whatever the delta
    w = torch.randn(64, 256, generator=g) * torch.logspace(-4, 0, 256)
    base = {"model.layers.0.mlp.up_proj.weight": w}

    def independent_delta(seed):
        return {k: v + 1e-4 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed))
                for k, v in base.items()}

    result = delta_overlap(base, independent_delta(1), independent_delta(2), threshold=0.0, precision="bf16")
    total = result["total"]
    assert total.jaccard_lift > 1.5  # uniform independence calls two unrelated deltas "overlapping"
    assert total.jaccard_vs_null == pytest.approx(1.0, abs=0.1)  # the precision-aware null does not
    assert "Jaccard / that" in overlap_markdown(result)
    without = delta_overlap(base, independent_delta(1), independent_delta(2), precision="bf16", null=False)["total"]
    assert without.null_jaccard is None and "null_jaccard" not in without.to_dict()


def test_delta_overlap_of_an_adapter_and_its_merged_checkpoint_is_total(tmp_path):
    from sparse_opd.analysis import delta_overlap

    model = make_model("llama")
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, SparseDeltaConfig(mask_init="random", mask_density=0.05, init_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = _state(peft_model.merge_and_unload())
    result = delta_overlap(tmp_path / "base", tmp_path / "adapter", merged, threshold=0.0)
    total = result["total"]
    assert total.size_a > 0 and total.intersection == total.size_a
    assert total.jaccard_lift > 10


def test_checkpoint_and_state_dict_paths_agree_and_leave_their_inputs_untouched(tmp_path):
    from safetensors.torch import load_file, save_file

    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(40, 30, generator=GEN)}
    tuned = {k: v + 1e-3 * torch.randn(v.shape, generator=GEN) for k, v in base.items()}
    kept = {k: v.clone() for k, v in tuned.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    from_files = analyze_delta(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", progress=False).rows[0]
    from_dicts = analyze_delta(base, tuned, progress=False).rows[0]
    assert from_files["d_energy"] == pytest.approx(from_dicts["d_energy"]) and from_files["d_energy"] > 0
    assert torch.equal(tuned["model.layers.0.mlp.up_proj.weight"], kept["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(load_file(tmp_path / "tuned.safetensors")["model.layers.0.mlp.up_proj.weight"],
                       kept["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("kind", ["gaussian", "mostly_zero", "few_levels"])
def test_abs_quantiles_are_exact_order_statistics(kind):
    w = torch.randn(300, 70, generator=GEN)
    w[0, :10] = 0.0  # ties and zeros
    if kind == "mostly_zero":  # one bucket holds 90% of the entries (a delta that left most weights alone)
        w = w * (torch.rand(w.shape, generator=GEN) < 0.1)
    elif kind == "few_levels":  # a dequantized weight: many ties inside each bucket
        w = (w * 8).round() / 8 + 1e-3
    got = M.abs_quantiles(w, (0.001, 0.1, 0.25, 0.5, 0.9, 1.0))
    ordered = w.abs().reshape(-1).sort().values
    for q, value in got.items():
        assert value == ordered[max(1, math.ceil(q * w.numel())) - 1]


def test_near_zero_lift_of_the_largest_updates_sees_a_bias_that_a_dense_delta_hides():
    w = torch.randn(200, 100, generator=GEN)
    small = w.abs() <= w.abs().reshape(-1).kthvalue(2000).values  # bottom 10% of |W|
    d = 1e-3 * torch.randn(w.shape, generator=GEN).sign() * torch.where(small, 5.0, 1.0)  # every entry moves
    row = analyze_matrix("model.layers.0.mlp.up_proj", w, d)
    assert row["near_zero_lift_raw_q0.1"] == pytest.approx(1.0)  # all changed: the raw set cannot show the bias
    assert row["near_zero_lift_top10_q0.1"] == pytest.approx(10.0)  # the largest 10% are exactly the small weights
    assert 0.5 < row["near_zero_lift_null_top10_q0.1"] < 1.5


def test_streamed_elementwise_pass_is_exact_across_row_blocks(monkeypatch):
    monkeypatch.setattr(M, "CHUNK_ENTRIES", 7 * 10)  # 7 rows per block, the last one short
    w = torch.randn(30, 10, generator=GEN)
    d = torch.zeros(30, 10)
    d.view(-1)[:15] = 1e-6
    d.view(-1)[15:24] = 1e-3
    row = analyze_matrix("model.layers.0.mlp.up_proj", w, d)
    assert row["unchanged_raw_0"] == pytest.approx(276 / 300)
    assert row["unchanged_raw_1e-05"] == pytest.approx(291 / 300)
    assert row["unchanged_bf16_0"] == pytest.approx(float((M.bf16_visible(w, d) == 0).double().mean()))
    changed = d.abs() > 1e-5  # by hand, unstreamed: P(|W| <= Q_0.1(|W|) | changed) / 0.1
    q10 = w.abs().reshape(-1).sort().values[math.ceil(0.1 * w.numel()) - 1]
    lift = float((w.abs()[changed] <= q10).double().mean()) / 0.1
    assert row["near_zero_lift_raw_q0.1"] == pytest.approx(lift)
    # the null has d's norm: spread over 300 entries it stays below 1e-5 nowhere near as often as d does
    assert row["null_unchanged_raw_1e-05"] < row["unchanged_raw_1e-05"]
    tiny = analyze_matrix("model.layers.0.mlp.up_proj", w, d * 1e-6)
    assert tiny["null_unchanged_bf16_0"] == 1.0 and tiny["null_unchanged_raw_1e-05"] == 1.0
