"""What makes every PNG the package (and its benchmarks) writes readable at a glance, in one place:
plain tick labels (``2M``, ``1.5``, ``1e18``; never ``2×10^6``), titles wrapped to the figure's
width, y-limits that fit the data rather than a fitted curve, and an atomic write.

A plot function draws as usual, then ends with :func:`save`, which does the rest::

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.set_xscale("log"); ax.plot(tokens, loss)
    fit_ylim(ax, loss)                       # only where a curve would flatten the points
    save(fig, "loss.png")                    # plain ticks, wrapped titles, layout, written, closed
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings
from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def number(x: float) -> str:
    """A tick label a reader takes in at once: ``0.25``, ``1.5``, ``20``, ``500k``, ``2.5M``, ``1B``;
    ``1e12`` and up (FLOPs) and below 0.001 as ``3e18``, ``1e-4``."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    a = abs(x)
    if a >= 1e12 or a < 1e-3:
        return exponent(x)
    for unit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if a >= unit:
            return f"{x / unit:.3g}{suffix}"
    return f"{x:.3g}"


def exponent(x: float) -> str:
    """``1e18``, ``3e15``: the label of a FLOP count (see :func:`flop_ticks`)."""
    if x == 0 or not math.isfinite(x):
        return number(x)
    mantissa, power = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(power)}"


def _plain_log_formatter(text=None, every_minor: bool = True):
    """Matplotlib's log formatter (which decides which ticks get a label, so minor labels thin
    out on wide ranges) with ``text(x)`` (default :func:`number`) in place of ``a×10^b``.
    ``every_minor``: within one decade (a loss from 3 to 7) label every minor tick (3, 4, 5, 6, 7),
    not matplotlib's subset (3, 4, 6)."""
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        plain = True

        def __call__(self, x, pos=None):
            return (text or number)(x) if super().__call__(x, pos) else ""

    return PlainLog(base=10, labelOnlyBase=False, minor_thresholds=(1, 1) if every_minor else (1, 0.4))


def flop_ticks(axis) -> None:
    """Compute (FLOPs) labels as powers of ten, ``1e12 ... 1e18``, on a log ``axis`` (``ax.xaxis``,
    a colorbar's ``cb.ax.yaxis``); :func:`save` leaves them as they are."""
    axis.set_major_formatter(_plain_log_formatter(exponent))
    axis.set_minor_formatter(_plain_log_formatter(exponent))


def plain_ticks(ax) -> None:
    """Plain labels on both axes of ``ax`` (a colorbar's too): log axes via :func:`number`; linear
    axes without an offset or a ``1e6`` corner factor. Labels set by hand (category names) stay."""
    from matplotlib.ticker import FuncFormatter, LogFormatter, ScalarFormatter

    for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
        major = axis.get_major_formatter()
        if scale == "log":
            if isinstance(major, LogFormatter) and not getattr(major, "plain", False):
                axis.set_major_formatter(_plain_log_formatter())
            minor = axis.get_minor_formatter()
            if isinstance(minor, LogFormatter) and not getattr(minor, "plain", False):
                axis.set_minor_formatter(_plain_log_formatter())
        elif scale == "linear" and isinstance(major, ScalarFormatter):
            lo, hi = axis.get_view_interval()
            if max(abs(lo), abs(hi)) >= 1e4:
                axis.set_major_formatter(FuncFormatter(lambda x, pos: number(x)))
            else:
                major.set_useOffset(False)
                major.set_scientific(False)


def fit_ylim(ax, values, margin: float = 0.08) -> None:
    """Y-limits on ``values`` (the measured points) plus ``margin`` of their range on each side
    (in log space on a log axis), so a fitted curve that runs far off does not flatten them;
    lines beyond the limits are clipped by the axes."""
    ys = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if ax.get_yscale() == "log":
        ys = [y for y in ys if y > 0]
    if not ys:
        return
    lo, hi = min(ys), max(ys)
    if ax.get_yscale() == "log":
        span = math.log(hi / lo) or math.log(1.1)
        ax.set_ylim(lo * math.exp(-margin * span), hi * math.exp(margin * span))
    else:
        span = (hi - lo) or abs(hi) * 0.1 or 1.0
        ax.set_ylim(lo - margin * span, hi + margin * span)


