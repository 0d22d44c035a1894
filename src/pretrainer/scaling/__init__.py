"""Scaling-law lab: fit Kaplan and Chinchilla laws to (N, D, loss) measurements, plan, plot."""

from .fit import (choose_form, fit_chinchilla, fit_kaplan, fit_kaplan_c, fit_kaplan_d, fit_kaplan_n,
                  fit_points, load_fit, load_points)
from .plan import CHINCHILLA_PAPER, compute_optimal, plan, rule_20_tokens

__all__ = ["load_points", "load_fit", "choose_form", "fit_points", "fit_kaplan", "fit_kaplan_n", "fit_kaplan_d",
           "fit_kaplan_c", "fit_chinchilla", "plan", "compute_optimal", "rule_20_tokens", "CHINCHILLA_PAPER"]
