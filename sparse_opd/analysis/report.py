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
from . import keys as K
from . import metrics as M
from .sources import open_source

CHANGED_TAU = 1e-5  # the paper's "moved" threshold
# per-matrix numbers whose median across matrices the report shows beside their nulls
MEDIANS = (
    K.rank_ratio(), K.rank_ratio(prefix="null_"), "stable_rank", "null_stable_rank", "effective_rank",
    "null_effective_rank", K.top_energy(16), K.top_energy(16, "null_"), K.align("both"),
    K.align("both", prefix="null_"),
    K.align("both", prefix="expected_"), K.near_zero_lift("raw", 0.1), K.near_zero_lift("top10", 0.1),
    K.near_zero_lift("null_top10", 0.1), K.near_zero_lift("bf16", 0.1), K.near_zero_lift("null_bf16", 0.1),
)


def _device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


NEAR_ZERO_QUANTILES = (0.1, 0.25, 0.5)


def _sparsity(w: torch.Tensor, d: torch.Tensor, null: torch.Tensor, rms: float) -> dict:
    """Unchanged fractions in the three precision modes, for the delta and (at the paper's thresholds) its null."""
    row = {}
    raw = M.fraction_unchanged(d, (*M.TAUS, 1e-3 * rms))
    for tau in M.TAUS:
        row[K.unchanged("raw", tau)] = raw[tau]
    row[K.UNCHANGED_REL] = raw[1e-3 * rms]
    for tau, value in M.fraction_unchanged_bf16(w, d).items():
        row[K.unchanged("bf16", tau)] = value
    row[K.UNCHANGED_HALF_STEP] = M.fraction_below_half_bf16_step(w, d)
    row[K.unchanged("raw", CHANGED_TAU, "null_")] = M.fraction_unchanged(null, (CHANGED_TAU,))[CHANGED_TAU]
    row[K.unchanged("bf16", 0, "null_")] = M.fraction_unchanged_bf16(w, null, (0.0,))[0.0]
    return row


def _near_zero_lifts(w: torch.Tensor, d: torch.Tensor, null: torch.Tensor) -> dict:
    """Near-zero lift of six change sets: ``|D| > 1e-5`` (raw), bf16-visible (bf16), the largest 10% of ``|D|``
    (top10: still informative when nearly every entry moved), and the same three for the null."""
    thresholds = M.abs_quantiles(w, NEAR_ZERO_QUANTILES)
    row = {}
    for prefix, delta in (("", d), ("null_", null)):
        top10 = M.abs_quantiles(delta, (0.9,))[0.9]
        for label, rule, threshold in (("raw", "raw", CHANGED_TAU), ("bf16", "bf16", 0.0), ("top10", "top", top10)):
            lifts = M.near_zero_lift(w, delta, rule, threshold, NEAR_ZERO_QUANTILES, thresholds)
            for q, lift in lifts.items():
                row[K.near_zero_lift(prefix + label, q)] = lift
    return row


def _spectrum_and_alignment(row: dict, w: torch.Tensor, d: torch.Tensor, null: torch.Tensor, rank_fraction: float,
                            device: str) -> None:
    m, n = w.shape
    r = M.subspace_size(rank_fraction, m, n)
    sweep = {f: M.subspace_size(f, m, n) for f in M.ALIGN_FRACTIONS}
    row[K.align_r()] = r
    row.update({K.align_r(f): rf for f, rf in sweep.items()})
    ranks = sorted({r, *sweep.values()})
    u, v = M.top_singular_subspaces(w.to(device), max(ranks))
    for prefix, delta in (("", d), ("null_", null)):
        delta = delta.to(device)
        s = M.singular_values(delta)
        row[f"{prefix}rank"] = M.numerical_rank(s)
        row[K.rank_ratio(prefix=prefix)] = row[f"{prefix}rank"] / min(m, n)
        for tau in M.RANK_TAUS:
            row[K.rank_ratio(tau, prefix)] = M.numerical_rank(s, tau) / min(m, n)
        row[f"{prefix}stable_rank"] = M.stable_rank(s)
        row[f"{prefix}effective_rank"] = M.effective_rank(s)
        for k, share in M.top_k_energy(s).items():
            row[K.top_energy(k, prefix)] = share
        aligns = M.alignment_sweep(u, v, delta, ranks)
        expected = ("expected_",) if not prefix else ()
        for side in ("left", "right", "both"):
            for who in (prefix, *expected):
                key = side if who == prefix else f"expected_{side}"
                row[K.align(side, prefix=who)] = aligns[r][key]
                for fraction, rf in sweep.items():
                    row[K.align(side, fraction, who)] = aligns[rf][key]
        if not prefix:
            row["spectrum"] = [float(x) for x in s[:64].cpu()]
        del delta