def _wrap_titles(fig, renderer, authored: dict) -> bool:
    """Re-wrap every title (and the figure's suptitle) that runs past the figure's edges onto more
    lines (a title is centred on its axes, so the room is twice the distance to the nearer edge);
    ``authored``: each title's text as its author wrote it, kept across calls. Returns whether any
    changed."""
    texts = [(t, ax.bbox) for ax in fig.axes for t in (ax.title, getattr(ax, "_left_title", None),
                                                         getattr(ax, "_right_title", None)) if t is not None]
    if getattr(fig, "_suptitle", None) is not None:
        texts.append((fig._suptitle, fig.bbox))
    changed = False
    for t, anchor in texts:
        text = authored.setdefault(id(t), t.get_text())
        if not text:
            continue
        centre = (anchor.x0 + anchor.x1) / 2
        room = 2 * min(centre - fig.bbox.x0, fig.bbox.x1 - centre) * 0.96
        chars = max(len(line) for line in t.get_text().split("\n"))
        for _ in range(8):  # the author's lines, each filled to fewer characters until the title fits
            extent = t.get_window_extent(renderer)
            if extent.width <= room or chars <= 12:
                break
            chars = max(12, min(chars - 1, int(chars * room / extent.width)))
            t.set_text("\n".join(textwrap.fill(line, chars) for line in text.split("\n")))
            changed = True
    return changed


def _labels_collide(axis, horizontal: bool, renderer, gap: float = 2.0) -> bool:
    labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda e: e.x0 if horizontal else e.y0)
    return any((a.x1 + gap > b.x0) if horizontal else (a.y1 + gap > b.y0) for a, b in zip(boxes, boxes[1:]))


def _unclutter(fig) -> None:
    """Where tick labels run into each other: drop the minor labels first, then thin the major ticks
    (measured with the renderer, without drawing the figure)."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter

    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for axis, horizontal in ((ax.xaxis, True), (ax.yaxis, False)):
            for bins in (8, 6, 4, 3, 2):
                if not _labels_collide(axis, horizontal, renderer):
                    break
                minor = axis.get_minor_formatter()
                if getattr(minor, "plain", False) and minor.minor_thresholds[1] >= 1:
                    axis.set_minor_formatter(_plain_log_formatter(every_minor=False))  # matplotlib's subset
                elif not isinstance(minor, NullFormatter):
                    axis.set_minor_formatter(NullFormatter())
                elif axis.get_scale() == "log":
                    axis.set_major_locator(LogLocator(base=10, numticks=bins))
                elif axis.get_scale() == "linear":
                    axis.set_major_locator(MaxNLocator(nbins=bins))
                else:
                    break


def save(fig, out_png, dpi: int = 120) -> Path:
    """Plain ticks on every axes, titles wrapped to the figure, layout, then the PNG written
    atomically (a temporary file renamed over ``out_png``); the figure is closed either way."""
    plt = pyplot()
    out = Path(out_png)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        for ax in fig.axes:
            plain_ticks(ax)
        authored: dict = {}
        for _ in range(3):  # the layout moves the axes, and so the room each title has
            changed = _wrap_titles(fig, fig.canvas.get_renderer(), authored)
            if fig.get_layout_engine() is None:
                with warnings.catch_warnings():  # "not compatible with tight_layout": the tight bbox below holds
                    warnings.simplefilter("ignore", UserWarning)
                    fig.tight_layout()
            if not changed:
                break
        _unclutter(fig)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
        plt.close(fig)
    return out
