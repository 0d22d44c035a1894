"""Training-step throughput on CPU, ours against Hugging Face ``transformers``, side by side.

The configuration of ../shared/ANCHORS.md: 4 layers x 256 wide, 4 heads, vocabulary 8192, batch
8 x 256 tokens, float32, AdamW; FFN 1024 for GPT-2 style, 688 (SwiGLU) for Llama style. A step is
forward + backward + AdamW step + zero_grad on fresh random tokens (the same batches on both sides
of a turn). The styles (``--models``, default all):

- ``gpt2``, ``llama``: causal LM, against ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` (transformers'
  dropout 0 on both sides, as ours has none). Our targets are the inputs
  unshifted (the same work as transformers' shift), so the first loss of our tied GPT-2, which can
  copy its input, is lower (~7.9 against ~9.1);
- ``bert``: masked LM like for like against ``BertForMaskedLM`` (post-norm BERT, FFN 1024, no
  pooler, dropout 0 on both sides; 15 % of the positions selected): our head and loss on every
  position, as transformers computes them;
- ``bert-masked``: our ``mlm`` objective as the trainer runs it, the head on the selected
  positions only, against the same ``BertForMaskedLM``: NOT like for like (the table says so);
- ``t5``: our ``span`` objective's step against ``T5ForConditionalGeneration`` (T5 v1.0 layout,
  FFN 1024 ReLU, tied embeddings, dropout 0), 256 input + 64 target tokens per example; tokens/s
  counts both.

Both sides use the fused AdamW
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

    python benchmarks/throughput.py [--models gpt2,llama,bert,bert-masked,t5] [--rounds 20] [--steps 3]
        [--json FILE]   (default results/throughput.json for every style, else results/throughput_<styles>.json)

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


STYLES = ("gpt2", "llama", "bert", "bert-masked", "t5")
T_DEC = 64  # t5: target tokens per example (the encoder reads T), as in ../shared/ANCHORS.md
MASK_PROB, MASK_ID = 0.15, 4  # bert: the share of positions selected, and the id they read


def tokens_per_step(style: str) -> int:
    """Tokens a step processes: the encoder's and the decoder's for t5."""
    return B * (T + T_DEC) if style == "t5" else B * T


def make_batch(style: str, gen):
    """A fresh random batch from the generator ``gen`` (both sides of a turn get the same one).
    bert: MASK_PROB of the positions selected at random, read as MASK_ID, labelled with the token
    (-100 elsewhere); t5: T input tokens, T_DEC target tokens (no padding: id 0 is T5's pad)."""
    import torch

    if style in ("gpt2", "llama"):
        x = torch.randint(0, V, (B, T), generator=gen)
        return {"input_ids": x, "labels": x}
    if style.startswith("bert"):
        x = torch.randint(5, V, (B, T), generator=gen)
        picked = torch.rand(B, T, generator=gen) < MASK_PROB
        return {"input_ids": x.masked_fill(picked, MASK_ID), "labels": x.masked_fill(~picked, -100)}
    x = torch.randint(1, V, (B, T), generator=gen)
    return {"input_ids": x, "attention_mask": (x != 0).long(), "labels": torch.randint(1, V, (B, T_DEC), generator=gen)}


def build(impl: str):
    """(model, loss_fn) for one implementation, random weights; ``loss_fn(batch)``."""
    import torch

    torch.manual_seed(0)
    side, style = impl.split("-", 1)
    if side == "hf":
        import transformers

        transformers.logging.set_verbosity_error()
        if style == "gpt2":
            cfg = transformers.GPT2Config(n_layer=L, n_embd=D, n_head=H, n_inner=4 * D, vocab_size=V,
                                          n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          attn_implementation="sdpa")
            model = transformers.GPT2LMHeadModel(cfg)
        elif style == "llama":
            cfg = transformers.LlamaConfig(num_hidden_layers=L, hidden_size=D, num_attention_heads=H,
                                           num_key_value_heads=H, intermediate_size=688, vocab_size=V,
                                           max_position_embeddings=T, attn_implementation="sdpa")
            model = transformers.LlamaForCausalLM(cfg)
        elif style == "bert":  # logits and loss on every position (the labels ignore the others)
            cfg = transformers.BertConfig(num_hidden_layers=L, hidden_size=D, num_attention_heads=H,
                                          intermediate_size=4 * D, vocab_size=V, max_position_embeddings=T,
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                          attn_implementation="sdpa")
            model = transformers.BertForMaskedLM(cfg)
        else:  # t5: the labels shifted right inside for the decoder's inputs
            cfg = transformers.T5Config(vocab_size=V, d_model=D, d_kv=D // H, d_ff=4 * D, num_layers=L,
                                        num_heads=H, dropout_rate=0.0, feed_forward_proj="relu",
                                        tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0,
                                        attn_implementation="sdpa")
            model = transformers.T5ForConditionalGeneration(cfg)
        return model, lambda b: model(**b).loss
    from pretrainer.model import build_model

    if style == "gpt2":
        model = build_model("gpt2-small", n_layer=L, d_model=D, n_head=H, vocab_size=V, max_seq_len=T)
    elif style == "llama":
        model = build_model("llama-tiny", n_layer=L, d_model=D, n_head=H, n_kv_heads=H, d_ff=688,
                            vocab_size=V, max_seq_len=T)
    elif style.startswith("bert"):  # no pooler: BertForMaskedLM has none (the same parameters)
        model = build_model("bert-mini", n_layer=L, d_model=D, n_head=H, vocab_size=V, max_seq_len=T,
                            pooler=False)
    else:
        model = build_model("t5-tiny", n_layer=L, d_model=D, n_head=H, d_ff=4 * D, vocab_size=V,
                            max_seq_len=T)
    # what the trainer runs: the fast paths, and the objective's loss (the LM objectives through
    # the fused head, no logits kept); gpt2/llama targets equal to the inputs as for HF's labels=
    # (HF shifts them inside; the work is the same)
    try:
        from pretrainer.model.fast import apply_fast_paths
        from pretrainer.train.objectives import lm_loss
    except ImportError:  # a baseline from before the training-step seam (824d051 and earlier)
        if style not in ("gpt2", "llama"):
            raise
        return model, lambda b: model(b["input_ids"], b["labels"], return_logits=False).loss
    apply_fast_paths(model)
    if style in ("gpt2", "llama"):
        return model, lambda b: lm_loss(model, model.hidden_states(b["input_ids"]), b["labels"])
    if style == "bert":  # like for like with BertForMaskedLM: our masked-LM loss on every position
        try:
            from pretrainer.train.objectives import mlm_loss
        except ImportError:  # a baseline from before mlm_loss: the plain logits, as its objective had them
            from pretrainer.model.loss import cross_entropy

            def mlm_loss(model, h, labels):
                return cross_entropy(model.head(h), labels)
        return model, lambda b: mlm_loss(model, model.hidden_states(b["input_ids"]), b["labels"])
    # bert-masked (the mlm objective: the head on the selected positions only) and t5 (span)
    from pretrainer.config import RunConfig
    from pretrainer.train.objectives import get_objective

    objective = get_objective(RunConfig(model=model.cfg, objective="mlm" if style == "bert-masked" else "span"))
    return model, lambda b: objective.loss(model, b)


def optimizer(impl: str, model):
    """AdamW with the fused kernel on both sides: ours as the trainer makes it, transformers' as its
    Trainer does (``adamw_torch_fused``)."""
    import torch

    if impl.startswith("hf-"):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    from pretrainer.config import TrainConfig
    from pretrainer.train.optim import make_optimizer

    return make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.1), "cpu")


