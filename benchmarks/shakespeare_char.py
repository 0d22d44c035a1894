"""Character-level tiny Shakespeare: pretrainer and nanoGPT side by side, in one run.

nanoGPT's documented CPU example (see ../shared/ANCHORS.md): 4 layers, 4 heads, 128 wide, context
64, batch 12, 2000 iterations, dropout 0, 90/10 split by position. This script runs that example
from the unmodified nanoGPT snapshot (``../shared/anchors/nanoGPT`` or ``--nanogpt DIR``, copied to a
temporary folder with the corpus as its ``input.txt``) and the same-size model with our trainer,
alternating the two (ABBA order over ``--rounds`` pairs), each in its own process with the same
number of threads and the same learning-rate schedule (``--lr``, nanoGPT's 1e-3 by default; warmup
100, cosine to lr/10, AdamW beta2 0.99, weight decay 0.1, clipping 1). It reports, for every run:
whole-process wall time (data preparation included on both sides), training steps per second, the
final validation loss each side prints, and peak resident memory (the child's maxrss); then the
ratios nanoGPT / ours with their spread.

    python benchmarks/shakespeare_char.py [--rounds 2] [--threads 2] [--steps 2000] [--lr 1e-3]
        [--model gpt-micro|nanogpt-layout|llama-micro-char] [--no-plot]

``gpt-micro`` is our GPT-2 preset (biases, tanh GELU); ``nanogpt-layout`` is the layout nanoGPT's
example trains (``bias=False``, exact GELU), the like-for-like step. Ours writes its loss plot
(``loss.png``) at every evaluation as a training run does; ``--no-plot`` leaves it out (nanoGPT
writes none), which shows what matplotlib adds to the peak memory.

The two validation losses are each side's own estimate of the same quantity on the same held-out
text: nanoGPT averages 20 random batches of 12 x 64; ours averages 40 fixed batches of consecutive
windows from the start of the split. Without the nanoGPT snapshot the script runs ours alone and
says so.
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
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_DIR = HERE.parent.parent / "shared" / "anchors" / "nanoGPT"


def model_config(name: str):
    """Our model of nanoGPT's example size (4 layers, 4 heads, 128 wide, context 64; the vocabulary
    is the data's): ``gpt-micro``, ``nanogpt-layout`` or ``llama-micro-char``."""
    from pretrainer.config import model_preset

    if name in ("gpt-micro", "nanogpt-layout"):
        model = model_preset("gpt-micro")  # 4 layers, 4 heads, 128 wide: GPT-2 style
        if name == "nanogpt-layout":  # what nanoGPT's example runs: no biases, exact GELU
            model.bias, model.mlp = False, "gelu"
    else:  # the same size with Llama parts (RMSNorm, rotary positions, SwiGLU with 4x-equivalent width)
        model = model_preset("llama-tiny")
        model.n_layer, model.n_head, model.n_kv_heads, model.d_model, model.d_ff = 4, 4, 4, 128, 344
        model.tie_embeddings = True
    model.max_seq_len = 64
    return model


def run_ours(args) -> None:
    """The worker: prepare + train in this process, print one JSON line (the parent times it)."""
    import torch

    torch.set_num_threads(args.threads)
    from pretrainer.config import RunConfig, TrainConfig
    from pretrainer.data.prepare import prepare
    from pretrainer.train.trainer import train

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    prepare(args.corpus, "char", out / "data", split="tail", val_fraction=0.1, progress=False)
    cfg = RunConfig(model=model_config(args.model), data=str(out / "data"), out=str(out / "run"), train=TrainConfig(
        max_steps=args.steps, batch_size=12, seq_len=64, lr=args.lr, min_lr_ratio=0.1,
        warmup_steps=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_every=250,
        eval_batches=40, log_every=100, checkpoint_every=0, device="cpu", seed=1337, threads=args.threads,
        plot=not args.no_plot))
    t0 = time.perf_counter()
    summary = train(cfg)
    train_s = time.perf_counter() - t0
    rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    print(json.dumps({"val_loss": summary["val_loss"], "train_s": train_s,
                      "val_loss_by_step": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}}))


def nanogpt_copy(src: Path, corpus: Path, tmp: Path) -> Path:
    """An unmodified copy of the nanoGPT snapshot whose shakespeare_char data is our corpus file."""
    dst = tmp / "nanoGPT"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.bin", "*.pkl", "out*", "__pycache__"))
    shutil.copy(corpus, dst / "data" / "shakespeare_char" / "input.txt")
    return dst


