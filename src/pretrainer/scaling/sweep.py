"""Scaling sweeps: train a grid of model sizes x token budgets (or an IsoFLOP set) from one base
config, record (N, D, C, loss) per run in ``DIR/sweep.jsonl``, then fit, plan and plot.

Sizes are written ``WIDTHxDEPTH`` (``64x2`` = d_model 64, 2 layers) or ``WIDTHxDEPTHxHEADS``.
Without HEADS, the base model's head width is kept (n_head = d_model / head_dim); ``d_ff`` and
``n_kv_heads`` keep the base model's ratios. Every other model and training option comes from
the base config.

A token budget D becomes ``train.max_steps = round(D / (batch_size * seq_len * grad_accum))``, and
the recorded D is the number of tokens actually trained on (steps x tokens per step). N is the
non-embedding parameter count of :func:`pretrainer.model.info.model_info` (Kaplan's N), C = 6 N D
and ``C_attn`` = (6 N + 6 n_layer seq_len d_model) D (Kaplan's count with the attention term).

Learning rate, recorded per run as ``lr`` and ``lr_rule``:

* ``fixed``: the base config's ``train.lr`` for every size;
* ``mup``: ``lr = base_lr * base_width / d_model`` for the whole model. This is the simplest honest
  reading of µP's width rule (Yang et al. 2022, hidden matrices' Adam rate proportional to
  1/width), applied to every parameter; initialisation is not changed, so it is width-scaled
  rates, not full µP;
* ``search``: for each size, the candidate rates are trained on a short budget (the smallest of the
  sweep unless given) and the rate with the lowest final validation loss is used for every budget
  of that size; rates whose loss is within ``lr_search_tie`` (relative, default 0.5 %) of the
  lowest count as tied, and the smallest tied rate is taken, because a difference that small is
  within evaluation noise and the best rate falls as runs get longer. Search runs are recorded in ``DIR/lr_search.jsonl``; the search run at the best
  rate *is* the grid run when the budgets agree (same name, trained once).

Warnings (recorded in each row's ``warnings``): ``epochs`` > 1 (the run repeats training data), and
``late_drop`` > ``converge_tol``: the training loss still falls by more than that fraction over
the last 20 % of the steps (mean logged loss over steps 70-80 % vs 90-100 % of the run, relative
to the latter), i.e. the run stopped far from converged. Both bend a fit.

Runs go one after another in this process (``threads``: torch CPU threads), or ``jobs`` at a time
as ``pretrainer pretrain`` child processes of ``threads`` threads each (default 1; their output in
``DIR/logs/``). On a small shared CPU, 2 jobs x 1 thread avoids the thread oversubscription that
makes 2-thread runs crawl when other processes compete. ``wall_s`` is each run's own wall time,
which concurrent jobs stretch.

Resumable: a run whose folder holds a checkpoint at its last step and a final validation loss is
finished and is not trained again; a run with earlier checkpoints resumes from the newest.
``print_commands`` writes each run's config under ``DIR/configs/`` and prints one
``pretrainer pretrain`` command per unfinished run instead of training; running the sweep again
afterwards collects the finished runs. The sweep folder is locked while a sweep runs in it
(:mod:`pretrainer.runlock`): a second sweep in the same folder is refused.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import RunConfig, SweepConfig, apply_override, from_dict, save_config, section
from ..errors import CheckpointError, ConfigError, DataError, DivergenceError, PretrainerError, storage, write_atomic
from ..progress import duration
from ..runlock import RunLock

SWEEP_FILE = "sweep.jsonl"
LR_SEARCH_FILE = "lr_search.jsonl"
LATE_WINDOWS = ((0.7, 0.8), (0.9, 1.0))  # fractions of the run compared by the convergence check
_SIZE = re.compile(r"^\s*(\d+)\s*[x:]\s*(\d+)\s*(?:[x:]\s*(\d+))?\s*$")
_COUNT = re.compile(r"^\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kmgt]?)\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}

#: sweep options and their defaults (:class:`~pretrainer.config.SweepConfig`, where each is declared
#: once); a ``sweep:`` section of the base YAML may set any of them
DEFAULTS = dataclasses.asdict(SweepConfig())


# ----------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class Size:
    d_model: int
    n_layer: int
    n_head: int

    @property
    def label(self) -> str:
        return f"d{self.d_model}-l{self.n_layer}"


def parse_count(text, what: str = "value") -> float:
    """``2e6``, ``500k``, ``1.5M``, ``3G`` -> float."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        v = float(text)
    else:
        m = _COUNT.match(str(text))
        if not m:
            raise ConfigError(f"{what} '{text}': expected a positive number such as 2e6, 500k or 1.5M")
        v = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{what} '{text}': expected a positive number such as 2e6, 500k or 1.5M")
    return v


