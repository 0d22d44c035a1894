"""Scaling-law fits from measurements of (N, D, loss).

N is the number of non-embedding parameters, D the number of training tokens, C the training
compute (6 N D when a row does not give it). Two families of fits:

* Kaplan et al. (2020), "Scaling Laws for Neural Language Models": one power law per variable,
  L(N) = (N_c / N)^alpha_N, L(D) = (D_c / D)^alpha_D, L(C) = (C_c / C)^alpha_C, each a linear
  least-squares fit in log space (log L = alpha log X_c - alpha log X).
* Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models" (Chinchilla), Approach 3:
  L(N, D) = E + A / N^alpha + B / D^beta, fitted as the paper does: the Huber loss (delta = 1e-3)
  between the log of the predicted and the log of the observed loss, with the prediction written
  as logsumexp(a - alpha log N, b - beta log D, e) for a = log A, b = log B, e = log E, minimised
  by L-BFGS from a grid of starting points.

Every fit returns a plain JSON-serialisable dict with ``form``, ``params``, ``intervals``
(bootstrap 2.5/97.5 percentiles), ``r2`` (on log loss), ``n_points``, ``residuals`` (observed
minus predicted log loss) and ``flags`` (``demonstration: true`` with ``reasons`` when the fit
should not be read as an estimate).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from pathlib import Path

import numpy as np

from ..errors import DataError, PretrainerError
from ..progress import Progress

SWEEP_FILE = "sweep.jsonl"
HUBER_DELTA = 1e-3
WIDE_INTERVAL = 0.5  # relative interval width above which an exponent is "not an estimate"

_CANONICAL = {"n": "N", "d": "D", "c": "C", "loss": "loss"}


# ----------------------------------------------------------------------------------------------
# Loading


def load_points(path, require: tuple[str, ...] = ()) -> list[dict]:
    """Rows of ``N``, ``D``, ``loss`` (``C`` optional) from a CSV, a JSONL file or a sweep folder.

    ``require`` names the columns that must be present besides ``loss`` (e.g. ``("N", "D")`` for
    the Chinchilla form); with none required, at least one of N, D, C must be. ``C`` is filled in
    as 6 N D where a row has N and D but no C. Column names are matched case-insensitively.
    """
    p = Path(path)
    keep = None  # a sweep folder: only the runs of its latest settings (sweep.jsonl keeps older ones)
    if p.is_dir():
        f = p / SWEEP_FILE
        if not f.is_file():
            raise DataError(f"{p}: no {SWEEP_FILE} in this folder "
                            "(expected a sweep folder, or a .csv/.jsonl file of N, D, loss rows)")
        try:
            keep = {r["name"] for r in json.loads((p / "summary.json").read_text())["records"]}
        except (OSError, ValueError, KeyError, TypeError):
            keep = None
        p = f
    if not p.is_file():
        raise DataError(f"{p}: no such file (expected a .csv or .jsonl file of N, D, loss rows, or a sweep folder)")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        header, rows = _read_csv(p)
    elif suffix in (".jsonl", ".ndjson"):
        header, rows = _read_jsonl(p, keep)
    else:
        raise DataError(f"{p}: unknown format '{suffix}' (expected .csv, .jsonl or a sweep folder)")
    if not rows:
        raise DataError(f"{p}: no rows (expected N, D, loss rows)")

    for col in ("loss", *require):
        if col not in header:
            found = ", ".join(sorted(header)) or "none"
            raise DataError(f"{p}: no '{col}' column (expected columns N, D, loss; found: {found})")
    if not require and not ({"N", "D", "C"} & header):
        raise DataError(f"{p}: no 'N', 'D' or 'C' column (expected columns N, D, loss)")

    points = []
    for line, row in rows:
        pt = {}
        for col in ("N", "D", "C", "loss"):
            raw = row.get(col)
            if raw is None or (isinstance(raw, str) and raw.strip() == ""):
                if col == "loss" or col in require:
                    raise DataError(f"{p}:{line}: '{col}' is empty (expected a positive number)")
                continue
            pt[col] = _positive(raw, p, line, col)
        if "C" not in pt and "N" in pt and "D" in pt:
            pt["C"] = 6.0 * pt["N"] * pt["D"]
        points.append(pt)
    return points


def _positive(raw, path, line, col) -> float:
    try:
        v = float(raw)
    except (TypeError, ValueError):
        raise DataError(f"{path}:{line}: '{col}' is {raw!r}, expected a positive number") from None
    if not math.isfinite(v) or v <= 0:
        raise DataError(f"{path}:{line}: '{col}' is {raw!r}, expected a positive number")
    return v


def _read_csv(p: Path):
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            names = next(reader)
        except StopIteration:
            raise DataError(f"{p}: empty file (expected a header line with N, D, loss)") from None
        cols = [_CANONICAL.get(n.strip().lower(), n.strip()) for n in names]
        rows = []
        for i, values in enumerate(reader, start=2):
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(cols):
                raise DataError(f"{p}:{i}: {len(values)} values, expected {len(cols)} (one per header column)")
            rows.append((i, dict(zip(cols, values))))
    return set(cols), rows


def _read_jsonl(p: Path, names: set | None = None):
    """``names``: keep only the rows whose ``name`` is one of them."""
    rows, header = [], None
    with open(p, encoding="utf-8") as f:
        for i, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{i}: expected a JSON object with N, D, loss")
            if names is not None and obj.get("name") not in names:
                continue
            row = {_CANONICAL.get(str(k).lower(), str(k)): v for k, v in obj.items()}
            keys = {k for k, v in row.items() if v is not None}
            header = keys if header is None else header & keys  # a column must be in every row
            rows.append((i, row))
    return header or set(), rows


# ----------------------------------------------------------------------------------------------
# Helpers


def _clean(x):
    """numpy scalars/arrays and non-finite floats to plain JSON values."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_clean(v) for v in x.tolist()]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _r2(y: np.ndarray, yhat: np.ndarray):
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot <= 0:
        return None
    return 1.0 - float(np.sum((y - yhat) ** 2)) / ss_tot


