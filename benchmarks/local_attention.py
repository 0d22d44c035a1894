"""Local (banded) attention at long context on a CPU: GPT-3 / GPT-Neo's alternating global and local
layers (``model.attention_layers=global,local``, ``model.attention_window``) against the all-global
decoder of the same size (the same parameters: a window changes no weight).

1. **Training step** (forward + backward of the clm loss through the trainer's fused head, fast
   paths on, as the trainer runs on a CPU) at long contexts, batch 1, three variants:
   ``global`` (every layer dense causal: ``is_causal``, the kernel skips the blocks above the
   diagonal), ``local, masked`` (half the layers local through the plain layer: an explicit T x T
   boolean band mask, every score computed then masked) and ``local, banded`` (the fast path,
   ``pretrainer.model.fast.banded_attention``: queries in blocks of W, each over the 2W keys its
   band reaches). All three live in one process and take turns of a few steps, in rounds whose
   order alternates; ratios to ``global`` per round give the spread.
2. **Memory**: each (variant, context) in a fresh process: the peak resident set during one step
   (``VmHWM``, reset through ``/proc/self/clear_refs`` just before it) less the resident set
   before it (weights and gradients already allocated, libraries loaded by a short step), i.e.
   activations and temporaries as the allocator saw them (Linux only). Beside it, computed from the shapes: the mask bytes a local layer makes
   and the attention scores it computes per head.
3. **Generation**: one new token at a time after a long prompt, the alternating model with its
   local layers' cache kept to the window (the ring buffer) against the same model with a full
   cache for every layer (local layers then mask all but the window), and the all-global model;
   the three advance in lockstep in alternating turns, so each round's tokens are at the same
   positions.
4. **Quality**: validation loss after the same number of steps on ``builtin:stdlib`` (BPE 2048),
   a small model, window = seq_len / 8 (GPT-Neo's 256 of 2048), global vs alternating, two seeds.

    python benchmarks/local_attention.py [--quick] [--json benchmarks/results/local_attention.json]

One thread (``torch.set_num_threads(1)``): the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
V, L, D, H = 4096, 4, 256, 4  # the speed / memory / generation model: 4 layers x 256, 4 heads of 64
WINDOW = 256  # GPT-Neo's
VARIANTS = ("global", "local, masked", "local, banded")


def build(variant: str, max_len: int):
    """The model of ``variant`` (fast paths on, as the trainer runs on a CPU), weights seeded."""
    import torch

    from pretrainer.model import build_model
    from pretrainer.model.fast import FastSelfAttention, apply_fast_paths
    from pretrainer.model.layers import SelfAttention

    torch.manual_seed(0)
    local = {} if variant == "global" else dict(attention_layers="global,local", attention_window=WINDOW)
    model = apply_fast_paths(build_model("gpt2-small", n_layer=L, d_model=D, n_head=H, vocab_size=V,
                                         max_seq_len=max_len, **local))
    if variant == "local, masked":  # the fast head split, the plain masked attention
        class MaskedLocal(FastSelfAttention):
            attend = SelfAttention.attend

        for block in model.blocks:
            block.attn.__class__ = MaskedLocal
    return model


def step_fn(model, T: int):
    import torch

    from pretrainer.train.objectives import lm_loss

    def step() -> float:
        x = torch.randint(0, V, (1, T))
        t0 = time.perf_counter()
        lm_loss(model, model.hidden_states(x), x).backward()
        for p in model.parameters():
            p.grad = None
        return 1000 * (time.perf_counter() - t0)
    return step


def quartiles(xs: list[float]) -> list[float]:
    if len(xs) < 2:
        return [xs[0]] * 3
    q = statistics.quantiles(xs, n=4)
    return [q[0], statistics.median(xs), q[2]]


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


# ----------------------------------------------------------------------------------------------
# 1. training step


def speed(contexts: list[int], rounds: int, steps: int) -> dict:
    out = {}
    for T in contexts:
        steps_of = {v: step_fn(build(v, T), T) for v in VARIANTS}
        for fn in steps_of.values():
            fn()  # warm-up
        times = {v: [] for v in VARIANTS}
        ratio = {v: [] for v in VARIANTS[1:]}
        for r in range(rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            turn = {v: [steps_of[v]() for _ in range(steps)] for v in order}
            for v in VARIANTS:
                times[v] += turn[v]
            for v in ratio:
                ratio[v].append(statistics.median(turn[v]) / statistics.median(turn["global"]))
        out[str(T)] = {v: {"ms_median": statistics.median(times[v]), "ms_quartiles": quartiles(times[v]),
                           "ms_all": times[v]} for v in VARIANTS}
        out[str(T)]["time_ratio_to_global_per_round"] = {v: spread(x) for v, x in ratio.items()}
        print(f"step T={T}: " + "  ".join(f"{v} {statistics.median(times[v]):.0f} ms" for v in VARIANTS)
              + "  | /global per round: " + "  ".join(
                  f"{v} {spread(x)['median']:.2f} ({spread(x)['min']:.2f}-{spread(x)['max']:.2f})"
                  for v, x in ratio.items()), flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# 2. memory


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` size (``VmRSS``: resident now, ``VmHWM``: the peak) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_worker(variant: str, T: int) -> None:
    import gc

    import torch

    from pretrainer.train.objectives import lm_loss

    torch.set_num_threads(1)
    model = build(variant, T)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    step_fn(model, 64)()  # libraries and kernels loaded
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # held through the step, as a trainer holds them
    x = torch.randint(0, V, (1, T))
    gc.collect()
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    lm_loss(model, model.hidden_states(x), x).backward()
    print(json.dumps({"rss_before": before, "peak_rss_growth": _status_bytes("VmHWM") - before}))


def memory(contexts: list[int]) -> dict:
    out = {}
    for T in contexts:
        row = {}
        for v in VARIANTS:
            res = subprocess.run([sys.executable, __file__, "--memory-worker", v, str(T)],
                                 capture_output=True, text=True, check=True)
            row[v] = json.loads(res.stdout.strip().splitlines()[-1])
        n_local = L // 2
        row["analytic_per_local_layer"] = {
            # the plain local layer: (query - key) in int64, then three T x T booleans (one kept)
            "mask_bytes_masked": 8 * T * T + 3 * T * T,
            "mask_bytes_banded": -(-T // WINDOW) * WINDOW * 2 * WINDOW,
            "scores_per_head_global_causal": T * (T + 1) // 2,
            "scores_per_head_masked": T * T,
            "scores_per_head_banded": -(-T // WINDOW) * WINDOW * 2 * WINDOW,
            "local_layers": n_local,
        }
        out[str(T)] = row
        mb = lambda b: b / 2**20  # noqa: E731
        print(f"memory T={T}: peak RSS growth of a step " + "  ".join(
            f"{v} {mb(row[v]['peak_rss_growth']):.0f} MiB" for v in VARIANTS), flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# 3. generation


def generation(prompt: int, new: int, turn: int) -> dict:
    import torch

    from pretrainer.model.layers import KVCache

    total = prompt + new
    alt, dense = build("local, banded", total).eval(), build("global", total).eval()
    cfg = alt.cfg
    full = lambda: KVCache(cfg.n_layer, 1, cfg.kv_heads, total, cfg.head_dim,  # noqa: E731
                           torch.device("cpu"), torch.float32)  # no windows: every layer keeps all
    runs = {"alternating, window cache": (alt, alt.new_cache(1)),
            "alternating, full cache": (alt, full()),
            "global": (dense, dense.new_cache(1))}
    ids = torch.randint(0, V, (1, total))
    with torch.no_grad():
        for model, cache in runs.values():
            model(ids[:, :prompt], cache=cache, last_only=True)
        times = {k: [] for k in runs}
        ratio = []
        pos, r = prompt, 0
        while pos < total:
            n = min(turn, total - pos)
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for k in order:
                model, cache = runs[k]
                for i in range(pos, pos + n):
                    t0 = time.perf_counter()
                    model(ids[:, i:i + 1], cache=cache, last_only=True)
                    times[k].append(1000 * (time.perf_counter() - t0))
            ratio.append(statistics.median(times["alternating, window cache"][-n:])
                         / statistics.median(times["alternating, full cache"][-n:]))
            pos, r = pos + n, r + 1
    sizes = {k: sum(t.numel() * t.element_size() for t in cache.k + cache.v) for k, (_, cache) in runs.items()}
    out = {k: {"ms_per_token_median": statistics.median(v), "ms_quartiles": quartiles(v),
               "cache_bytes": sizes[k]} for k, v in times.items()}
    out["window_over_full_cache_time_per_round"] = spread(ratio)
    print(f"generation after {prompt} tokens: " + "  ".join(
        f"{k} {statistics.median(v):.1f} ms/token ({sizes[k] / 2**20:.0f} MiB cache)" for k, v in times.items())
        + f"  | window/full per round {spread(ratio)['median']:.2f} "
          f"({spread(ratio)['min']:.2f}-{spread(ratio)['max']:.2f})", flush=True)
    return {"prompt": prompt, "new_tokens": new, **out}


# ----------------------------------------------------------------------------------------------
# 4. quality


def quality(steps: int, seeds: list[int], docs: int, seq_len: int, work: Path) -> dict:
    from pretrainer.config import load_config
    from pretrainer.data.prepare import prepare
    from pretrainer.train.trainer import train

    data = work / "data"
    if not (data / "manifest.json").is_file():
        prepare(f"builtin:stdlib:{docs}", "bpe:2048", data, overwrite=True)
    window = seq_len // 8
    variants = {"global": [], "alternating": ["model.attention_layers=global,local",
                                              f"model.attention_window={window}"]}
    common = [f"data={data}", "model=gpt-micro", f"model.max_seq_len={seq_len}", "model.vocab_size=null",
              f"train.max_steps={steps}", "train.batch_size=8", f"train.seq_len={seq_len}", "train.lr=2e-3",
              f"train.warmup_steps={max(1, steps // 10)}", "train.eval_every=0", "train.eval_batches=16",
              f"train.log_every={max(1, steps // 5)}", "train.checkpoint_every=0", "train.plot=false"]
    runs = {}
    for seed in seeds:
        for name, keys in variants.items():  # the seeds' runs side by side
            out = work / f"{name}-seed{seed}-{steps}steps"
            shutil.rmtree(out, ignore_errors=True)  # always a fresh run
            cfg = load_config(None, common + keys + [f"train.seed={seed}", f"out={out}"])
            summary = train(cfg, quiet=True)
            runs[f"{name} seed {seed}"] = {"variant": name, "seed": seed, "val_loss": summary["val_loss"],
                                           "seconds": round(summary["seconds"], 1)}
            print(f"quality {name:12s} seed {seed}: val loss {summary['val_loss']:.4f} "
                  f"({summary['seconds']:.0f} s)", flush=True)
    diffs = [runs[f"alternating seed {s}"]["val_loss"] - runs[f"global seed {s}"]["val_loss"] for s in seeds]
    mean = {n: statistics.mean(runs[f"{n} seed {s}"]["val_loss"] for s in seeds) for n in variants}
    print(f"quality: alternating - global val loss per seed {', '.join(f'{d:+.4f}' for d in diffs)}", flush=True)
    return {"steps": steps, "seq_len": seq_len, "window": window, "docs": docs, "tokenizer": "bpe:2048",
            "model": "gpt-micro (4 layers x 128, 4 heads)", "batch": 8, "lr": 2e-3, "runs": runs,
            "mean_val_loss": mean, "alternating_minus_global_per_seed": diffs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: short contexts, few steps")
    p.add_argument("--json", default=str(HERE / "results" / "local_attention.json"))
    p.add_argument("--work", default=str(HERE / "runs" / "local_attention"))
    p.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker[0], int(args.memory_worker[1]))
        return 0

    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    if args.quick:
        contexts, rounds, steps, gen, quality_args = [1024], 2, 1, (768, 32, 16), (20, [0], 40, 128)
    else:
        contexts, rounds, steps, gen, quality_args = [1024, 2048, 4096], 5, 1, (1920, 128, 16), (300, [0, 1], 400, 256)
    result = {"benchmark": "local_attention", "quick": args.quick,
              "model": {"n_layer": L, "d_model": D, "n_head": H, "vocab": V, "window": WINDOW, "batch": 1,
                        "pattern": "global,local", "dtype": "float32"},
              "protocol": {"threads": 1, "rounds": rounds, "steps_per_turn": steps,
                           "note": "one thread: the 2-core machine is shared with other jobs"}}
    result["step"] = speed(contexts, rounds, steps)
    result["memory"] = memory(contexts)
    result["generation"] = generation(*gen)
    result["quality"] = quality(*quality_args, Path(args.work))
    result["seconds"] = round(time.time() - t0, 1)
    result["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                         "torch": torch.__version__}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"-> {args.json} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
