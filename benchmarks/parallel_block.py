"""The parallel block (GPT-J, GPT-NeoX, PaLM) against the serial one at equal size, on a CPU.

PaLM (Chowdhery et al. 2022, section 2) reports about 15 % faster training at large scale from
``y = x + attn(norm(x)) + mlp(norm(x))`` instead of ``y = x + mlp(norm(x + attn(norm(x))))``,
because the attention's and the MLP's input matrix products can then be fused into one, and
"small degradation in quality at 8B scale but no degradation at 62B". pretrainer's parallel block
is the plain formula: it does not fuse the two products (nor does the fast path), so what changes
in a step is one norm fewer (``parallel_norms=1``) and the order of the work.

Three variants of one small Llama-style decoder (RoPE, RMSNorm, SwiGLU, no biases), equal in
everything else:

    serial      the usual pre-norm block (llama-tiny's)
    parallel-2  model.parallel_block=true                    (a norm per branch, GPT-NeoX)
    parallel-1  model.parallel_block=true parallel_norms=1   (one shared norm, GPT-J / PaLM)

1. Step time: forward + backward + AdamW of a batch of ``--batch`` x 256 tokens, as the trainer
   runs a float32 CPU model (fast paths, fused head loss, fused AdamW). The three models live in
   one process and take turns of ``--steps`` steps for ``--rounds`` rounds, the order rotating each
   round, so the machine's slow spells fall on all alike. Reported: median ms per step with
   quartiles, the ratio of medians to serial, and the spread (median, min, max) of the per-round
   ratios (each round's turns are adjacent in time).
2. Quality: validation loss after the same number of steps on ``builtin:stdlib`` (pretrainer's
   trainer, ``pretrainer.train.trainer.train``, same data, seed, batch and schedule), for each
   variant and each of ``--seeds`` seeds; the same decoder at half the width (128), so that the
   six runs short (about two minutes each on 2 cores).

    python benchmarks/parallel_block.py [--quick] [--json benchmarks/results/parallel_block.json]

Runs single-threaded (``torch.set_num_threads(1)``; the development machine is shared).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "serial": [],
    "parallel-2": ["model.parallel_block=true"],
    "parallel-1": ["model.parallel_block=true", "model.parallel_norms=1"],
}
SIZE = dict(n_layer=4, d_model=256, n_head=4, n_kv_heads=4, d_ff=688)  # llama-tiny, MHA: step time
QUALITY_SIZE = dict(n_layer=4, d_model=128, n_head=4, n_kv_heads=4, d_ff=344)  # half as wide: training runs
SEQ = 256


def overrides_of(size: dict) -> list[str]:
    return ["model=llama-tiny"] + [f"model.{k}={v}" for k, v in size.items()]


def step_times(args) -> dict:
    import torch

    from pretrainer.config import TrainConfig, load_config
    from pretrainer.model import make_model
    from pretrainer.model.fast import apply_fast_paths
    from pretrainer.train.objectives import get_objective
    from pretrainer.train.optim import make_optimizer

    V = 8192
    steps = {}
    for name, keys in VARIANTS.items():
        cfg = load_config(None, overrides_of(SIZE) + keys + [f"model.vocab_size={V}", f"model.max_seq_len={SEQ}"])
        torch.manual_seed(0)
        model = apply_fast_paths(make_model(cfg.model)).train()
        objective = get_objective(cfg)
        opt = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.1), "cpu")
        gen = torch.Generator().manual_seed(0)

        def step(model=model, objective=objective, opt=opt, gen=gen) -> float:
            x = torch.randint(0, V, (args.batch, SEQ), generator=gen)
            t0 = time.perf_counter()
            objective.loss(model, {"input_ids": x, "labels": x.roll(-1, 1)}).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return 1000 * (time.perf_counter() - t0)

        for _ in range(args.warmup):
            step()
        steps[name] = (step, sum(p.numel() for p in model.parameters()))
    names = list(VARIANTS)
    times = {n: [] for n in names}
    per_round = {n: [] for n in names[1:]}  # each round's median / serial's median
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        turn = {}
        for n in order:
            turn[n] = [steps[n][0]() for _ in range(args.steps)]
            times[n] += turn[n]
        for n in names[1:]:
            per_round[n].append(statistics.median(turn[n]) / statistics.median(turn["serial"]))
        print(f"round {r + 1}/{args.rounds}  " + "  ".join(
            f"{n} {statistics.median(turn[n]):.0f} ms" for n in names), file=sys.stderr, flush=True)
    rows = {}
    for n in names:
        q = statistics.quantiles(times[n], n=4)
        rows[n] = {"params": steps[n][1], "ms_per_step_median": round(statistics.median(times[n]), 1),
                   "ms_per_step_quartiles": [round(q[0], 1), round(q[2], 1)], "timed_steps": len(times[n])}
        if n != "serial":
            ratios = per_round[n]
            rows[n]["time_ratio_to_serial_of_medians"] = round(
                statistics.median(times[n]) / statistics.median(times["serial"]), 3)
            rows[n]["time_ratio_to_serial_per_round"] = {
                "median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                "max": round(max(ratios), 3)}
    return {"batch": args.batch, "seq_len": SEQ, "vocab_size": V, "rounds": args.rounds,
            "steps_per_turn": args.steps, "rows": rows}


def quality(args) -> dict:
    from pretrainer import load
    from pretrainer.config import load_config
    from pretrainer.data.prepare import prepare
    from pretrainer.data.tokens import TokenSplit
    from pretrainer.train.objectives import get_objective
    from pretrainer.train.trainer import evaluate_split, train

    work = Path(args.work)
    data = work / f"data-{args.docs}"
    if not (data / "manifest.json").is_file():
        prepare(f"builtin:stdlib:{args.docs}", "bpe:4096", data, overwrite=True)
    val = TokenSplit(data, "val")
    common = [f"data={data}", f"train.max_steps={args.train_steps}", "train.batch_size=16", "train.seq_len=128",
              "train.lr=2e-3", "train.warmup_steps=30", "train.eval_every=0", "train.eval_batches=16",
              f"train.log_every={max(1, args.train_steps // 5)}", "train.checkpoint_every=0", "train.plot=false",
              "model.vocab_size=null", "model.max_seq_len=128"]
    runs = {}
    for seed in range(args.seeds):
        for name, keys in VARIANTS.items():
            out = work / f"{name}-seed{seed}-{args.train_steps}"
            cfg = load_config(None, overrides_of(QUALITY_SIZE) + keys + common
                              + [f"train.seed={seed}", f"out={out}"])
            t0 = time.time()
            if not (out / "checkpoints").is_dir():
                print(f"--- train {name} seed {seed}", file=sys.stderr, flush=True)
                train(cfg, quiet=True)
            model = load(out)
            val_loss = evaluate_split(model, get_objective(cfg), val, 16, 16)["val_loss"]
            runs.setdefault(name, []).append({"seed": seed, "val_loss": round(val_loss, 4),
                                              "seconds": round(time.time() - t0, 1)})
            print(f"{name:11s} seed {seed}: val loss {val_loss:.4f}", flush=True)
    summary = {}
    for name, rs in runs.items():
        losses = [r["val_loss"] for r in rs]
        summary[name] = {"val_loss_mean": round(statistics.mean(losses), 4), "val_loss_runs": losses}
        if name != "serial":
            diffs = [a - b for a, b in zip(losses, summary["serial"]["val_loss_runs"])]
            summary[name]["minus_serial_per_seed"] = [round(d, 4) for d in diffs]
    return {"model": QUALITY_SIZE, "corpus": f"builtin:stdlib:{args.docs}", "tokenizer": "bpe:4096", "steps": args.train_steps,
            "batch": "16 x 128", "lr": 2e-3, "seeds": args.seeds, "eval": "16 batches of 16 x 128 held-out windows",
            "runs": runs, "summary": summary}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: few rounds, few steps, one seed")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=3, help="timed steps per turn")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--docs", type=int, default=300, help="standard-library files in the corpus")
    p.add_argument("--work", default=str(HERE / "runs" / "parallel_block"))
    p.add_argument("--json", default=str(HERE / "results" / "parallel_block.json"))
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup, args.train_steps, args.seeds = 2, 1, 1, 20, 1
        if args.json == p.get_default("json"):
            args.json = str(Path(args.work) / "parallel_block_quick.json")

    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    speed = step_times(args)
    for n, row in speed["rows"].items():
        extra = ("" if n == "serial" else f"  x{row['time_ratio_to_serial_of_medians']:.3f} of serial "
                 f"(per round {row['time_ratio_to_serial_per_round']})")
        print(f"{n:11s} {row['ms_per_step_median']:7.1f} ms/step  quartiles {row['ms_per_step_quartiles']}{extra}")
    qual = quality(args)
    from pretrainer import kernels

    result = {"benchmark": "parallel_block", "model": {**SIZE, "preset": "llama-tiny", "position": "rope",
                                                       "norm": "rmsnorm", "mlp": "swiglu"},
              "variants": VARIANTS, "step_time": speed, "quality": qual,
              "paper": "PaLM (Chowdhery et al. 2022, section 2): ~15% faster training at large scale "
                       "(fused input matmuls); small quality loss at 8B, none at 62B",
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "fused_kernels": kernels.load() is not None,
                          "note": "torch.set_num_threads(1): a shared 2-core machine"},
              "seconds": round(time.time() - t0, 1)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