def _array(values, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=float).ravel()
    if a.size and (not np.all(np.isfinite(a)) or np.any(a <= 0)):
        raise PretrainerError(f"{name}: every value must be a positive finite number")
    return a


def _relative_width(lo, hi, est):
    if lo is None or hi is None or est is None or est == 0:
        return None
    return (hi - lo) / abs(est)


def _percentiles(samples: np.ndarray):
    s = samples[np.isfinite(samples)]
    if s.size < 2:
        return [None, None]
    return [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))]


# ----------------------------------------------------------------------------------------------
# Kaplan power laws


def _fit_power_law(x, L, var: str, *, n_boot: int = 200, seed: int = 0) -> dict:
    """L = (X_c / X)^alpha by least squares on log L = alpha log X_c - alpha log X."""
    x = _array(x, var)
    L = _array(L, "loss")
    if x.size != L.size:
        raise PretrainerError(f"{var} and loss have different lengths ({x.size} and {L.size})")
    if x.size < 3:
        raise PretrainerError(f"L({var}) needs at least 3 points (more than its 2 parameters), got {x.size}")
    if np.unique(x).size < 2:
        raise PretrainerError(f"L({var}) needs at least 2 different values of {var}, got one ({x[0]:g})")
    lx, ly = np.log(x), np.log(L)

    def solve(lx_, ly_):
        slope, intercept = np.polyfit(lx_, ly_, 1)
        alpha = -slope
        log_xc = intercept / alpha if alpha != 0 else float("nan")
        return alpha, log_xc, intercept, slope

    alpha, log_xc, intercept, slope = solve(lx, ly)
    pred = intercept + slope * lx
    resid = ly - pred

    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        idx = rng.integers(0, x.size, x.size)
        if np.unique(lx[idx]).size < 2:
            continue
        boot.append(solve(lx[idx], ly[idx])[:2])
    boot = np.array(boot) if boot else np.empty((0, 2))
    a_name, c_name = f"alpha_{var}", f"{var}_c"
    with np.errstate(over="ignore"):
        xc = float(np.exp(log_xc)) if np.isfinite(log_xc) else float("nan")
    intervals = {a_name: _percentiles(boot[:, 0]) if len(boot) else [None, None]}
    if len(boot):
        lo, hi = _percentiles(boot[:, 1])
        with np.errstate(over="ignore"):
            intervals[c_name] = [float(np.exp(lo)) if lo is not None else None,
                                 float(np.exp(hi)) if hi is not None else None]
        intervals[f"log_{c_name}"] = [lo, hi]
    else:
        intervals[c_name] = intervals[f"log_{c_name}"] = [None, None]

    reasons = []
    if alpha <= 0:
        reasons.append(f"loss does not fall with {var} (alpha_{var} = {alpha:.3g})")
    width = _relative_width(*intervals[a_name], alpha)
    if width is not None and width > WIDE_INTERVAL:
        reasons.append(f"alpha_{var} interval is wide ({width:.0%} of the estimate)")
    if intervals[a_name][0] is None:
        reasons.append(f"no bootstrap interval for alpha_{var}")
    return _clean({
        "form": f"kaplan_{var.lower()}",
        "law": f"L({var}) = ({var}_c / {var})^alpha_{var}",
        "params": {a_name: alpha, c_name: xc, f"log_{c_name}": log_xc},
        "intervals": intervals,
        "r2": _r2(ly, pred),
        "n_points": int(x.size),
        "residuals": resid,
        "data_range": {var: [float(x.min()), float(x.max())], "loss": [float(L.min()), float(L.max())]},
        "flags": {"demonstration": bool(reasons), "reasons": reasons},
        "bootstrap": {"n": int(len(boot)), "seed": seed},
    })


