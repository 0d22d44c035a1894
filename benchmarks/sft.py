"""Instruction tuning at CPU scale (FLAN's claim, Wei et al. 2022): a decoder instruction-tuned on
some instruction kinds answers kinds it never trained on better, zero-shot, than the same
pretrained decoder without instruction tuning.

    python benchmarks/sft.py [--steps 800] [--epochs 2] [--reuse] [--quick] [--work DIR]

1. ``prepare``: the standard library **without** the files that hold ``builtin:stdlib-instruct``'s
   evaluation functions (pretraining never sees an evaluation function), BPE ``--vocab``.
2. ``pretrain``: a small Llama-style decoder (rotary positions, RMSNorm, SwiGLU; ``--width`` x
   ``--layers``, 256 tokens) with the causal LM objective for ``--steps`` steps.
3. ``finetune --task sft`` on ``builtin:stdlib-instruct``'s training split: Alpaca rows of the five
   training kinds (name, parameters, package, has_default, summarize), loss on the answers only,
   packed rows, the epoch with the lowest response loss on the training kinds' evaluation rows
   kept (the held-out kinds play no part until the end).
4. Both models answer every evaluation row zero-shot through the same chat template
   (``<eos>User: instruction\\n\\ncode\\n\\nAssistant:``), greedily, up to ``--max-new-tokens``
   tokens: the four held-out kinds (signature, module, method, first_parameter) and, for
   reference, the training kinds on held-out functions. Scores: exact match and ROUGE-L per kind;
   over the held-out kinds the tuned-minus-base difference with a paired bootstrap 95 %
   interval over rows. The pretrained model never learned to stop (it writes on until the token
   limit), so it is also scored on its answer's first line only, the more generous baseline.

One CPU thread throughout (``--threads``): on a shared 2-core machine one thread per process is
faster than two competing. ``--reuse`` keeps the data folder, the pretraining run (extended to
``--steps`` when it has fewer) and a finished fine-tuning run of the same settings in ``--work``.
Writes ``benchmarks/results/sft.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


def bootstrap_diff(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> list[float]:
    """95 % interval of mean(a) - mean(b) over rows resampled with replacement (paired)."""
    rng = random.Random(seed)
    k = len(a)
    diffs = sorted(sum(a[i] - b[i] for i in idx) / k for idx in ([rng.randrange(k) for _ in range(k)]
                                                                    for _ in range(n)))
    return [round(diffs[int(0.025 * n)], 4), round(diffs[int(0.975 * n) - 1], 4)]


def main() -> None:
    t_process = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(REPO / "runs" / "bench-sft"), help="data and run folders")
    p.add_argument("--steps", type=int, default=800, help="pretraining steps (--batch x 256 tokens)")
    p.add_argument("--batch", type=int, default=8, help="pretraining batch (sequences of 256 tokens)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=2, help="instruction-tuning epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="instruction-tuning peak learning rate")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--quick", action="store_true", help="a smoke run: 60 steps, 200 rows, 1 epoch")
    p.add_argument("--json", default=str(HERE / "results" / "sft.json"))
    args = p.parse_args()
    if args.quick:
        args.steps, args.epochs, args.max_new_tokens = 60, 1, 16

    from _reuse import fresh_corpus
    from pretrainer import load
    from pretrainer.config import RunConfig, TrainConfig, model_preset
    from pretrainer.data.prepare import prepare
    from pretrainer.finetune import finetune
    from pretrainer.finetune.builtin import INSTRUCTION_KINDS
    from pretrainer.finetune.heads import InputFormat
    from pretrainer.finetune.sft import SFTTask, answer_scores
    from pretrainer.tokenization import load_tokenizer
    from pretrainer.train.checkpoint import latest_checkpoint
    from pretrainer.train.trainer import resume_config, train

    torch.set_num_threads(args.threads)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    work = Path(args.work)
    data, pre, ft = work / "data", work / "pretrain", work / "sft"
    source = "builtin:stdlib-instruct" + (":200" if args.quick else "")
    timings = {}

    if not (args.reuse and (data / "manifest.json").is_file()):
        t0 = time.perf_counter()
        corpus = work / "corpus"
        n_files = fresh_corpus(corpus, "builtin:stdlib-instruct")
        say(f"[1/4] preparing {n_files} stdlib files (evaluation files held out), BPE {args.vocab}")
        prepare(str(corpus), f"bpe:{args.vocab}", data, overwrite=True, progress=False,
                tokenizer_sample_mb=4 if args.quick else None)
        timings["prepare_s"] = round(time.perf_counter() - t0, 1)

    done = latest_checkpoint(pre)[1]["step"] if args.reuse and (pre / "config.yaml").is_file() else 0
    if 0 < done < args.steps:
        t0 = time.perf_counter()
        say(f"[2/4] continuing pretraining from step {done} to {args.steps}")
        if train(resume_config(pre, [f"train.max_steps={args.steps}"]), resume=True, quiet=True).get("preempted"):
            sys.exit("pretraining was stopped (SIGTERM or Ctrl-C); run again with --reuse to continue")
        timings["pretrain_more_s"] = round(time.perf_counter() - t0, 1)
    elif done == 0:
        model = model_preset("llama-tiny")
        model.d_model, model.n_layer, model.n_head, model.n_kv_heads = args.width, args.layers, 4, 2
        model.d_ff, model.max_seq_len = int(args.width * 8 / 3 / 32 + 0.999) * 32, 256
        model.validate()
        cfg = RunConfig(model=model, data=str(data), out=str(pre), train=TrainConfig(
            batch_size=args.batch, seq_len=256, lr=3e-3, warmup_steps=max(1, min(100, args.steps // 10)),
            min_lr_ratio=0.1, eval_every=max(1, args.steps // 3), eval_batches=20, log_every=100,
            checkpoint_every=max(1, args.steps // 3), device="cpu", max_steps=args.steps, seed=args.seed))
        if pre.exists():
            shutil.rmtree(pre)
        say(f"[2/4] pretraining a {args.layers} x {args.width} decoder for {args.steps} steps "
            f"({args.threads} thread)")
        t0 = time.perf_counter()
        if train(cfg, quiet=True).get("preempted"):
            sys.exit("pretraining was stopped (SIGTERM or Ctrl-C); run again with --reuse to continue")
        timings["pretrain_s"] = round(time.perf_counter() - t0, 1)
    ckpt, state = latest_checkpoint(pre)
    evals = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in x]

    opts = dict(epochs=args.epochs, lr=args.lr, batch_size=16, max_len=256, packing=True,
                max_new_tokens=args.max_new_tokens, seed=args.seed, quiet=True)
    # the kept epoch is chosen on the training kinds' evaluation rows: the held-out kinds stay unseen
    from pretrainer.finetune.builtin import builtin_rows

    seen = work / "eval_training_kinds.jsonl"
    seen.write_text("".join(json.dumps(row) + "\n" for _, row in builtin_rows(source, "eval")[1]
                            if not row["held_out"]))
    reuse_ft = False
    if args.reuse and (ft / "config.yaml").is_file():
        old = yaml.safe_load((ft / "config.yaml").read_text()) or {}
        reuse_ft = bool(old.get("best")) and all(old["options"].get(k) == v for k, v in opts.items()
                                                 if k != "quiet") and \
            Path((old.get("origin") or {}).get("checkpoint", "")).resolve() == ckpt.resolve() and \
            old["call"]["train"] == source and old["call"]["eval"] == str(seen)
    if not reuse_ft:
        if ft.exists():
            shutil.rmtree(ft)
        say(f"[3/4] instruction tuning on {source} (training kinds only), {args.epochs} epochs")
        t0 = time.perf_counter()
        tuned_summary = finetune(str(pre), "sft", source, str(ft), eval=str(seen), **opts)
        timings["finetune_s"] = round(time.perf_counter() - t0, 1)
    else:
        say(f"[3/4] reusing {ft}")
        tuned_summary = yaml.safe_load((ft / "config.yaml").read_text())["best"]

    # 4. both models, the same prompts, the same greedy decoding
    say("[4/4] answering the evaluation rows zero-shot with both models")
    t0 = time.perf_counter()
    answers = {}
    for name, folder in (("pretrained", pre), ("instruction_tuned", ft)):
        net, tok = load(folder), load_tokenizer(folder / "tokenizer")
        task = SFTTask(max_new_tokens=args.max_new_tokens)
        examples = task.load(source, "eval")
        feats = task.encode(examples, tok, InputFormat.for_backbone("decoder", tok), 256)
        task.bind(tok)
        preds = task.decode(examples, feats, task.infer(net, feats, 32, tok.pad_id, torch.device("cpu")))
        answers[name] = [p["prediction"] for p in preds]
    answers["pretrained_first_line"] = [a.strip().split("\n")[0].strip() for a in answers["pretrained"]]
    timings["answer_s"] = round(time.perf_counter() - t0, 1)

    gold = [e["label"] for e in examples]
    kinds = list(INSTRUCTION_KINDS)
    held = [k for k in kinds if INSTRUCTION_KINDS[k][1]]
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def per_row(preds):
        return ([float(p.strip() == g.strip()) for p, g in zip(preds, gold)],
                [scorer.score(g, p)["rougeL"].fmeasure for p, g in zip(preds, gold)])

    rows = {name: per_row(preds) for name, preds in answers.items()}
    table, summary = {}, {}
    for kind in kinds:
        idx = [i for i, e in enumerate(examples) if e["task"] == kind]
        table[kind] = {"held_out": INSTRUCTION_KINDS[kind][1], "rows": len(idx),
                       **{name: answer_scores([answers[name][i] for i in idx], [gold[i] for i in idx])
                          for name in answers},
                       "example": {"gold": gold[idx[0]], **{name: answers[name][idx[0]] for name in answers}}}
    for group, members in (("held_out", held), ("training_kinds", [k for k in kinds if k not in held])):
        idx = [i for i, e in enumerate(examples) if e["task"] in members]
        g = {name: {"exact_match": round(sum(rows[name][0][i] for i in idx) / len(idx), 4),
                    "rougeL": round(sum(rows[name][1][i] for i in idx) / len(idx), 4)} for name in answers}
        for base in ("pretrained", "pretrained_first_line"):
            for m, col in (("exact_match", 0), ("rougeL", 1)):
                a = [rows["instruction_tuned"][col][i] for i in idx]
                b = [rows[base][col][i] for i in idx]
                g[f"tuned_minus_{base}_{m}"] = {"mean": round(sum(a) / len(a) - sum(b) / len(b), 4),
                                                "ci95": bootstrap_diff(a, b, seed=args.seed)}
        g["rows"] = len(idx)
        summary[group] = g
    params = sum(p.numel() for p in load(pre).parameters())
    result = {
        "benchmark": "sft", "claim": "instruction tuning on some kinds helps zero-shot on held-out kinds "
                                     "(FLAN, Wei et al. 2022)",
        "quick": args.quick, "source": source,
        "pretrain": {"model": f"llama-style decoder {args.layers} x {args.width}, 4 heads (2 kv), rotary, "
                              f"256 tokens", "parameters": params, "steps": state["step"],
                     "tokens": state.get("tokens"), "batch": f"{args.batch} x 256", "lr": 3e-3, "vocab": f"bpe:{args.vocab}",
                     "val_loss_first": evals[0]["val_loss"] if evals else None,
                     "val_loss": evals[-1]["val_loss"] if evals else None},
        "instruction_tuning": {**{k: v for k, v in opts.items() if k != "quiet"}, "kept_epoch": tuned_summary.get("epoch"),
                               "train_kinds": [k for k in kinds if k not in held], "held_out_kinds": held,
                               "eval_loss": (tuned_summary.get("eval_loss") if "eval_loss" in tuned_summary
                                             else tuned_summary.get("metrics", {}).get("eval_loss"))},
        "decoding": f"greedy, up to {args.max_new_tokens} new tokens, ending at <eos>; the same chat template",
        "summary": summary, "per_kind": table, "timings_s": timings,
        "threads": args.threads, "wall_seconds": round(time.perf_counter() - t_process, 1),
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    for group, g in summary.items():
        print(f"{group} ({g['rows']} rows): " + " | ".join(
            f"{name} EM {g[name]['exact_match']:.3f} ROUGE-L {g[name]['rougeL']:.3f}" for name in answers))
        d = g["tuned_minus_pretrained_first_line_rougeL"]
        print(f"  tuned - pretrained (first line) ROUGE-L {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