def worker(impl: str, warmup: int) -> None:
    """Build, warm up, say ``ready``; then for every line ``k seed`` on stdin time k steps on the
    batches of generator ``seed`` and print their milliseconds as one JSON line. Ends when stdin
    closes."""
    import torch

    model, loss_fn = build(impl)
    style = impl.split("-", 1)[1]
    gen = torch.Generator().manual_seed(10**6)  # the warm-up's batches
    opt = optimizer(impl, model)

    losses = []

    def step() -> float:
        batch = make_batch(style, gen)
        t0 = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ms = 1000 * (time.perf_counter() - t0)
        losses.append(loss.item())  # (after the clock: a check that both sides compute the same loss)
        return ms

    for _ in range(warmup):
        step()
    params = sum(p.numel() for p in model.parameters())
    fused = None
    if not impl.startswith("hf-"):  # whether pretrainer's fused CPU kernels were in use
        from pretrainer import kernels

        fused = kernels.load() is not None
    print(json.dumps({"ready": impl, "params": params, "threads": torch.get_num_threads(),
                      "fused_kernels": fused, "first_loss": losses[0] if losses else None}), flush=True)
    for line in sys.stdin:
        steps, seed = map(int, line.split())
        gen.manual_seed(seed)
        print(json.dumps({"ms": [step() for _ in range(steps)]}), flush=True)


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

    def run(self, steps: int, seed: int) -> list[float]:
        self.proc.stdin.write(f"{steps} {seed}\n")
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
    p.add_argument("--models", default=",".join(STYLES), help=f"styles to compare (default {','.join(STYLES)})")
    p.add_argument("--baseline", help="a pretrainer checkout to compare against instead of transformers")
    p.add_argument("--json", help="where to write the results (default results/throughput.json for every "
                   "style, else results/throughput_<styles>.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.warmup)
    styles = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in styles if m not in STYLES]
    if unknown or not styles:
        p.error(f"--models: expected a comma-separated list of {', '.join(STYLES)}, got {args.models!r}")
    styles = list(dict.fromkeys(styles))
    if args.json is None:  # a selection never overwrites the full table
        name = "throughput" if set(styles) == set(STYLES) else "throughput_" + "_".join(styles)
        args.json = str(HERE / "results" / f"{name}.json")
    if args.rounds < 2 or args.steps < 1 or args.warmup < 0 or args.pause < 0:
        p.error("expected --rounds >= 2, --steps >= 1, --warmup >= 0 and --pause >= 0")
    if args.baseline and not Path(args.baseline, "src", "pretrainer").is_dir():
        p.error(f"--baseline {args.baseline}: not a pretrainer checkout (no src/pretrainer)")
    other = "base" if args.baseline else "hf"
    # bert-masked runs against the same BertForMaskedLM as bert (one process when both are chosen)
    pairs = [(f"ours-{m}", "hf-bert" if m == "bert-masked" and other == "hf" else f"{other}-{m}")
             for m in styles]

    workers = {}
    try:
        for ours, hf in pairs:  # built one after another: no warm-up competes with another
            for impl in (ours, hf):
                if impl not in workers:
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
                    turn[impl] = workers[impl].run(args.steps, seed=r)  # both sides: the same batches
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
        ms, tokens = statistics.median(times[impl]), tokens_per_step(impl.split("-", 1)[1])
        rows[impl] = {"ms_per_step": ms, "tokens_per_s": tokens / ms * 1000,
                      "tokens_per_s_overall": tokens * len(times[impl]) / sum(times[impl]) * 1000,
                      "tokens_per_step": tokens, "params": w.info["params"],
                      "fused_kernels": w.info["fused_kernels"], "threads": w.info["threads"],
                      "first_loss": w.info.get("first_loss"), "ms_quartiles": quartiles(times[impl]),
                      "ms_all": times[impl]}
    ratios = {ours: rows[ours]["tokens_per_s"] / rows[hf]["tokens_per_s"] for ours, hf in pairs}
    overall = {ours: rows[ours]["tokens_per_s_overall"] / rows[hf]["tokens_per_s_overall"] for ours, hf in pairs}
    result = {"benchmark": "throughput", "config": {"batch": B, "seq_len": T, "vocab": V, "n_layer": L,
                                                    "d_model": D, "n_head": H, "dtype": "float32",
                                                    "optimizer": "AdamW (fused)", "t5_target_len": T_DEC,
                                                    "mlm_mask_prob": MASK_PROB, "dropout": 0.0},
              "protocol": {"rounds": args.rounds, "steps_per_turn": args.steps, "warmup": args.warmup,
                           "pause_s": args.pause},
              "results": rows, "speedup_tokens_per_s": ratios, "speedup_tokens_per_s_overall": overall,
              "per_round_speedup_quartiles": {o: quartiles(v) for o, v in round_ratio.items()},
              "per_round_speedup": round_ratio, "target": None if args.baseline else 1.3,
              "like_for_like": {ours: not (ours.endswith("bert-masked") and not args.baseline) for ours, _ in pairs},
              "baseline": str(args.baseline) if args.baseline else "transformers",
              "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"{'implementation':16s} {'ms/step':>8s} {'quartiles':>17s} {'tokens/s':>9s} {'params':>10s} "
          f"{'loss 1':>6s}")
    for impl, row in rows.items():
        q = row["ms_quartiles"]
        note = {True: "  (fused CPU kernels)", False: "  (PyTorch ops only)"}.get(row["fused_kernels"], "")
        loss = f"{row['first_loss']:6.3f}" if row["first_loss"] is not None else f"{'-':>6s}"
        print(f"{impl:16s} {row['ms_per_step']:8.1f} {q[0]:8.1f}-{q[2]:<8.1f} {row['tokens_per_s']:9.0f} "
              f"{row['params']:10,} {loss}{note}")
    for ours, hf in pairs:
        q = result["per_round_speedup_quartiles"][ours]
        target = "" if args.baseline else " (target >= 1.3x)"
        if not result["like_for_like"][ours]:
            target = (" (NOT like for like: our head on the selected positions only, transformers' "
                      "on every position)")
        print(f"{ours} / {hf}: {ratios[ours]:.2f}x tokens/s{target}; all timed tokens over all "
              f"timed seconds {overall[ours]:.2f}x; per round {q[1]:.2f}x, quartiles {q[0]:.2f}-{q[2]:.2f}, "
              f"lowest {min(round_ratio[ours]):.2f}")


if __name__ == "__main__":
    main()
