"""PNG plots of scaling fits and plans (matplotlib, Agg backend; files written atomically)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, out_png, xlabel: str, ylabel: str, title: str) -> Path:
    """Log-log axes, labels, legend and grid, then the PNG written atomically; the figure closed."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    try:
        return _save(fig, out_png)
    finally:
        plt.close(fig)


def _save(fig, out_png) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _title(fit_result: dict, text: str) -> str:
    r2 = fit_result.get("r2")
    t = text + (f"   R² (log loss) = {r2:.4f}" if r2 is not None else "")
    if (fit_result.get("flags") or {}).get("demonstration"):
        t += "\n[demonstration, not an estimate: " + "; ".join(fit_result["flags"]["reasons"])[:120] + "]"
    return t


def plot_fit(points: list[dict], fit_result: dict, out_png) -> Path:
    """Loss vs N (points coloured by D) with the fitted lines; L vs D when the data has no N."""
    plt = _figure()
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(7, 5))
    form = fit_result.get("form")
    xvar = "N" if any("N" in p for p in points) else "D" if any("D" in p for p in points) else "C"
    pts = [p for p in points if xvar in p]
    x = np.array([p[xvar] for p in pts])
    y = np.array([p["loss"] for p in pts])
    has_d = xvar == "N" and pts and all("D" in p for p in pts) and len({p["D"] for p in pts}) > 1
    cmap = plt.get_cmap("viridis")
    if has_d:
        d = np.array([p["D"] for p in pts])
        norm = LogNorm(d.min(), d.max())
        sc = ax.scatter(x, y, c=d, cmap=cmap, norm=norm, s=22, zorder=3)
        fig.colorbar(sc, ax=ax, label="tokens D")
    else:
        ax.scatter(x, y, color="k", s=22, zorder=3, label="measured")
    xs = np.logspace(np.log10(x.min()) - 0.1, np.log10(x.max()) + 0.1, 200)
    p = fit_result.get("params", {})
    if form == "chinchilla" and xvar == "N":
        ds = sorted({pt["D"] for pt in pts})
        if len(ds) > 8:
            ds = list(np.quantile(ds, [0, 0.25, 0.5, 0.75, 1.0]))
        for dv in ds:
            col = cmap(norm(dv)) if has_d else "C0"
            ax.plot(xs, p["E"] + p["A"] / xs ** p["alpha"] + p["B"] / dv ** p["beta"], color=col, lw=1.2)
        ax.axhline(p["E"], color="gray", ls=":", lw=1, label=f"E = {p['E']:.3g}")
        text = f"L = {p['E']:.3g} + {p['A']:.3g}/N^{p['alpha']:.3f} + {p['B']:.3g}/D^{p['beta']:.3f}"
    elif form == "kaplan" or (form or "").startswith("kaplan_"):
        alpha, xc = p.get(f"alpha_{xvar}"), p.get(f"{xvar}_c")
        text = f"L({xvar})"
        if alpha is not None and xc is not None:
            ax.plot(xs, (xc / xs) ** alpha, color="C3", lw=1.5,
                    label=f"L = ({xc:.3g}/{xvar})^{alpha:.3f}")
            text = f"L({xvar}) = ({xvar}_c/{xvar})^alpha_{xvar},  alpha_{xvar} = {alpha:.3f}"
    else:
        text = str(form)
    xlabel = {"N": "non-embedding parameters N", "D": "tokens D", "C": "compute C (FLOPs)"}[xvar]
    return _finish(plt, fig, ax, out_png, xlabel, "loss", _title(fit_result, text))


def plot_plan(fit_result: dict, out_png, compute: float | None = None, c_range=None) -> Path:
    """Compute-optimal frontier N_opt(C): ours (with bootstrap band), Chinchilla's published fit, 20x rule."""
    from .plan import CHINCHILLA_PAPER, compute_optimal

    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 5))
    if c_range is None:
        lo = ((fit_result.get("data_range") or {}).get("C") or [1e15, None])[0] or 1e15
        hi = max(compute or 0, lo * 1e6)
        c_range = (lo / 10, hi * 10)
    cs = np.logspace(np.log10(c_range[0]), np.log10(c_range[1]), 100)
    if fit_result.get("form") == "chinchilla":
        n, _ = compute_optimal(fit_result["params"], cs)
        ax.plot(cs, n, color="C0", lw=2, label="ours (Chinchilla-form fit)")
        samples = (fit_result.get("bootstrap") or {}).get("samples")
        if samples:
            S = {k: np.asarray([np.nan if v is None else v for v in samples[k]], dtype=float)[:, None]
                 for k in ("E", "A", "B", "alpha", "beta")}
            ns, _ = compute_optimal(S, cs[None, :])
            ax.fill_between(cs, np.nanpercentile(ns, 2.5, axis=0), np.nanpercentile(ns, 97.5, axis=0),
                            color="C0", alpha=0.2, label="ours, 95% bootstrap interval")
    n_paper, _ = compute_optimal(CHINCHILLA_PAPER, cs)
    ax.plot(cs, n_paper, color="C1", ls="--", label="Hoffmann et al. (2022), Approach 3")
    ax.plot(cs, np.sqrt(cs / 120.0), color="C2", ls=":", label="20 tokens per parameter")
    if compute:
        ax.axvline(compute, color="gray", lw=1, ls="-.", label=f"C = {compute:.3g}")
    return _finish(plt, fig, ax, out_png, "compute C = 6ND (FLOPs)", "compute-optimal parameters N_opt",
                   _title(fit_result, "compute-optimal frontier"))
