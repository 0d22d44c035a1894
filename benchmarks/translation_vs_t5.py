"""English->French from random weights: ``pretrainer finetune t5-tiny --from-scratch --task
text2text`` (the README's example on ``examples/translation/``) beside a plain ``transformers`` loop
training a ``T5ForConditionalGeneration`` of the same size, on the same token ids, batches,
optimizer, rate and schedule, in the same process, taking turns.

Data: ``examples/translation/en-fr.{train,eval}.jsonl`` (2,000 / 400 sentence pairs from a seeded
grammar, ``make_en_fr.py``), every input prefixed ``translate English to French: ``. One Unigram
tokenizer (``--vocab-size``, what ``finetune --from-scratch`` trains on the training texts when it
is given none) is trained once, saved, and passed to ``finetune`` as ``tokenizer=``; the
``transformers`` side gets the ids ``finetune`` encodes (``input <eos>`` -> ``target <eos>``), made
by the same task code.

Models: ``t5-tiny`` (4 + 4 layers, d_model 256, 4 heads of 64, d_ff 1024, ReLU, RMSNorm pre-norm,
no biases, relative position bias with 32 buckets up to distance 128, tied embeddings with the
d_model**-0.5 rescale) and ``T5ForConditionalGeneration(T5Config(**hf_config(cfg)))`` (the config
``pretrainer export`` writes for it), dropout 0.1 in both. Before training, the script copies one
random ``t5-tiny`` into the ``transformers`` model and compares their logits: the two are the same
function (max difference printed and saved). Each side then trains from its own T5 initialisation
under the same seed.

Training, both sides: ``--epochs`` over batches of ``--batch-size`` in the order ``finetune``
draws (its per-epoch generator, shuffle and grouping by length, replayed here on the ``transformers``
side), AdamW (``torch.optim.AdamW`` fused, betas 0.9/0.999, eps 1e-8, weight decay 0.01 on tensors
of two or more dimensions only), ``--lr`` with linear warmup over 10 % of the steps and linear decay
to 0 (``pretrainer.train.optim.lr_at`` on both sides: ``transformers``' own linear schedule starts
its warmup one step later), gradients clipped at 1, the loss averaged over target tokens.

Evaluation, both sides, after every epoch: greedy decoding of every eval input (batches of
``--batch-size`` sorted by input length, at most 64 new tokens, stopping at ``<eos>``; ours through
its own ``generate``, theirs through ``model.generate``), decoded by the same tokenizer, scored by
the same call (``pretrainer.finetune.text2text.generation_metrics``: sacrebleu's corpus BLEU and
chrF), and the teacher-forced eval loss. Reported: the last epoch's BLEU/chrF, and the epoch each
side would keep by the lowest eval loss (``finetune``'s rule for text2text).

Time: per side, the whole run's wall time (tokenizer loading and encoding, model building, training
and the per-epoch evaluations; on our side ``finetune`` also writes its run folder and checkpoints),
and the training work alone (batch collation, forward, backward, clipping, optimizer step; on our
side ``finetune``'s ``_micro_batches`` and ``optimizer_step`` are wrapped here, not changed). Round r
runs with seed ``--seed`` + r on both sides; even rounds run ours first, odd rounds theirs first
(ABBA); the ratios transformers/ours (> 1: ours is faster) are taken per round: median, min, max.

    python benchmarks/translation_vs_t5.py [--epochs 3] [--lr 3e-3] [--rounds 2] [--threads 1]
    python benchmarks/translation_vs_t5.py --epochs 8   # the README example's length (about 2.5x longer)
    python benchmarks/translation_vs_t5.py --quick     # a smoke run: 256 pairs, 1 epoch, 1 round

Writes ``benchmarks/results/translation_vs_t5.json`` (``--quick``: nothing, unless ``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT / "examples" / "translation"
PREFIX = "translate English to French: "
PRESET = "t5-tiny"
KEYS = ("bleu", "chrf", "exact_match", "eval_loss")


class Clock:
    """Wall time spent inside the calls it wraps."""

    def __init__(self):
        self.wall = 0.0

    def wrap(self, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.wall += time.perf_counter() - t
        return timed


def subset(src: Path, dst: Path, n: int | None) -> Path:
    """``src``, or its first ``n`` lines written to ``dst``."""
    if n is None:
        return src
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return dst


def make_task():
    from pretrainer.finetune.tasks import make_task as make

    return make("text2text", prefix=PREFIX)


def train_tokenizer(train: Path, out: Path, vocab_size: int) -> None:
    """The tokenizer ``finetune --from-scratch`` would train for ``t5-tiny``: Unigram on the texts."""
    from pretrainer.tokenization import Tok

    task = make_task()
    Tok.train(task.texts(task.load(str(train), "train")), "unigram", vocab_size).save(out)


def ours(train: Path, evalf: Path, tok_dir: Path, out: Path, args, seed: int) -> dict:
    from pretrainer.finetune import finetune, runner

    shutil.rmtree(out, ignore_errors=True)
    clock = Clock()
    originals = runner.optimizer_step, runner._micro_batches
    runner.optimizer_step, runner._micro_batches = clock.wrap(originals[0]), clock.wrap(originals[1])
    t0 = time.perf_counter()
    try:
        r = finetune(PRESET, "text2text", str(train), str(out), eval=str(evalf), from_scratch=True,
                     tokenizer=str(tok_dir), prefix=PREFIX, epochs=args.epochs, batch_size=args.batch_size,
                     lr=args.lr, seed=seed, quiet=True, log_every=10 ** 9, device="cpu")
    finally:
        runner.optimizer_step, runner._micro_batches = originals
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [{k: rec[k] for k in KEYS} for rec in records if rec.get("split") == "eval"]
    return summarise(epochs, wall, clock.wall) | {"kept_epoch_by_finetune": r["epoch"]}


def summarise(epochs: list[dict], wall: float, train_wall: float) -> dict:
    """Last epoch's scores and the epoch kept by the lowest eval loss (the first of equals)."""
    kept = min(range(len(epochs)), key=lambda i: (epochs[i]["eval_loss"], i))
    return {"wall_seconds": wall, "train_seconds": train_wall, "last": epochs[-1],
            "kept": {"epoch": kept + 1, **epochs[kept]}, "epochs": epochs}


