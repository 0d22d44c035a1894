"""ELECTRA against BERT at equal pretraining compute (Clark et al. 2020, Table 1: ELECTRA-Small 79.9
vs BERT-Small 75.1 GLUE at 1.4e18 FLOPs), at CPU scale.

Both sides have the same encoder (``electra-tiny`` with ``--layers``: 128 wide, 64-wide factorised
embeddings, 2 heads, FFN 512), the same data, batch, sequence length, learning-rate schedule and
seed; they differ only in the objective:

- BERT: ``objective=mlm`` (15 %, 80/10/10), the encoder with its MLM head (``model.rtd_head=false``);
- ELECTRA: ``objective=electra`` (its generator: a quarter of the width, FFN and heads, all the
  layers, sharing the embeddings; lambda = 50), the encoder with the detection head.

Equal compute: BERT trains ``--bert-steps`` steps; ELECTRA as many steps as the same training FLOPs
buy, with FLOPs counted as 6 x (matrix parameters applied per token) + 12 x layers x width x
sequence length (attention) for every forward + backward, where an MLM output layer (transform +
vocabulary x embedding matrix) runs only at the 15 % selected positions, as both objectives run it,
and ELECTRA's count adds its whole generator and the discriminator's head at every token (the
sampling's softmax, a few operations per vocabulary entry at the selected positions, is left out).

Then each pretrained encoder is fine-tuned, with the same settings and seeds, on
``builtin:stdlib-package`` (which of 10 standard-library packages a function comes from) and
``builtin:stdlib-docstring`` (does this docstring belong to this function: a text pair), and so is
the same encoder from random weights (``--from-scratch``, to tell whether pretraining helped at all
at this budget). The corpus is the standard library without the files that hold either task's
evaluation functions, WordPiece 4096.

    python benchmarks/electra.py [--quick] [--bert-steps 400] [--seeds 0 1 2] [--work DIR] [--reuse]

One thread (``torch.set_num_threads(1)``: a shared machine). About 15 minutes by default; ``--quick``
is a smoke run of a minute or two. Writes ``benchmarks/results/electra.json`` (``--quick``: into
``--work``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = {"stdlib-package": "builtin:stdlib-package", "stdlib-docstring": "builtin:stdlib-docstring"}
METHODS = ("bert", "electra", "scratch")
MASK_PROB = 0.15


def corpus(folder: Path, files: int) -> int:
    """Links to ``files`` standard-library files (all when 0) none of which holds an evaluation
    function of either task (a stable order, so the corpus is the same on every machine)."""
    import hashlib

    from pretrainer.data.corpus import stdlib_files
    from pretrainer.finetune.builtin import held_out_files

    root = Path(sysconfig.get_paths()["stdlib"])
    held = set().union(*(held_out_files(source) for source in TASKS.values()))
    keep = sorted((p for p in stdlib_files() if p.relative_to(root).as_posix() not in held),
                  key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest())
    keep = keep[:files] if files else keep
    for path in keep:
        link = folder / path.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(path, link)
    return len(keep)


def flops_per_token(cfg, seq_len: int) -> dict:
    """Training FLOPs per token of one encoder (see the module docstring): its blocks, attention,
    and its head (an MLM head at the selected positions only, a detection head at every token)."""
    from pretrainer.model.info import model_info

    info = model_info(cfg, seq_len)
    blocks = 6 * info["params_non_embedding"] + 12 * cfg.n_layer * cfg.d_model * seq_len
    if cfg.rtd_head:
        head = 6 * info["params_rtd_head"]
    else:
        head = 6 * (info["params_mlm_head"] + cfg.vocab_size * cfg.embed_dim) * MASK_PROB
    return {"blocks": blocks, "head": head, "total": blocks + head}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 30 BERT steps, one seed, tiny tasks")
    p.add_argument("--bert-steps", type=int, default=400, help="BERT's pretraining steps (sets the compute)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="pretraining peak learning rate (both)")
    p.add_argument("--files", type=int, default=800, help="standard-library files in the corpus (0: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds")
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--ft-len", type=int, default=128, help="fine-tuning tokens per input")
    p.add_argument("--package-cap", type=int, default=100,
                   help="stdlib-package: training examples per package (evaluation: the whole held-out split)")
    p.add_argument("--docstring-cap", type=int, default=800, help="stdlib-docstring: training pairs (likewise)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="keep the data and finished runs in --work")
    p.add_argument("--work", default=str(HERE / "runs" / "electra"))
    p.add_argument("--json", default=str(HERE / "results" / "electra.json"))
    args = p.parse_args()
    if args.quick:
        args.bert_steps, args.seeds, args.files, args.ft_epochs = 30, args.seeds[:1], 150, 1
        args.package_cap, args.docstring_cap, args.ft_len = 20, 200, 64
        if args.json == p.get_default("json"):
            args.json = str(Path(args.work) / "electra_quick.json")

    import torch

    from pretrainer.config import load_config
    from pretrainer.data.prepare import prepare
    from pretrainer.finetune import finetune
    from pretrainer.train.objectives import get_objective
    from pretrainer.train.trainer import train

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = Path(args.work)
    if not args.reuse and work.exists():
        shutil.rmtree(work)
    data, timings = work / "data", {}

    if not (data / "manifest.json").is_file():
        t0 = time.perf_counter()
        n_files = corpus(work / "corpus", args.files)
        print(f"[prepare] {n_files} standard-library files (both tasks' evaluation files held out), "
              f"WordPiece 4096", flush=True)
        prepare(str(work / "corpus"), "wordpiece:4096", data, overwrite=True, progress=False)
        timings["prepare_s"] = round(time.perf_counter() - t0, 1)
    manifest = json.loads((data / "manifest.json").read_text())

    # -- pretraining at equal FLOPs ---------------------------------------------------------------
    def config(method: str, steps: int, out: Path):
        objective = "electra" if method == "electra" else "mlm"
        keys = ["model=electra-tiny", f"model.n_layer={args.layers}", f"objective={objective}",
                f"data={data}", f"out={out}", f"train.max_steps={steps}", f"train.batch_size={args.batch}",
                f"train.seq_len={args.seq_len}", f"train.lr={args.lr}",
                f"train.warmup_steps={max(1, steps // 10)}", f"train.eval_every={max(1, steps // 4)}",
                "train.eval_batches=8", f"train.log_every={max(1, steps // 20)}", "train.checkpoint_every=0",
                "train.plot=false", "train.seed=0"]
        if method == "bert":
            keys.append("model.rtd_head=false")
        cfg = load_config(None, keys)
        cfg.model.vocab_size = manifest["vocab_size"]
        return cfg, keys

    probe = {m: config(m, 1, work / "probe")[0] for m in ("bert", "electra")}
    flops = {"bert": flops_per_token(probe["bert"].model, args.seq_len)}
    gen_cfg = get_objective(probe["electra"]).generator_cfg
    disc, gen = flops_per_token(probe["electra"].model, args.seq_len), flops_per_token(gen_cfg, args.seq_len)
    flops["electra"] = {"discriminator": disc["total"], "generator": gen["total"],
                        "total": disc["total"] + gen["total"]}
    tokens_per_step = args.batch * args.seq_len
    budget = args.bert_steps * tokens_per_step * flops["bert"]["total"]
    steps = {"bert": args.bert_steps,
             "electra": round(budget / (tokens_per_step * flops["electra"]["total"]))}
    print(f"[compute] {budget:.3g} FLOPs: BERT {steps['bert']} steps x {flops['bert']['total'] / 1e6:.2f} "
          f"MFLOP/token, ELECTRA {steps['electra']} steps x {flops['electra']['total'] / 1e6:.2f} MFLOP/token "
          f"(generator {gen['total'] / 1e6:.2f}; d_model {gen_cfg.d_model}, {gen_cfg.n_head} head, FFN "
          f"{gen_cfg.ff_dim}, {gen_cfg.n_layer} layers)", flush=True)

    pretrain = {}
    for method in ("bert", "electra"):
        out = work / f"pretrain-{method}"
        cfg, keys = config(method, steps[method], out)
        t0 = time.perf_counter()
        if not (args.reuse and (out / "checkpoints").is_dir()):
            if out.exists():
                shutil.rmtree(out)
            print(f"[pretrain] {method}: {steps[method]} steps", flush=True)
            train(cfg, quiet=True)
            timings[f"pretrain_{method}_s"] = round(time.perf_counter() - t0, 1)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        evals = [r for r in rows if "val_loss" in r]
        logged = [r for r in rows if "ms_per_step" in r]
        last = evals[-1]
        pretrain[method] = {
            "overrides": keys, "steps": steps[method], "tokens": steps[method] * tokens_per_step,
            "flops": steps[method] * tokens_per_step * flops[method]["total"],
            "ms_per_step_median": round(statistics.median(r["ms_per_step"] for r in logged[1:] or logged), 1),
            "val": {k: v for k, v in last.items() if k.startswith("val_")},
        }
        pretrain[method]["wall_s_steps"] = round(pretrain[method]["ms_per_step_median"] * steps[method] / 1000, 1)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in pretrain[method]["val"].items()
                          if k in ("val_loss", "val_accuracy", "val_disc_accuracy", "val_replaced"))
        print(f"           {shown}; {pretrain[method]['ms_per_step_median']:.0f} ms/step", flush=True)

    # -- fine-tuning, side by side per seed -------------------------------------------------------
    sources = {"stdlib-package": f"{TASKS['stdlib-package']}:{args.package_cap}",
               "stdlib-docstring": f"{TASKS['stdlib-docstring']}:{args.docstring_cap}"}
    runs = []
    for task, source in sources.items():
        for seed in args.seeds:
            for method in METHODS:
                out = work / f"ft-{task}-{method}-s{seed}"
                done = out / "config.yaml"
                if not (args.reuse and done.is_file() and "best" in done.read_text()):
                    if out.exists():
                        shutil.rmtree(out)
                    src = work / f"pretrain-{'bert' if method == 'scratch' else method}"
                    t0 = time.perf_counter()
                    r = finetune(str(src), "classification", source, str(out), eval=TASKS[task], epochs=args.ft_epochs,
                                 lr=args.ft_lr, batch_size=32, max_len=args.ft_len, seed=seed,
                                 from_scratch=method == "scratch", quiet=True)
                    seconds = round(time.perf_counter() - t0, 1)
                    best = {k: r[k] for k in ("accuracy", "f1", "mcc", "epoch")}
                else:
                    import yaml

                    saved = yaml.safe_load(done.read_text())["best"]
                    best = {**{k: saved["metrics"][k] for k in ("accuracy", "f1", "mcc")}, "epoch": saved["epoch"]}
                    seconds = None
                runs.append({"task": task, "method": method, "seed": seed, **best, "seconds": seconds})
                print(f"[finetune] {task:16s} {method:8s} seed {seed}: accuracy {best['accuracy']:.4f} "
                      f"(macro F1 {best['f1']:.4f})", flush=True)

    # -- summary ------------------------------------------------------------------------------------
    summary = {}
    for task in sources:
        acc = {m: [r["accuracy"] for r in runs if r["task"] == task and r["method"] == m] for m in METHODS}
        diff = [e - b for e, b in zip(acc["electra"], acc["bert"])]  # paired by seed
        summary[task] = {
            **{m: {"mean": statistics.mean(v), "min": min(v), "max": max(v),
                   "sd": statistics.stdev(v) if len(v) > 1 else 0.0} for m, v in acc.items()},
            "electra_minus_bert": {"mean": statistics.mean(diff), "min": min(diff), "max": max(diff),
                                   "per_seed": diff},
            "electra_wins": sum(d > 0 for d in diff), "seeds": len(diff),
        }
    from pretrainer.finetune.builtin import builtin_rows

    result = {
        "benchmark": "electra", "quick": args.quick,
        "paper": "Clark et al. 2020, Table 1: ELECTRA-Small 79.9 vs BERT-Small 75.1 GLUE dev at 1.4e18 "
                 "pretraining FLOPs (the same 14M-parameter encoder)",
        "encoder": {"preset": "electra-tiny", "n_layer": args.layers, "d_model": 128, "d_embed": 64,
                    "n_head": 2, "d_ff": 512, "vocab_size": manifest["vocab_size"]},
        "generator": {"d_model": gen_cfg.d_model, "n_head": gen_cfg.n_head, "d_ff": gen_cfg.ff_dim,
                      "n_layer": gen_cfg.n_layer, "disc_weight": 50.0},
        "corpus": {"files": args.files, "train_tokens": manifest["splits"]["train"]["tokens"],
                   "tokenizer": "wordpiece:4096"},
        "flops_per_token": flops, "compute_flops": budget, "pretrain": pretrain,
        "finetune_settings": {"epochs": args.ft_epochs, "lr": args.ft_lr, "batch_size": 32,
                              "max_len": args.ft_len, "seeds": args.seeds,
                              "tasks": {t: {"source": s, "train": len(builtin_rows(s, "train")[1]),
                                            "eval": len(builtin_rows(TASKS[t], "eval")[1])}
                                        for t, s in sources.items()}},
        "runs": runs, "summary": summary, "timings_s": timings,
        "seconds": round(time.perf_counter() - t_start, 1),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "note": "torch.set_num_threads(1): a shared 2-core machine"},
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"{'task':18s}{'BERT':>18s}{'ELECTRA':>18s}{'scratch':>18s}{'ELECTRA - BERT':>26s}")
    for task, s in summary.items():
        cell = lambda m: f"{100 * s[m]['mean']:5.1f} ({100 * s[m]['min']:.1f}-{100 * s[m]['max']:.1f})"
        d = s["electra_minus_bert"]
        print(f"{task:18s}{cell('bert'):>18s}{cell('electra'):>18s}{cell('scratch'):>18s}"
              f"{100 * d['mean']:+8.1f} ({100 * d['min']:+.1f} .. {100 * d['max']:+.1f}), "
              f"{s['electra_wins']}/{s['seeds']} seeds")
    print(f"wrote {args.json} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