def _items(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [s for s in str(value).split(",") if s.strip()]


def parse_sizes(value, base) -> list[Size]:
    """``"32x2,64x2,128x4"`` (WIDTHxDEPTH[xHEADS]) against the base ModelConfig's head width."""
    items = _items(value)
    if not items:
        raise ConfigError("sizes: missing; expected WIDTHxDEPTH pairs such as --sizes 32x2,64x2,128x4")
    head_dim = base.d_model // base.n_head
    out = []
    for item in items:
        m = _SIZE.match(str(item))
        if not m:
            raise ConfigError(f"sizes: '{item}' is not WIDTHxDEPTH or WIDTHxDEPTHxHEADS (e.g. 64x2 or 64x2x4)")
        d, L = int(m.group(1)), int(m.group(2))
        if m.group(3):
            h = int(m.group(3))
        elif d % head_dim == 0:
            h = d // head_dim
        else:
            raise ConfigError(f"sizes: width {d} is not a multiple of the base head width {head_dim} "
                              f"(d_model {base.d_model} / n_head {base.n_head}); give heads as {d}x{L}xHEADS")
        if d <= 0 or L <= 0 or h <= 0 or d % h:
            raise ConfigError(f"sizes: '{item}': width {d} must be positive and divisible by {h} heads")
        out.append(Size(d, L, h))
    if len(set(out)) != len(out):
        raise ConfigError("sizes: the same size is listed twice")
    return out


def model_for(base, size: Size):
    """The base ModelConfig resized: width, depth, heads; d_ff and n_kv_heads keep their ratios."""
    m = copy.deepcopy(base)
    ratio = size.d_model / base.d_model
    m.d_model, m.n_layer, m.n_head = size.d_model, size.n_layer, size.n_head
    if base.d_ff is not None:
        m.d_ff = max(8, int(round(base.d_ff * ratio / 8)) * 8)
    if base.n_kv_heads is not None:
        kv = max(1, round(size.n_head * base.n_kv_heads / base.n_head))
        while size.n_head % kv:
            kv -= 1
        m.n_kv_heads = kv
    m.validate()
    return m


# ----------------------------------------------------------------------------------------------
# Planning the runs


@dataclass
class RunSpec:
    name: str
    size: Size
    steps: int
    lr: float
    lr_rule: str
    role: str  # grid | isoflop | lr_search
    cfg: RunConfig
    N: int
    params: int
    flops_per_token_attn: int
    c_target: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        t = self.cfg.train
        return self.steps * t.batch_size * t.seq_len * t.grad_accum


def tokens_per_step(cfg: RunConfig) -> int:
    t = cfg.train
    return t.batch_size * t.seq_len * t.grad_accum


def _run_name(size: Size, steps: int, lr: float) -> str:
    return f"{size.label}-{steps}steps-lr{lr:.3g}"


def make_spec(base: RunConfig, out: Path, size: Size, steps: int, lr: float, lr_rule: str, role: str,
              evals: int, c_target=None) -> RunSpec:
    from ..model.info import model_info

    cfg = copy.deepcopy(base)
    cfg.model = model_for(base.model, size)
    name = _run_name(size, steps, lr)
    cfg.out = str(out / "runs" / name)
    t = cfg.train
    t.max_steps, t.lr = steps, lr
    t.eval_every = max(1, steps // evals) if evals else 0
    t.checkpoint_every = max(t.eval_every, steps // 4)
    t.keep_checkpoints = 1
    t.warmup_steps = min(t.warmup_steps, steps // 5)
    t.log_every = max(1, min(t.log_every, steps // 50))
    cfg.validate()
    info = model_info(cfg.model, t.seq_len)
    return RunSpec(name, size, steps, lr, lr_rule, role, cfg, info["params_non_embedding"], info["params"],
                   info["flops_per_token_kaplan"], c_target)


# ----------------------------------------------------------------------------------------------
# Reading a run folder


def _metrics(run: Path) -> list[dict]:
    from ..train.trainer import read_metrics

    f = run / "metrics.jsonl"
    return read_metrics(f) if f.is_file() else []  # (a last line cut by a crash is dropped)


def is_finished(run: Path, steps: int) -> bool:
    """A checkpoint at ``steps`` that verifies and a validation loss logged at ``steps``."""
    from ..train.checkpoint import latest_checkpoint

    try:
        _, meta = latest_checkpoint(run, warn=lambda s: None)
    except CheckpointError:
        return False
    if meta.get("step") != steps:
        return False
    return any(r.get("step") == steps and "val_loss" in r for r in _metrics(run))


def is_diverged(run: Path) -> bool:
    """The run stopped on a divergence guard (``metrics.jsonl`` holds its ``diverged`` line): it is
    over, with no loss to fit (a learning-rate candidate too large, typically)."""
    return any(r.get("diverged") for r in _metrics(Path(run)))


def late_drop(train_curve: list[tuple[int, float]], steps: int) -> float | None:
    """Relative fall of the logged training loss over the last 20 % of the run: mean over steps in
    70-80 % of ``steps`` minus mean over 90-100 %, divided by the latter (None: too few points)."""
    means = []
    for lo, hi in LATE_WINDOWS:
        vals = [loss for s, loss in train_curve if lo * steps < s <= hi * steps]
        if not vals:
            return None
        means.append(sum(vals) / len(vals))
    return (means[0] - means[1]) / means[1]


def _logged_seconds(rows: list[dict], upto: int | None = None) -> float:
    """Training time from the logged step times (evaluations excluded), for steps <= ``upto``."""
    total, prev = 0.0, 0
    for r in rows:
        if "ms_per_step" in r and (upto is None or r["step"] <= upto):
            total += r["ms_per_step"] * (r["step"] - prev) / 1000
            prev = r["step"]
    return total


def record_for(spec: RunSpec, out: Path, train_tokens: int, converge_tol: float, wall_s: float | None,
               resumed_at: int = 0) -> dict:
    """The sweep.jsonl row of a finished run, from its metrics.jsonl. ``wall_s``: measured by the
    sweep (plus the logged time of the steps before ``resumed_at``), or None: the logged step times."""
    run = Path(spec.cfg.out)
    rows = _metrics(run)
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    diverged = next((r for r in rows if r.get("diverged")), None)
    if diverged is not None:  # no final loss: an infinite one loses every comparison, and fits leave it out
        val = [*val, (diverged.get("tokens", 0), math.inf)]
    if not val:
        raise DataError(f"{run / 'metrics.jsonl'}: no validation loss (expected a finished run)")
    if wall_s is None:  # trained elsewhere (--print-commands)
        wall_s = _logged_seconds(rows)
    elif resumed_at:  # the part trained before an interruption
        wall_s += _logged_seconds(rows, resumed_at)
    D = spec.tokens
    drop = late_drop(train, spec.steps)
    epochs = D / train_tokens
    warnings = []
    if epochs > 1:
        warnings.append(f"repeats data: {epochs:.2f} passes over the {train_tokens:,} training tokens")
    if diverged is not None:
        warnings.append(f"diverged at step {diverged.get('step')} (lr {spec.lr:.3g}); left out of the fits")
    if drop is not None and drop > converge_tol:
        warnings.append(f"far from converged: training loss fell {drop:.1%} over the last 20% of steps "
                        f"(threshold {converge_tol:.0%})")
    rec = {
        "name": spec.name, "run": str(run.relative_to(out)) if run.is_relative_to(out) else str(run),
        "role": spec.role, "d_model": spec.size.d_model, "n_layer": spec.size.n_layer, "n_head": spec.size.n_head,
        "N": spec.N, "params": spec.params, "D": D, "steps": spec.steps, "tokens_per_step": tokens_per_step(spec.cfg),
        "C": 6.0 * spec.N * D, "C_attn": float(spec.flops_per_token_attn) * D,
        "loss": val[-1][1], "final_val_loss": val[-1][1], "best_val_loss": min(v for _, v in val),
        "final_train_loss": train[-1][1] if train else None,
        "wall_s": round(wall_s, 2), "lr": spec.lr, "lr_rule": spec.lr_rule, "epochs": epochs,
        "late_drop": drop, "warnings": warnings, "curve": [[t, v] for t, v in val if math.isfinite(v)],
        **({"diverged": True} if diverged is not None else {}),
    }
    if spec.c_target is not None:
        rec["C_target"] = spec.c_target
    rec.update(spec.extra)
    return rec


def _read_jsonl(path: Path) -> dict[str, dict]:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                out[r["name"]] = r
    return out


def _append_jsonl(path: Path, rec: dict) -> None:
    with storage(path, "append to"), open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------------------------
# Analysis helpers (pure functions, tested on hand-made data)


def tokens_to_reach(curve, target: float) -> float | None:
    """Tokens at which a validation curve [(tokens, loss), ...] first reaches ``target``: linear
    interpolation between the last point above and the first point at or below. None if never."""
    pts = sorted((float(t), float(v)) for t, v in curve)
    for i, (t, v) in enumerate(pts):
        if v <= target:
            if i == 0:
                return t
            t0, v0 = pts[i - 1]
            return t0 + (t - t0) * (v0 - target) / (v0 - v)
    return None


def sample_efficiency(records: list[dict], targets=None) -> dict:
    """Tokens each model size needs to reach target losses, from the validation curve of its
    longest run. Default targets: the lowest loss every size reaches (L*), and 1.05 L*, 1.1 L*."""
    import numpy as np

    by_size: dict[tuple, dict] = {}
    for r in records:
        key = (r["d_model"], r["n_layer"])
        if key not in by_size or r["D"] > by_size[key]["D"]:
            by_size[key] = r
    longest = sorted(by_size.values(), key=lambda r: r["N"])
    if not longest:
        return {"targets": [], "sizes": [], "larger_needs_fewer": {}}
    if targets is None:
        floor = max(min(v for _, v in r["curve"]) for r in longest)
        targets = [math.ceil(floor * f * 1e4) / 1e4 for f in (1.1, 1.05, 1.0)]  # rounded up: still reached
    targets = [float(t) for t in targets]
    sizes = []
    for r in longest:
        sizes.append({"name": r["name"], "N": r["N"], "d_model": r["d_model"], "n_layer": r["n_layer"],
                      "D": r["D"], "tokens_to_target": {f"{t:g}": tokens_to_reach(r["curve"], t) for t in targets}})
    verdict, pairs, slope = {}, {}, {}
    for t in targets:
        need = [s["tokens_to_target"][f"{t:g}"] for s in sizes]
        reached = [x for x in need if x is not None]
        verdict[f"{t:g}"] = (len(reached) == len(need) and len(need) >= 2
                             and all(b <= a for a, b in zip(need, need[1:])))
        ok = [(a, b) for a, b in zip(need, need[1:]) if a is not None and b is not None]
        pairs[f"{t:g}"] = f"{sum(b <= a for a, b in ok)}/{len(ok)}"
        pts = [(s["N"], x) for s, x in zip(sizes, need) if x]
        if len({n for n, _ in pts}) >= 2:
            slope[f"{t:g}"] = float(np.polyfit(np.log([n for n, _ in pts]), np.log([x for _, x in pts]), 1)[0])
    return {"targets": targets, "method": "validation curve of each size's longest run, linear interpolation "
            "in tokens between evaluations", "sizes": sizes,
            "larger_needs_fewer": verdict,  # every larger size needs no more tokens than the next smaller
            "adjacent_pairs_in_order": pairs,  # larger size needs <= tokens, of the pairs that both reach it
            "log_tokens_vs_log_N_slope": slope}  # < 0: larger models need fewer tokens


def isoflop_minimum(N, L) -> dict | None:
    """Parabola L = a x^2 + b x + c in x = ln N through IsoFLOP points; its minimum N_opt = e^(-b/2a).
    None when fewer than 3 sizes or the parabola opens downwards."""
    import numpy as np

    x, y = np.log(np.asarray(N, dtype=float)), np.asarray(L, dtype=float)
    if np.unique(x).size < 3:
        return None
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0:
        return None
    xo = -b / (2 * a)
    return {"N_opt": float(math.exp(xo)), "loss_min": float(c - b * b / (4 * a)), "coef": [float(a), float(b), float(c)],
            "inside_range": bool(x.min() <= xo <= x.max())}


def isoflop_sets(records: list[dict]) -> list[dict]:
    """IsoFLOP groups (rows with the same ``C_target``), each with its parabola minimum."""
    groups: dict[float, list[dict]] = {}
    for r in records:
        if r.get("C_target"):
            groups.setdefault(r["C_target"], []).append(r)
    out = []
    for c, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["N"])
        out.append({"C": c, "N": [r["N"] for r in rs], "loss": [r["loss"] for r in rs],
                    "minimum": isoflop_minimum([r["N"] for r in rs], [r["loss"] for r in rs])})
    return out


def loss_falls_with_n(records: list[dict]) -> dict:
    """For each budget D shared by several sizes: is the final loss strictly lower for every larger N?"""
    by_d: dict[int, list[dict]] = {}
    for r in records:
        by_d.setdefault(r["D"], []).append(r)
    out = {}
    for d, rs in sorted(by_d.items()):
        if len(rs) >= 2:
            rs = sorted(rs, key=lambda r: r["N"])
            out[str(d)] = all(b["loss"] < a["loss"] for a, b in zip(rs, rs[1:]))
    return out


# ----------------------------------------------------------------------------------------------
# The sweep


def _options(raw_sweep: dict, given: dict) -> dict:
    typed = section(SweepConfig, raw_sweep, "sweep")  # types checked, a misspelt key named
    opts = dataclasses.asdict(typed)
    for a, b in (("tokens", "isoflop"), ("isoflop", "tokens")):  # budgets given on the command line win
        if given.get(a) is not None:
            opts[b] = None
    opts.update({k: v for k, v in given.items() if v is not None})
    if opts["lr_scaling"] not in ("fixed", "mup"):
        raise ConfigError(f"lr_scaling '{opts['lr_scaling']}': expected fixed or mup")
    if opts["lr_search"] and opts["lr_scaling"] == "mup":
        raise ConfigError("lr_search and lr_scaling=mup exclude each other: search the rates, or scale them")
    try:
        opts["lr_search_tie"] = float(opts["lr_search_tie"])
    except (TypeError, ValueError):
        opts["lr_search_tie"] = -1.0
    if not opts["lr_search_tie"] >= 0:
        raise ConfigError(f"lr_search_tie '{raw_sweep.get('lr_search_tie', given.get('lr_search_tie'))}': "
                          "expected a fraction >= 0, such as 0.005")
    if bool(opts["tokens"]) == bool(opts["isoflop"]):
        raise ConfigError("give token budgets (--tokens 1M,3M) or compute budgets (--isoflop 1e13,3e13), one of the two")
    return opts


def load_base(config: str, overrides=()) -> tuple[RunConfig, dict]:
    """The base RunConfig and the ``sweep:`` section of a YAML file (plus key=value overrides)."""
    from ..config import _find_config_file

    file = _find_config_file(config)
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping of config keys at the top level")
    sweep = raw.pop("sweep", None) or {}
    if not isinstance(sweep, dict):
        raise ConfigError(f"{file}: 'sweep' must be a mapping of sweep options")
    cfg = from_dict(raw, where=str(file))
    for item in overrides:
        apply_override(cfg, item)
    return cfg, sweep


def _prepare_data(base: RunConfig, out: Path, opts: dict, say) -> dict:
    from ..data.prepare import load_manifest, prepare

    if opts["corpus"]:
        data = out / "data"
        try:
            manifest = load_manifest(data)
            say(f"data: reusing {data}")
        except DataError:
            say(f"data: preparing {opts['corpus']} with tokenizer {opts['tokenizer']} into {data}")
            manifest = prepare(opts["corpus"], opts["tokenizer"], str(data), overwrite=True, progress=False)
        base.data = str(data)
    elif not base.data:
        raise ConfigError("data: missing; set 'data:' in the base config or give --corpus builtin:stdlib")
    else:
        manifest = load_manifest(base.data)
    if base.model.vocab_size is None:
        base.model.vocab_size = int(manifest["vocab_size"])
    return manifest


def plan_sweep(base: RunConfig, out: Path, opts: dict) -> tuple[list[RunSpec], dict[int, list[RunSpec]]]:
    """The main runs, and for an lr search the candidate runs per size index."""
    sizes = parse_sizes(opts["sizes"], base.model)
    tps = tokens_per_step(base)
    base_lr = base.train.lr
    base_width = int(opts["base_width"] or base.model.d_model)
    plans: list[tuple[Size, int, float | None]] = []  # size, steps, C target
    if opts["tokens"]:
        budgets = sorted({parse_count(t, "tokens") for t in _items(opts["tokens"])})
        for size in sizes:
            for d in budgets:
                steps = max(1, round(d / tps))
                plans.append((size, steps, None))
    else:
        from ..model.info import model_info

        budgets = sorted({parse_count(c, "isoflop") for c in _items(opts["isoflop"])})
        n_of = {s: model_info(model_for(base.model, s), base.train.seq_len)["params_non_embedding"] for s in sizes}
        for c in budgets:
            kept = [(s, round(c / (6 * n_of[s]) / tps)) for s in sizes]
            kept = [(s, st) for s, st in kept if st >= opts["min_steps"]]
            if len(kept) < 3:
                print(f"warning: isoflop C={c:.3g}: only {len(kept)} size(s) get at least {opts['min_steps']} "
                      "steps; a parabola needs 3", file=sys.stderr)
            plans += [(s, st, c) for s, st in kept]
    short = [(s, st) for s, st, _ in plans if st < opts["min_steps"]]
    if short:
        raise ConfigError(f"{short[0][0].label}: {short[0][1]} steps at {tps:,} tokens per step, fewer than "
                          f"min_steps={opts['min_steps']}; raise the token budget")
    evals = int(opts["evals"])
    role = "grid" if opts["tokens"] else "isoflop"
    search: dict[int, list[RunSpec]] = {}
    if opts["lr_search"]:
        rates = sorted({parse_count(r, "lr_search") for r in _items(opts["lr_search"])})
        if opts["lr_search_tokens"]:
            s_steps = max(1, round(parse_count(opts["lr_search_tokens"], "lr_search_tokens") / tps))
        else:
            s_steps = min(st for _, st, _ in plans)
        for i, size in enumerate(sizes):
            search[i] = [make_spec(base, out, size, s_steps, lr, "search", "lr_search", evals) for lr in rates]
    specs = []
    for size, steps, c in plans:
        lr = base_lr * base_width / size.d_model if opts["lr_scaling"] == "mup" else base_lr
        rule = "search" if opts["lr_search"] else opts["lr_scaling"]
        specs.append(make_spec(base, out, size, steps, lr, rule, role, evals, c))
    return specs, search


def _command_args(spec: RunSpec, out: Path) -> list[str]:
    """``pretrainer`` arguments that train (or resume) ``spec``; its config is written under DIR/configs."""
    from ..train.checkpoint import list_checkpoints

    cfg_file = out / "configs" / f"{spec.name}.yaml"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    save_config(spec.cfg, cfg_file)
    if list_checkpoints(spec.cfg.out):
        return ["pretrain", "--quiet", "--resume", str(spec.cfg.out)]
    return ["pretrain", "--quiet", "-c", str(cfg_file)]


def _command(spec: RunSpec, out: Path) -> str:
    return "pretrainer " + shlex.join(_command_args(spec, out))


def _train_in_process(spec: RunSpec) -> None:
    from ..train.checkpoint import list_checkpoints
    from ..train.trainer import train

    try:
        train(copy.deepcopy(spec.cfg), resume=bool(list_checkpoints(spec.cfg.out)), quiet=True)
    except DivergenceError:  # recorded in its metrics.jsonl; the sweep goes on
        pass


def _child(spec: RunSpec, out: Path, threads: int) -> subprocess.Popen:
    """``pretrainer pretrain`` for ``spec`` in a child process with ``threads`` CPU threads."""
    args = _command_args(spec, out)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(logs / f"{spec.name}.log", "a") as log:
        return subprocess.Popen([sys.executable, "-m", "pretrainer", *args], stdout=log, stderr=log, env=env)


class Interrupted(PretrainerError):
    pass


#: Seconds between two progress lines of a sweep run (steps done, loss, eta).
WATCH_EVERY = 15.0


class RunWatch:
    """Progress of a sweep run read from its ``metrics.jsonl`` (the same for a run in this process
    and a child process): ``poll()`` says ``NAME: step 300/1,000 (30 %), loss 2.41, 1 min 2 s, eta
    2 min 25 s`` when the run has moved on and ``every`` seconds have passed since the last line."""

    def __init__(self, spec: RunSpec, resumed_at: int, say, every: float | None = None):
        self.spec, self.resumed_at, self.say = spec, resumed_at, say
        self.every = WATCH_EVERY if every is None else every
        self.start = self.last = time.perf_counter()
        self.step = resumed_at

    def poll(self) -> None:
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        rows = [r for r in _metrics(Path(self.spec.cfg.out)) if "loss" in r and "step" in r]
        if not rows or rows[-1]["step"] <= self.step:
            return
        self.last, self.step = now, rows[-1]["step"]
        total, spent = self.spec.steps, now - self.start
        done = self.step - self.resumed_at
        eta = spent / done * (total - self.step) if done > 0 else float("nan")
        self.say(f"        {self.spec.name}: step {self.step:,}/{total:,} ({self.step / total:.0%}), "
                 f"loss {rows[-1]['loss']:.4f}, {duration(spent)}, eta {duration(eta) if eta == eta else '?'}")


@contextlib.contextmanager
def _watching(watch: RunWatch):
    """``watch.poll()`` on a thread every second while the body runs (a run trained in this process)."""
    stop = threading.Event()

    def loop():
        while not stop.wait(min(1.0, max(0.05, watch.every))):
            watch.poll()

    thread = threading.Thread(target=loop, name=f"watch {watch.spec.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _run_phase(specs: list[RunSpec], out: Path, train_tokens: int, opts: dict, known: dict, file: Path,
               say, counter: list[int], print_commands: bool, commands: list[str]) -> bool:
    """Records every spec of a phase into ``known`` (and ``file``): already known, collected from a
    finished folder, or trained (``jobs`` at a time). With ``print_commands``, commands instead.
    Returns whether every spec has a record."""
    pending = []
    for spec in specs:
        if spec.name in known:
            continue
        if is_finished(Path(spec.cfg.out), spec.steps) or is_diverged(Path(spec.cfg.out)):  # trained elsewhere, or before a crash of the sweep
            known[spec.name] = record_for(spec, out, train_tokens, opts["converge_tol"], None)
            _append_jsonl(file, known[spec.name])
        elif spec.name not in {p.name for p in pending}:
            pending.append(spec)
    if print_commands:
        commands += [_command(spec, out) for spec in pending]
        return not pending
    jobs, threads = int(opts["jobs"]), opts["threads"]

    def start(spec):
        from ..train.checkpoint import latest_checkpoint

        counter[0] += 1
        try:
            resume = latest_checkpoint(spec.cfg.out, warn=lambda s: None)[1]["step"]
        except CheckpointError:
            resume = 0
        say(f"[{counter[0]}/{counter[1]}] {spec.name}: N={spec.N:,}, D={spec.tokens:,} tokens, lr {spec.lr:.3g} "
            f"({spec.lr_rule}){f' - resuming at step {resume}' if resume else ''}")
        return time.perf_counter(), resume, RunWatch(spec, resume, say)

    def finish(spec, t0):
        t0, resumed_at, _ = t0
        wall = time.perf_counter() - t0
        if not (is_finished(Path(spec.cfg.out), spec.steps) or is_diverged(Path(spec.cfg.out))):
            raise Interrupted(f"{spec.name} stopped before step {spec.steps}; run the same command again to resume "
                              f"(log: {out / 'logs' / (spec.name + '.log')} with --jobs > 1)")
        rec = record_for(spec, out, train_tokens, opts["converge_tol"], wall, resumed_at)
        known[spec.name] = rec
        _append_jsonl(file, rec)
        say(f"        {spec.name}: val loss {rec['loss']:.4f} (best {rec['best_val_loss']:.4f}) in {wall:.0f} s"
            + "".join(f"\n        warning: {w}" for w in rec["warnings"]))

    if jobs <= 1:
        import torch

        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        try:
            for spec in pending:
                t0 = start(spec)
                with _watching(t0[2]):
                    _train_in_process(spec)
                finish(spec, t0)
        finally:  # the caller's setting again (a library call leaves the process as it found it)
            torch.set_num_threads(before)
        return True
    running: list[tuple[RunSpec, subprocess.Popen, float]] = []
    queue = list(pending)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)  # SIGTERM stops the children cleanly too
    try:
        while queue or running:
            while queue and len(running) < jobs:
                spec = queue.pop(0)
                t0 = start(spec)
                running.append((spec, _child(spec, out, int(threads or 1)), t0))
            time.sleep(0.5)
            for item in list(running):
                spec, proc, t0 = item
                if proc.poll() is not None:
                    running.remove(item)
                    finish(spec, t0)
                else:
                    t0[2].poll()
    finally:
        for _, proc, _ in running:  # interrupted: let each child checkpoint and stop
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in running:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        signal.signal(signal.SIGTERM, old_term)
    return True


def run_sweep(config: str, out, overrides=(), print_commands: bool = False, quiet: bool = False, **given) -> dict:
    """Plan, train (or print the commands of), record, fit, plan and plot a sweep. Returns the summary
    (or ``{"commands": [...]}`` with ``print_commands``)."""
    out = Path(out)
    say = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    base, raw_sweep = load_base(config, overrides)
    opts = _options(raw_sweep, given)
    base.out = str(out)
    parse_sizes(opts["sizes"], base.model)  # bad input fails before any data is prepared
    for key in ("tokens", "isoflop", "lr_search"):
        [parse_count(v, key) for v in _items(opts[key])]
    with RunLock(out, "sweep") as lock:  # one sweep per folder (its runs lock their own folders)
        lock.acquire()
        return _run_sweep(base, out, opts, print_commands, say)


def _run_sweep(base: RunConfig, out: Path, opts: dict, print_commands: bool, say) -> dict:
    manifest = _prepare_data(base, out, opts, say)
    train_tokens = int(manifest["splits"]["train"]["tokens"])
    base.validate()
    specs, search = plan_sweep(base, out, opts)

    sweep_file, search_file = out / SWEEP_FILE, out / LR_SEARCH_FILE
    known, known_search = _read_jsonl(sweep_file), _read_jsonl(search_file)
    commands: list[str] = []
    search_specs = [s for runs in search.values() for s in runs]
    todo = {s.name for s in search_specs if s.name not in known_search} | {
        s.name for s in specs if s.name not in known and not (search and s.name in known_search)}
    counter = [0, len(todo)]  # an upper bound: main runs equal to a search run are trained once

    # 1. learning-rate search: per size, the candidate rates on the short budget
    best_lr: dict[Size, dict] = {}
    if search_specs:
        if not _run_phase(search_specs, out, train_tokens, opts, known_search, search_file, say, counter,
                          print_commands, commands):
            commands.append(f"# then run the same 'pretrainer scaling sweep ... --print-commands' again for the main "
                            f"runs: their learning rates come from these {len(search_specs)} search runs")
            return {"commands": commands}
        for runs in search.values():
            recs = [known_search[s.name] for s in runs]
            best_lr[runs[0].size] = pick = pick_rate(recs, float(opts["lr_search_tie"]))
            tied = f" (tied within {pick['tie']:.1%}: {', '.join(f'{x:.3g}' for x in pick['tied'])})" \
                if len(pick["tied"]) > 1 else ""
            say(f"lr search {runs[0].size.label}: " + ", ".join(f"{r['lr']:.3g} -> {r['loss']:.4f}" for r in recs)
                + f"; best {pick['lr']:.3g}{tied}")

    # 2. the main runs, at the chosen rates
    main = []
    for spec in specs:
        if spec.size in best_lr:
            spec = make_spec(base, out, spec.size, spec.steps, best_lr[spec.size]["lr"], "search", spec.role,
                             int(opts["evals"]), spec.c_target)
            spec.extra = {"lr_search": best_lr[spec.size]["losses"]}
            if spec.name in known_search and spec.name not in known:  # the search run at the best rate
                known[spec.name] = {**known_search[spec.name], "role": spec.role, **spec.extra,
                                    **({"C_target": spec.c_target} if spec.c_target else {})}
                _append_jsonl(sweep_file, known[spec.name])
        main.append(spec)
    _run_phase(main, out, train_tokens, opts, known, sweep_file, say, counter, print_commands, commands)
    if print_commands:
        return {"commands": commands}
    records = [known[s.name] for s in main]
    return analyse(records, out, opts, best_lr={s.label: v for s, v in best_lr.items()}, say=say)


def pick_rate(recs: list[dict], tie: float = 0.005) -> dict:
    """The learning rate kept from a size's search runs (``lr`` and final ``loss`` each): the
    smallest rate whose loss is within ``tie`` (relative) of the lowest. Also the losses by rate,
    the tied rates, and ``at_edge``: the kept rate is the smallest or largest candidate."""
    if tie < 0:
        raise ConfigError(f"lr_search_tie {tie}: expected a fraction >= 0, such as 0.005")
    lowest = min(r["loss"] for r in recs)
    tied = sorted(r["lr"] for r in recs if r["loss"] <= lowest * (1 + tie))
    rates = sorted(r["lr"] for r in recs)
    lr = tied[0]
    return {"lr": lr, "losses": {f"{r['lr']:.3g}": r["loss"] for r in sorted(recs, key=lambda r: r["lr"])},
            "tie": tie, "tied": tied, "at_edge": len(rates) > 1 and lr in (rates[0], rates[-1])}


# ----------------------------------------------------------------------------------------------
# Fits, plan, plots, summary


SUMMARY_COLUMNS = ["name", "role", "d_model", "n_layer", "n_head", "N", "params", "D", "steps", "C", "C_attn",
                   "loss", "final_val_loss", "best_val_loss", "final_train_loss", "wall_s", "lr", "lr_rule",
                   "epochs", "late_drop", "C_target", "warnings"]


def analyse(records: list[dict], out: Path, opts: dict, best_lr: dict | None = None, say=None) -> dict:
    """Fits (Kaplan, and Chinchilla where N and D both vary), a plan, sample efficiency, IsoFLOP
    minima, plots; writes summary.json, summary.csv, fit.json, plan.json and the PNGs into ``out``.
    ``say``: where progress lines of a long bootstrap go."""
    from . import plots
    from .fit import choose_form, fit_kaplan, fit_points
    from .plan import plan

    out = Path(out)
    diverged = [r["name"] for r in records if r.get("diverged")]
    records = sorted((r for r in records if not r.get("diverged")), key=lambda r: (r["N"], r["D"]))
    # this sweep's rows only (sweep.jsonl may also hold runs of earlier settings)
    points = [{k: r[k] for k in ("N", "D", "C", "loss")} for r in records]
    n_boot = int(opts.get("bootstrap") or 200)
    summary: dict = {"out": str(out), "n_runs": len(records), "records": [
        {k: r.get(k) for k in SUMMARY_COLUMNS} for r in records]}
    warnings = [f"diverged, left out of the fits: {', '.join(diverged)}"] if diverged else []
    kaplan = None
    try:
        kaplan = fit_kaplan(points, n_boot=n_boot, source=str(out))
    except PretrainerError as e:
        warnings.append(f"Kaplan fit: {e}")
    form = choose_form(points)
    fit = None
    if form == "chinchilla":
        try:
            fit = fit_points(points, "chinchilla", n_boot=n_boot, source=str(out), say=say)
        except PretrainerError as e:
            warnings.append(f"Chinchilla fit: {e}")
    fit = fit or kaplan
    if fit is not None:
        fit.setdefault("source", str(out))
        write_atomic(out / "fit.json", json.dumps(fit, indent=2) + "\n")
    if kaplan is not None:
        write_atomic(out / "fit_kaplan.json", json.dumps(kaplan, indent=2) + "\n")
    c_max = max(r["C"] for r in records) if records else 0
    compute = float(parse_count(opts["plan_compute"], "plan_compute")) if opts.get("plan_compute") else 10 * c_max
    the_plan = None
    if fit is not None and compute > 0:
        try:
            the_plan = plan(fit, compute)
        except PretrainerError as e:
            warnings.append(f"plan: {e}")
    if the_plan is not None:
        write_atomic(out / "plan.json", json.dumps(the_plan, indent=2) + "\n")
    se = sample_efficiency(records, opts.get("targets") and [parse_count(t, "targets") for t in _items(opts["targets"])])
    iso = isoflop_sets(records)
    if kaplan:
        lawN = kaplan["laws"].get("N")
        summary["L_of_N"] = lawN and {"alpha_N": lawN["params"]["alpha_N"], "N_c": lawN["params"]["N_c"],
                                      "r2": lawN["r2"], "interval_alpha_N": lawN["intervals"]["alpha_N"],
                                      "selection": lawN.get("selection")}
        for var in ("D", "C"):
            law = kaplan["laws"].get(var)
            if law:
                summary[f"L_of_{var}"] = {f"alpha_{var}": law["params"][f"alpha_{var}"], f"{var}_c": law["params"][f"{var}_c"],
                                          "r2": law["r2"], "selection": law.get("selection")}
    if fit is not None and fit["form"] == "chinchilla":
        summary["chinchilla"] = {"params": fit["params"], "intervals": {k: fit["intervals"].get(k) for k in fit["params"]},
                                 "r2": fit["r2"], "flags": fit["flags"]}
    if the_plan is not None:
        summary["plan"] = {k: the_plan.get(k) for k in ("compute", "form", "ours", "rule_20_tokens", "flags")}
        summary["plan"]["chinchilla_paper"] = {k: the_plan["chinchilla_paper"][k] for k in ("N", "D", "tokens_per_param")}
    summary["loss_falls_with_N_at_fixed_D"] = loss_falls_with_n(records)
    summary["sample_efficiency"] = se
    if iso:
        summary["isoflop"] = iso
    if best_lr:
        summary["lr_search"] = best_lr
    summary["lr_rule"] = sorted({r["lr_rule"] for r in records})
    for label, v in (best_lr or {}).items():
        if v.get("at_edge"):
            warnings.append(f"lr search {label}: the best rate {v['lr']:.3g} is the edge of the candidates; "
                            "the optimum may lie beyond them")
    summary["warnings"] = warnings + [f"{r['name']}: {w}" for r in records for w in r["warnings"]]
    summary["wall_s_total"] = round(sum(r["wall_s"] or 0 for r in records), 1)

    files = {}
    try:
        files["loss_curves"] = plots.plot_loss_curves(records, out / "loss_curves.png")
        if kaplan:
            for var in ("N", "D", "C"):
                files[f"loss_vs_{var}"] = plots.plot_loss_vs(records, kaplan, var, out / f"loss_vs_{var}.png")
        files["isoflop"] = plots.plot_isoflop(records, iso, fit, out / "isoflop.png")
        if fit is not None:
            files["frontier"] = plots.plot_plan(fit, out / "frontier.png", compute=compute,
                                                measured=_frontier_points(records, iso))
        files["sample_efficiency"] = plots.plot_sample_efficiency(se, out / "sample_efficiency.png")
    except ImportError as e:  # matplotlib missing
        warnings.append(f"no plots: {e}")
    summary["files"] = {k: str(v) for k, v in files.items() if v}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _write_csv(out / "summary.csv", summary["records"])
    return summary


def _frontier_points(records: list[dict], iso: list[dict]) -> list[tuple[float, float, str]]:
    from .fit import _compute_frontier

    pts = [(r["C"], r["N"], "measured compute-efficient frontier") for r in _compute_frontier(records)]
    pts += [(g["C"], g["minimum"]["N_opt"], "IsoFLOP parabola minima") for g in iso if g["minimum"]]
    return pts


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with storage(path, "write", cleanup=tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: ("; ".join(v) if isinstance(v, list) else v) for k, v in r.items()})
        os.replace(tmp, path)
