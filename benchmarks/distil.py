"""DistilBERT at CPU scale: does a student with half the layers, distilled from its teacher, keep
>= 95 % of the teacher's fine-tuned accuracy (Sanh et al. 2019: DistilBERT keeps 97 % of BERT-base's
GLUE score), and how much faster does it train per step?

    python benchmarks/distil.py [--quick] [--reuse] [--teacher-steps 400] [--distill-steps 400] [--seeds 0,1,2]
                                [--all-positions]

1. ``prepare``: the standard library **without** the files that hold the task's evaluation
   functions (pretraining never sees an evaluation example), WordPiece ``--vocab``.
2. ``pretrain`` the teacher: a small BERT, 4 layers x 128 (``bert-tiny`` with 4 layers), masked LM
   (``configs/bert-mini-stdlib.yaml``'s settings: batch 32 x 128 tokens, lr 1e-3) on ``builtin:stdlib``.
3. ``distill`` the student: ``distilbert-mini`` at the teacher's width (2 x 128: half the layers, no
   segment embeddings, no pooler), from teacher layers 0 and 3, with DistilBERT's loss (soft targets
   at T = 2, MLM, hidden-state cosine; 5 / 2 / 1) on the same corpus and settings. The soft targets
   are on the MLM-selected tokens only (``distill.masked_only``, the ``restrict_ce_to_mask`` option
   of Sanh et al.'s code): on every token (DistilBERT's default, ``--all-positions``) a step over a
   4,096-entry vocabulary costs 2.5x as much CPU time.
4. ``finetune`` both on ``builtin:stdlib-package`` (which of 10 standard-library packages a function
   comes from) with the same settings, for each seed, teacher and student interleaved; accuracy of
   the student as a fraction of the teacher's, per seed and of the means. A third arm, the student's
   config and tokenizer from random weights (``--from-scratch``), shows what distillation carried.
5. Speed per training step, measured side by side: the same MLM batches through the teacher's and the
   student's training step (forward, backward, AdamW), and a forward pass alone, alternating
   teacher and student in every round; the ratio teacher / student per round, median and range.

One thread (``torch.set_num_threads``, ``--threads``): the machine is shared. ``--quick`` is a smoke
run (a few minutes: 20 steps, one seed, 240 training examples) whose numbers mean nothing;
it writes ``results/distil_quick.json``. ``--reuse`` keeps the data, the teacher and the student in
``--work``. Writes ``results/distil.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TASK = "builtin:stdlib-package"


def say(text: str) -> None:
    print(text, flush=True)


def main() -> None:
    t_process = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(REPO / "runs" / "bench-distil"), help="data and run folders")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, one seed")
    p.add_argument("--reuse", action="store_true", help="reuse the data, teacher and student in --work")
    p.add_argument("--vocab", type=int, default=4096, help="WordPiece vocabulary size")
    p.add_argument("--teacher-steps", type=int, default=400, help="teacher pretraining steps (32 x 128 tokens)")
    p.add_argument("--distill-steps", type=int, default=400, help="student distillation steps (32 x 128 tokens)")
    p.add_argument("--all-positions", action="store_true",
                   help="soft targets on every token (DistilBERT's default) instead of the masked ones")
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak learning rate")
    p.add_argument("--max-len", type=int, default=64, help="fine-tuning tokens per function")
    p.add_argument("--speed-rounds", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default=None, help="result file (default results/distil.json)")
    args = p.parse_args()
    if args.quick:
        args.teacher_steps, args.distill_steps, args.seeds = 20, 20, "0"
        args.epochs, args.speed_rounds = 1, 3
        args.work = args.work + "-quick"
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out_json = Path(args.json or HERE / "results" / ("distil_quick.json" if args.quick else "distil.json"))
    torch.set_num_threads(args.threads)

    from pretrainer.config import load_config
    from pretrainer.data.prepare import prepare
    from pretrainer.finetune import finetune
    from pretrainer.finetune.builtin import builtin_rows, corpus_without_eval
    from pretrainer.train.distill import distill_config
    from pretrainer.train.trainer import read_metrics

    work = Path(args.work)
    data, teacher, student = work / "data", work / "teacher", work / "student"
    timings: dict[str, float] = {}

    if not (args.reuse and (data / "manifest.json").is_file()):
        t0 = time.perf_counter()
        corpus = work / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        n_files = corpus_without_eval(corpus, TASK)
        say(f"[1/5] preparing {n_files} stdlib files (the task's evaluation files held out), WordPiece {args.vocab}")
        prepare(str(corpus), f"wordpiece:{args.vocab}", data, overwrite=True, progress=False)
        timings["prepare_s"] = time.perf_counter() - t0

    common = ["train.eval_every=100000", "train.eval_batches=10", "train.checkpoint_every=0",
              "train.log_every=50", "train.plot=false"]
    if not (args.reuse and _finished(teacher, args.teacher_steps)):
        shutil.rmtree(teacher, ignore_errors=True)
        say(f"[2/5] pretraining the teacher (bert-tiny with 4 layers: 4 x 128) with MLM for {args.teacher_steps} steps")
        t0 = time.perf_counter()
        cfg = load_config(str(REPO / "configs" / "bert-mini-stdlib.yaml"),
                          ["model=bert-tiny", "model.n_layer=4", "model.vocab_size=null", "model.max_seq_len=128",
                           f"data={data}", f"out={teacher}", f"train.max_steps={args.teacher_steps}",
                           f"train.warmup_steps={max(1, min(100, args.teacher_steps // 10))}", *common])
        _train(cfg)
        timings["teacher_pretrain_s"] = time.perf_counter() - t0
    if not (args.reuse and _finished(student, args.distill_steps, not args.all_positions)):
        shutil.rmtree(student, ignore_errors=True)
        say(f"[3/5] distilling the student (distilbert-mini at width 128: 2 x 128) for {args.distill_steps} steps")
        t0 = time.perf_counter()
        cfg = distill_config(str(teacher), "distilbert-mini",
                             overrides=["model.d_model=128", "model.n_head=2", "model.max_seq_len=128",
                                        f"out={student}", f"train.max_steps={args.distill_steps}",
                                        f"distill.masked_only={not args.all_positions}",
                                        f"train.warmup_steps={max(1, min(100, args.distill_steps // 10))}", *common])
        _train(cfg)
        timings["student_distill_s"] = time.perf_counter() - t0

    def pretraining(run: Path) -> dict:
        rows = read_metrics(run / "metrics.jsonl")
        evals = [r for r in rows if "val_loss" in r]
        losses = [r for r in rows if "loss" in r]
        return {"steps": evals[-1]["step"], "val_mlm_loss_first": evals[0]["val_loss"],
                "val_mlm_loss": evals[-1]["val_loss"], "val_masked_accuracy": evals[-1].get("val_accuracy"),
                "train_loss_last": losses[-1]["loss"], "ms_per_step": statistics.median(r["ms_per_step"] for r in losses)}

    # -- 4. fine-tuning, teacher and student interleaved ------------------------------------------
    task = TASK if not args.quick else f"{TASK}:24"
    ft = {"teacher": [], "student": [], "student_scratch": []}
    for seed in seeds:
        for name, run in (("teacher", teacher), ("student", student), ("student_scratch", student)):
            out = work / f"ft-{name}-seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            say(f"[4/5] fine-tuning the {name.replace('_', ' from ')} on {task}, seed {seed}")
            t0 = time.perf_counter()
            r = finetune(str(run), "classification", task, str(out), epochs=args.epochs, lr=args.lr,
                         batch_size=32, max_len=args.max_len, seed=seed, quiet=True,
                         from_scratch=name == "student_scratch")
            seconds = time.perf_counter() - t0
            ft[name].append({"seed": seed, "accuracy": r["accuracy"], "f1": r["f1"], "epoch": r["epoch"],
                             "steps": r["steps"], "seconds": round(seconds, 1),
                             "ms_per_step": 1000 * seconds / max(1, r["steps"])})
            say(f"      accuracy {r['accuracy']:.4f} (epoch {r['epoch']}, {seconds:.0f} s)")

    # -- 5. speed per training step, side by side -------------------------------------------------
    say(f"[5/5] timing training steps and forwards, teacher and student alternating, {args.speed_rounds} rounds")
    speed = time_steps(teacher, student, data, args.speed_rounds)

    acc_t = [r["accuracy"] for r in ft["teacher"]]
    acc_s = [r["accuracy"] for r in ft["student"]]
    acc_0 = [r["accuracy"] for r in ft["student_scratch"]]
    per_seed = [s / t for s, t in zip(acc_s, acc_t)]
    kept = statistics.mean(acc_s) / statistics.mean(acc_t)
    result = {
        "claim": "a student with half the layers keeps >= 95 % of its teacher's fine-tuned accuracy "
                 "(Sanh et al. 2019: DistilBERT keeps 97 % of BERT-base's GLUE score) and trains faster per step",
        "quick": args.quick,
        "task": f"{task} (10 classes)",
        "train_examples": len(builtin_rows(task, "train")[1]),
        "eval_examples": len(builtin_rows(task, "eval")[1]),
        "tokenizer": f"wordpiece:{args.vocab} trained on the stdlib minus the evaluation files",
        "teacher": {"model": "bert-tiny, n_layer=4 (4 x 128, 2 heads, segments + pooler)", **pretraining(teacher)},
        "student": {"model": "distilbert-mini at d_model=128, 2 heads (2 x 128, no segments, no pooler), "
                             "from teacher layers 0 and 3; distill: T=2, ce 5 / mlm 2 / cos 1, soft targets on "
                             + ("every token" if args.all_positions else "the masked tokens (masked_only)"),
                    **pretraining(student)},
        "finetune_settings": {"epochs": args.epochs, "lr": args.lr, "batch_size": 32, "max_len": args.max_len,
                              "seeds": seeds, "order": "teacher, student, student from scratch; seed by seed"},
        "finetune": ft,
        "accuracy": {"teacher_mean": statistics.mean(acc_t), "student_mean": statistics.mean(acc_s),
                     "teacher_std": statistics.pstdev(acc_t), "student_std": statistics.pstdev(acc_s),
                     "student_scratch_mean": statistics.mean(acc_0), "student_scratch_std": statistics.pstdev(acc_0),
                     "student_over_teacher": kept, "per_seed_ratio": per_seed,
                     "per_seed_ratio_min": min(per_seed), "per_seed_ratio_max": max(per_seed),
                     "claim_95_holds": kept >= 0.95},
        "speed": speed,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.perf_counter() - t_process, 1),
        "cpu_s": round(time.process_time(), 1),
        "threads": args.threads,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "note": "a shared 2-core machine; one torch thread"},
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    a = result["accuracy"]
    say(f"\nteacher accuracy {a['teacher_mean']:.4f} ± {a['teacher_std']:.4f}, student {a['student_mean']:.4f} "
        f"± {a['student_std']:.4f} ({len(seeds)} seeds): the student keeps {100 * kept:.1f} % "
        f"(per seed {100 * min(per_seed):.1f}-{100 * max(per_seed):.1f} %); the student from scratch "
        f"{a['student_scratch_mean']:.4f} ± {a['student_scratch_std']:.4f}")
    for kind in ("train_step", "forward"):
        s = speed[kind]
        say(f"{kind}: teacher {s['teacher_ms_median']:.1f} ms, student {s['student_ms_median']:.1f} ms: "
            f"{s['ratio_median']:.2f}x faster (rounds {s['ratio_min']:.2f}-{s['ratio_max']:.2f})")
    say(f"wrote {out_json} ({result['total_s']:.0f} s, {result['cpu_s']:.0f} s of CPU)")


def _train(cfg) -> None:
    from pretrainer.train.trainer import train

    if train(cfg)["preempted"]:  # Ctrl-C or SIGTERM: the run is saved, the benchmark stops
        sys.exit(75)


def _finished(run: Path, steps: int, masked_only: bool | None = None) -> bool:
    from pretrainer.config import config_from_file
    from pretrainer.train.checkpoint import latest_checkpoint

    try:
        if masked_only is not None and config_from_file(run / "config.yaml").distill.masked_only != masked_only:
            return False
        return latest_checkpoint(run, warn=lambda s: None)[1]["step"] == steps
    except Exception:  # noqa: BLE001 - no run, or an unusable one: train it again
        return False


def time_steps(teacher_run: Path, student_run: Path, data: Path, rounds: int) -> dict:
    """Training-step and forward times of the two models on the same MLM batches (32 x 128), one
    step of each in turn per round, after a warm-up step; both as the trainer runs them (fast
    paths, AdamW). Returns medians and the per-round teacher / student ratios."""
    from pretrainer import load
    from pretrainer.config import config_from_file
    from pretrainer.data.tokens import TokenSplit
    from pretrainer.train.loop import TrainStep
    from pretrainer.train.objectives import MaskedLM
    from pretrainer.train.optim import make_optimizer

    cfg = config_from_file(teacher_run / "config.yaml")
    batches = MaskedLM(cfg).batches(TokenSplit(data, "train"), 128, 0)
    models = {}
    for name, run in (("teacher", teacher_run), ("student", student_run)):
        model = load(run).train()
        models[name] = (model, TrainStep(model, MaskedLM(cfg)), make_optimizer(model, cfg.train, "cpu"))
    out = {}
    for kind in ("train_step", "forward"):
        times = {"teacher": [], "student": []}
        for r in range(rounds + 1):
            batch = batches.batch(r * 32, 32)
            for name, (model, step, opt) in models.items():
                t0 = time.perf_counter()
                if kind == "train_step":
                    step(batch).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                else:
                    with torch.no_grad():
                        model.hidden_states(batch["input_ids"])
                if r:  # round 0 warms up
                    times[name].append(1000 * (time.perf_counter() - t0))
        ratios = [t / s for t, s in zip(times["teacher"], times["student"])]
        out[kind] = {"teacher_ms_median": statistics.median(times["teacher"]),
                     "student_ms_median": statistics.median(times["student"]),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "rounds": rounds, "teacher_ms": times["teacher"], "student_ms": times["student"]}
    out["batch"] = "32 x 128 tokens of MLM windows; train_step: forward + backward + AdamW step (the mlm loss)"
    return out


if __name__ == "__main__":
    main()
