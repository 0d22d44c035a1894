"""The value of pretraining, one flag apart: a small BERT pretrained with masked-LM on the embedded
corpus, then fine-tuned on ``builtin:stdlib-package`` (which of 10 standard-library packages a
function comes from), against the same model, config and tokenizer fine-tuned from random weights
(``--from-scratch``), with identical fine-tuning settings and seed.

    python benchmarks/finetune_pretrained_vs_scratch.py [--model bert-tiny] [--steps 800] [--reuse] [--work DIR]

1. ``prepare``: the standard library **without** the files that hold the task's evaluation
   functions (so pretraining never sees an evaluation example, not even unlabeled), WordPiece 8192.
2. ``pretrain``: ``configs/bert-mini-stdlib.yaml`` (MLM 15 %, 128 tokens, batch 32) with the model
   ``--model`` (default ``bert-tiny``, 2 x 128: on a shared 2-core CPU a few minutes buy more
   for the smaller model) for ``--steps`` steps; ``--reuse`` keeps the data folder and the
   pretraining run in ``--work``, and extends that run to ``--steps`` when it has fewer (an exact
   resume; the learning-rate schedule is recomputed for the new length); it also reuses a finished
   fine-tuning run of the same settings.
3. ``finetune``: pretrained, then ``--from-scratch``, with the same settings (``--epochs``,
   ``--lr``, batch 32, 128 tokens, seed); from scratch is also given each rate of
   ``--scratch-lrs`` (a model trained from random weights usually wants a larger one), the
   pretrained model each of ``--pretrained-lrs``, and each side's best result is the one
   compared, so the margin is not an artefact of a rate chosen for one side.

Prints both accuracies, the margin and the ratio; writes
``benchmarks/results/finetune_pretrained_vs_scratch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from _reuse import finished_finetune, fresh_corpus, rates

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> None:
    t_process = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(REPO / "runs" / "bench-finetune"), help="data and run folders")
    p.add_argument("--model", default="bert-tiny", help="BERT preset to pretrain (bert-tiny, bert-mini, ...)")
    p.add_argument("--steps", type=int, default=800, help="pretraining steps (batch 32 x 128 tokens)")
    p.add_argument("--reuse", action="store_true", help="reuse the data folder and pretraining run in --work")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-4, help="fine-tuning peak learning rate")
    p.add_argument("--pretrained-lrs", default="", help="more rates tried for the pretrained model (comma-separated)")
    p.add_argument("--scratch-lrs", default="1e-3", help="more rates tried from scratch (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(HERE / "results" / "finetune_pretrained_vs_scratch.json"))
    args = p.parse_args()

    from pretrainer.config import load_config
    from pretrainer.data.prepare import prepare
    from pretrainer.finetune import finetune
    from pretrainer.finetune.builtin import builtin_rows
    from pretrainer.train.checkpoint import latest_checkpoint
    from pretrainer.train.trainer import resume_config, train

    work = Path(args.work)
    data, pre = work / "data", work / "pretrain"
    timings = {}

    if not (args.reuse and (data / "manifest.json").is_file()):
        t0 = time.perf_counter()
        corpus = work / "corpus"
        n_files = fresh_corpus(corpus, "builtin:stdlib-package")
        print(f"[1/3] preparing {n_files} stdlib files (eval files held out) with WordPiece 8192", flush=True)
        prepare(str(corpus), "wordpiece:8192", data, overwrite=True, progress=False)
        timings["prepare_s"] = time.perf_counter() - t0

    done_steps = 0
    if args.reuse and (pre / "config.yaml").is_file():
        done_steps = latest_checkpoint(pre)[1]["step"]
    if args.reuse and 0 < done_steps < args.steps:  # extend the existing run (exact resume)
        t0 = time.perf_counter()
        print(f"[2/3] continuing pretraining from step {done_steps} to {args.steps}", flush=True)
        train(resume_config(pre, [f"train.max_steps={args.steps}"]), resume=True)
        timings["pretrain_more_s"] = time.perf_counter() - t0
    elif not (args.reuse and (pre / "config.yaml").is_file()):
        t0 = time.perf_counter()
        print(f"[2/3] pretraining {args.model} with MLM for {args.steps} steps", flush=True)
        cfg = load_config(str(REPO / "configs" / "bert-mini-stdlib.yaml"),
                          [f"model={args.model}", "model.vocab_size=null", "model.max_seq_len=128",
                           f"data={data}", f"out={pre}", f"train.max_steps={args.steps}",
                           f"train.warmup_steps={min(100, args.steps // 10)}", "train.eval_every=500",
                           "train.checkpoint_every=500", "train.log_every=50", "train.plot=false"])
        if pre.exists():
            shutil.rmtree(pre)
        train(cfg)
        timings["pretrain_s"] = time.perf_counter() - t0
    lines = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in lines if "val_loss" in r]
    ckpt, state = latest_checkpoint(pre)  # what fine-tuning starts from
    pre_model = yaml.safe_load((pre / "config.yaml").read_text())["model"]
    pretrain_info = {"model": f"{pre_model['preset']} ({pre_model['n_layer']} x {pre_model['d_model']}, "
                              f"vocab {pre_model['vocab_size']}; configs/bert-mini-stdlib.yaml otherwise)",
                     "steps": state["step"], "tokens": state["tokens"],
                     "val_loss_first": evals[0]["val_loss"], "val_loss": evals[-1]["val_loss"],
                     "val_masked_accuracy": evals[-1].get("val_accuracy"), "val_at_step": evals[-1]["step"]}

    def run_finetune(name: str, scratch: bool, lr: float) -> dict:
        out = work / f"ft-{name}-lr{lr:g}"
        done = finished_finetune(out, epochs=args.epochs, lr=lr, seed=args.seed, scratch=scratch,
                                 checkpoint=ckpt) if args.reuse else None
        if done:
            best = done["metrics"]
            print(f"[3/3] reusing {out} (lr {lr:g}): accuracy {best['accuracy']:.4f}", flush=True)
            return {"lr": lr, **{k: best[k] for k in ("accuracy", "f1", "mcc")}, "epoch": done["epoch"],
                    "reused": True}
        if out.exists():
            shutil.rmtree(out)
        print(f"[3/3] fine-tuning {name} (lr {lr:g}) on builtin:stdlib-package", flush=True)
        t0 = time.perf_counter()
        r = finetune(str(pre), "classification", "builtin:stdlib-package", str(out), epochs=args.epochs,
                     lr=lr, batch_size=32, max_len=128, from_scratch=scratch, seed=args.seed)
        timings[f"finetune_{name}_lr{lr:g}_s"] = time.perf_counter() - t0
        print(f"      accuracy {r['accuracy']:.4f}, macro F1 {r['f1']:.4f} (best epoch {r['epoch']})", flush=True)
        return {"lr": lr, **{k: r[k] for k in ("accuracy", "f1", "mcc", "epoch")}}

    pretrained_runs = [run_finetune("pretrained", False, lr) for lr in rates(args.lr, args.pretrained_lrs)]
    scratch_runs = [run_finetune("scratch", True, lr) for lr in rates(args.lr, args.scratch_lrs)]
    pretrained = max(pretrained_runs, key=lambda r: r["accuracy"])
    scratch = max(scratch_runs, key=lambda r: r["accuracy"])
    acc_p, acc_s = pretrained["accuracy"], scratch["accuracy"]
    result = {
        "task": "builtin:stdlib-package (10 classes)",
        "train_examples": len(builtin_rows("builtin:stdlib-package", "train")[1]),
        "eval_examples": len(builtin_rows("builtin:stdlib-package", "eval")[1]),
        "pretrain": pretrain_info,
        "finetune_settings": {"epochs": args.epochs, "batch_size": 32, "max_len": 128, "seed": args.seed,
                              "warmup": 0.1, "schedule": "linear", "lrs_pretrained": [r["lr"] for r in pretrained_runs],
                              "lrs_scratch": [r["lr"] for r in scratch_runs]},
        "pretrained": pretrained,
        "pretrained_all": pretrained_runs,
        "scratch": scratch,
        "scratch_same_lr": scratch_runs[0],
        "scratch_all": scratch_runs,
        "accuracy_margin": acc_p - acc_s,
        "accuracy_ratio": acc_p / acc_s if acc_s else None,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "process_s": round(time.perf_counter() - t_process, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    tried_p = ", ".join(f"{r['lr']:g}" for r in pretrained_runs)
    print(f"pretrained: accuracy {acc_p:.4f} (macro F1 {pretrained['f1']:.4f}, best of lr {tried_p})")
    tried = ", ".join(f"{r['lr']:g}" for r in scratch_runs)
    print(f"scratch:    accuracy {acc_s:.4f} (macro F1 {scratch['f1']:.4f}, best of lr {tried})")
    print(f"margin {acc_p - acc_s:+.4f}, ratio {result['accuracy_ratio']:.2f}x; written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
