"""A Gato-style joint model against single-task models of the same size and steps (Reed et al. 2022,
"A Generalist Agent": one decoder over one serialised token stream learns many tasks).

``objective=gato`` (``pretrainer.data.gato``) mixes three tasks in one stream: captioning 8 x 8 digit
images ("a digit seven", the images as patch embeddings), continuing text (a character-level slice of
the standard library) and predicting a PD-controlled pendulum's torque as mu-law tokens. For each
seed, interleaved, four runs of the same model (``gpt-nano``, 3 x 48) for the same steps, batch and
learning rate:

- ``joint``: ``gato.tasks=caption,text,control`` (each task a third of the rows);
- ``caption``, ``text``, ``control``: one task each (``gato.tasks=TASK``): three times the rows of
  its task that the joint model sees, and none of the others.

Every model is then evaluated per task on the same validation rows: all 180 held-out digits
(caption exact match: the greedy caption, "a digit seven" and its end, is right), the first text
windows of the val split, and fixed validation episodes (the torque's mean absolute error, in its
own units, of the most likely value token). For scale: the control baselines "the previous torque"
and "zero", the bins' own error, and chance on captions (0.1).

    python benchmarks/gato.py [--steps 400] [--seeds 2] [--quick]

Writes ``benchmarks/results/gato.json`` and ``gato.png``. One CPU thread
(``torch.set_num_threads(1)``): the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

TASK_METRICS = {"caption": ("val_caption_accuracy", "higher"), "text": ("val_text_loss", "lower"),
                "control": ("val_control_mae", "lower")}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def evaluate_task(model, data: Path, task: str, seq_len: int, rows: int) -> dict:
    """The per-task metrics of a trained Gato model on ``rows`` fixed validation rows of ``task``."""
    from pretrainer.config import load_config
    from pretrainer.data.tokens import TokenSplit
    from pretrainer.train.objectives import get_objective
    from pretrainer.train.trainer import evaluate_split

    cfg = load_config(None, ["objective=gato", f"gato.tasks={task}", f"data={data}", "out=unused",
                             f"train.seq_len={seq_len}"])
    return evaluate_split(model, get_objective(cfg), TokenSplit(data, "val"), rows, 1)


def control_baselines(seq_len: int, episodes: int) -> dict:
    """MAE of the validation torques for: the previous step's torque (0 at the first), zero, and
    the middle of each torque's own bin (the floor of any model that predicts tokens)."""
    import numpy as np
    import torch

    from pretrainer.data.gato import discretise, pendulum, undiscretise

    steps = (seq_len + 1) // 4
    u = torch.from_numpy(np.stack([pendulum(steps, 0, j, 1)[2] for j in range(episodes)]))
    prev = torch.cat([torch.zeros(episodes, 1, dtype=u.dtype), u[:, :-1]], 1)
    return {"previous_torque": (prev - u).abs().mean().item(), "zero": u.abs().mean().item(),
            "bins_own_error": (undiscretise(discretise(u)) - u).abs().mean().item()}


def curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keep = ("val_loss", *(m for m, _ in TASK_METRICS.values()))
    return [{"step": r["step"], **{k: r[k] for k in keep if k in r}} for r in rows if "val_loss" in r]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--model", default="gpt-nano")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--docs", type=int, default=200, help="standard-library files for the text task")
    p.add_argument("--eval-rows", type=int, default=48, help="validation rows of the text and control tasks")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 20 steps")
    p.add_argument("--work", default=str(HERE / "runs" / "gato"))
    p.add_argument("--json", default=str(HERE / "results" / "gato.json"))
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_rows = 1, 20, 12

    import torch

    torch.set_num_threads(1)
    import pretrainer
    from pretrainer.config import load_config
    from pretrainer.data.prepare import prepare
    from pretrainer.train.trainer import train

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data = work / "text"
    manifest = prepare(f"builtin:stdlib:{args.docs}", "char", data, progress=False)
    kinds = ("joint", "caption", "text", "control")
    results = {k: [] for k in kinds}
    started = time.perf_counter()
    params = None
    for seed in range(args.seeds):
        for kind in kinds:
            t0 = time.perf_counter()
            run = work / f"{kind}-{seed}"
            tasks = "caption,text,control" if kind == "joint" else kind
            cfg = load_config(None, [
                f"model={args.model}", "objective=gato", f"gato.tasks={tasks}", f"data={data}", f"out={run}",
                f"train.seed={seed}", f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
                f"train.seq_len={args.seq_len}", f"train.lr={args.lr}", f"train.warmup_steps={max(1, args.steps // 10)}",
                # training-time evaluation on the same rows of each task for all four: the joint model's
                # rows go to the tasks in turn, so it takes three times the batches
                f"train.eval_every={max(1, args.steps // 5)}", f"train.eval_batches={6 if kind == 'joint' else 2}",
                "train.log_every=50",
                "train.plot=false", f"train.checkpoint_every={args.steps}", "train.keep_checkpoints=1",
                "train.threads=1"])
            summary = train(cfg, quiet=True)
            seconds = time.perf_counter() - t0
            model = pretrainer.load(run, trained=True)
            params = sum(q.numel() for q in model.parameters())
            from pretrainer.data.gato import GatoBatches  # captions per row, for the rows covering 180 digits
            from pretrainer.data.tokens import TokenSplit

            per_row = GatoBatches(TokenSplit(data, "val"), args.seq_len, 0, ("caption",), 4).per_row
            scores = {}
            for task in TASK_METRICS:
                rows = math.ceil(180 / per_row) if task == "caption" else args.eval_rows
                scores.update({k: v for k, v in evaluate_task(model, data, task, args.seq_len, rows).items()
                               if k.startswith(f"val_{task}_")})
            results[kind].append({"seed": seed, "scores": scores, "train_val_loss": summary["val_loss"],
                                  "seconds": round(seconds, 1), "curve": curve(run)})
            print(f"seed {seed} {kind:>8}: " + ", ".join(f"{k[4:]} {v:.4f}" for k, v in scores.items())
                  + f" ({seconds:.0f} s)", flush=True)

    # each task's rows and targets: in the joint model's batches a third of the rows, and of the
    # per-token mean loss the share of its targets
    from pretrainer.common import IGNORE
    from pretrainer.data.gato import TASKS, GatoBatches
    from pretrainer.data.tokens import TokenSplit

    rows = GatoBatches(TokenSplit(data, "train"), args.seq_len, 0, TASKS, 4).batch(0, 3)
    targets = {t: int((rows["labels"][i] != IGNORE).sum()) for i, t in enumerate(TASKS)}
    mix = {t: {"targets_per_row": n, "share_of_joint_loss": n / sum(targets.values()),
               "rows_seen_joint": args.steps * args.batch // 3, "rows_seen_single_task": args.steps * args.batch}
           for t, n in targets.items()}
    table = {}
    for task, (metric, better) in TASK_METRICS.items():
        joint = [r["scores"][metric] for r in results["joint"]]
        single = [r["scores"][metric] for r in results[task]]
        table[task] = {"metric": metric, "better": better, "joint": spread(joint), "single_task": spread(single),
                       "joint_minus_single": spread([a - b for a, b in zip(joint, single)])}
        # what a single-task model scores on the tasks it never saw (for scale)
        table[task]["other_single_task_models"] = {k: spread([r["scores"][metric] for r in results[k]])
                                                   for k in TASK_METRICS if k != task}
    out = {
        "benchmark": "gato", "model": f"{args.model} ({params:,} parameters with the patch embedding)",
        "data": {"text": f"builtin:stdlib:{args.docs}, char tokenizer (vocab {manifest['vocab_size']})",
                 "caption": "builtin digits (sklearn): 1,617 train / 180 val images, 8 x 8, patches of 4 x 4",
                 "control": "PD-controlled pendulum, torque as mu-law tokens (mu 100, M 256, 1024 bins)"},
        "train": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                  "warmup": max(1, args.steps // 10), "schedule": "cosine (the trainer's default)"},
        "eval": {"caption": "all 180 val digits, exact match of the greedy caption",
                 "text": f"{args.eval_rows} val windows of {args.seq_len} tokens, cross-entropy",
                 "control": f"{args.eval_rows} val episodes of {(args.seq_len + 1) // 4} steps, torque MAE"},
        "seeds": args.seeds, "threads": 1, "quick": args.quick,
        "tasks": table, "mix": mix, "control_baselines": control_baselines(args.seq_len, args.eval_rows),
        "caption_chance": 0.1, "runs": results, "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
        "note": "same model, steps, batch and lr for all four; the joint model sees a third of each task's rows",
    }
    path = Path(args.json)
    if args.quick:
        path = path.with_name(path.stem + "_quick.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({t: {"joint": v["joint"]["median"], "single_task": v["single_task"]["median"]}
                      for t, v in table.items()} | {"control_baselines": out["control_baselines"],
                                                     "seconds": out["seconds"]}, indent=2))
    plot(results, out["control_baselines"], path.with_suffix(".png"), args)
    print(f"wrote {path}, {path.with_suffix('.png')}")
    return 0


