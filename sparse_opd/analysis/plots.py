"""PNG plots of a report: energy by module type, per-layer relative norm, singular spectra, sparsity by precision."""

from __future__ import annotations

import os


def write_plots(report: dict, out_dir: str, spectra: int = 4) -> list[str]:
    """``report``: the dict of `DeltaReport.to_dict()`. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, rows, paths = report["aggregates"], report["rows"], []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    types = list(a["by_type"])
    ax.bar(types, [a["by_type"][t]["energy_share"] for t in types])
    ax.set_ylabel("share of update energy")
    ax.set_title("Update energy by module type")
    save(fig, "energy_by_type.png")

    layers = [g for g in a["by_layer"] if g != "None"]
    if layers:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([int(g) for g in layers], [a["by_layer"][g]["rel_norm"] for g in layers], marker="o")
        ax.set_xlabel("layer")
        ax.set_ylabel("||D|| / ||W||")
        ax.set_title("Relative update norm by layer")
        save(fig, "rel_norm_by_layer.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for row in sorted(rows, key=lambda r: -r["d_energy"])[:spectra]:
        s = row["spectrum"]
        if s and s[0] > 0:
            ax.semilogy(range(1, len(s) + 1), [x / s[0] for x in s], label=row["name"].split(".", 2)[-1])
    ax.set_xlabel("index")
    ax.set_ylabel("s_i / s_1")
    ax.set_title("Singular spectra of the largest deltas (top 64)")
    ax.legend(fontsize=7)
    save(fig, "spectra.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    taus = list(a["unchanged"]["raw"])
    x = range(len(taus))
    ax.bar([i - 0.2 for i in x], [a["unchanged"]["raw"][t] for t in taus], width=0.4, label="raw")
    ax.bar([i + 0.2 for i in x], [a["unchanged"]["bf16"][t] for t in taus], width=0.4, label="bf16-visible")
    ax.set_xticks(list(x), taus)
    ax.set_xlabel("tau")
    ax.set_ylabel("fraction |D| <= tau")
    ax.set_title("Sparsity by precision mode")
    ax.legend()
    save(fig, "sparsity_by_precision.png")
    return paths
