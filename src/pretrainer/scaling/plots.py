"""PNG plots of scaling fits, plans and sweeps (readable ticks, titles and limits, atomic writes:
:mod:`pretrainer.plotting`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plotting import exponent, fit_ylim, flop_ticks, pyplot, save


def _figure():
    return pyplot()


def _finish(plt, fig, ax, out_png, xlabel: str, ylabel: str, title: str, ydata=None) -> Path:
    """Log-log axes, labels, legend and grid (y-limits on ``ydata`` when given: the measured
    points, not the curves; compute on x labelled 1e12, 1e15 ...), then the PNG
    (:func:`pretrainer.plotting.save`)."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    if xlabel.startswith("compute"):
        flop_ticks(ax.xaxis)
    if ydata is not None:
        fit_ylim(ax, ydata)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    return save(fig, out_png)


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
    ydata = None
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
        shown = p["E"] >= y.min() / 1.5  # else the line would squash the points against the top
        ax.axhline(p["E"], color="gray", ls=":", lw=1,
                   label=f"E = {p['E']:.3g}" + ("" if shown else " (below the plotted range)"))
        ydata = [*y, p["E"]] if shown else y
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
    return _finish(plt, fig, ax, out_png, xlabel, "loss", _title(fit_result, text),
                   ydata=y if ydata is None else ydata)


def plot_plan(fit_result: dict, out_png, compute: float | None = None, c_range=None, measured=None) -> Path:
    """Compute-optimal frontier N_opt(C): ours (with bootstrap band), Chinchilla's published fit, 20x rule;
    ``measured``: (C, N, label) points to show with it (a sweep's compute-efficient runs, IsoFLOP minima)."""
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
    for i, label in enumerate(dict.fromkeys(lab for _, _, lab in measured or ())):
        pts = [(c, n) for c, n, lab in measured if lab == label]
        ax.scatter(*zip(*pts), marker="os^"[i % 3], color=("k", "C3", "C4")[i % 3], s=24, zorder=4, label=label)
    if compute:
        ax.axvline(compute, color="gray", lw=1, ls="-.", label=f"C = {exponent(compute)}")
    return _finish(plt, fig, ax, out_png, "compute C = 6ND (FLOPs)", "compute-optimal parameters N_opt",
                   _title(fit_result, "compute-optimal frontier"))


# ----------------------------------------------------------------------------------------------
# Sweep plots (records are the rows of a sweep folder's sweep.jsonl)


def _size_colors(plt, records: list[dict]):
    from matplotlib.colors import LogNorm

    ns = [r["N"] for r in records]
    norm = LogNorm(min(ns), max(ns) * 1.0001)
    cmap = plt.get_cmap("viridis")
    return (lambda n: cmap(norm(n))), norm, cmap


