"""Training-step throughput on CPU, ours against Hugging Face ``transformers``, side by side.

The configuration of ../shared/ANCHORS.md: 4 layers x 256 wide, 4 heads, vocabulary 8192, batch
8 x 256 tokens, float32, AdamW; FFN 1024 for GPT-2 style, 688 (SwiGLU) for Llama style. Each
implementation runs in its own process (so none inherits another's allocator or thread state),
in interleaved rounds (ours, theirs, ours, theirs, ...) so that machine noise hits both alike; a
step is forward + backward + AdamW step + zero_grad on fresh random tokens. Both sides use the
fused AdamW kernel: ours because the trainer does (``make_optimizer``), transformers because its
Trainer defaults to ``adamw_torch_fused`` with torch >= 2.8. We report, per
implementation, the median over rounds of each round's median step time, and the ratio of
tokens/s.

    python benchmarks/throughput.py [--rounds 3] [--steps 10] [--json benchmarks/results/throughput.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
B, T, V, L, D, H = 8, 256, 8192, 4, 256, 4
PAIRS = [("ours-gpt2", "hf-gpt2"), ("ours-llama", "hf-llama")]


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

    if impl == "ours-gpt2":
        model = build_model("gpt2-small", n_layer=L, d_model=D, n_head=H, vocab_size=V, max_seq_len=T)
    else:
        model = build_model("llama-tiny", n_layer=L, d_model=D, n_head=H, n_kv_heads=H, d_ff=688,
                            vocab_size=V, max_seq_len=T)
    # what the trainer calls: targets given, no logits needed (fused head); targets equal to the
    # inputs here as for HF's labels= (HF shifts them inside; the work is the same)
    return model, lambda x: model(x, x, return_logits=False).loss


def worker(impl: str, steps: int, warmup: int) -> None:
    import torch

    model, loss_fn = build(impl)
    if impl.startswith("ours"):
        from pretrainer.config import TrainConfig
        from pretrainer.train.optim import make_optimizer

        opt = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.1), "cpu")
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    params = sum(p.numel() for p in model.parameters())
    times = []
    for i in range(warmup + steps):
        x = torch.randint(0, V, (B, T))
        t0 = time.perf_counter()
        loss_fn(x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"impl": impl, "params": params, "ms": [1000 * t for t in times],
                      "threads": torch.get_num_threads()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=str(HERE / "results" / "throughput.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.warmup)

    impls = [i for pair in PAIRS for i in pair]
    per_round: dict[str, list[float]] = {i: [] for i in impls}
    params = {}
    for r in range(args.rounds):
        for impl in impls:
            out = subprocess.run([sys.executable, __file__, "--worker", impl, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup)], capture_output=True, text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            per_round[impl].append(statistics.median(rec["ms"]))
            params[impl] = rec["params"]
            print(f"round {r + 1}/{args.rounds} {impl:11s} {per_round[impl][-1]:7.1f} ms/step", file=sys.stderr)
    rows = {}
    for impl in impls:
        ms = statistics.median(per_round[impl])
        rows[impl] = {"ms_per_step": ms, "tokens_per_s": B * T / ms * 1000, "params": params[impl],
                      "ms_per_round": per_round[impl]}
    ratios = {ours: rows[ours]["tokens_per_s"] / rows[hf]["tokens_per_s"] for ours, hf in PAIRS}
    result = {"benchmark": "throughput", "config": {"batch": B, "seq_len": T, "vocab": V, "n_layer": L,
                                                    "d_model": D, "n_head": H, "dtype": "float32",
                                                    "optimizer": "AdamW"},
              "results": rows, "speedup_tokens_per_s": ratios, "target": 1.3,
              "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"{'implementation':12s} {'ms/step':>8s} {'tokens/s':>9s} {'params':>10s}")
    for impl, row in rows.items():
        print(f"{impl:12s} {row['ms_per_step']:8.1f} {row['tokens_per_s']:9.0f} {row['params']:10,}")
    for ours, hf in PAIRS:
        print(f"{ours} / {hf}: {ratios[ours]:.2f}x tokens/s (target >= 1.3x)")


if __name__ == "__main__":
    main()
