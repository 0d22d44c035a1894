"""Switch Transformers' claim at CPU scale: a mixture-of-experts decoder against its dense twin at
equal active parameters and equal tokens (Fedus et al. 2021 report Switch-Base reaching T5-Base's
quality about 7x faster, section 3 and Figure 1).

Two ``pretrainer pretrain`` runs per seed on ``builtin:stdlib`` with the same data, steps, batch,
learning rate and seed:

    dense   model=llama-tiny <size>
    switch  model=llama-tiny <size> model.moe.n_experts=8 model.moe.top_k=1 model.moe.every=2

Each token runs one expert, of the dense MLP's size, so both models do the same matrix work per
token (the switch model adds a router); the switch model holds 8x the MLP parameters in its MoE
layers. Reported: validation loss at the end and along the way (``eval_every``), the steps the
switch model needs to reach the dense model's final validation loss (interpolated on the
validation curve: the "faster to the same quality" of the paper, counted in steps), the router's
balance (busiest expert over the mean) and dropped fraction from ``metrics.jsonl``, and the
wall-time cost per step measured apart, side by side: dense and switch training steps
interleaved, repeats, the median ratio with its min-max spread (the training runs' own step times
are context, not the comparison).

    python benchmarks/moe_switch.py [--steps 800] [--seeds 0 1] [--json benchmarks/results/moe_switch.json]

Writes the JSON and a PNG of the validation curves beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWITCH = ["model.moe.n_experts=8", "model.moe.top_k=1", "model.moe.every=2"]


def size(args) -> list[str]:
    return ["model=llama-tiny", f"model.n_layer={args.layers}", f"model.d_model={args.width}", "model.n_head=4",
            "model.n_kv_heads=4", f"model.d_ff={int(8 / 3 * args.width) // 8 * 8}", "model.vocab_size=null"]


def curve(run: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r[key]) for r in rows if key in r]


def steps_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which the validation curve reaches ``target`` (linear between evaluations)."""
    for (s0, l0), (s1, l1) in zip(points, points[1:]):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1) if l0 > target else float(s0)
    return None


