"""Where a training step's time goes, ours beside the reference's: the share in matrix products,
in the attention kernel, in the optimizer and in everything else, from ``torch.profiler``.

It answers the question a speed ratio leaves open: how much faster could ours be at all? Both
sides call the same matrix-product and attention kernels for the same shapes, so ours can only
gain on the rest. Every figure is taken within one process, per millisecond of that process's own
products and attention (the *overhead*: the optimizer and the rest, over products + attention),
so that a machine that runs faster or slower from one process to the next (a shared VM does, by
10-20 %) enters far less than it does the milliseconds: the **estimated ratio** is (1 + theirs) / (1 + ours), the **ceiling**
1 + theirs (ours with no overhead at all), and **needed for 1.3x** the overhead ours may have at
most for a step 1.3x the reference's.

    python benchmarks/step_profile.py [--models bert,t5,shakespeare] [--steps 5] [--rounds 2]
        [--ops N] [--json results/step_profile.json]

Models: ``gpt2``, ``llama``, ``bert`` (head on all positions, like for like), ``t5``: the
configurations and steps of ``throughput.py`` (ours with the trainer's fast paths against
``transformers``); ``shakespeare``: nanoGPT's CPU example (4 layers x 128, context 64, batch 12,
vocabulary 65, no biases, exact GELU; ``shakespeare_char.py --model nanogpt-layout``) against the
model of the unmodified nanoGPT snapshot (``../shared/anchors/nanoGPT`` or ``--nanogpt DIR``), each
with its own optimizer set-up and gradient clipping at 1. Each side runs in its own process,
the sides alternating over ``--rounds``; the numbers are the median over rounds. The profiler
slows every op a little; the shares, not the milliseconds, are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NANOGPT_DIR = HERE.parent.parent / "shared" / "anchors" / "nanoGPT"
MODELS = ("gpt2", "llama", "bert", "t5", "shakespeare")
PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"}


def category(op: str) -> str:
    if op in PRODUCTS:
        return "products"
    if "scaled_dot_product" in op:
        return "attention"
    if "adam" in op.lower() or op.startswith("Optimizer."):
        return "optimizer"
    return "rest"


def overhead(ms: dict) -> float:
    """A process's optimizer and rest per millisecond of its products and attention."""
    return (ms["optimizer"] + ms["rest"]) / (ms["products"] + ms["attention"])


def build_shakespeare(side: str, nanogpt: str):
    """(batch maker, step function of a batch) for nanoGPT's CPU example: its model or ours with
    the same layout."""
    import torch

    torch.manual_seed(0)
    B, T, V = 12, 64, 65
    gen = torch.Generator().manual_seed(1)

    def batch():
        x = torch.randint(0, V, (B, T + 1), generator=gen)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    if side == "theirs":
        sys.path.insert(0, nanogpt)
        from model import GPT, GPTConfig  # the snapshot's model.py, run as it is

        model = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False))
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")

        def loss_of(x, y):
            return model(x, y)[1]
    else:
        from pretrainer.config import TrainConfig
        from pretrainer.model import build_model
        from pretrainer.model.fast import apply_fast_paths
        from pretrainer.train.objectives import lm_loss
        from pretrainer.train.optim import make_optimizer

        sys.path.insert(0, str(HERE))
        from shakespeare_char import model_config

        cfg = model_config("nanogpt-layout")
        cfg.vocab_size = V
        model = apply_fast_paths(build_model(cfg))
        opt = make_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1, beta2=0.99), "cpu")

        def loss_of(x, y):
            return lm_loss(model, model.hidden_states(x), y)

    def step(xy):
        loss_of(*xy).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch, step


