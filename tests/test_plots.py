"""Every PNG the package writes is readable at a glance: each plot drawn from small fabricated data,
then its figure checked as a reader would look at it: plain tick labels (no ``2×10^6``), titles
inside the figure, no two tick labels on top of each other, y-limits that fit the measured points
(not a fitted curve running off to 10³)."""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pretrainer.plotting import fit_ylim, number, save  # noqa: E402

CHIN = {"E": 1.3, "A": 60.0, "alpha": 0.32, "B": 90.0, "beta": 0.3}


@pytest.fixture
def figures(monkeypatch):
    """The figures that :func:`pretrainer.plotting.save` closes, kept open to be inspected."""
    kept = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    monkeypatch.undo()
    plt.close("all")


def _visible_labels(axis):
    return [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]


def problems(fig) -> list[str]:
    """What a reader would trip over in ``fig`` (as laid out by ``save``)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    box = fig.bbox
    found = []
    titles = [t for ax in fig.axes for t in (ax.title,)] + ([fig._suptitle] if fig._suptitle else [])
    for t in titles:
        if not t.get_text():
            continue
        e = t.get_window_extent(r)
        if e.x0 < box.x0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
            found.append(f"title outside the figure: {t.get_text()!r} {e} vs {box}")
    for ax in fig.axes:
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = _visible_labels(axis)
            for t in labels:
                text = t.get_text()
                if "10^" in text or "times" in text or "×" in text or "$" in text:
                    found.append(f"{name} tick label {text!r} is not plain")
            ext = sorted((t.get_window_extent(r) for t in labels), key=lambda e: e.x0 if name == "x" else e.y0)
            for a, b in zip(ext, ext[1:]):
                if (a.x1 > b.x0 + 1) if name == "x" else (a.y1 > b.y0 + 1):
                    found.append(f"{name} tick labels overlap: {a} and {b}")
            if axis.get_offset_text().get_text():
                found.append(f"{name} axis has an offset/factor text {axis.get_offset_text().get_text()!r}")
    return found


def _records():
    """A 4 x 3 grid sweep with Chinchilla-shaped losses and validation curves."""
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate([25_472, 98_000, 340_000, 793_344]):
        for d in [250_000, 1_000_000, 4_000_000]:
            loss = CHIN["E"] + CHIN["A"] / n ** CHIN["alpha"] + CHIN["B"] / d ** CHIN["beta"]
            loss *= 1 + rng.normal(0, 0.003)
            curve = [(t, CHIN["E"] + CHIN["A"] / n ** CHIN["alpha"] + CHIN["B"] / t ** CHIN["beta"])
                     for t in np.linspace(d / 10, d, 10)]
            rows.append({"name": f"d{32 * (i + 1)}-{d}", "N": n, "D": d, "C": 6.0 * n * d, "loss": loss, "curve": curve,
                         "d_model": 32 * (i + 1), "n_layer": 2})
    return rows


def _check(figures, out: Path):
    assert out.is_file() and out.stat().st_size > 5000
    assert figures, "the plot was not drawn through pretrainer.plotting.save"
    fig = figures[-1]
    assert problems(fig) == []
    return fig


# ----------------------------------------------------------------------------------------------


def test_number_labels_are_plain():
    assert [number(x) for x in (0, 0.25, 1.5, 2, 20, 500, 1000, 25_000, 2_000_000, 2.5e9)] == \
        ["0", "0.25", "1.5", "2", "20", "500", "1k", "25k", "2M", "2.5B"]
    assert number(1e18) == "1e18" and number(3.2e15) == "3.2e15" and number(1e-4) == "1e-4"


def test_the_checker_catches_what_the_helper_fixes(tmp_path, figures):
    """Matplotlib's defaults fail the checks (so the checks can fail); the same figure through
    ``save`` passes them."""
    def draw():
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot([2e4, 8e5], [1.5, 2.2])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title("a long title that runs well past the right edge of a small figure, "
                     "as a fit's formula with its R² and its caveats does")
        return fig

    raw = draw()
    raw.canvas.draw()
    assert any("not plain" in p for p in problems(raw))
    assert any("title outside" in p for p in problems(raw))
    save(draw(), tmp_path / "fixed.png")
    assert problems(figures[-1]) == []


def test_fit_ylim_keeps_the_points_readable():
    fig, ax = plt.subplots()
    ax.set_yscale("log")
    ax.plot([1, 2, 3], [2.0, 1.9, 1.8], "o")
    ax.plot([0.5, 5], [1000.0, 1.0])  # a fitted curve running off
    fit_ylim(ax, [2.0, 1.9, 1.8])
    lo, hi = ax.get_ylim()
    assert 1.6 < lo < 1.8 and 2.0 < hi < 2.3


def test_scaling_plots(tmp_path, figures):
    from pretrainer.scaling.fit import fit_kaplan
    from pretrainer.scaling.plots import (
        plot_fit,
        plot_isoflop,
        plot_loss_curves,
        plot_loss_vs,
        plot_plan,
        plot_sample_efficiency,
    )
    from pretrainer.scaling.sweep import isoflop_sets, sample_efficiency

    records = _records()
    points = [{k: r[k] for k in ("N", "D", "C", "loss")} for r in records]
    rng = np.random.default_rng(1)
    fit = {"form": "chinchilla", "params": CHIN, "r2": 0.996, "data_range": {"C": [3.8e10, 1.9e13]},
           "flags": {"demonstration": True, "reasons": ["alpha interval is wide (84% of the estimate)",
                                                         "beta interval is wide (91% of the estimate)"]},
           "bootstrap": {"samples": {k: list(v * rng.uniform(0.9, 1.1, 20)) for k, v in CHIN.items()}}}
    kaplan = fit_kaplan(points, n_boot=20)
    losses = [r["loss"] for r in records]

    fig = _check(figures, plot_fit(points, fit, tmp_path / "fit.png"))
    lo, hi = fig.axes[0].get_ylim()
    assert lo > min(losses) / 1.5 and hi < max(losses) * 1.5

    _check(figures, plot_plan(fit, tmp_path / "plan.png", compute=1e15))
    _check(figures, plot_loss_curves(records, tmp_path / "curves.png"))
    for var in ("N", "D", "C"):
        fig = _check(figures, plot_loss_vs(records, kaplan, var, tmp_path / f"vs_{var}.png"))
        lo, hi = fig.axes[0].get_ylim()
        assert lo > min(losses) / 1.5 and hi < max(losses) * 1.5
    _check(figures, plot_sample_efficiency(sample_efficiency(records), tmp_path / "se.png"))

    # the grid sweep's IsoFLOP view (the fitted surface's curves run up to L ~ 10^3 at large N):
    # the y-range stays on the runs
    fig = _check(figures, plot_isoflop(records, [], fit, tmp_path / "iso.png"))
    lo, hi = fig.axes[0].get_ylim()
    assert lo > min(losses) / 1.5 and hi < max(losses) * 1.5, (lo, hi)
    # IsoFLOP sets with their parabolas
    iso_records = []
    for c in (1e11, 1e12):
        for n in (2e4, 6e4, 2e5, 6e5):
            d = c / (6 * n)
            iso_records.append({"N": n, "D": d, "C": c, "C_target": c,
                                "loss": CHIN["E"] + CHIN["A"] / n ** CHIN["alpha"] + CHIN["B"] / d ** CHIN["beta"]})
    fig = _check(figures, plot_isoflop(iso_records, isoflop_sets(iso_records), None, tmp_path / "iso2.png"))
    ys = [r["loss"] for r in iso_records]
    lo, hi = fig.axes[0].get_ylim()
    assert lo > min(ys) / 1.5 and hi < max(ys) * 1.5


def test_icl_plots(tmp_path, figures):
    from pretrainer.eval.icl import plot_params, plot_shots

    def shots(base):
        return {str(k): {"accuracy": base + 0.01 * k, "interval": [base, base + 0.02 * k + 0.01], "chance": 0.25}
                for k in (0, 1, 2, 4, 8, 16, 32)}

    curves = [{"label": "runs/gpt-mini", "shots": shots(0.3)}, {"label": "runs/gpt-small", "shots": shots(0.35)}]
    _check(figures, plot_shots(curves, tmp_path / "shots.png",
                               title="builtin:lookup-country-capital-and-a-long-task-name (multiple_choice)"))
    runs = [{"params": 1_200_000, "shots": shots(0.3)}, {"params": 45_000_000, "shots": shots(0.4)}]
    _check(figures, plot_params(runs, tmp_path / "params.png", title="lookup (multiple_choice)"))


def test_loss_png(tmp_path, figures):
    from pretrainer.train.trainer import plot_losses

    run = tmp_path / "a-run-folder-with-a-rather-long-name-as-sweeps-make-them-d128-l4-steps3906-lr0.003"
    run.mkdir()
    rows = [{"step": s, "loss": 8 * math.exp(-s / 300) + 2.5, "tokens": s * 4096} for s in range(10, 3000, 10)]
    rows += [{"step": s, "val_loss": 8 * math.exp(-s / 300) + 2.7} for s in range(500, 3001, 500)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _check(figures, plot_losses(run))