def plot(results: dict, baselines: dict, png: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"caption": "caption exact match (180 val digits) ↑", "text": "text loss (nats/char) ↓",
              "control": "torque MAE (val episodes) ↓"}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=110)
    for col, (task, (metric, _)) in enumerate(TASK_METRICS.items()):
        ax = axes[0, col]
        for i, kind in enumerate(("joint", task)):
            vals = [r["scores"][metric] for r in results[kind]]
            med = statistics.median(vals)
            ax.bar(i, med, color=f"C{i}", yerr=[[med - min(vals)], [max(vals) - med]], capsize=6)
            ax.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
            ax.text(i, med / 2, f"{med:.3f}", ha="center", color="white", fontsize=10)
        if task == "control":
            for name, style in (("previous_torque", "--"), ("zero", "-."), ("bins_own_error", ":")):
                ax.axhline(baselines[name], color="gray", ls=style, lw=1, label=name.replace("_", " "))
            ax.legend(fontsize=7)
        if task == "caption":
            ax.axhline(0.1, color="gray", ls="--", lw=1, label="chance")
            ax.legend(fontsize=7)
        ax.set_xticks([0, 1], ["joint (3 tasks)", f"{task} only"])
        ax.set_title(titles[task], fontsize=9)
        ax = axes[1, col]  # against the rows of this task seen: the joint model sees a third as many per step
        for i, kind in enumerate(("joint", task)):
            per_step = args.batch / 3 if kind == "joint" else args.batch
            for j, r in enumerate(results[kind]):
                pts = [(c["step"] * per_step, c[metric]) for c in r["curve"] if metric in c and c["step"] > 0]
                ax.plot(*zip(*pts), "o-", color=f"C{i}", ms=3, alpha=0.8,
                        label=("joint" if kind == "joint" else f"{task} only") if j == 0 else None)
        if task == "control":
            ax.set_yscale("log")
            ax.axhline(baselines["previous_torque"], color="gray", ls="--", lw=1, label="previous torque")
            ax.axhline(baselines["zero"], color="gray", ls="-.", lw=1, label="zero torque")
        ax.set_xlabel(f"{task} rows seen (training-time evaluation: the first {2 * args.batch} validation rows)",
                      fontsize=8)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Gato-style joint model vs single-task models: {args.model}, {args.steps} steps of {args.batch} x "
                 f"{args.seq_len}, {args.seeds} seed(s), 1 CPU thread", fontsize=10)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
