"""Compute-optimal planning: how big and how long for a compute budget C (FLOPs).

With the Chinchilla form L(N, D) = E + A/N^alpha + B/D^beta and C = 6 N D, minimising L over N
at fixed C gives (Hoffmann et al. 2022, Eq. 4 and Appendix D.2):

    G = (alpha A / (beta B))^(1 / (alpha + beta))
    N_opt(C) = G (C/6)^(beta / (alpha + beta)),   D_opt(C) = G^-1 (C/6)^(alpha / (alpha + beta))
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import PretrainerError
from .fit import _clean, _percentiles

# Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models", Section 3.3 / Eq. 10
# (Approach 3, the parametric fit on MassiveText).
CHINCHILLA_PAPER = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
CHINCHILLA_SOURCE = ("Hoffmann et al. (2022), Training Compute-Optimal Large Language Models, "
                     "Approach 3 parametric fit (Eq. 10): E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28")
TOKENS_PER_PARAM_RULE = 20.0


def compute_optimal(params: dict, compute):
    """(N_opt, D_opt) under C = 6 N D for Chinchilla-form ``params``; works on arrays of params or C."""
    E, A, B, al, be = (np.asarray(params[k], dtype=float) for k in ("E", "A", "B", "alpha", "beta"))
    C = np.asarray(compute, dtype=float)
    with np.errstate(all="ignore"):
        s = al + be
        G = (al * A / (be * B)) ** (1.0 / s)
        N = G * (C / 6.0) ** (be / s)
        D = (C / 6.0) ** (al / s) / G
    return N, D


def chinchilla_loss(params: dict, N, D):
    """E + A/N^alpha + B/D^beta."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return params["E"] + params["A"] / N ** params["alpha"] + params["B"] / D ** params["beta"]


def rule_20_tokens(compute: float) -> dict:
    """N = sqrt(C / 120), D = 20 N (C = 6 N D with D / N = 20)."""
    N = math.sqrt(compute / (6.0 * TOKENS_PER_PARAM_RULE))
    return {"N": N, "D": TOKENS_PER_PARAM_RULE * N, "tokens_per_param": TOKENS_PER_PARAM_RULE,
            "source": "20 tokens per parameter, the rule of thumb drawn from Hoffmann et al. (2022): N = sqrt(C/120)"}


def _point(params: dict, compute: float) -> dict:
    N, D = compute_optimal(params, compute)
    N, D = float(N), float(D)
    return {"N": N, "D": D, "tokens_per_param": D / N, "loss": float(chinchilla_loss(params, N, D))}


def plan(fit_result: dict, compute: float) -> dict:
    """Compute-optimal N and D for ``compute`` FLOPs from a fit, with bootstrap interval and references."""
    try:
        compute = float(compute)
    except (TypeError, ValueError):
        raise PretrainerError(f"compute is {compute!r}, expected a positive number of FLOPs (e.g. 1e18)") from None
    if not math.isfinite(compute) or compute <= 0:
        raise PretrainerError(f"compute is {compute!r}, expected a positive number of FLOPs (e.g. 1e18)")
    form = fit_result.get("form")
    paper = _point(CHINCHILLA_PAPER, compute)
    paper["params"] = dict(CHINCHILLA_PAPER)
    paper["source"] = CHINCHILLA_SOURCE
    paper["note"] = "its loss is on the paper's data and tokenizer, not comparable with yours"
    rule = rule_20_tokens(compute)
    out = {"compute": compute, "form": form, "ours": None, "chinchilla_paper": paper, "rule_20_tokens": rule}

    if form in ("kaplan", "kaplan_n", "kaplan_d", "kaplan_c"):
        reason = ("a Kaplan fit (L(N), L(D), L(C) as separate power laws) cannot give a compute-optimal "
                  "split of C into N and D; fit the Chinchilla form L(N, D) on a sweep over both N and D")
        out["flags"] = {"demonstration": True, "reasons": [reason]}
        return _clean(out)
    if form != "chinchilla":
        raise PretrainerError(f"fit form is {form!r}, expected 'chinchilla' or 'kaplan'")

    params = fit_result["params"]
    if not (params["alpha"] > 0 and params["beta"] > 0 and params["A"] > 0 and params["B"] > 0):
        raise PretrainerError(f"fit has alpha={params['alpha']}, beta={params['beta']}: both exponents and A, B "
                              "must be positive for a compute-optimal split")
    ours = _point(params, compute)
    fit_flags = fit_result.get("flags") or {}
    reasons, warnings = list(fit_flags.get("reasons", [])), []
    samples = (fit_result.get("bootstrap") or {}).get("samples")
    if samples:
        S = {k: np.asarray([np.nan if v is None else v for v in samples[k]], dtype=float)
             for k in ("E", "A", "B", "alpha", "beta")}
        Ns, Ds = compute_optimal(S, compute)
        with np.errstate(all="ignore"):
            Ls = chinchilla_loss(S, Ns, Ds)
        ours["intervals"] = {"N": _percentiles(Ns), "D": _percentiles(Ds), "tokens_per_param": _percentiles(Ds / Ns),
                             "loss": _percentiles(Ls)}
        ours["bootstrap_n"] = int(np.isfinite(Ns).sum())
    else:
        ours["intervals"] = None
        warnings.append("no bootstrap samples in the fit result: no interval")
    ours["loss_at_rule_20"] = float(chinchilla_loss(params, rule["N"], rule["D"]))
    ours["loss_at_paper_split"] = float(chinchilla_loss(params, paper["N"], paper["D"]))
    c_max = (fit_result.get("data_range") or {}).get("C", [None, None])[1]
    if c_max:
        factor = compute / c_max
        ours["extrapolation"] = factor
        if factor > 100:
            warnings.append(f"C is {factor:.3g}x the largest measured compute: an extrapolation")
    out["ours"] = ours
    out["flags"] = {"demonstration": bool(fit_flags.get("demonstration")), "reasons": reasons, "warnings": warnings}
    return _clean(out)