def fit_kaplan_n(N, L, **kw) -> dict:
    """Kaplan L(N) = (N_c / N)^alpha_N (N: non-embedding parameters)."""
    return _fit_power_law(N, L, "N", **kw)


def fit_kaplan_d(D, L, **kw) -> dict:
    """Kaplan L(D) = (D_c / D)^alpha_D (D: training tokens)."""
    return _fit_power_law(D, L, "D", **kw)


def fit_kaplan_c(C, L, **kw) -> dict:
    """Kaplan L(C) = (C_c / C)^alpha_C (C: training FLOPs, on the compute-efficient frontier)."""
    return _fit_power_law(C, L, "C", **kw)


def _best_per_value(points: list[dict], key: str) -> list[dict]:
    """For each distinct value of ``key``, the point with the lowest loss."""
    best: dict[float, dict] = {}
    for p in points:
        if key in p and (p[key] not in best or p["loss"] < best[p[key]]["loss"]):
            best[p[key]] = p
    return [best[k] for k in sorted(best)]


def _compute_frontier(points: list[dict]) -> list[dict]:
    """Points whose loss is lower than that of every point with less compute (L(C_min))."""
    out, best = [], math.inf
    for p in sorted((p for p in points if "C" in p), key=lambda p: (p["C"], p["loss"])):
        if p["loss"] < best:
            out.append(p)
            best = p["loss"]
    return out


def fit_kaplan(points: list[dict], *, n_boot: int = 200, seed: int = 0, source: str = "data") -> dict:
    """Kaplan L(N), L(D) and L(C) from whichever of N, D, C the points carry.

    When a variable repeats (a grid of sizes x budgets), L(N) uses, for each N, its lowest loss
    (the best approximation of a model trained to convergence that the data has); L(D) likewise
    per D; L(C) uses the compute-efficient frontier (lowest loss so far as compute grows).
    """
    laws, notes = {}, []
    for var in ("N", "D", "C"):
        have = [p for p in points if var in p]
        if not have:
            continue
        sel = _compute_frontier(have) if var == "C" else _best_per_value(have, var)
        if len(sel) < 3:
            notes.append(f"L({var}) not fitted: {len(sel)} distinct point(s) after selection, needs at least 3")
            continue
        r = _fit_power_law([p[var] for p in sel], [p["loss"] for p in sel], var, n_boot=n_boot, seed=seed)
        r["selection"] = ("compute-efficient frontier (lowest loss so far as C grows)" if var == "C"
                          else f"lowest loss for each {var}" if len(sel) < len(have) else "all points")
        laws[var] = r
    if not laws:
        raise DataError(f"{source}: {len(points)} point(s), a Kaplan power law needs at least 3 "
                        "with different N (or D, or C)")
    primary = next(v for v in ("N", "D", "C") if v in laws)
    params, intervals, reasons = {}, {}, []
    for var, r in laws.items():
        params.update(r["params"])
        intervals.update(r["intervals"])
        reasons += [f"L({var}): {m}" for m in r["flags"]["reasons"]]
    return _clean({
        "form": "kaplan",
        "primary": primary,
        "params": params,
        "intervals": intervals,
        "r2": laws[primary]["r2"],
        "n_points": len(points),
        "residuals": laws[primary]["residuals"],
        "laws": laws,
        "notes": notes,
        "flags": {"demonstration": bool(reasons), "reasons": reasons},
    })


