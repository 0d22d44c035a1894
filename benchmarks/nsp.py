"""Next-sentence prediction or not (RoBERTa's finding, Liu et al. 2019, section 4.2: removing BERT's
NSP loss matches or slightly improves downstream results): a small BERT pretrained with ``mlm``
and the same BERT pretrained with ``mlm+nsp`` for the same steps on the embedded corpus, each then
fine-tuned on a text-pair task, ``builtin:stdlib-docstring`` (does this docstring belong to this
function?), with the same settings for several seeds.

    python benchmarks/nsp.py [--steps 400] [--seeds 0,1,2] [--epochs 3] [--quick] [--reuse]

1. ``prepare``: the standard library without the files that hold the task's evaluation functions
   (pretraining never sees an evaluation example), WordPiece 8192; documents are files.
2. ``pretrain``, the two runs interleaved in one process: ``bert-tiny`` (2 x 128), 128 tokens, batch
   32, ``--steps`` steps, AdamW lr 1e-3 (``configs/bert-mini-stdlib.yaml`` otherwise), the same
   seed; the NSP run has ``model.nsp_head=true`` and BERT's examples ``<cls> A <sep> B <sep>``
   (B the actual continuation or, half of the time, from another file). Equal steps and sequences,
   as in the paper's comparison; an NSP example may end in padding when a file is short, so it
   holds somewhat fewer real tokens (counted in the JSON).
3. ``finetune`` each on ``builtin:stdlib-docstring`` for every seed of ``--seeds`` (3 epochs, lr
   1e-3, the best rate for a pretrained bert-tiny in finetune_pretrained_vs_scratch.py; batch 32,
   128 tokens), the two runs of a seed one after the other.

One thread (``torch.set_num_threads(1)``), so the two sides see the same machine. Prints the
accuracies per seed, their mean, spread and paired difference; writes
``benchmarks/results/nsp.json`` and ``nsp.png``. ``--quick`` is a smoke run (a few steps, one seed,
a capped task) that writes ``nsp_quick.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TASK = "builtin:stdlib-docstring"


def main() -> int:
    t_process = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400, help="pretraining steps of each model (batch 32 x 128)")
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak learning rate")
    p.add_argument("--model", default="bert-tiny")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 steps, one seed, 200 task pairs")
    p.add_argument("--reuse", action="store_true", help="reuse the data folder in --work")
    p.add_argument("--work", default=str(REPO / "runs" / "bench-nsp"))
    p.add_argument("--json", default=None, help="default: benchmarks/results/nsp.json (nsp_quick.json with --quick)")
    p.add_argument("--replot", action="store_true", help="redraw the PNG from the --json results, train nothing")
    args = p.parse_args()
    task = TASK
    if args.quick:
        args.steps, args.seeds, args.epochs, task = 10, "0", 1, f"{TASK}:200"
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out_json = Path(args.json or HERE / "results" / ("nsp_quick.json" if args.quick else "nsp.json"))
    if args.replot:
        plot(json.loads(out_json.read_text())["runs"], out_json.with_suffix(".png"))
        return 0
    torch.set_num_threads(1)

    from _reuse import fresh_corpus
    from pretrainer.config import load_config
    from pretrainer.data.prepare import prepare
    from pretrainer.finetune import finetune
    from pretrainer.finetune.builtin import builtin_rows
    from pretrainer.train.trainer import train

    work = Path(args.work)
    data = work / "data"
    timings: dict[str, float] = {}
    if not (args.reuse and (data / "manifest.json").is_file()):
        t0 = time.perf_counter()
        corpus = work / "corpus"
        n_files = fresh_corpus(corpus, TASK)
        print(f"[1/3] preparing {n_files} stdlib files ({TASK}'s eval files held out), WordPiece 8192", flush=True)
        prepare(str(corpus), "wordpiece:8192", data, overwrite=True, progress=False)
        timings["prepare_s"] = time.perf_counter() - t0

    sides = {"mlm": ["objective=mlm"], "mlm+nsp": ["objective=mlm+nsp", "model.nsp_head=true"]}
    pretrained = {}
    for name, extra in sides.items():
        out = work / f"pretrain-{name}"
        if out.exists():
            shutil.rmtree(out)
        cfg = load_config(str(REPO / "configs" / "bert-mini-stdlib.yaml"),
                          [f"model={args.model}", "model.vocab_size=null", "model.max_seq_len=128", *extra,
                           f"data={data}", f"out={out}", f"train.max_steps={args.steps}",
                           f"train.warmup_steps={max(1, min(100, args.steps // 10))}", "train.eval_every=0",
                           "train.eval_batches=10", "train.checkpoint_every=0",
                           f"train.log_every={max(1, args.steps // 5)}", "train.plot=false", "train.seed=0"])
        print(f"[2/3] pretraining {args.model} with {name} for {args.steps} steps", flush=True)
        t0 = time.perf_counter()
        train(cfg, quiet=True)
        timings[f"pretrain_{name}_s"] = time.perf_counter() - t0
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        last = [r for r in lines if "val_loss" in r][-1]
        pretrained[name] = {"run": str(out), "val_mlm_loss": last["val_loss"],
                            "val_masked_accuracy": last.get("val_accuracy"),
                            "val_nsp_accuracy": last.get("val_nsp_accuracy"),
                            "real_tokens_per_sequence": real_tokens(cfg, name),
                            "seconds": round(timings[f"pretrain_{name}_s"], 1)}
        print(f"      val MLM loss {last['val_loss']:.4f}, masked accuracy {last.get('val_accuracy', 0):.4f}"
              + (f", NSP accuracy {last['val_nsp_accuracy']:.4f}" if "val_nsp_accuracy" in last else ""),
              flush=True)

    scores: dict[str, list[dict]] = {name: [] for name in sides}
    for seed in seeds:
        for name in sides:
            out = work / f"ft-{name}-seed{seed}"
            if out.exists():
                shutil.rmtree(out)
            t0 = time.perf_counter()
            r = finetune(pretrained[name]["run"], "classification", task, str(out), epochs=args.epochs,
                         lr=args.lr, batch_size=32, max_len=128, seed=seed, quiet=True)
            timings[f"finetune_{name}_seed{seed}_s"] = time.perf_counter() - t0
            scores[name].append({"seed": seed, **{k: r[k] for k in ("accuracy", "f1", "mcc", "epoch")}})
            print(f"[3/3] seed {seed} {name:8s}: accuracy {r['accuracy']:.4f}, F1 {r['f1']:.4f} "
                  f"(best epoch {r['epoch']})", flush=True)

    def summary(rows: list[dict]) -> dict:
        acc = [r["accuracy"] for r in rows]
        return {"mean": statistics.fmean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "min": min(acc), "max": max(acc)}

    diffs = [b["accuracy"] - a["accuracy"] for a, b in zip(scores["mlm"], scores["mlm+nsp"])]
    result = {
        "claim": "RoBERTa (Liu et al. 2019, 4.2): without NSP downstream results match or improve",
        "task": f"{task} (text pair, matched / shuffled)",
        "train_pairs": len(builtin_rows(task, "train")[1]), "eval_pairs": len(builtin_rows(task, "eval")[1]),
        "pretrain": {"model": args.model, "steps": args.steps, "batch_size": 32, "seq_len": 128, "lr": 1e-3,
                     "corpus": f"builtin:stdlib without {TASK}'s eval files, WordPiece 8192", **pretrained},
        "finetune": {"epochs": args.epochs, "lr": args.lr, "batch_size": 32, "max_len": 128, "seeds": seeds},
        "accuracy": {name: summary(rows) for name, rows in scores.items()},
        "runs": scores,
        "nsp_minus_mlm": {"per_seed": diffs, "mean": statistics.fmean(diffs),
                          "min": min(diffs), "max": max(diffs)},
        "threads": 1,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "process_s": round(time.perf_counter() - t_process, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    plot(scores, out_json.with_suffix(".png"))
    for name in sides:
        s = result["accuracy"][name]
        print(f"{name:8s}: accuracy {s['mean']:.4f} ± {s['std']:.4f} (min {s['min']:.4f}, max {s['max']:.4f}) "
              f"over seeds {seeds}")
    d = result["nsp_minus_mlm"]
    print(f"mlm+nsp - mlm: {d['mean']:+.4f} (per seed {', '.join(f'{x:+.4f}' for x in diffs)}); "
          f"{result['process_s']:.0f} s; written to {out_json}")
    return 0


def real_tokens(cfg, name: str) -> float:
    """The mean number of non-padding tokens of the first 256 training sequences."""
    from pretrainer.data.tokens import TokenSplit
    from pretrainer.train.objectives import get_objective

    if name == "mlm":
        return float(cfg.train.seq_len)
    batch = get_objective(cfg).batches(TokenSplit(cfg.data, "train")).batch(0, 256)
    return float(batch["attention_mask"].sum(1).double().mean())


def plot(scores: dict[str, list[dict]], path: Path) -> None:
    """Each seed's accuracy (dots) and their mean (a bar across), per pretraining objective: no bars
    from a cut-off baseline, so the y-range can stay on the scores."""
    try:
        from pretrainer.plotting import fit_ylim, pyplot, save

        plt = pyplot()
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for i, (name, rows) in enumerate(scores.items()):
        acc = [r["accuracy"] for r in rows]
        ax.hlines(statistics.fmean(acc), i - 0.25, i + 0.25, color=f"C{i}", lw=2.5, label="mean" if i == 0 else None)
        ax.scatter([i] * len(acc), acc, color="black", s=14, zorder=3, label="one seed" if i == 0 else None)
    ax.set_xticks(range(len(scores)), list(scores))
    ax.set_xlim(-0.6, len(scores) - 0.4)
    ax.set_ylabel("fine-tuned accuracy")
    ax.set_title("stdlib-docstring after mlm vs mlm+nsp", fontsize=9)
    fit_ylim(ax, [r["accuracy"] for rows in scores.values() for r in rows], margin=0.25)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