def plot_loss_curves(records: list[dict], out_png) -> Path:
    """Validation loss against tokens for every run, coloured by non-embedding parameters N."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 5))
    color, norm, cmap = _size_colors(plt, records)
    for r in sorted(records, key=lambda r: (r["N"], r["D"])):
        pts = [(t, v) for t, v in r["curve"] if t > 0]
        if pts:
            ax.plot(*zip(*pts), color=color(r["N"]), lw=1.2, alpha=0.85)
            ax.plot(*pts[-1], "o", color=color(r["N"]), ms=3)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label="non-embedding parameters N")
    return _finish(plt, fig, ax, out_png, "tokens", "validation loss",
                   "validation loss curves, coloured by model size (dot: end of run)")


def plot_loss_vs(records: list[dict], kaplan: dict, var: str, out_png) -> Path:
    """Final loss against N, D or C (points coloured by the other variable) with the Kaplan power law."""
    from matplotlib.colors import LogNorm

    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 5))
    other = {"N": "D", "D": "N", "C": "N"}[var]
    x = np.array([r[var] for r in records], dtype=float)
    y = np.array([r["loss"] for r in records], dtype=float)
    c = np.array([r[other] for r in records], dtype=float)
    sc = ax.scatter(x, y, c=c, cmap="viridis", norm=LogNorm(c.min(), c.max() * 1.0001), s=24, zorder=3)
    fig.colorbar(sc, ax=ax, label={"N": "non-embedding parameters N", "D": "tokens D"}[other])
    law = (kaplan.get("laws") or {}).get(var)
    title = f"L({var})"
    if law:
        p = law["params"]
        alpha, xc = p[f"alpha_{var}"], p[f"{var}_c"]
        xs = np.logspace(np.log10(x.min()) - 0.1, np.log10(x.max()) + 0.1, 100)
        ax.plot(xs, (xc / xs) ** alpha, color="C3", lw=1.5, label=f"L = ({xc:.3g}/{var})^{alpha:.3f}")
        r2 = law.get("r2")
        title = (f"L({var}) fitted on: {law.get('selection')}" + (f";  R² = {r2:.3f}" if r2 is not None else ""))
        if var == "C":
            from .fit import _compute_frontier

            fr = _compute_frontier(records)
            ax.plot([r["C"] for r in fr], [r["loss"] for r in fr], "k--", lw=0.8, label="compute-efficient frontier")
    xlabel = {"N": "non-embedding parameters N", "D": "tokens D", "C": "compute C = 6ND (FLOPs)"}[var]
    return _finish(plt, fig, ax, out_png, xlabel, "final validation loss", title, ydata=y)


def plot_isoflop(records: list[dict], iso: list[dict], fit: dict | None, out_png) -> Path:
    """Loss against N at fixed compute. IsoFLOP sets: the measured points with their parabola in
    ln N and its minimum. A grid sweep: the fitted Chinchilla surface along C = 6ND at the measured
    compute levels, with its minima, and the runs coloured by C."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 5))
    cmap = plt.get_cmap("plasma")
    shown = [r["loss"] for r in records]  # the y-range: the runs and the minima, not the curves' ends
    if iso:
        for i, g in enumerate(iso):
            col = cmap(i / max(1, len(iso) - 1) * 0.85)
            ax.plot(g["N"], g["loss"], "o", color=col, label=f"C = {exponent(g['C'])} FLOPs")
            shown += list(g["loss"])
            m = g["minimum"]
            if m:
                shown.append(m["loss_min"])
                xs = np.linspace(np.log(min(g["N"])) - 0.3, np.log(max(g["N"])) + 0.3, 100)
                a, b, c = m["coef"]
                ax.plot(np.exp(xs), a * xs ** 2 + b * xs + c, color=col, lw=1)
                ax.plot(m["N_opt"], m["loss_min"], "*", color=col, ms=12, mec="k")
        title = "IsoFLOP curves: parabola in ln N per compute budget (star: its minimum)"
    elif fit is not None and fit.get("form") == "chinchilla":
        from matplotlib.colors import LogNorm

        from .plan import chinchilla_loss, compute_optimal

        p = fit["params"]
        cs = np.array([r["C"] for r in records])
        ns = np.array([r["N"] for r in records])
        norm = LogNorm(cs.min(), cs.max() * 1.0001)
        sc = ax.scatter(ns, [r["loss"] for r in records], c=cs, cmap=cmap, norm=norm, s=24, zorder=3)
        flop_ticks(fig.colorbar(sc, ax=ax, label="compute C = 6ND (FLOPs)").ax.yaxis)
        for cval in np.logspace(np.log10(cs.min()), np.log10(cs.max()), 4):
            n_opt, d_opt = compute_optimal(p, cval)  # the curve reaches its minimum, wherever that is
            nn = np.logspace(np.log10(min(ns.min(), n_opt)) - 0.5, np.log10(max(ns.max(), n_opt)) + 0.5, 100)
            ax.plot(nn, chinchilla_loss(p, nn, cval / (6 * nn)), color=cmap(norm(cval)), lw=1)
            shown.append(float(chinchilla_loss(p, n_opt, d_opt)))
            ax.plot(n_opt, shown[-1], "*", color=cmap(norm(cval)), ms=12, mec="k")
        title = "IsoFLOP curves of the fitted L(N, D) at fixed C = 6ND (star: minimum); dots: runs"
    else:
        ax.scatter([r["N"] for r in records], [r["loss"] for r in records], color="k", s=20)
        title = "no IsoFLOP sets and no Chinchilla fit: runs only"
    return _finish(plt, fig, ax, out_png, "non-embedding parameters N", "validation loss", title, ydata=shown)


def plot_sample_efficiency(se: dict, out_png) -> Path:
    """Tokens needed to reach each target loss against model size N."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, t in enumerate(se.get("targets", [])):
        pts = [(s["N"], s["tokens_to_target"][f"{t:g}"]) for s in se["sizes"]
               if s["tokens_to_target"].get(f"{t:g}")]
        if pts:
            ax.plot(*zip(*pts), "o-", color=f"C{i}", label=f"loss {t:g}")
    return _finish(plt, fig, ax, out_png, "non-embedding parameters N", "tokens to reach the loss",
                   "sample efficiency: tokens each size needs to reach a validation loss")
