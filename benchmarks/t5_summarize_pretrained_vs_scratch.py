"""The value of span-corruption pretraining for an encoder-decoder: a small T5 pretrained on the
embedded corpus, then fine-tuned text-to-text on ``builtin:stdlib-summarize`` (a standard-library
function, docstring removed -> the first sentence of its docstring), against the same model, config
and tokenizer fine-tuned from random weights (``--from-scratch``), with identical fine-tuning
settings and seed. The score is ROUGE-L on the held-out functions (split by file).

    python benchmarks/t5_summarize_pretrained_vs_scratch.py [--steps 6000] [--seeds 0,1,2] [--reuse] [--work DIR]

1. ``prepare``: the standard library **without** the files that hold the task's evaluation
   functions (pretraining never sees an evaluation function or docstring), byte-level BPE 8192
   with 100 sentinels (trains in a minute where a Unigram model of the 30 MB corpus takes many).
2. ``pretrain``: the ``t5-tiny`` recipe (relative positions, RMSNorm pre-norm, tied embeddings) at
   ``--d-model`` x ``--layers`` (encoder and decoder each; default 128 x 3, FFN 4x, 4 heads: on a
   2-core CPU a small model pretrained for longer beats a larger one pretrained briefly),
   ``objective=span`` (15 % noise, mean span 3), inputs of 128 tokens, batch ``--batch``, for
   ``--steps`` steps, AdamW at ``--pretrain-lr`` with ``train.lr_scale=rms`` (each tensor's rate
   relative to its size: T5's N(0, 1) embeddings barely move under plain AdamW at 2e-3);
   ``--reuse`` keeps the data folder and the pretraining run in ``--work``, extends that run to
   ``--steps`` when it has fewer (an exact resume with the longer schedule), and reuses finished
   fine-tuning runs of the same settings.
3. ``finetune --task text2text``: pretrained at ``--lr`` and each rate of ``--pretrained-lrs``,
   then ``--from-scratch`` at ``--lr`` and each rate of ``--scratch-lrs``, each with every seed of
   ``--seeds``; ``--epochs``, batch 32, 192 input tokens, 48 target tokens, greedy decoding that
   never repeats a 3-gram (``--no-repeat-ngram``; plain greedy loops "list of list of ..."). A
   run's score is the ROUGE-L of the epoch the tool keeps (the lowest teacher-forced evaluation
   loss, text2text's rule), averaged over the seeds; each side's best rate is the one compared, so
   the margin is no artefact of a rate chosen for one side. Beside it: the last epoch's ROUGE-L (no
   choice at all) and the highest ROUGE-L of any epoch (chosen on the very set it is reported on,
   which rewards epochs that write one generic sentence for every function; the JSON gives each
   run's distinct outputs and the score of the best single sentence for comparison).

Prints both scores, the margin and the ratio; writes
``benchmarks/results/t5_summarize_pretrained_vs_scratch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
from collections import Counter
import sys
import time
from pathlib import Path

import torch
import yaml
from _reuse import finished_finetune, fresh_corpus, rates

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TASK = "builtin:stdlib-summarize"
KEYS = ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match")
KEPT = (*KEYS, "eval_loss")  # what each run reports of the epoch it keeps
#: ROUGE-L of three rules for the epoch a run ends with: the one the tool keeps (lowest evaluation
#: loss), the last one (no choice), and the one with the highest ROUGE-L on the evaluation set itself
PROTOCOLS = ("rougeL", "rougeL_last_epoch", "rougeL_best_epoch")
#: the best one-sentence-for-everything answer an earlier run of this benchmark produced (a from-scratch
#: model's most common output): kept among the candidates so the baseline never looks weaker than it is
FOUND_CONSTANTS = ["Return a list of the."]


def span_loss(model, x, y):
    """The mean cross-entropy of the targets ``y`` given the inputs ``x`` (teacher forcing)."""
    from pretrainer.common import shift_right

    logits = model(x, decoder_input_ids=shift_right(y), attention_mask=(x != 0).long()).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def encoder_use(run: Path, data: Path, batches: int = 8) -> dict:
    """How much the pretrained model reads its encoder: span-corruption loss on validation batches
    with each row's own corrupted input, and with the inputs of other rows (the same targets). Equal
    losses mean the decoder has learned a language model of the targets and ignores the input,
    so fine-tuning can gain nothing from the encoder."""
    from pretrainer.data.seq2seq import span_eval_batches
    from pretrainer.data.tokens import TokenSplit
    from pretrainer.finetune.backbone import load_backbone

    bb = load_backbone(str(run))
    model, tok = bb.model.eval(), bb.tok
    own = other = 0.0
    n = 0
    with torch.no_grad():
        for x, y in span_eval_batches(TokenSplit(data, "val"), 128, 32, batches, tok.sentinel_ids, tok.eos_id,
                                      tok.pad_id):
            perm = torch.roll(torch.arange(len(x)), 1) if len(x) > 1 else torch.arange(len(x))
            own += span_loss(model, x, y).item()
            other += span_loss(model, x[perm], y).item()
            n += 1
    return {"val_loss_own_inputs": own / max(1, n), "val_loss_other_rows_inputs": other / max(1, n),
            "batches": n}


def main() -> None:
    t_process = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(REPO / "runs" / "bench-t5-summarize"), help="data and run folders")
    p.add_argument("--d-model", type=int, default=128, help="model width (heads of 32, FFN 4x)")
    p.add_argument("--layers", type=int, default=3, help="encoder layers (and as many decoder layers)")
    p.add_argument("--steps", type=int, default=6000, help="pretraining steps")
    p.add_argument("--batch", type=int, default=32, help="pretraining batch (x 128 input tokens)")
    p.add_argument("--pretrain-lr", type=float, default=2e-2,
                   help="pretraining peak rate (times each tensor's RMS with --lr-scale rms)")
    p.add_argument("--lr-scale", choices=["rms", "none"], default="rms",
                   help="train.lr_scale of pretraining (rms: rates relative to each tensor's size)")
    p.add_argument("--reuse", action="store_true", help="reuse the data folder and pretraining run in --work")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak learning rate")
    p.add_argument("--pretrained-lrs", default="3e-3", help="more rates tried for the pretrained model (comma-separated)")
    p.add_argument("--scratch-lrs", default="3e-3", help="more rates tried from scratch (comma-separated)")
    p.add_argument("--no-repeat-ngram", type=int, default=3,
                   help="decoding on both sides never repeats an n-gram of this many tokens (0 = plain greedy)")
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds (comma-separated); scores are means over them")
    p.add_argument("--json", default=str(HERE / "results" / "t5_summarize_pretrained_vs_scratch.json"))
    args = p.parse_args()

    from pretrainer.config import load_config
    from pretrainer.data.prepare import prepare
    from pretrainer.finetune import finetune
    from pretrainer.train.checkpoint import latest_checkpoint
    from pretrainer.train.trainer import resume_config, train

    work = Path(args.work)
    data, pre = work / "data", work / "pretrain"
    timings = {}

    if not (args.reuse and (data / "manifest.json").is_file()):
        t0 = time.perf_counter()
        corpus = work / "corpus"
        n_files = fresh_corpus(corpus, TASK)
        print(f"[1/3] preparing {n_files} stdlib files (eval files held out), byte-level BPE 8192 + 100 sentinels",
              flush=True)
        prepare(str(corpus), "bpe:8192", data, sentinels=100, overwrite=True, progress=False)
        timings["prepare_s"] = time.perf_counter() - t0

    size = [f"model.d_model={args.d_model}", f"model.n_layer={args.layers}",
            f"model.n_head={max(1, args.d_model // 32)}", f"model.d_ff={4 * args.d_model}"]
    done_steps = 0
    if args.reuse and (pre / "config.yaml").is_file():
        saved = yaml.safe_load((pre / "config.yaml").read_text())
        old, old_train = saved["model"], saved["train"]
        if (old["d_model"], old["n_layer"]) != (args.d_model, args.layers):
            sys.exit(f"{pre}: holds a {old['d_model']} x {old['n_layer']} model, not --d-model {args.d_model} "
                     f"--layers {args.layers}; drop --reuse or choose another --work")
        if (old_train.get("lr_scale", "none"), old_train["lr"]) != (args.lr_scale, args.pretrain_lr):
            sys.exit(f"{pre}: was pretrained with lr {old_train['lr']:g}, lr_scale "
                     f"{old_train.get('lr_scale', 'none')}, not --pretrain-lr {args.pretrain_lr:g} --lr-scale "
                     f"{args.lr_scale}; drop --reuse or choose another --work")
        done_steps = latest_checkpoint(pre)[1]["step"]
    if args.reuse and 0 < done_steps < args.steps:  # extend the existing run (exact resume)
        t0 = time.perf_counter()
        print(f"[2/3] continuing pretraining from step {done_steps} to {args.steps}", flush=True)
        train(resume_config(pre, [f"train.max_steps={args.steps}"]), resume=True)
        timings["pretrain_more_s"] = time.perf_counter() - t0
    elif not done_steps:
        t0 = time.perf_counter()
        print(f"[2/3] pretraining a {args.d_model} x {args.layers}+{args.layers} T5 with span corruption "
              f"for {args.steps} steps", flush=True)
        cfg = load_config(None, ["model=t5-tiny", *size, "objective=span", f"data={data}", f"out={pre}",
                                 f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
                                 "train.seq_len=128", f"train.lr={args.pretrain_lr}",
                                 f"train.lr_scale={args.lr_scale}", "train.weight_decay=0.01",
                                 f"train.warmup_steps={min(100, args.steps // 10)}",
                                 "train.eval_every=500", "train.checkpoint_every=500",
                                 "train.log_every=50", "train.plot=false"])
        if pre.exists():
            shutil.rmtree(pre)
        train(cfg)
        timings["pretrain_s"] = time.perf_counter() - t0
    lines = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in lines if "val_loss" in r]
    ckpt, state = latest_checkpoint(pre)  # what fine-tuning starts from
    saved = yaml.safe_load((pre / "config.yaml").read_text())
    m, pre_train = saved["model"], saved["train"]
    pretrain_info = {"model": (f"t5-tiny recipe at {m['d_model']} wide, {m['n_layer']}+{m['n_layer']} layers, "
                               f"{m['n_head']} heads, FFN {m['d_ff']}, vocab {m['vocab_size']}"),
                     "objective": "span (noise density 0.15, mean span 3)", "steps": state["step"],
                     "optimizer": f"AdamW, peak lr {pre_train['lr']:g}, lr_scale {pre_train.get('lr_scale', 'none')}",
                     "tokens": state["tokens"], "val_loss_first": evals[0]["val_loss"],
                     "val_loss": evals[-1]["val_loss"], "val_at_step": evals[-1]["step"]}

    pretrain_info["encoder_use"] = encoder_use(pre, data)

    def epochs_of(out: Path) -> list[dict]:
        """The per-epoch evaluation lines of a fine-tuning run."""
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [r for r in rows if r.get("split") == "eval"]

    def run_finetune(name: str, scratch: bool, lr: float, seed: int) -> dict:
        out = work / (f"ft-{name}-lr{lr:g}" + (f"-seed{seed}" if seed else ""))
        done = finished_finetune(out, epochs=args.epochs, lr=lr, seed=seed, scratch=scratch,
                                 checkpoint=ckpt, selected_by="eval_loss",
                                 no_repeat_ngram=args.no_repeat_ngram) if args.reuse else None
        if done:
            best = done["metrics"]
            print(f"[3/3] reusing {out} (lr {lr:g}, seed {seed}): ROUGE-L {best['rougeL']:.4f}", flush=True)
            rec = {"lr": lr, "seed": seed, **{k: best[k] for k in KEPT if k in best},
                   "epoch": done["epoch"], "reused": True}
        else:
            if out.exists():
                shutil.rmtree(out)
            print(f"[3/3] fine-tuning {name} (lr {lr:g}, seed {seed}) on {TASK}", flush=True)
            t0 = time.perf_counter()
            r = finetune(str(pre), "text2text", TASK, str(out), epochs=args.epochs, lr=lr, batch_size=32,
                         max_len=192, max_target_len=48, from_scratch=scratch, seed=seed, select="loss",
                         no_repeat_ngram=args.no_repeat_ngram)
            timings[f"finetune_{name}_lr{lr:g}_seed{seed}_s"] = time.perf_counter() - t0
            print(f"      ROUGE-L {r['rougeL']:.4f}, ROUGE-1 {r['rouge1']:.4f} (epoch {r['epoch']}, "
                  f"lowest eval loss {r['eval_loss']:.4f})", flush=True)
            rec = {"lr": lr, "seed": seed, **{k: r[k] for k in KEPT}, "epoch": r["epoch"]}
        evals = epochs_of(out)
        rec["rougeL_last_epoch"] = evals[-1]["rougeL"]
        top = max(evals, key=lambda e: e["rougeL"])
        rec["rougeL_best_epoch"], rec["best_rougeL_epoch"] = top["rougeL"], top["epoch"]
        rec["eval_loss_per_epoch"] = [e["eval_loss"] for e in evals]
        rec["rougeL_per_epoch"] = [e["rougeL"] for e in evals]
        preds = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()
                 if line.strip()]
        rec["distinct_predictions"] = len(set(preds))  # at the kept epoch, of eval_examples
        text, n = Counter(preds).most_common(1)[0]
        rec["most_common_prediction"] = {"text": text, "share": n / len(preds)}
        return rec

    def constant_baseline(extra: list[str], candidates: int = 50) -> dict:
        """ROUGE-L of writing one sentence for every function: the best of the training set's most
        frequent targets and of each run's most common prediction (chosen on the evaluation set, as
        the best epoch is). A kept epoch that writes nearly one sentence everywhere scores this."""
        from pretrainer.finetune.text2text import generation_metrics

        train_targets = [row["target"] for _, row in train_rows]
        golds = [row["target"] for _, row in eval_rows]
        scored = [(generation_metrics([c] * len(golds), golds)["rougeL"], c)
                  for c in {c for c, _ in Counter(train_targets).most_common(candidates)} | set(extra)]
        best = max(scored)
        return {"sentence": best[1], "rougeL": best[0], "candidates": len(scored)}

    def side(name: str, scratch: bool, lrs: list[float]) -> tuple[dict, list[dict]]:
        """Every (rate, seed) run of one side, and the rate with the best mean ROUGE-L over seeds."""
        runs = [run_finetune(name, scratch, lr, seed) for lr in lrs for seed in seeds]
        by_lr = []
        for lr in lrs:
            mine = [r for r in runs if r["lr"] == lr]
            by_lr.append({"lr": lr, **{k: statistics.mean(r[k] for r in mine) for k in (*KEYS, *PROTOCOLS[1:])},
                          "distinct_predictions_per_seed": [r["distinct_predictions"] for r in mine],
                          **{f"{k}_per_seed": [r[k] for r in mine] for k in PROTOCOLS}})
        return max(by_lr, key=lambda r: r["rougeL"]), runs

    from pretrainer.finetune.builtin import builtin_rows

    train_rows, eval_rows = builtin_rows(TASK, "train")[1], builtin_rows(TASK, "eval")[1]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    lrs_pretrained, lrs_scratch = rates(args.lr, args.pretrained_lrs), rates(args.lr, args.scratch_lrs)
    pretrained, pretrained_runs = side("pretrained", False, lrs_pretrained)
    scratch, scratch_runs = side("scratch", True, lrs_scratch)
    r_p, r_s = pretrained["rougeL"], scratch["rougeL"]

    def wins(key: str) -> str:
        won = sum(p > s for p, s in zip(pretrained[f"{key}_per_seed"], scratch[f"{key}_per_seed"]))
        return f"{won}/{len(seeds)}"

    result = {
        "task": f"{TASK} (function source -> first sentence of its docstring)",
        "train_examples": len(train_rows),
        "eval_examples": len(eval_rows),
        "pretrain": pretrain_info,
        "finetune_settings": {"epochs": args.epochs, "batch_size": 32, "max_len": 192, "max_target_len": 48,
                              "seeds": seeds, "decoding": "greedy" + (f", no repeated {args.no_repeat_ngram}-gram"
                                                                     if args.no_repeat_ngram else ""),
                              "lrs_pretrained": lrs_pretrained, "lrs_scratch": lrs_scratch,
                              "scores": "rougeL (and the other metrics): the epoch each run keeps, the one with "
                                        "the lowest evaluation loss (text2text's rule), averaged over seeds; "
                                        "rougeL_last_epoch: its last epoch; rougeL_best_epoch: its epoch with the "
                                        "highest ROUGE-L on the evaluation set itself (chosen on what it reports)"},
        "pretrained": pretrained,
        "scratch": scratch,
        **{f"{k}_margin": pretrained[k] - scratch[k] for k in PROTOCOLS},
        "rougeL_ratio": r_p / r_s if r_s else None,
        "seeds_won_by_pretrained": {k: wins(k) for k in PROTOCOLS},
        "constant_baseline": constant_baseline([r["most_common_prediction"]["text"]
                                                for r in pretrained_runs + scratch_runs] + FOUND_CONSTANTS),
        "pretrained_all": pretrained_runs,
        "scratch_all": scratch_runs,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "process_s": round(time.perf_counter() - t_process, 1),
        "threads": torch.get_num_threads(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for label, r in (("pretrained", pretrained), ("scratch", scratch)):
        per_seed = ", ".join(f"{x:.4f}" for x in r["rougeL_per_seed"])
        print(f"{label:11s} ROUGE-L {r['rougeL']:.4f} (kept epochs; seeds {per_seed}; lr {r['lr']:g}), "
              f"last epoch {r['rougeL_last_epoch']:.4f}, best-ROUGE-L epoch {r['rougeL_best_epoch']:.4f}")
    c = result["constant_baseline"]
    print(f"one sentence for every function ('{c['sentence']}'): ROUGE-L {c['rougeL']:.4f}")
    ratio = f"{result['rougeL_ratio']:.2f}x" if result["rougeL_ratio"] else "n/a"
    won = result["seeds_won_by_pretrained"]
    print(f"margin {r_p - r_s:+.4f} (seeds won {won['rougeL']}), ratio {ratio}; last epoch "
          f"{result['rougeL_last_epoch_margin']:+.4f} ({won['rougeL_last_epoch']}); best-ROUGE-L epoch "
          f"{result['rougeL_best_epoch_margin']:+.4f} ({won['rougeL_best_epoch']}); written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