# ----------------------------------------------------------------------------------------------
# Chinchilla form


def _chinchilla_terms(p: np.ndarray, lN: np.ndarray, lD: np.ndarray):
    """For parameter rows p[..., (a, b, e, alpha, beta)]: predicted log loss and softmax weights."""
    a, b, e, al, be = (p[..., i, None] for i in range(5))
    t = np.stack([a - al * lN, b - be * lD, np.broadcast_to(e, np.broadcast_shapes(e.shape, lN.shape))])
    m = t.max(axis=0)
    w = np.exp(t - m)
    s = w.sum(axis=0)
    return m + np.log(s), w / s


def _huber(r: np.ndarray, delta: float):
    ar = np.abs(r)
    quad = ar <= delta
    h = np.where(quad, 0.5 * r * r, delta * (ar - 0.5 * delta))
    g = np.where(quad, r, delta * np.sign(r))
    return h, g


def _objective(p, lN, lD, lL, delta):
    """Sum of Huber(log predicted - log observed), divided by delta (same minimiser, better scale)."""
    pred, w = _chinchilla_terms(np.asarray(p, dtype=float), lN, lD)
    h, g = _huber(pred - lL, delta)
    grad = np.array([np.sum(g * w[0]), np.sum(g * w[1]), np.sum(g * w[2]),
                     -np.sum(g * w[0] * lN), -np.sum(g * w[1] * lD)])
    return float(h.sum()) / delta, grad / delta


def _grid() -> np.ndarray:
    """Hoffmann et al.'s grid of starts: alpha, beta in 0..2 by 0.5, e in -1..1 by 0.5, a, b in 0..25 by 5."""
    exps = np.arange(0.0, 2.01, 0.5)
    es = np.arange(-1.0, 1.01, 0.5)
    abs_ = np.arange(0.0, 25.01, 5.0)
    return np.stack(np.meshgrid(abs_, abs_, es, exps, exps, indexing="ij"), axis=-1).reshape(-1, 5)


_MAXITER = 2000


def _minimise(start, lN, lD, lL, delta, bounds):
    from scipy.optimize import minimize

    x0 = np.clip(start, [b[0] for b in bounds], [b[1] for b in bounds])
    return minimize(_objective, x0, args=(lN, lD, lL, delta), jac=True, method="L-BFGS-B", bounds=bounds,
                    options={"maxiter": _MAXITER, "ftol": 1e-10, "gtol": 1e-6})


