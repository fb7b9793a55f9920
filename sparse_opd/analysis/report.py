"""`analyze_delta`: per-matrix metrics in three precision modes, each spectral/alignment/near-zero number beside its
null (an isotropic delta of the same norm through the same pipeline), and aggregates by module type, block, layer."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..masks.module_types import block_of, layer_index, module_type
from ..memory import release_freed_memory
from . import metrics as M
from .sources import open_source

CHANGED_TAU = 1e-5  # the paper's "moved" threshold


def _device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _elementwise(w: torch.Tensor, d: torch.Tensor, null: torch.Tensor, rms: float) -> dict:
    """Sparsity in the three precision modes and the near-zero lift of six change sets, counted over row blocks so
    that no full-size intermediate is ever made. The change sets: ``|D| > 1e-5`` (raw), ``bf16(W + D) != bf16(W)``
    (bf16), the largest 10% of ``|D|`` (top10: still informative when nearly every entry moved), and the same three
    for the null."""
    thresholds = M.abs_quantiles(w)
    top10 = {"d": M.abs_quantiles(d, (0.9,))[0.9], "null": M.abs_quantiles(null, (0.9,))[0.9]}
    counts = defaultdict(int)
    for wc, dc, nc in zip(M.row_blocks(w), M.row_blocks(d), M.row_blocks(null)):
        wc, dc, nc = wc.float(), dc.float(), nc.float()
        a = dc.abs()
        visible = M.bf16_visible(wc, dc).abs()
        for tau in M.TAUS:
            counts[f"unchanged_raw_{tau:g}"] += int((a <= tau).sum())
            counts[f"unchanged_bf16_{tau:g}"] += int((visible <= tau).sum())
        counts["unchanged_rel_1e-3"] += int((a <= 1e-3 * rms).sum())
        counts["unchanged_half_step"] += int((a < 0.5 * M.bf16_step(wc)).sum())  # below half a bf16 step of W
        small = {q: wc.abs() <= t for q, t in thresholds.items()}
        changed = {"raw": a > CHANGED_TAU, "bf16": visible != 0, "top10": a > top10["d"],
                   "null_raw": nc.abs() > CHANGED_TAU, "null_bf16": M.bf16_visible(wc, nc) != 0,
                   "null_top10": nc.abs() > top10["null"]}
        for label, c in changed.items():
            counts[f"changed_{label}"] += int(c.sum())
            for q, below in small.items():
                counts[f"near_zero_{label}_q{q:g}"] += int((c & below).sum())
    numel = w.numel()
    out = {key: counts[key] / numel for key in counts if key.startswith("unchanged_")}
    # the same-norm isotropic null: how much of it would count as unchanged, as stored and through bf16
    out["null_unchanged_raw_1e-05"] = 1 - counts["changed_null_raw"] / numel
    out["null_unchanged_bf16_0"] = 1 - counts["changed_null_bf16"] / numel
    for label in ("raw", "bf16", "top10", "null_raw", "null_bf16", "null_top10"):
        total = counts[f"changed_{label}"]
        for q in thresholds:  # P(|W| <= Q_q | changed) / q; 1 = no bias
            out[f"near_zero_lift_{label}_q{q:g}"] = (
                counts[f"near_zero_{label}_q{q:g}"] / total / q if total else float("nan")
            )
    return out


def analyze_matrix(name: str, w: torch.Tensor, d: torch.Tensor, rank_fraction: float = 0.05, seed: int = 0,
                   device: str = "cpu") -> dict:
    """All per-matrix metrics of one delta as a flat, JSON-friendly dict."""
    m, n = w.shape
    row = {"name": name, "module_type": module_type(name), "block": block_of(name), "layer": layer_index(name),
           "rows": m, "cols": n, "numel": m * n,
           "w_energy": M.energy(w), "d_energy": M.energy(d)}
    row["rel_norm"] = (row["d_energy"] / row["w_energy"]) ** 0.5 if row["w_energy"] else float("nan")
    null = M.isotropic_like(d, torch.Generator().manual_seed(seed))  # same norm, same precision pipeline
    row.update(_elementwise(w, d, null, rms=(row["w_energy"] / (m * n)) ** 0.5))

    r = max(1, round(rank_fraction * min(m, n)))
    row["align_r"] = r
    sweep = {f: max(1, round(f * min(m, n))) for f in M.ALIGN_FRACTIONS}
    ranks = sorted({r, *sweep.values()})
    u, v = M.top_singular_subspaces(w.to(device), max(ranks))
    for label in ("", "null_"):
        delta = (null if label else d).to(device)
        s = M.singular_values(delta)
        row[f"{label}rank"] = M.numerical_rank(s)
        row[f"{label}rank_ratio"] = row[f"{label}rank"] / min(m, n)
        for tau in M.RANK_TAUS:
            row[f"{label}rank_ratio_tau{tau:g}"] = M.numerical_rank(s, tau) / min(m, n)
        row[f"{label}stable_rank"] = M.stable_rank(s)
        row[f"{label}effective_rank"] = M.effective_rank(s)
        for k, share in M.top_k_energy(s).items():
            row[f"{label}top{k}_energy"] = share
        aligns = M.alignment_sweep(u, v, delta, ranks)
        for key in ("left", "right", "both"):
            row[f"{label}align_{key}"] = aligns[r][key]
            for fraction, rf in sweep.items():
                row[f"{label}align_{key}_f{fraction:g}"] = aligns[rf][key]
        if not label:
            row["spectrum"] = [float(x) for x in s[:64].cpu()]
            for key in ("left", "right", "both"):
                row[f"expected_align_{key}"] = aligns[r][f"expected_{key}"]
                for fraction, rf in sweep.items():
                    row[f"expected_align_{key}_f{fraction:g}"] = aligns[rf][f"expected_{key}"]
        del delta
    return row


@dataclass
class DeltaReport:
    rows: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    source: dict = field(default_factory=dict)

    # aggregates ----------------------------------------------------------------------------------------------------
    def _group(self, key: str) -> dict:
        energy, w_energy, numel = defaultdict(float), defaultdict(float), defaultdict(int)
        for row in self.rows:
            g = str(row[key])
            energy[g] += row["d_energy"]
            w_energy[g] += row["w_energy"]
            numel[g] += row["numel"]
        total, total_numel = sum(energy.values()) or 1.0, sum(numel.values()) or 1
        # entry_share is the energy share an update of the same size on every entry would give: the null for energy_share
        return {g: {"energy_share": energy[g] / total, "entry_share": numel[g] / total_numel,
                    "rel_norm": (energy[g] / w_energy[g]) ** 0.5 if w_energy[g] else 0.0,
                    "numel": numel[g]} for g in sorted(energy, key=lambda x: (len(x), x))}

    @property
    def aggregates(self) -> dict:
        if not self.rows:
            return {}
        numel = sum(r["numel"] for r in self.rows)
        weighted = lambda key: sum(r[key] * r["numel"] for r in self.rows) / numel  # noqa: E731
        med = lambda key: statistics.median(r[key] for r in self.rows)  # noqa: E731
        out = {
            "matrices": len(self.rows),
            "global_rel_norm": (sum(r["d_energy"] for r in self.rows) / sum(r["w_energy"] for r in self.rows)) ** 0.5,
            "unchanged": {mode: {f"{tau:g}": weighted(f"unchanged_{mode}_{tau:g}") for tau in M.TAUS}
                          for mode in ("raw", "bf16")},
            "unchanged_half_step": weighted("unchanged_half_step"),
            "null_unchanged": {"raw_1e-05": weighted("null_unchanged_raw_1e-05"),
                               "bf16_0": weighted("null_unchanged_bf16_0")},
            "median": {k: med(k) for k in ("rank_ratio", "null_rank_ratio", "stable_rank", "null_stable_rank",
                                            "effective_rank", "null_effective_rank", "top16_energy", "null_top16_energy",
                                            "align_both", "null_align_both", "expected_align_both",
                                            "near_zero_lift_raw_q0.1", "near_zero_lift_top10_q0.1",
                                            "near_zero_lift_null_top10_q0.1", "near_zero_lift_bf16_q0.1",
                                            "near_zero_lift_null_bf16_q0.1")},
            "top_energy_by_k": {str(k): {"delta": med(f"top{k}_energy"), "null": med(f"null_top{k}_energy")}
                                for k in M.TOP_KS},
            "rank_ratio_by_tau": {f"{tau:g}": {"delta": med(f"rank_ratio_tau{tau:g}"),
                                               "null": med(f"null_rank_ratio_tau{tau:g}")} for tau in M.RANK_TAUS},
            "alignment_by_fraction": {
                f"{f:g}": {f"{who}{key}": med(f"{prefix}align_{key}_f{f:g}")
                           for who, prefix in (("", ""), ("null_", "null_"), ("expected_", "expected_"))
                           for key in ("left", "right", "both")}
                for f in M.ALIGN_FRACTIONS},
            "by_block": self._group("block"),
            "by_type": self._group("module_type"),
            "by_layer": self._group("layer"),
        }
        return out

    def summary(self) -> str:
        a = self.aggregates
        if not a:
            return "no matrix analyzed"
        ffn = a["by_block"].get("ffn", {}).get("energy_share", 0.0)
        return "\n".join([
            f"relative update norm {a['global_rel_norm']:.3e} over {a['matrices']} matrices",
            f"entries with |delta| <= 1e-5: {a['unchanged']['raw']['1e-05']:.1%} raw "
            f"(null {a['null_unchanged']['raw_1e-05']:.1%}), {a['unchanged']['bf16']['0']:.1%} invisible in bf16 "
            f"(null {a['null_unchanged']['bf16_0']:.1%})",
            f"FFN share of update energy: {ffn:.1%} (FFN share of entries "
            f"{a['by_block'].get('ffn', {}).get('entry_share', 0.0):.1%})",
            f"median rank ratio {a['median']['rank_ratio']:.2f} (null {a['median']['null_rank_ratio']:.2f}); "
            f"median top-16 energy {a['median']['top16_energy']:.1%} (null {a['median']['null_top16_energy']:.1%})",
            f"near-zero lift (bottom 10% of |W|): {a['median']['near_zero_lift_raw_q0.1']:.2f} raw, "
            f"{a['median']['near_zero_lift_top10_q0.1']:.2f} for the largest 10% of updates, "
            f"{a['median']['near_zero_lift_bf16_q0.1']:.2f} bf16-visible (null through bf16 "
            f"{a['median']['near_zero_lift_null_bf16_q0.1']:.2f})",
        ])

    # output ---------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"source": self.source, "aggregates": self.aggregates, "rows": self.rows,
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped]}

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def to_markdown(self) -> str:
        from .markdown import report_markdown

        return report_markdown(self)


def analyze_delta(base, tuned, *, rank_fraction: float = 0.05, seed: int = 0, device: str = "auto",
                  progress: bool = True) -> DeltaReport:
    """Analyze ``tuned - base``.

    ``base``: checkpoint (file, directory, Hub id) or state dict. ``tuned``: a checkpoint or state dict of the same
    architecture, or a PEFT adapter directory (sparse delta or LoRA; deltas are built per module from the file).
    """
    source = open_source(base, tuned)
    device = _device(device)
    report = DeltaReport(source={"base": str(base) if not isinstance(base, dict) else "<state dict>",
                                 "tuned": str(tuned) if not isinstance(tuned, dict) else "<state dict>",
                                 "kind": type(source).__name__})
    iterator = iter(source)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(source), desc="analyze", unit="matrix")
    for name, w, d in iterator:
        report.rows.append(analyze_matrix(name.removesuffix(".weight"), w, d, rank_fraction, seed, device))
        del w, d
        release_freed_memory()
    report.skipped = list(source.skipped)
    return report