def step_times(dense_cfg, switch_cfg, data: Path, repeats: int, steps: int) -> dict:
    """Training-step milliseconds of both models, interleaved: a block of ``steps`` steps of one,
    then of the other, ``repeats`` times (after a warm-up block each)."""
    import torch

    from pretrainer.data.tokens import TokenSplit
    from pretrainer.model import make_model
    from pretrainer.model.fast import apply_fast_paths
    from pretrainer.train.loop import TrainStep
    from pretrainer.train.objectives import get_objective
    from pretrainer.train.optim import make_optimizer

    split = TokenSplit(data, "train")
    runs = {}
    for name, cfg in (("dense", dense_cfg), ("switch", switch_cfg)):
        cfg.model.vocab_size = split.vocab_size
        torch.manual_seed(0)
        model = apply_fast_paths(make_model(cfg.model)).train()
        objective = get_objective(cfg)
        runs[name] = (TrainStep(model, objective), make_optimizer(model, cfg.train, "cpu"),
                      objective.batches(split))
    ms = {name: [] for name in runs}

    def block(name: str) -> float:
        step, opt, batches = runs[name]
        t0 = time.perf_counter()
        for i in range(steps):
            loss = step(batches.batch(i * 16, 16))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return 1000 * (time.perf_counter() - t0) / steps

    for name in runs:
        block(name)  # warm-up
    for _ in range(repeats):
        for name in runs:
            ms[name].append(block(name))
    ratios = [s / d for s, d in zip(ms["switch"], ms["dense"])]
    return {"ms_per_step": {k: {"median": statistics.median(v), "all": v} for k, v in ms.items()},
            "switch_over_dense": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--docs", type=int, default=400, help="standard-library files in the corpus (default 400)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timing-repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="a smoke run: 60 steps, one seed, 2 timing repeats")
    p.add_argument("--work", default=str(HERE / "runs" / "moe_switch"))
    p.add_argument("--json", default=str(HERE / "results" / "moe_switch.json"))
    p.add_argument("--replot", action="store_true", help="redraw the PNG from the --json results, train nothing")
    args = p.parse_args()
    if args.replot:
        plot(json.loads(Path(args.json).read_text())["runs"], Path(args.json).with_suffix(".png"))
        return 0
    if args.quick:
        args.steps, args.seeds, args.timing_repeats = 60, args.seeds[:1], 2

    import torch

    from pretrainer.config import load_config
    from pretrainer.data.prepare import prepare
    from pretrainer.model.info import model_info
    from pretrainer.train.trainer import train

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        prepare(f"builtin:stdlib:{args.docs}", "bpe:4096", data, overwrite=True)
    common = [f"data={data}", f"train.max_steps={args.steps}", "train.batch_size=16", "train.seq_len=128",
              f"train.lr={args.lr}", f"train.warmup_steps={max(1, args.steps // 10)}",
              f"train.eval_every={max(1, args.steps // 10)}", "train.eval_batches=8",
              f"train.log_every={max(1, args.steps // 20)}", "train.checkpoint_every=0", "train.plot=false"]
    models = {"dense": size(args), "switch": size(args) + SWITCH}
    runs = {}
    for seed in args.seeds:
        for name, keys in models.items():
            out = work / f"{name}-s{seed}-{args.steps}"
            cfg = load_config(None, keys + common + [f"train.seed={seed}", f"out={out}"])
            if not (out / "checkpoints").is_dir():
                print(f"--- {name}, seed {seed}", file=sys.stderr, flush=True)
                train(cfg, quiet=True)
            info = model_info(_with_vocab(cfg.model, data), cfg.train.seq_len)
            logged = [r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
            runs[f"{name}-s{seed}"] = {
                "model": name, "seed": seed, "overrides": keys + common + [f"train.seed={seed}"],
                "params": info["params"], "params_active": info.get("params_active", info["params"]),
                "val": curve(out, "val_loss"), "final_val_loss": curve(out, "val_loss")[-1][1],
                "train_ms_per_step": statistics.median(r["ms_per_step"] for r in logged[1:]),
                **({"moe_load_max_last": logged[-1]["moe_load_max"], "moe_dropped_last": logged[-1]["moe_dropped"],
                    "moe_load_max_median": statistics.median(r["moe_load_max"] for r in logged),
                    "moe_dropped_median": statistics.median(r["moe_dropped"] for r in logged)}
                   if name == "switch" else {}),
            }
            r = runs[f"{name}-s{seed}"]
            print(f"{name:6s} seed {seed}: val loss {r['final_val_loss']:.4f}  params {r['params']:,} "
                  f"(active {r['params_active']:,})", flush=True)
    per_seed = []
    for seed in args.seeds:
        d, s = runs[f"dense-s{seed}"], runs[f"switch-s{seed}"]
        reach = steps_to_reach(s["val"], d["final_val_loss"])
        per_seed.append({"seed": seed, "val_loss_dense": d["final_val_loss"], "val_loss_switch": s["final_val_loss"],
                         "difference": s["final_val_loss"] - d["final_val_loss"],
                         "switch_steps_to_dense_final": reach,
                         "step_speedup": args.steps / reach if reach else None})
        print(f"seed {seed}: dense {d['final_val_loss']:.4f}  switch {s['final_val_loss']:.4f}  "
              f"switch reaches dense's final loss at step {reach if reach is None else round(reach)} of {args.steps}")

    print("--- step time, interleaved", file=sys.stderr, flush=True)
    timing = step_times(*(load_config(None, keys + common + [f"out={work / 'timing'}"]) for keys in models.values()),
                        data, args.timing_repeats, 10 if not args.quick else 3)
    t = timing["switch_over_dense"]
    print(f"step time switch / dense: {t['median']:.2f}x (min {t['min']:.2f}, max {t['max']:.2f}; "
          f"{timing['ms_per_step']['dense']['median']:.0f} vs {timing['ms_per_step']['switch']['median']:.0f} ms)")
    result = {"benchmark": "moe_switch", "steps": args.steps, "seeds": args.seeds, "docs": args.docs,
              "layers": args.layers, "width": args.width, "lr": args.lr, "threads": args.threads,
              "quick": args.quick, "runs": runs, "per_seed": per_seed, "step_time": timing,
              "paper": "Fedus et al. 2021: Switch-Base (128 experts) reaches T5-Base's quality ~7x faster "
                       "in wall time at equal FLOPs per token",
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "torch": torch.__version__}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    plot(runs, Path(args.json).with_suffix(".png"))
    print(f"-> {args.json}")
    return 0


def _with_vocab(model_cfg, data: Path):
    import dataclasses

    from pretrainer.data.tokens import TokenSplit

    return dataclasses.replace(model_cfg, vocab_size=TokenSplit(data, "train").vocab_size)


def plot(runs: dict, path: Path) -> None:
    from pretrainer.plotting import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for key, r in runs.items():
        steps, losses = zip(*r["val"][1:])
        ax.plot(steps, losses, marker="o", ms=3, color="C1" if r["model"] == "switch" else "C0",
                ls="-" if r["seed"] % 2 == 0 else "--",
                label=f"{r['model']} (seed {r['seed']}, {r['params_active']:,} active)")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("Switch (8 experts, top-1, every other layer) vs dense,\nequal active size", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