def _one_blas_thread():
    """L-BFGS-B works on 5-vectors; a multi-threaded BLAS only adds synchronisation (10x slower on a busy
    2-core machine), so the fits run with one BLAS thread."""
    import scipy.optimize  # noqa: F401 - load scipy's BLAS first, so that the limit applies to it

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional speed-up only
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def fit_chinchilla(N, D, L, *, n_boot: int = 200, seed: int = 0, delta: float = HUBER_DELTA,
                   n_starts: int = 40, full_grid: bool = False, say=None) -> dict:
    """Chinchilla L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, Approach 3).

    The whole starting grid of the paper is scored at once; L-BFGS-B then runs from the best start
    of each (alpha, beta) pair and the best starts overall (``n_starts`` in all; ``full_grid`` runs
    it from every grid point, as the paper does, which is about 100x slower). Bootstrap: ``n_boot``
    resamples of the points with replacement, each refitted from the best solution; ``say``: where
    progress lines go (resamples done, rate, eta) when the bootstrap takes more than a few seconds.
    """
    N, D, L = _array(N, "N"), _array(D, "D"), _array(L, "loss")
    if not (N.size == D.size == L.size):
        raise PretrainerError(f"N, D and loss have different lengths ({N.size}, {D.size}, {L.size})")
    if N.size < 6:
        raise PretrainerError(f"the Chinchilla form needs at least 6 points (more than its 5 parameters), got {N.size}")
    for name, a in (("N", N), ("D", D)):
        if np.unique(a).size < 2:
            raise PretrainerError(f"the Chinchilla form needs at least 2 different values of {name}, got one ({a[0]:g})")
    lN, lD, lL = np.log(N), np.log(D), np.log(L)
    # bounds: e from E ~ 0.001 up to the lowest observed loss (E is the loss no model reaches)
    e_hi = float(lL.min())
    bounds = [(-20.0, 60.0), (-20.0, 60.0), (-7.0, e_hi), (0.0, 3.0), (0.0, 3.0)]

    with _one_blas_thread():
        return _fit_chinchilla(N, D, L, lN, lD, lL, bounds, n_boot, seed, delta, n_starts, full_grid, say)


def _fit_chinchilla(N, D, L, lN, lD, lL, bounds, n_boot, seed, delta, n_starts, full_grid, say=None) -> dict:
    grid = _grid()
    grid[:, 2] = np.clip(grid[:, 2], bounds[2][0], bounds[2][1])
    pred, _ = _chinchilla_terms(grid, lN, lD)
    scores = _huber(pred - lL, delta)[0].sum(axis=1)
    if full_grid:
        starts = grid
    else:
        order = np.argsort(scores)
        chosen, seen = [], set()
        for i in order:  # the best start of each (alpha, beta) pair
            key = (grid[i, 3], grid[i, 4])
            if key not in seen:
                seen.add(key)
                chosen.append(i)
        for i in order:
            if len(chosen) >= max(n_starts, len(seen)):
                break
            if i not in chosen:
                chosen.append(i)
        starts = grid[chosen]

    best = None
    for s in starts:
        r = _minimise(s, lN, lD, lL, delta, bounds)
        if best is None or r.fun < best.fun:
            best = r
    p = best.x
    pred, _ = _chinchilla_terms(p, lN, lD)
    resid = lL - pred

    rng = np.random.default_rng(seed)
    samples = []
    progress = Progress("Chinchilla fit bootstrap", n_boot, "resamples", say)
    for _ in range(n_boot):
        idx = rng.integers(0, N.size, N.size)
        r = _minimise(p, lN[idx], lD[idx], lL[idx], delta, bounds)
        samples.append(r.x)
        progress.update(len(samples))
    samples = np.array(samples).reshape(-1, 5)
    nat = {  # natural parameters, as the paper reports them
        "E": np.exp(samples[:, 2]), "A": np.exp(samples[:, 0]), "B": np.exp(samples[:, 1]),
        "alpha": samples[:, 3], "beta": samples[:, 4],
    }
    params = {"E": math.exp(p[2]), "A": math.exp(p[0]), "B": math.exp(p[1]), "alpha": p[3], "beta": p[4]}
    intervals = {k: _percentiles(v) for k, v in nat.items()}

    reasons = []
    for k in ("alpha", "beta", "E"):
        w = _relative_width(*intervals[k], params[k])
        if w is not None and w > WIDE_INTERVAL:
            reasons.append(f"{k} interval is wide ({w:.0%} of the estimate)")
    tol = 1e-3
    if p[2] <= bounds[2][0] + tol:
        reasons.append(f"E sits at its lower bound ({math.exp(bounds[2][0]):.3g}): the irreducible loss is not identified")
    if p[2] >= bounds[2][1] - tol:
        reasons.append(f"E sits at its upper bound (the lowest observed loss, {math.exp(bounds[2][1]):.4g}): "
                       "the data does not separate E from the N and D terms")
    for i, k in ((3, "alpha"), (4, "beta")):
        if p[i] <= bounds[i][0] + tol or p[i] >= bounds[i][1] - tol:
            reasons.append(f"{k} sits at a bound ({p[i]:.3g})")
    if best.nit >= _MAXITER:  # a line-search stop at a kink of the Huber loss is not a failure
        reasons.append(f"L-BFGS-B stopped after {best.nit} iterations without converging")

    C = 6.0 * N * D
    return _clean({
        "form": "chinchilla",
        "law": "L(N, D) = E + A / N^alpha + B / D^beta",
        "params": params,
        "log_params": {"a": p[0], "b": p[1], "e": p[2]},
        "intervals": intervals,
        "r2": _r2(lL, pred),
        "n_points": int(N.size),
        "residuals": resid,
        "huber_loss": float(best.fun) * delta,
        "data_range": {"N": [N.min(), N.max()], "D": [D.min(), D.max()], "C": [C.min(), C.max()],
                       "loss": [L.min(), L.max()]},
        "optimizer": {"method": "L-BFGS-B", "huber_delta": delta, "starts": int(len(starts)),
                      "grid_points": int(len(grid)), "bounds": {"a": bounds[0], "b": bounds[1], "e": bounds[2],
                                                                "alpha": bounds[3], "beta": bounds[4]}},
        "flags": {"demonstration": bool(reasons), "reasons": reasons},
        "bootstrap": {"n": int(len(samples)), "seed": seed, "samples": nat},
    })


