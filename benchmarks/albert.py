"""ALBERT's claim at CPU scale (Lan et al. 2020, Table 2): far fewer parameters for accuracy close to a
BERT of the same width. Two encoders of one width and depth, pretrained the same way and fine-tuned
the same way, differ only in ALBERT's two options:

    bert    model=bert-tiny  model.n_layer=L model.d_model=H model.n_head=2            (BERT)
    albert  ... the same, plus model.d_embed=E model.share_layers=all                  (ALBERT)

1. ``prepare``: ``--docs`` standard-library files **without** the files that hold
   ``builtin:stdlib-package``'s evaluation functions (pretraining never sees an evaluation example),
   WordPiece 8192; both models share it.
2. ``pretrain``: MLM (15 %, 80/10/10), the same steps, batch, rate and seed for both
   (batch 16 x 64 tokens; ``configs/bert-mini-stdlib.yaml``'s optimizer settings).
3. ``finetune``: each pretrained model on ``builtin:stdlib-package`` (which of 10 packages a function
   comes from), the same settings, for 3 seeds; mean and spread (min, max) of the accuracy.
4. Step time, side by side: both models in this process, one pretraining step (forward, backward,
   AdamW) each in turn, the order alternating, ``--rounds`` rounds; median and quartiles of each, and
   the median of the per-round ratios with its min and max.

One thread (``torch.set_num_threads(1)``: the machine is shared): about 5 minutes on an idle core,
up to 15 on a busy one; ``--quick`` is a smoke run (a minute or two) whose numbers mean nothing.

    python benchmarks/albert.py [--quick] [--steps 400] [--layers 4] [--width 128] [--embed 32]

Writes ``benchmarks/results/albert.json`` (``albert_quick.json`` with ``--quick``).
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


def quartiles(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": q[1], "q1": q[0], "q3": q[2], "n": len(xs)}


def main() -> int:
    t_process = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets, meaningless numbers")
    p.add_argument("--docs", type=int, default=400, help="standard-library files to pretrain on")
    p.add_argument("--steps", type=int, default=400, help="pretraining steps of each model (batch 16 x 64 tokens)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--embed", type=int, default=32, help="ALBERT's d_embed")
    p.add_argument("--lr", type=float, default=1e-3, help="pretraining peak rate (both)")
    p.add_argument("--ft-lr", type=float, default=1e-3, help="fine-tuning peak rate (both)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=20, help="side-by-side step timing rounds")
    p.add_argument("--work", default=str(REPO / "runs" / "bench-albert"))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.quick:
        args.docs, args.steps, args.epochs, args.seeds, args.rounds = 40, 20, 1, "0", 3
    out_json = Path(args.json or HERE / "results" / ("albert_quick.json" if args.quick else "albert.json"))
    torch.set_num_threads(1)

    from pretrainer.config import load_config
    from pretrainer.data.prepare import prepare
    from pretrainer.data.tokens import TokenSplit
    from pretrainer.finetune import finetune
    from pretrainer.finetune.builtin import builtin_rows, corpus_without_eval
    from pretrainer.model import make_model
    from pretrainer.model.fast import apply_fast_paths
    from pretrainer.model.info import model_info
    from pretrainer.train.objectives import get_objective
    from pretrainer.train.trainer import train

    work = Path(args.work) / ("quick" if args.quick else "full")
    if work.exists():
        shutil.rmtree(work)
    timings = {}

    # 1. data: every k-th file of the standard library less the task's evaluation files
    t0 = time.perf_counter()
    every = work / "stdlib"
    every.mkdir(parents=True)
    corpus_without_eval(every, "builtin:stdlib-package")
    files = sorted(f for f in every.rglob("*.py"))
    corpus = work / "corpus"
    for i, f in enumerate(files[::max(1, len(files) // args.docs)][:args.docs]):
        (corpus / f"{i:04d}.py").parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f.resolve(), corpus / f"{i:04d}.py")
    data = work / "data"
    print(f"[1/4] preparing {args.docs} stdlib files (eval files held out), WordPiece 8192", flush=True)
    manifest = prepare(str(corpus), "wordpiece:8192", data, overwrite=True, progress=False)
    timings["prepare_s"] = time.perf_counter() - t0

    size = [f"model.n_layer={args.layers}", f"model.d_model={args.width}", "model.n_head=2",
            f"model.d_ff={4 * args.width}", "model.max_seq_len=128", "model.vocab_size=null"]
    variants = {"bert": ["model=bert-tiny", *size],
                "albert": ["model=bert-tiny", *size, f"model.d_embed={args.embed}", "model.share_layers=all"]}
    seeds = [int(s) for s in args.seeds.split(",")]
    result_models = {}
    cfgs = {}
    for name, model_args in variants.items():
        # 2. pretraining, the same for both
        t0 = time.perf_counter()
        run = work / f"pretrain-{name}"
        print(f"[2/4] pretraining {name} with MLM for {args.steps} steps", flush=True)
        cfg = load_config(str(REPO / "configs" / "bert-mini-stdlib.yaml"), [
            *model_args, f"data={data}", f"out={run}", f"train.max_steps={args.steps}",
            "train.batch_size=16", "train.seq_len=64", f"train.lr={args.lr}",
            f"train.warmup_steps={max(1, args.steps // 10)}", f"train.eval_every={args.steps}",
            "train.eval_batches=8", "train.checkpoint_every=0", f"train.log_every={max(1, args.steps // 5)}",
            "train.plot=false", "train.seed=0"])
        train(cfg, quiet=True)
        timings[f"pretrain_{name}_s"] = time.perf_counter() - t0
        cfgs[name] = cfg
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        last = [r for r in rows if "val_loss" in r][-1]
        model_cfg = load_config(str(run / "config.yaml"), []).model
        info = model_info(model_cfg, 64)
        # 3. fine-tuning, 3 seeds
        accs = []
        for seed in seeds:
            t0 = time.perf_counter()
            out = work / f"ft-{name}-seed{seed}"
            print(f"[3/4] fine-tuning {name} on builtin:stdlib-package, seed {seed}", flush=True)
            r = finetune(str(run), "classification", "builtin:stdlib-package", str(out), epochs=args.epochs,
                         lr=args.ft_lr, batch_size=32, max_len=64, seed=seed, quiet=True)
            timings[f"finetune_{name}_seed{seed}_s"] = time.perf_counter() - t0
            accs.append(r["accuracy"])
            print(f"      accuracy {r['accuracy']:.4f}", flush=True)
        result_models[name] = {
            "config": " ".join(model_args),
            "params": info["params"], "params_non_embedding": info["params_non_embedding"],
            "params_with_mlm_head": info["params"] + info["params_mlm_head"],
            "flops_per_token": info["flops_per_token"],
            "pretrain_val_loss": last["val_loss"], "pretrain_val_masked_accuracy": last.get("val_accuracy"),
            "accuracy_mean": statistics.fmean(accs), "accuracy_min": min(accs), "accuracy_max": max(accs),
            "accuracy_per_seed": dict(zip(map(str, seeds), accs)),
        }

    # 4. step time, side by side: one pretraining step of each in turn
    print(f"[4/4] timing pretraining steps side by side, {args.rounds} rounds", flush=True)
    split = TokenSplit(data, "train")
    models, opts = {}, {}
    objective = get_objective(cfgs["bert"])
    batch = objective.batches(split, seq_len=64, seed=0).batch(0, 16)  # the first training batch
    for name, cfg in cfgs.items():
        cfg.model.vocab_size = manifest["vocab_size"]
        torch.manual_seed(0)
        models[name] = apply_fast_paths(make_model(cfg.model)).train()  # as the trainer runs them on a CPU
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4, fused=False)

    def step(name: str) -> float:
        t = time.perf_counter()
        loss = objective.loss(models[name], batch)
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for name in models:  # warm up
        step(name), step(name)
    times = {name: [] for name in models}
    ratios = []
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        got = {name: step(name) for name in order}
        for name, t in got.items():
            times[name].append(t)
        ratios.append(got["bert"] / got["albert"])
    for name in models:
        result_models[name]["step_ms"] = {k: (v * 1000 if k != "n" else v) for k, v in quartiles(times[name]).items()}

    b, a = result_models["bert"], result_models["albert"]
    result = {
        "claim": "ALBERT (Lan et al. 2020): far fewer parameters for accuracy close to BERT of the same width",
        "quick": args.quick,
        "task": "builtin:stdlib-package (10 classes)",
        "train_examples": len(builtin_rows("builtin:stdlib-package", "train")[1]),
        "eval_examples": len(builtin_rows("builtin:stdlib-package", "eval")[1]),
        "pretrain": {"docs": args.docs, "tokens_train": manifest["splits"]["train"]["tokens"],
                     "vocab_size": manifest["vocab_size"], "steps": args.steps, "batch": "16 x 64",
                     "lr": args.lr, "objective": "mlm", "optimizer": "configs/bert-mini-stdlib.yaml"},
        "step_timing": {"batch": list(batch["input_ids"].shape), "what": "mlm loss, backward, AdamW step",
                        "fast_paths": True},
        "finetune": {"epochs": args.epochs, "lr": args.ft_lr, "batch_size": 32, "max_len": 64, "seeds": seeds},
        "models": result_models,
        "params_ratio_albert_over_bert": a["params"] / b["params"],
        "accuracy_gap_mean": a["accuracy_mean"] - b["accuracy_mean"],
        "step_time_ratio_bert_over_albert": {"median": statistics.median(ratios), "min": min(ratios),
                                             "max": max(ratios), "rounds": args.rounds},
        "threads": torch.get_num_threads(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "process_s": round(time.perf_counter() - t_process, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "platform": platform.platform(),
                    "note": "shared 2-core VM, other jobs running; one thread"},
        "date": time.strftime("%Y-%m-%d"),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    for name, m in result_models.items():
        print(f"{name:7s} {m['params']:>10,} params  MLM val loss {m['pretrain_val_loss']:.3f}  "
              f"accuracy {m['accuracy_mean']:.4f} [{m['accuracy_min']:.4f}, {m['accuracy_max']:.4f}]  "
              f"step {m['step_ms']['median']:.0f} ms (IQR {m['step_ms']['q1']:.0f}-{m['step_ms']['q3']:.0f})")
    s = result["step_time_ratio_bert_over_albert"]
    print(f"albert/bert parameters {result['params_ratio_albert_over_bert']:.3f}, accuracy gap "
          f"{result['accuracy_gap_mean']:+.4f}, step time bert/albert {s['median']:.2f}x "
          f"[{s['min']:.2f}, {s['max']:.2f}]; {result['process_s']:.0f} s; written to {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
