"""The GPU path, measured through the trainer itself: tokens/s and model FLOP utilisation (MFU).

1. gpt2-small (124M) on one GPU: bf16 autocast, ``torch.compile`` (each block), attention through
   ``F.scaled_dot_product_attention`` (flash kernels on recent GPUs), fused AdamW;
   12 x 1024 tokens per micro-step as nanoGPT's reference run (batch 12, block 1024).
2. A Llama of about 1B parameters (16 layers x 2048, 16 heads, SwiGLU 5504, vocabulary 32,000)
   with ``train.parallel=fsdp`` on every visible GPU (``torchrun``), 2048 tokens per sequence.

Each is a real ``pretrainer pretrain`` run on a prepared synthetic corpus (the data only supplies
token ids; the model keeps its full vocabulary, so the FLOPs are the preset's). Tokens/s and MFU are
the trainer's own log lines (MFU = achieved FLOP/s / (peak bf16 FLOP/s x GPUs), FLOPs per token
6 x matmul parameters + 12 x layers x d_model x sequence, PaLM's appendix B), the median over the
logging windows after the first (compilation). The JSON goes to ``benchmarks/results/gpu.json``.

    python benchmarks/gpu.py [--steps 60] [--skip-fsdp] [--json benchmarks/results/gpu.json]

Without a CUDA device it says so and exits with status 2 (CI never has one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE = {"nanoGPT gpt2-small, A100 (its README)": 0.37,
             "torchtitan Llama 3 8B, H100s (its docs)": "0.33-0.39"}


def run(cmd: list[str], env: dict | None = None) -> None:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, env=env)
    if done.returncode:
        raise SystemExit(f"gpu benchmark: command failed ({done.returncode}): {' '.join(cmd)}")


def window_stats(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "tokens_per_s" in r][1:]  # the first window holds compilation
    if not train:
        raise SystemExit(f"gpu benchmark: {run_dir} logged no timed window; raise --steps")
    out = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
           "ms_per_step": statistics.median(r["ms_per_step"] for r in train),
           "windows": len(train), "final_loss": train[-1]["loss"]}
    if all("mfu" in r for r in train):
        out["mfu"] = statistics.median(r["mfu"] for r in train)
        out["mfu_range"] = [min(r["mfu"] for r in train), max(r["mfu"] for r in train)]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--skip-fsdp", action="store_true", help="only the one-GPU gpt2-small run")
    p.add_argument("--work", help="folder for the data and runs (default: a temporary one)")
    p.add_argument("--json", default=str(HERE / "results" / "gpu.json"))
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu benchmark: no CUDA device here; run it on a machine with one", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="pretrainer-gpu-"))
    py = sys.executable
    data = work / "data"
    if not (data / "manifest.json").is_file():
        run([py, "-m", "pretrainer", "prepare", "--corpus", "builtin:synthetic", "--tokenizer", "bpe:2000",
             "--out", str(data)])
    common = [f"data={data}", f"train.max_steps={args.steps}", f"train.log_every={args.log_every}",
              "train.eval_every=0", "train.checkpoint_every=0", "train.warmup_steps=10", "train.plot=false",
              "train.dtype=bfloat16", "train.compile=true"]
    results = {}

    t0 = time.time()
    gpt = work / "gpt2-small"
    run([py, "-m", "pretrainer", "pretrain", "model=gpt2-small", f"out={gpt}", "train.batch_size=12",
         "train.seq_len=1024", "train.lr=6e-4", *common])
    results["gpt2-small_1gpu"] = {**window_stats(gpt), "gpus": 1, "batch": 12, "seq_len": 1024,
                                  "seconds": time.time() - t0}

    if not args.skip_fsdp:
        n = torch.cuda.device_count()
        t0 = time.time()
        llama = work / "llama-1b"
        env = dict(os.environ, OMP_NUM_THREADS="4")
        run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "pretrainer",
             "pretrain", "model=llama2-7b", "model.n_layer=16", "model.d_model=2048", "model.n_head=16",
             "model.d_ff=5504", "model.max_seq_len=2048", f"out={llama}", "train.parallel=fsdp",
             "train.batch_size=4", "train.seq_len=2048", "train.lr=3e-4", *common], env=env)
        results[f"llama-1b_fsdp_{n}gpu"] = {**window_stats(llama), "gpus": n, "batch_per_gpu": 4,
                                            "seq_len": 2048, "seconds": time.time() - t0}

    props = torch.cuda.get_device_properties(0)
    result = {"benchmark": "gpu", "device": props.name, "gpus": torch.cuda.device_count(),
              "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
              "python": platform.python_version(), "results": results, "goal": "gpt2-small MFU >= 0.50",
              "reference_mfu": REFERENCE}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    for name, r in results.items():
        mfu = f", MFU {100 * r['mfu']:.1f}% ({100 * r['mfu_range'][0]:.1f}-{100 * r['mfu_range'][1]:.1f})" if "mfu" in r else ""
        print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s, {r['ms_per_step']:.0f} ms/step{mfu}")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