def analyze_matrix(name: str, w: torch.Tensor, d: torch.Tensor, rank_fraction: float = 0.05, seed: int = 0,
                   device: str = "cpu") -> dict:
    """All per-matrix metrics of one delta as a flat, JSON-friendly dict (keys: `sparse_opd.analysis.keys`)."""
    m, n = w.shape
    row = {"name": name, "module_type": module_type(name), "block": block_of(name), "layer": layer_index(name),
           "rows": m, "cols": n, "numel": m * n, "w_energy": M.energy(w), "d_energy": M.energy(d),
           "rel_norm": M.relative_norm(w, d)}
    null = M.isotropic_like(d, torch.Generator().manual_seed(seed))  # same norm, same precision pipeline
    row.update(_sparsity(w, d, null, rms=(row["w_energy"] / (m * n)) ** 0.5))
    row.update(_near_zero_lifts(w, d, null))
    _spectrum_and_alignment(row, w, d, null, rank_fraction, device)
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
        # entry_share is the energy share an update of the same size on every entry would give: the null for
        # energy_share
        return {g: {"energy_share": energy[g] / total, "entry_share": numel[g] / total_numel,
                    "rel_norm": (energy[g] / w_energy[g]) ** 0.5 if w_energy[g] else 0.0,
                    "numel": numel[g]} for g in sorted(energy, key=lambda x: (len(x), x))}

    @property
    def aggregates(self) -> dict:
        if not self.rows:
            return {}
        numel = sum(r["numel"] for r in self.rows)

        def weighted(key):
            return sum(r[key] * r["numel"] for r in self.rows) / numel

        def med(key):
            return statistics.median(r[key] for r in self.rows)

        return {
            "matrices": len(self.rows),
            "global_rel_norm": (sum(r["d_energy"] for r in self.rows) / sum(r["w_energy"] for r in self.rows)) ** 0.5,
            "unchanged": {mode: {f"{tau:g}": weighted(K.unchanged(mode, tau)) for tau in M.TAUS}
                          for mode in ("raw", "bf16")},
            "unchanged_half_step": weighted(K.UNCHANGED_HALF_STEP),
            "null_unchanged": {"raw_1e-05": weighted(K.unchanged("raw", CHANGED_TAU, "null_")),
                               "bf16_0": weighted(K.unchanged("bf16", 0, "null_"))},
            "median": {k: med(k) for k in MEDIANS},
            "top_energy_by_k": {str(k): {"delta": med(K.top_energy(k)), "null": med(K.top_energy(k, "null_"))}
                                for k in M.TOP_KS},
            "rank_ratio_by_tau": {
                f"{tau:g}": {"delta": med(K.rank_ratio(tau)), "null": med(K.rank_ratio(tau, "null_"))}
                for tau in M.RANK_TAUS},
            "alignment_by_fraction": {
                f"{f:g}": {f"{who}{side}": med(K.align(side, f, who))
                           for who in ("", "null_", "expected_") for side in ("left", "right", "both")}
                for f in M.ALIGN_FRACTIONS},
            "by_block": self._group("block"),
            "by_type": self._group("module_type"),
            "by_layer": self._group("layer"),
        }

    def summary(self) -> str:
        a = self.aggregates
        if not a:
            return "no matrix analyzed"
        ffn = a["by_block"].get("ffn", {}).get("energy_share", 0.0)
        med = a["median"]
        return "\n".join([
            f"relative update norm {a['global_rel_norm']:.3e} over {a['matrices']} matrices",
            (f"entries with |delta| <= 1e-5: {a['unchanged']['raw']['1e-05']:.1%} raw "
             f"(null {a['null_unchanged']['raw_1e-05']:.1%}), {a['unchanged']['bf16']['0']:.1%} invisible in bf16 "
             f"(null {a['null_unchanged']['bf16_0']:.1%})"),
            (f"FFN share of update energy: {ffn:.1%} (FFN share of entries "
             f"{a['by_block'].get('ffn', {}).get('entry_share', 0.0):.1%})"),
            (f"median rank ratio {med[K.rank_ratio()]:.2f} (null {med[K.rank_ratio(prefix='null_')]:.2f}); "
             f"median top-16 energy {med[K.top_energy(16)]:.1%} (null {med[K.top_energy(16, 'null_')]:.1%})"),
            (f"near-zero lift (bottom 10% of |W|): {med[K.near_zero_lift('raw', 0.1)]:.2f} raw, "
             f"{med[K.near_zero_lift('top10', 0.1)]:.2f} for the largest 10% of updates, "
             f"{med[K.near_zero_lift('bf16', 0.1)]:.2f} bf16-visible (null through bf16 "
             f"{med[K.near_zero_lift('null_bf16', 0.1)]:.2f})"),
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

    def save(self, out_dir: str, plots: bool = True) -> list[str]:
        """Write ``report.json``, ``report.md`` and (``plots=True``) the PNG plots to ``out_dir``; returns the
        paths."""
        import os

        os.makedirs(out_dir, exist_ok=True)
        paths = [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")]
        self.to_json(paths[0])
        with open(paths[1], "w") as f:
            f.write(self.to_markdown())
        if plots and self.rows:
            from .plots import write_plots

            paths += write_plots(self.to_dict(), out_dir)
        return paths


def _count_nonfinite(x: torch.Tensor) -> int:
    return sum(int((~torch.isfinite(block)).sum()) for block in M.row_blocks(x))


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
    nonfinite = []
    for name, w, d in iterator:
        bad = _count_nonfinite(w) + _count_nonfinite(d)
        if bad:  # a diverged run: list it rather than stop the whole analysis in an SVD
            nonfinite.append((name, f"{bad} non-finite (NaN or inf) entries in the base or the delta"))
        else:
            report.rows.append(analyze_matrix(name.removesuffix(".weight"), w, d, rank_fraction, seed, device))
        del w, d
        release_freed_memory()
    report.skipped = list(source.skipped) + nonfinite
    if not report.rows:
        reasons = "; ".join(f"{n}: {r}" for n, r in report.skipped[:3]) or "no 2-D floating-point tensor in common"
        raise ValueError(f"no weight matrix of {report.source['tuned']} could be compared with "
                         f"{report.source['base']} ({reasons})")
    return report