def run_child(cmd: list[str], cwd: Path, threads: int) -> tuple[float, float, str]:
    """Run a child process; its wall seconds, peak resident memory in MiB (its own maxrss) and stdout."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(HERE.parent / "src"))
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err)
        out = p.stdout.read().decode()
        _, status, rusage = os.wait4(p.pid, 0)  # this child's own resource use
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        if code:
            err.seek(0)
            sys.exit(f"benchmark child failed (exit {code}): {' '.join(cmd)}\n{err.read().decode()[-2000:]}")
    return wall, rusage.ru_maxrss / 1024, out


def nanogpt_round(ng: Path, args) -> dict:
    py = sys.executable
    prep_s, prep_mb, _ = run_child([py, "data/shakespeare_char/prepare.py"], ng, args.threads)
    cmd = [py, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
           "--eval_iters=20", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
           "--n_embd=128", f"--max_iters={args.steps}", f"--lr_decay_iters={args.steps}",
           "--dropout=0.0", f"--eval_interval={min(250, args.steps)}", f"--learning_rate={args.lr}", f"--min_lr={args.lr / 10}", "--out_dir=out-bench"]
    wall, mb, out = run_child(cmd, ng, args.threads)
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", out)
    if not evals:
        sys.exit("nanoGPT printed no evaluation line:\n" + out[-2000:])
    shutil.rmtree(ng / "out-bench", ignore_errors=True)
    return {"wall_s": prep_s + wall, "prepare_s": prep_s, "train_process_s": wall, "peak_rss_mib": max(mb, prep_mb),
            "val_loss": float(evals[-1][2]), "val_loss_by_step": {int(s): float(v) for s, _, v in evals}}


def ours_round(args, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out), "--corpus", args.corpus,
           "--model", args.model, "--steps", str(args.steps), "--lr", str(args.lr), "--threads", str(args.threads),
           *(["--no-plot"] if args.no_plot else [])]
    wall, mb, out_text = run_child(cmd, HERE.parent, args.threads)
    res = json.loads(out_text.strip().splitlines()[-1])
    return {"wall_s": wall, "train_s": res["train_s"], "peak_rss_mib": mb, "val_loss": res["val_loss"],
            "val_loss_by_step": res["val_loss_by_step"]}


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--nanogpt", default=str(NANOGPT_DIR), help="the nanoGPT snapshot to run beside ours")
    p.add_argument("--model", default="gpt-micro", choices=["gpt-micro", "nanogpt-layout", "llama-micro-char"],
                   help="gpt-micro (GPT-2: biases, tanh GELU), nanogpt-layout (the same without biases and with "
                        "exact GELU, as nanoGPT's example runs) or llama-micro-char")
    p.add_argument("--no-plot", action="store_true",
                   help="ours writes no loss.png (nanoGPT writes none); shows what matplotlib adds to the memory")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, both sides (nanoGPT's example: 1e-3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs (ABBA order)")
    p.add_argument("--out", default=str(HERE / "results" / "shakespeare_char"))
    p.add_argument("--json", default=str(HERE / "results" / "shakespeare_char.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return run_ours(args)
    if not Path(args.corpus).is_file():
        sys.exit(f"{args.corpus}: no such corpus file (pass --corpus)")

    ng_src = Path(args.nanogpt)
    have_ng = (ng_src / "train.py").is_file()
    if not have_ng:
        print(f"note: no nanoGPT snapshot at {ng_src}: running ours alone (no comparison)", file=sys.stderr)
    runs: dict[str, list[dict]] = {"ours": [], "nanogpt": []}
    with tempfile.TemporaryDirectory() as tmp:
        ng = nanogpt_copy(ng_src, Path(args.corpus), Path(tmp)) if have_ng else None
        for r in range(args.rounds):
            order = ["ours", "nanogpt"] if r % 2 == 0 else ["nanogpt", "ours"]
            for side in order:
                if side == "nanogpt" and ng is None:
                    continue
                res = ours_round(args, Path(args.out)) if side == "ours" else nanogpt_round(ng, args)
                res["steps_per_s"] = args.steps / res.get("train_s", res.get("train_process_s"))
                runs[side].append(res)
                print(f"round {r + 1}/{args.rounds} {side:8s} wall {res['wall_s']:6.1f} s  "
                      f"val {res['val_loss']:.4f}  peak {res['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)

    import torch
    result = {
        "benchmark": "shakespeare_char", "model": args.model, "steps": args.steps, "batch_size": 12,
        "seq_len": 64, "lr": args.lr, "threads": args.threads, "rounds": args.rounds, "plot": not args.no_plot,
        "runs": runs,
        "ours": {k: spread([x[k] for x in runs["ours"]]) for k in ("wall_s", "val_loss", "peak_rss_mib")},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
    }
    if runs["nanogpt"]:
        result["nanogpt"] = {k: spread([x[k] for x in runs["nanogpt"]]) for k in ("wall_s", "val_loss", "peak_rss_mib")}
        pairs = list(zip(runs["nanogpt"], runs["ours"]))
        result["ratio_wall_nanogpt_over_ours"] = spread([a["wall_s"] / b["wall_s"] for a, b in pairs])
        result["ratio_memory_ours_over_nanogpt"] = spread([b["peak_rss_mib"] / a["peak_rss_mib"] for a, b in pairs])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs",)}, indent=2))
    print(f"result: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