def encoded(train: Path, evalf: Path, tok_dir: Path):
    """Examples and features exactly as ``finetune`` builds them for text2text."""
    from pretrainer.config import FinetuneConfig
    from pretrainer.finetune.heads import InputFormat
    from pretrainer.tokenization import load_tokenizer

    opts = FinetuneConfig()
    task = make_task()
    train_ex, eval_ex = task.load(str(train), "train"), task.load(str(evalf), "eval")
    tok = load_tokenizer(tok_dir).with_roles({"eos": opts.eos_token, "pad": opts.pad_token})
    fmt = InputFormat.for_backbone("encoder-decoder", tok)
    task.bind(tok)
    return (task, tok, fmt, train_ex, task.encode(train_ex, tok, fmt, opts.max_len), eval_ex,
            task.encode(eval_ex, tok, fmt, opts.max_len))


def hf_t5(vocab_size: int, dropout: float):
    """``T5ForConditionalGeneration`` of ``t5-tiny``'s config (as ``pretrainer export`` writes it)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from pretrainer.interop.hf import hf_config
    from pretrainer.model import model_config

    cfg = model_config(PRESET, vocab_size=vocab_size, dropout=dropout)
    hf = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type", "dtype")}
    return T5ForConditionalGeneration(T5Config(**hf)), cfg


def same_function(vocab_size: int, feats: list[dict], task, pad_id: int) -> float:
    """Max |logit difference| between a random ``t5-tiny`` and the ``transformers`` model holding
    its weights, on one batch (dropout off): how far apart the two architectures are."""
    import torch

    from pretrainer.common import shift_right
    from pretrainer.interop.hf import to_hf_state_dict
    from pretrainer.model import make_model

    model, cfg = hf_t5(vocab_size, 0.0)
    mine = make_model(cfg).eval()
    _, weights = to_hf_state_dict(mine)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in ("lm_head.weight", "encoder.embed_tokens.weight",
                                               "decoder.embed_tokens.weight")]  # tied to shared.weight
    assert not missing and not unexpected, (missing, unexpected)
    model.eval()
    batch = task.collate(feats[:8], pad_id)
    with torch.no_grad():
        a = mine(batch["input_ids"], attention_mask=batch["attention_mask"],
                 decoder_input_ids=shift_right(batch["labels"])).logits
        b = model(**batch).logits
    keep = batch["labels"] != -100
    return float((a - b).abs()[keep].max())


def theirs(data, args, seed: int) -> dict:
    """A plain ``transformers`` loop over the batches ``finetune`` makes."""
    import torch

    from pretrainer.config import FinetuneConfig, TrainConfig
    from pretrainer.finetune.runner import group_by_length
    from pretrainer.finetune.text2text import generation_metrics
    from pretrainer.train.optim import lr_at

    t0 = time.perf_counter()
    task, tok, fmt, train_ex, train_feats, eval_ex, eval_feats = data()
    opts = FinetuneConfig()
    torch.manual_seed(seed)  # as finetune does before building its model
    model, _ = hf_t5(tok.vocab_size, opts.dropout)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            fused=True)
    per_epoch = math.ceil(len(train_feats) / args.batch_size)
    total = per_epoch * args.epochs
    tcfg = TrainConfig(lr=args.lr, warmup_steps=int(opts.warmup * total), max_steps=total, schedule="linear",
                       min_lr_ratio=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, tcfg) / args.lr)
    lengths = [task.length(f) for f in train_feats]
    pad, eos = fmt.pad_id, fmt.end_id
    clock, epochs = Clock(), []

    @clock.wrap
    def step(feats):
        loss = model(**task.collate(feats, pad)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    for epoch in range(1, args.epochs + 1):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)  # finetune's epoch order, replayed
        order = group_by_length(task.epoch_order(train_ex, train_feats, gen), lengths, args.batch_size, gen)
        for k in range(per_epoch):
            step([train_feats[i] for i in order[k * args.batch_size:(k + 1) * args.batch_size]])
        model.eval()
        preds = [""] * len(eval_feats)
        total_loss, n_tokens = 0.0, 0
        with torch.no_grad():
            by_len = sorted(range(len(eval_feats)), key=lambda i: len(eval_feats[i]["ids"]))
            for k in range(0, len(by_len), args.batch_size):
                idx = by_len[k:k + args.batch_size]
                batch = task.collate([eval_feats[i] for i in idx], pad)
                out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     max_new_tokens=task.max_target_len, do_sample=False, num_beams=1,
                                     eos_token_id=eos, pad_token_id=pad, decoder_start_token_id=pad)
                for row, i in enumerate(idx):
                    ids = out[row, 1:].tolist()  # after the decoder-start token
                    ids = ids[:ids.index(eos)] if eos in ids else ids
                    preds[eval_feats[i]["ex"]] = tok.decode([t for t in ids if t != pad]).strip()
            for k in range(0, len(by_len), args.batch_size):  # teacher-forced loss, as finetune's eval_loss
                batch = task.collate([eval_feats[i] for i in by_len[k:k + args.batch_size]], pad)
                n = int((batch["labels"] != -100).sum())
                total_loss += float(model(**batch).loss) * n
                n_tokens += n
        model.train()
        scores = generation_metrics(preds, [e["label"] for e in eval_ex])
        epochs.append({"bleu": round(scores["bleu"], 6), "chrf": round(scores["chrf"], 6),
                       "exact_match": round(scores["exact_match"], 6), "eval_loss": round(total_loss / n_tokens, 6)})
    return summarise(epochs, time.perf_counter() - t0, clock.wall)


def spread(values: list[float], digits: int = 3) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "all": [round(v, digits) for v in values]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3,
                   help="the README example trains 8; 3 keeps 2 rounds near 15 minutes on one quiet core (estimated)")
    p.add_argument("--lr", type=float, default=3e-3, help="the README example's 3e-3")
    p.add_argument("--batch-size", type=int, default=32, help="finetune's default")
    p.add_argument("--vocab-size", type=int, default=8192, help="of the Unigram tokenizer (finetune's default)")
    p.add_argument("--rounds", type=int, default=2, help="runs per side, interleaved ABBA; seed --seed + round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--train-size", type=int, default=None, help="first N training pairs (default: all 2,000)")
    p.add_argument("--eval-size", type=int, default=None, help="first N eval pairs (default: all 400)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 256 / 64 pairs, 1 epoch, 1 round")
    p.add_argument("--work", default=str(HERE / "runs" / "translation_vs_t5"))
    p.add_argument("--json", default=None, help="default: benchmarks/results/translation_vs_t5.json")
    args = p.parse_args()
    if args.quick:
        args.train_size, args.eval_size, args.epochs, args.rounds = 256, 64, 1, 1

    import torch
    import transformers

    from pretrainer.model import make_model

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train = subset(DATA / "en-fr.train.jsonl", work / "train.jsonl", args.train_size)
    evalf = subset(DATA / "en-fr.eval.jsonl", work / "eval.jsonl", args.eval_size)
    tok_dir = work / "tokenizer"
    train_tokenizer(train, tok_dir, args.vocab_size)

    def data():
        return encoded(train, evalf, tok_dir)

    task, tok, fmt, train_ex, train_feats, eval_ex, eval_feats = data()
    torch.manual_seed(args.seed)
    diff = same_function(tok.vocab_size, train_feats, task, fmt.pad_id)
    hf_model, cfg = hf_t5(tok.vocab_size, 0.1)
    n_theirs = sum(p.numel() for p in hf_model.parameters())
    n_ours = sum(p.numel() for p in make_model(cfg).parameters())
    del hf_model
    lengths = [len(f["ids"]) for f in train_feats]
    print(f"en-fr: {len(train_ex)} training / {len(eval_ex)} eval pairs, {sum(lengths) / len(lengths):.1f} input "
          f"tokens on average; Unigram vocabulary {tok.vocab_size}; {PRESET} and T5ForConditionalGeneration "
          f"({n_ours:,} and {n_theirs:,} parameters), same function on a random t5-tiny: max |logit difference| {diff:.2e}; "
          f"{args.epochs} epochs of batch {args.batch_size}, lr {args.lr}, {args.threads} thread(s)", flush=True)

    runs: dict[str, list[dict]] = {"ours": [], "transformers": []}
    for r in range(args.rounds):
        for side in (("ours", "transformers") if r % 2 == 0 else ("transformers", "ours")):
            seed = args.seed + r
            if side == "ours":
                res = ours(train, evalf, tok_dir, work / "run", args, seed)
            else:
                res = theirs(data, args, seed)
            runs[side].append(res)
            last = res["last"]
            print(f"round {r + 1} | {side:>12} | wall {res['wall_seconds']:6.1f} s (training {res['train_seconds']:6.1f} s) | "
                  f"last epoch BLEU {last['bleu']:5.2f}, chrF {last['chrf']:5.2f}, eval loss {last['eval_loss']:.4f} | "
                  f"kept epoch {res['kept']['epoch']}: BLEU {res['kept']['bleu']:5.2f}", flush=True)

    a, b = runs["ours"], runs["transformers"]
    results = {
        "ratio_wall_transformers_over_ours": spread([y["wall_seconds"] / x["wall_seconds"] for x, y in zip(a, b)]),
        "ratio_train_transformers_over_ours": spread([y["train_seconds"] / x["train_seconds"] for x, y in zip(a, b)]),
    }
    for side, rs in runs.items():
        results[f"{side}_wall_seconds"] = spread([x["wall_seconds"] for x in rs], 1)
        results[f"{side}_train_seconds"] = spread([x["train_seconds"] for x in rs], 1)
        for which in ("last", "kept"):
            for k in ("bleu", "chrf"):
                results[f"{side}_{which}_{k}"] = spread([x[which][k] for x in rs], 2)

    print()
    print(f"| {'side':<12} | {'BLEU last':>17} | {'chrF last':>17} | {'BLEU kept':>9} | {'chrF kept':>9} | "
          f"{'wall s':>18} | {'training s':>18} |")
    print(f"|{'-' * 14}|{'-' * 19}|{'-' * 19}|{'-' * 11}|{'-' * 11}|{'-' * 20}|{'-' * 20}|")

    def cell(s: dict, d: int) -> str:
        return f"{s['median']:.{d}f} ({s['min']:.{d}f}-{s['max']:.{d}f})" if len(s["all"]) > 1 else f"{s['median']:.{d}f}"

    for side in runs:
        print(f"| {side:<12} | {cell(results[f'{side}_last_bleu'], 2):>17} | {cell(results[f'{side}_last_chrf'], 2):>17} | "
              f"{results[f'{side}_kept_bleu']['median']:9.2f} | {results[f'{side}_kept_chrf']['median']:9.2f} | "
              f"{cell(results[f'{side}_wall_seconds'], 1):>18} | {cell(results[f'{side}_train_seconds'], 1):>18} |")
    for k, what in (("wall", "whole run"), ("train", "training work")):
        s = results[f"ratio_{k}_transformers_over_ours"]
        print(f"transformers / ours, {what}: {s['median']:.2f}x (min {s['min']:.2f}, max {s['max']:.2f}; "
              f"> 1: ours faster)")

    result = {
        "benchmark": "translation_vs_t5",
        "data": f"examples/translation en-fr: {len(train_ex)} train / {len(eval_ex)} eval pairs, prefix {PREFIX!r}",
        "model": f"{PRESET} from random weights vs T5ForConditionalGeneration(T5Config(**hf_config(t5-tiny))), "
                 f"{n_ours:,} / {n_theirs:,} parameters, Unigram vocabulary {tok.vocab_size}, dropout 0.1",
        "same_function_max_logit_diff": diff,
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "json")},
        "threads": args.threads,
        "note": "2-core machine shared with other jobs while measuring; torch.set_num_threads(%d)" % args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "results": results, "runs": runs,
    }
    out = Path(args.json) if args.json else (None if args.quick else HERE / "results" / "translation_vs_t5.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