def predict_chinchilla(params: dict, N, D):
    """E + A/N^alpha + B/D^beta for arrays N, D."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return params["E"] + params["A"] / N ** params["alpha"] + params["B"] / D ** params["beta"]


# ----------------------------------------------------------------------------------------------
# Dispatch


def choose_form(points: list[dict]) -> str:
    """``chinchilla`` when every point has N and D and both vary, else ``kaplan``."""
    if points and all("N" in p and "D" in p for p in points):
        if len({p["N"] for p in points}) >= 2 and len({p["D"] for p in points}) >= 2 and len(points) >= 6:
            return "chinchilla"
    return "kaplan"


def fit_points(points: list[dict], form: str | None = None, *, n_boot: int = 200, seed: int = 0,
               source: str = "data", say=None) -> dict:
    """Fit ``form`` ('kaplan', 'chinchilla' or None = choose from the data) to loaded points;
    ``say``: where progress lines of a long bootstrap go."""
    form = form or choose_form(points)
    if form == "kaplan":
        r = fit_kaplan(points, n_boot=n_boot, seed=seed, source=source)
    elif form == "chinchilla":
        for col in ("N", "D"):
            missing = [i for i, p in enumerate(points) if col not in p]
            if missing:
                raise DataError(f"{source}: the Chinchilla form needs '{col}' in every row "
                                f"({len(missing)} row(s) without it)")
        if len(points) < 6:
            raise DataError(f"{source}: {len(points)} point(s), the Chinchilla form "
                            "L(N, D) = E + A/N^alpha + B/D^beta needs at least 6 (more than its 5 parameters)")
        try:
            r = fit_chinchilla([p["N"] for p in points], [p["D"] for p in points], [p["loss"] for p in points],
                               n_boot=n_boot, seed=seed, say=say)
        except PretrainerError as e:
            raise DataError(f"{source}: {e}") from None
    else:
        raise PretrainerError(f"unknown form '{form}' (expected kaplan or chinchilla)")
    r["source"] = str(source)
    return r


def load_fit(path) -> dict:
    """A fit result written by ``pretrainer scaling fit`` (fit.json)."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{p}: no such file (expected a fit.json written by 'pretrainer scaling fit')") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or "form" not in obj or "params" not in obj:
        raise DataError(f"{p}: not a fit result (expected the keys 'form' and 'params' of 'pretrainer scaling fit')")
    if obj["form"] == "chinchilla":
        missing = [k for k in ("E", "A", "B", "alpha", "beta") if not isinstance(obj["params"].get(k), (int, float))]
        if missing:
            raise DataError(f"{p}: params.{missing[0]} missing or not a number (expected a Chinchilla fit)")
    return obj
