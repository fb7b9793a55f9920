"""Markdown rendering of a `DeltaReport` and side-by-side comparisons."""

from __future__ import annotations

from . import keys as K


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def report_markdown(report) -> str:
    a = report.aggregates
    lines = [f"# Delta analysis: {report.source.get('tuned')} vs {report.source.get('base')}", "", "```",
             report.summary(), "```", "", "## Sparsity by precision mode", "",
             "| tau | unchanged raw | unchanged bf16-visible |", "|---:|---:|---:|"]
    for tau in a["unchanged"]["raw"]:
        lines.append(f"| {tau} | {a['unchanged']['raw'][tau]:.4f} | {a['unchanged']['bf16'][tau]:.4f} |")
    lines += ["", f"Entries whose update is below half a bf16 step of W: {a['unchanged_half_step']:.4f}", "",
              (f"The same-norm isotropic null: {a['null_unchanged']['raw_1e-05']:.4f} with |d| <= 1e-5 as stored, "
               f"{a['null_unchanged']['bf16_0']:.4f} invisible in bf16."), "",
              "## Medians beside their nulls", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in a["median"].items()]
    lines += ["", "## Spectral concentration (median energy share of the top-k singular values)", "",
              "| k | delta | null |", "|---:|---:|---:|"]
    lines += [f"| {k} | {v['delta']:.3f} | {v['null']:.3f} |" for k, v in a["top_energy_by_k"].items()]
    lines += ["", "## Numerical rank ratio by threshold (median; rank = #{s_i > tau s_1} / min(m, n))", "",
              "| tau | delta | null |", "|---:|---:|---:|"]
    lines += [f"| {t} | {v['delta']:.3f} | {v['null']:.3f} |" for t, v in a["rank_ratio_by_tau"].items()]
    lines += ["", ("## Source-subspace alignment by subspace size (median energy share; "
                   "r = max(1, int(fraction x min(m, n))), as in the paper's code)"), "",
              "| fraction | both | null | random expectation | left | null | expected | right | null | expected |",
              "|---:|" + "---:|" * 9]
    for f, v in a["alignment_by_fraction"].items():
        cells = [v[f"{who}{key}"] for key in ("both", "left", "right") for who in ("", "null_", "expected_")]
        lines.append(f"| {f} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    for key, title in (("by_block", "block"), ("by_type", "module type"), ("by_layer", "layer")):
        lines += ["", f"## Energy by {title}", "", f"| {title} | energy share | share of entries | relative norm |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {g} | {v['energy_share']:.3f} | {v.get('entry_share', 0.0):.3f} | {v['rel_norm']:.3e} |"
                  for g, v in a[key].items()]
    cols = ["name", "rel_norm", K.unchanged("raw", 1e-5), K.unchanged("bf16", 0), K.rank_ratio(), K.top_energy(16),
            K.top_energy(16, "null_"), K.align("both"), K.align("both", prefix="null_"), K.near_zero_lift("raw", 0.1),
            K.near_zero_lift("top10", 0.1)]
    lines += ["", "## Per matrix", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in report.rows]
    if report.skipped:
        lines += ["", "## Skipped", ""] + [f"- `{n}`: {r}" for n, r in report.skipped]
    return "\n".join(lines) + "\n"


def compare_markdown(named: dict[str, dict]) -> str:
    """``named``: label -> report.json contents. One row per headline number, one column per report."""
    labels = list(named)
    rows = [
        ("relative norm", lambda a: a["global_rel_norm"]),
        ("unchanged |d|<=1e-5 (raw)", lambda a: a["unchanged"]["raw"]["1e-05"]),
        ("invisible in bf16", lambda a: a["unchanged"]["bf16"]["0"]),
        ("invisible in bf16 (null)", lambda a: a.get("null_unchanged", {}).get("bf16_0", "")),
        ("FFN energy share", lambda a: a["by_block"].get("ffn", {}).get("energy_share", 0.0)),
        ("FFN share of entries", lambda a: a["by_block"].get("ffn", {}).get("entry_share", "")),
        ("median rank ratio", lambda a: a["median"][K.rank_ratio()]),
        ("median stable rank", lambda a: a["median"].get("stable_rank", "")),
        ("median stable rank (null)", lambda a: a["median"].get("null_stable_rank", "")),
        ("median top-16 energy", lambda a: a["median"][K.top_energy(16)]),
        ("median top-16 energy (null)", lambda a: a["median"][K.top_energy(16, "null_")]),
        ("median alignment both", lambda a: a["median"][K.align("both")]),
        ("median alignment both (null)", lambda a: a["median"][K.align("both", prefix="null_")]),
        ("near-zero lift q0.1 (raw)", lambda a: a["median"][K.near_zero_lift("raw", 0.1)]),
        ("near-zero lift q0.1 (largest 10% of updates)",
         lambda a: a["median"].get(K.near_zero_lift("top10", 0.1), "")),
        ("near-zero lift q0.1 (bf16-visible)", lambda a: a["median"][K.near_zero_lift("bf16", 0.1)]),
        ("near-zero lift q0.1 (null through bf16)", lambda a: a["median"][K.near_zero_lift("null_bf16", 0.1)]),
    ]
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for title, get in rows:
        lines.append(f"| {title} | " + " | ".join(_fmt(get(named[label]["aggregates"])) for label in labels) + " |")
    return "\n".join(lines) + "\n"
