"""Training-step throughput on CPU, ours against Hugging Face ``transformers``, side by side.

The configuration of ../shared/ANCHORS.md: 4 layers x 256 wide, 4 heads, vocabulary 8192, batch
8 x 256 tokens, float32, AdamW; FFN 1024 for GPT-2 style, 688 (SwiGLU) for Llama style. A step is
forward + backward + AdamW step + zero_grad on fresh random tokens. Both sides use the fused AdamW
kernel: ours because the trainer does (``make_optimizer``), transformers because its Trainer
defaults to ``adamw_torch_fused`` with torch >= 2.8. Ours runs as its trainer would: with its fused CPU
kernels (``pretrainer.kernels``) when they build on the machine, which the table and the JSON
say.

Each implementation lives in its own process (so none inherits another's allocator or thread
state), built and warmed up once; then the processes take turns of a few steps each, one at a
time, in many rounds (ours, theirs / theirs, ours, alternating), so that the machine's slow and
fast moments (on a shared VM they last about a second) fall on both sides alike. We report per
implementation the median over all timed steps and the ratio of tokens/s from those medians;
beside it the ratio of all timed tokens over all timed seconds, and, as a check on the noise, the
spread of the per-round ratios (each round's two turns are adjacent in time).

    python benchmarks/throughput.py [--rounds 20] [--steps 3] [--json benchmarks/results/throughput.json]

``--baseline DIR`` compares ours against another pretrainer checkout instead of transformers (the
same protocol; e.g. ``git worktree add /tmp/before 824d051`` to measure what a change cost):

    python benchmarks/throughput.py --baseline /tmp/before --json benchmarks/results/throughput_vs_before.json
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
B, T, V, L, D, H = 8, 256, 8192, 4, 256, 4


def build(impl: str):
    """(model, loss_fn) for one implementation, random weights."""
    import torch

    torch.manual_seed(0)
    if impl.startswith("hf-"):
        import transformers

        transformers.logging.set_verbosity_error()
        if impl == "hf-gpt2":
            cfg = transformers.GPT2Config(n_layer=L, n_embd=D, n_head=H, n_inner=4 * D, vocab_size=V,
                                          n_positions=T, attn_implementation="sdpa")
            model = transformers.GPT2LMHeadModel(cfg)
        else:
            cfg = transformers.LlamaConfig(num_hidden_layers=L, hidden_size=D, num_attention_heads=H,
                                           num_key_value_heads=H, intermediate_size=688, vocab_size=V,
                                           max_position_embeddings=T, attn_implementation="sdpa")
            model = transformers.LlamaForCausalLM(cfg)
        return model, lambda x: model(input_ids=x, labels=x).loss
    from pretrainer.model import build_model

    if impl.endswith("-gpt2"):
        model = build_model("gpt2-small", n_layer=L, d_model=D, n_head=H, vocab_size=V, max_seq_len=T)
    else:
        model = build_model("llama-tiny", n_layer=L, d_model=D, n_head=H, n_kv_heads=H, d_ff=688,
                            vocab_size=V, max_seq_len=T)
    # what the trainer runs: the fast paths, and the clm objective's loss through the fused head
    # (no logits kept); targets equal to the inputs here as for HF's labels= (HF shifts them
    # inside; the work is the same)
    try:
        from pretrainer.model.fast import apply_fast_paths
        from pretrainer.train.objectives import lm_loss
    except ImportError:  # a baseline from before the training-step seam (824d051 and earlier)
        return model, lambda x: model(x, x, return_logits=False).loss
    apply_fast_paths(model)
    return model, lambda x: lm_loss(model, model.hidden_states(x), x)


def worker(impl: str, warmup: int) -> None:
    """Build, warm up, say ``ready``; then for every line ``k`` on stdin time k steps and print
    their milliseconds as one JSON line. Ends when stdin closes."""
    import torch

    model, loss_fn = build(impl)
    if not impl.startswith("hf-"):
        from pretrainer.config import TrainConfig
        from pretrainer.train.optim import make_optimizer

        opt = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.1), "cpu")
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step() -> float:
        x = torch.randint(0, V, (B, T))
        t0 = time.perf_counter()
        loss_fn(x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 1000 * (time.perf_counter() - t0)

    for _ in range(warmup):
        step()
    params = sum(p.numel() for p in model.parameters())
    fused = None
    if not impl.startswith("hf-"):  # whether pretrainer's fused CPU kernels were in use
        from pretrainer import kernels

        fused = kernels.load() is not None
    print(json.dumps({"ready": impl, "params": params, "threads": torch.get_num_threads(),
                      "fused_kernels": fused}), flush=True)
    for line in sys.stdin:
        print(json.dumps({"ms": [step() for _ in range(int(line))]}), flush=True)


class Worker:
    def __init__(self, impl: str, warmup: int, baseline: str | None = None):
        self.impl = impl
        env = dict(os.environ)
        if impl.startswith("base-"):  # the other checkout's pretrainer first on the path
            env["PYTHONPATH"] = str(Path(baseline, "src").resolve())
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", impl, "--warmup", str(warmup)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"throughput: worker {self.impl} exited (code {self.proc.wait()})")
        return json.loads(line)

    def run(self, steps: int) -> list[float]:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return self._read()["ms"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def quartiles(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4)
    return [q[0], statistics.median(xs), q[2]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20, help="turns per implementation (default 20)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per turn (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after building (default 3)")
    p.add_argument("--pause", type=float, default=0.2,
                   help="seconds between turns, so the previous process's threads go idle (default 0.2)")
    p.add_argument("--models", default="gpt2,llama", help="styles to compare (default gpt2,llama)")
    p.add_argument("--baseline", help="a pretrainer checkout to compare against instead of transformers")
    p.add_argument("--json", default=str(HERE / "results" / "throughput.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.warmup)
    styles = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in styles if m not in ("gpt2", "llama")]
    if unknown or not styles:
        p.error(f"--models: expected a comma-separated list of gpt2 and llama, got {args.models!r}")
    if args.rounds < 2 or args.steps < 1 or args.warmup < 0 or args.pause < 0:
        p.error("expected --rounds >= 2, --steps >= 1, --warmup >= 0 and --pause >= 0")
    if args.baseline and not Path(args.baseline, "src", "pretrainer").is_dir():
        p.error(f"--baseline {args.baseline}: not a pretrainer checkout (no src/pretrainer)")
    other = "base" if args.baseline else "hf"
    pairs = [(f"ours-{m}", f"{other}-{m}") for m in styles]

    workers = {}
    try:
        for ours, hf in pairs:  # built one after another: no warm-up competes with another
            for impl in (ours, hf):
                workers[impl] = Worker(impl, args.warmup, args.baseline)
                print(f"ready: {impl}", file=sys.stderr)
        times: dict[str, list[float]] = {i: [] for i in workers}
        round_ratio: dict[str, list[float]] = {ours: [] for ours, _ in pairs}
        t_start = time.time()
        for r in range(args.rounds):
            for ours, hf in (pairs if r % 2 == 0 else pairs[::-1]):
                turn = {}
                for impl in ((ours, hf) if r % 2 == 0 else (hf, ours)):
                    time.sleep(args.pause)
                    turn[impl] = workers[impl].run(args.steps)
                    times[impl] += turn[impl]
                round_ratio[ours].append(statistics.median(turn[hf]) / statistics.median(turn[ours]))
            done = r + 1
            eta = (time.time() - t_start) / done * (args.rounds - done)
            print(f"round {done}/{args.rounds}  " + "  ".join(
                f"{ours}/{hf} {round_ratio[ours][-1]:.2f}x" for ours, hf in pairs) + f"  ETA {eta:.0f}s",
                file=sys.stderr)
    finally:
        for w in workers.values():
            w.close()

    rows = {}
    for impl, w in workers.items():
        ms = statistics.median(times[impl])
        rows[impl] = {"ms_per_step": ms, "tokens_per_s": B * T / ms * 1000,
                      "tokens_per_s_overall": B * T * len(times[impl]) / sum(times[impl]) * 1000,
                      "params": w.info["params"], "fused_kernels": w.info["fused_kernels"],
                      "threads": w.info["threads"], "ms_quartiles": quartiles(times[impl]),
                      "ms_all": times[impl]}
    ratios = {ours: rows[ours]["tokens_per_s"] / rows[hf]["tokens_per_s"] for ours, hf in pairs}
    overall = {ours: rows[ours]["tokens_per_s_overall"] / rows[hf]["tokens_per_s_overall"] for ours, hf in pairs}
    result = {"benchmark": "throughput", "config": {"batch": B, "seq_len": T, "vocab": V, "n_layer": L,
                                                    "d_model": D, "n_head": H, "dtype": "float32",
                                                    "optimizer": "AdamW (fused)"},
              "protocol": {"rounds": args.rounds, "steps_per_turn": args.steps, "warmup": args.warmup,
                           "pause_s": args.pause},
              "results": rows, "speedup_tokens_per_s": ratios, "speedup_tokens_per_s_overall": overall,
              "per_round_speedup_quartiles": {o: quartiles(v) for o, v in round_ratio.items()},
              "per_round_speedup": round_ratio, "target": None if args.baseline else 1.3,
              "baseline": str(args.baseline) if args.baseline else "transformers",
              "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"{'implementation':12s} {'ms/step':>8s} {'quartiles':>17s} {'tokens/s':>9s} {'params':>10s}")
    for impl, row in rows.items():
        q = row["ms_quartiles"]
        note = {True: "  (fused CPU kernels)", False: "  (PyTorch ops only)"}.get(row["fused_kernels"], "")
        print(f"{impl:12s} {row['ms_per_step']:8.1f} {q[0]:8.1f}-{q[2]:<8.1f} {row['tokens_per_s']:9.0f} "
              f"{row['params']:10,}{note}")
    for ours, hf in pairs:
        q = result["per_round_speedup_quartiles"][ours]
        target = "" if args.baseline else " (target >= 1.3x)"
        print(f"{ours} / {hf}: {ratios[ours]:.2f}x tokens/s{target}; all timed tokens over all "
              f"timed seconds {overall[ours]:.2f}x; per round {q[1]:.2f}x, quartiles {q[0]:.2f}-{q[2]:.2f}, "
              f"lowest {min(round_ratio[ours]):.2f}")


if __name__ == "__main__":
    main()