def build_throughput(side: str, style: str):
    """(batch maker, step function of a batch) for a style of ``throughput.py``: the same model,
    batches and optimizer."""
    import torch

    sys.path.insert(0, str(HERE))
    import throughput as tp

    impl = f"{'ours' if side == 'ours' else 'hf'}-{style}"
    model, loss_fn = tp.build(impl)
    opt = tp.optimizer(impl, model)
    gen = torch.Generator().manual_seed(1)

    def step(batch):
        loss_fn(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return lambda: tp.make_batch(style, gen), step


def worker(model: str, side: str, steps: int, warmup: int, nanogpt: str, ops: int = 0) -> None:
    """Profile ``steps`` steps after ``warmup``; print one JSON line of milliseconds per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    batch, step = build_shakespeare(side, nanogpt) if model == "shakespeare" else build_throughput(side, model)
    for _ in range(warmup):
        step(batch())
    batches = [batch() for _ in range(2 * steps)]  # made before the clock, as throughput.py does
    t0 = time.perf_counter()
    for b in batches[:steps]:
        step(b)
    plain_ms = 1000 * (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU], record_shapes=ops > 0) as prof:
        t0 = time.perf_counter()
        for b in batches[steps:]:
            step(b)
        wall_ms = 1000 * (time.perf_counter() - t0) / steps
    shares = {"products": 0.0, "attention": 0.0, "optimizer": 0.0}
    for e in prof.key_averages():
        c = category(e.key)
        if c != "rest":
            shares[c] += e.self_cpu_time_total / 1000 / steps
    shares["rest"] = wall_ms - sum(shares.values())
    top = sorted(([e.key, str(e.input_shapes), e.self_cpu_time_total / 1000 / steps]
                  for e in prof.key_averages(group_by_input_shape=True) if category(e.key) == "rest"),
                 key=lambda x: -x[2])[:ops] if ops else []
    print(json.dumps({"step_ms_unprofiled": plain_ms, "step_ms_profiled": wall_ms, "ms": shares,
                      "threads": torch.get_num_threads(), "top_rest_ops": top}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="bert,t5,shakespeare", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--steps", type=int, default=5, help="profiled steps per process (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="processes per side, the sides alternating")
    p.add_argument("--nanogpt", default=str(NANOGPT_DIR), help="the nanoGPT snapshot (shakespeare)")
    p.add_argument("--ops", type=int, default=0, help="also list each side's N costliest ops of the rest, by shape")
    p.add_argument("--json", default=str(HERE / "results" / "step_profile.json"))
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker, args.steps, args.warmup, args.nanogpt, args.ops)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            sys.exit(f"error: --models: unknown model {m!r}; expected some of {', '.join(MODELS)}")
    if "shakespeare" in models and not (Path(args.nanogpt) / "model.py").is_file():
        print(f"note: no nanoGPT snapshot at {args.nanogpt}: shakespeare left out", file=sys.stderr)
        models.remove("shakespeare")

    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    results = {}
    for m in models:
        runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
        for r in range(args.rounds):
            for side in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", m, side, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--nanogpt", args.nanogpt, "--ops", str(args.ops)]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode:
                    sys.exit(f"error: {m} {side} failed:\n{done.stderr[-2000:]}")
                runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
        med = {side: {k: statistics.median(x["ms"][k] for x in rs) for k in ("products", "attention", "optimizer", "rest")}
               | {"step_ms_profiled": statistics.median(x["step_ms_profiled"] for x in rs),
                  "step_ms_unprofiled": statistics.median(x["step_ms_unprofiled"] for x in rs)}
               for side, rs in runs.items()}
        over = {side: [overhead(x["ms"]) for x in rs] for side, rs in runs.items()}  # per process
        o, t = statistics.median(over["ours"]), statistics.median(over["theirs"])
        estimated = [(1 + b) / (1 + a) for a, b in zip(over["ours"], over["theirs"])]  # round by round
        results[m] = {"ours": med["ours"], "theirs": med["theirs"], "runs": runs,
                      "overhead": {"ours": o, "theirs": t, "per_round": over},
                      "estimated_ratio": {"median": statistics.median(estimated), "min": min(estimated),
                                          "max": max(estimated)},
                      "ceiling": 1 + t, "overhead_needed_for_1_3x": (1 + t) / 1.3 - 1}
        ref = "nanoGPT" if m == "shakespeare" else "transformers"
        print(f"\n{m}: ms a step under the profiler, median of {args.rounds} processes a side ({args.steps} steps each)")
        print(f"  {'':14s} {'products':>9s} {'attention':>10s} {'optimizer':>10s} {'rest':>8s} {'step':>8s} {'overhead':>9s}")
        for side, name in (("ours", "ours"), ("theirs", ref)):
            s = med[side]
            print(f"  {name:14s} {s['products']:9.1f} {s['attention']:10.1f} {s['optimizer']:10.1f} {s['rest']:8.1f} "
                  f"{s['step_ms_profiled']:8.1f} {statistics.median(over[side]):9.2f}")
        for side, name in (("ours", "ours"), ("theirs", ref)) if args.ops else ():
            print(f"  {name}: the costliest ops of the rest, ms a step (first process)")
            for op, shapes, ms in runs[side][0]["top_rest_ops"]:
                print(f"    {ms:6.1f}  {op[:40]:40s} {shapes[:80]}")
        e = results[m]["estimated_ratio"]
        print(f"  overhead = (optimizer + rest) / (products + attention), each process its own. {ref} / ours "
              f"estimated {e['median']:.2f}x ({e['min']:.2f}-{e['max']:.2f}); ceiling {1 + t:.2f}x; "
              f"for 1.3x ours needs an overhead of at most {(1 + t) / 1.3 - 1:.2f} (now {o:.2f})")

    import torch

    out = {"benchmark": "step_profile", "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
           "models": results, "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                          "python": platform.python_version(), "platform": platform.platform()},
           "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
