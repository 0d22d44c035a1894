"""``pretrainer quickstart``: the whole decoder-only path on the embedded corpus, in minutes on a CPU.

1. prepare: train a 4,096-token byte-level BPE on the running interpreter's standard library and
   tokenise it into shards (cached: a second quickstart reuses them);
2. pretrain a small GPT (``gpt-micro``: 4 layers, 128 wide) for at most ``minutes`` minutes — the
   number of steps is set from a short timing run so the learning-rate schedule ends on time, and
   ``train.max_minutes`` stops the run at the budget if the machine turns out slower;
3. print samples and the path of the loss curve.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .config import RunConfig, TrainConfig, model_preset


def quickstart(out: str = "runs/quickstart", minutes: float = 4.0, corpus: str = "builtin:stdlib") -> dict:
    from . import load
    from .api import generate_samples
    from .data.prepare import load_manifest, prepare
    from .errors import PretrainerError
    from .tokenization import load_tokenizer
    from .train.trainer import train

    run = Path(out)
    tag = corpus.replace(":", "-").replace("/", "_").strip("_.")
    data = run.parent / f"data-{tag}-bpe4096"
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    say(f"[1/3] preparing {corpus} -> {data}")
    try:
        load_manifest(data)
        say("      (already prepared; reusing it)")
    except PretrainerError:
        prepare(corpus, "bpe:4096", str(data), overwrite=True)

    cfg = RunConfig(model=model_preset("gpt-micro"), data=str(data), out=str(run),
                    train=TrainConfig(batch_size=16, seq_len=128, lr=2e-3, warmup_steps=50,
                                      eval_every=100, eval_batches=10, log_every=20,
                                      checkpoint_every=200, max_steps=1))
    if (run / "checkpoints").exists():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run = run.with_name(f"{run.name}-{stamp}")
        cfg.out = str(run)
        say(f"      {out} already holds a run; this one goes to {run}")

    ms = _time_step(cfg)
    cfg.train.max_steps = max(100, int(minutes * 60 * 1000 / (ms * 1.08)))  # 8 %: evals, checkpoints
    # the schedule is planned from the timing; the budget is a hard stop when the machine slows down
    cfg.train.max_minutes = minutes
    say(f"[2/3] pretraining gpt-micro for {cfg.train.max_steps} steps (planned from {ms:.0f} ms/step; "
        f"stops at {minutes:g} min whatever happens) -> {run}")
    summary = train(cfg)

    say("[3/3] samples (temperature 0.8, top-k 50):")
    model = load(run)
    tok = load_tokenizer(run / "tokenizer")
    for text in generate_samples(model, tok, ["def ", "import os\n", "class "], 120, 0.8, 50, None, 0):
        print(text.rstrip())
        print("-" * 60)
    first_val = _first_val(run)
    print(f"validation loss {first_val:.3f} -> {summary['val_loss']:.3f} "
          f"(perplexity {2.718281828 ** summary['val_loss']:.1f}); loss curve: {summary['loss_png']}")
    print(f"next: pretrainer generate {run} --prompt 'def main('   |   pretrainer evaluate {run}")
    return summary


def _time_step(cfg: RunConfig) -> float:
    """Median milliseconds of a training step of this config, from a few steps on random weights."""
    import dataclasses
    import statistics

    from .data.tokens import TokenSplit
    from .model import DecoderLM
    from .model.fast import apply_fast_paths
    from .train.objectives import get_objective
    from .train.optim import make_optimizer

    split = TokenSplit(cfg.data, "train")
    model = apply_fast_paths(DecoderLM(dataclasses.replace(cfg.model, vocab_size=split.vocab_size)))
    opt = make_optimizer(model, cfg.train, "cpu")
    objective = get_objective(cfg)
    batches = objective.batches(split, seed=0)
    times = []
    for i in range(6):
        t0 = time.perf_counter()
        batch = batches.batch(i * cfg.train.batch_size, cfg.train.batch_size)
        objective.loss(model, batch).backward()  # as the trainer's step (fast paths, fused head)
        opt.step()
        opt.zero_grad()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times[1:])


def _first_val(run: Path) -> float:
    import json

    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            return rec["val_loss"]
    return float("nan")
