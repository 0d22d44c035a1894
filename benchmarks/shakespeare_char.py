"""Character-level tiny Shakespeare at the size of nanoGPT's documented CPU example.

nanoGPT's example (see ../shared/ANCHORS.md): 4 layers, 4 heads, 128 wide, context 64, batch 12,
2000 iterations, dropout 0, 90/10 split by position; it reaches validation loss 1.8857 in 185 s of
wall-clock (whole process) on a 2-core machine. This script prepares the same split with our
``prepare`` (character tokenizer, ``split="tail"``), trains the same-size model with our trainer,
and writes the validation curve, wall-clock and the comparison to ``benchmarks/results/``.

    python benchmarks/shakespeare_char.py [--model gpt-micro] [--steps 2000] [--out DIR]

Validation loss here is the mean over 40 batches of 12 x 64 consecutive windows from the start of
the validation split (nanoGPT estimates it from 20 random batches): both estimate the same
quantity on the same held-out text.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT = {"val_loss_2000": 1.8857, "wall_s": 185.0, "ms_per_iter": 58.0,
           "source": "shared/ANCHORS.md (nanoGPT, same machine class)"}


def main() -> None:
    t_process = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--model", default="gpt-micro", help="gpt-micro (GPT-2 style) or llama-micro-char")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", default=str(HERE / "results" / "shakespeare_char"))
    p.add_argument("--json", default=str(HERE / "results" / "shakespeare_char.json"))
    args = p.parse_args()

    from pretrainer.config import RunConfig, TrainConfig, model_preset
    from pretrainer.data.prepare import prepare
    from pretrainer.model.info import model_info
    from pretrainer.train.trainer import train

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    manifest = prepare(args.corpus, "char", out / "data", split="tail", val_fraction=0.1, progress=False)
    prep_s = time.perf_counter() - t0

    if args.model == "gpt-micro":
        model = model_preset("gpt-micro")  # 4 layers, 4 heads, 128 wide: GPT-2 style
    else:  # the same size with Llama parts (RMSNorm, rotary positions, SwiGLU with 4x-equivalent width)
        model = model_preset("llama-tiny")
        model.n_layer, model.n_head, model.n_kv_heads, model.d_model, model.d_ff = 4, 4, 4, 128, 344
        model.tie_embeddings = True
    model.max_seq_len = 64
    cfg = RunConfig(model=model, data=str(out / "data"), out=str(out / "run"), train=TrainConfig(
        max_steps=args.steps, batch_size=12, seq_len=64, lr=args.lr, min_lr_ratio=0.1,
        warmup_steps=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_every=250,
        eval_batches=40, log_every=100, checkpoint_every=0, device="cpu", seed=1337))
    t0 = time.perf_counter()
    summary = train(cfg)
    train_s = time.perf_counter() - t0
    rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    ms = sorted(r["ms_per_step"] for r in rows if "ms_per_step" in r)
    wall = time.perf_counter() - t_process
    result = {
        "benchmark": "shakespeare_char", "model": args.model,
        "params": model_info(cfg.model)["params"],
        "steps": args.steps, "batch_size": 12, "seq_len": 64, "lr": args.lr,
        "vocab_size": manifest["vocab_size"],
        "val_loss_final": summary["val_loss"], "val_loss_by_step": val,
        "wall_s_whole_process": wall, "prepare_s": prep_s, "train_s": train_s,
        "median_ms_per_step": ms[len(ms) // 2] if ms else None,
        "nanogpt": NANOGPT,
        "wall_ratio_nanogpt_over_ours": NANOGPT["wall_s"] / wall,
        "meets_val_target_1.88": summary["val_loss"] <= 1.88,
        "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("model", "params", "val_loss_final", "wall_s_whole_process",
                                             "median_ms_per_step", "wall_ratio_nanogpt_over_ours",
                                             "meets_val_target_1.88")}, indent=2))
    print(f"loss curve: {out / 'run' / 'loss.png'}; result: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
