"""Chain-of-thought prompting on a CPU: direct-answer vs chain-of-thought shots, by model size.

Wei et al. (2022, "Chain-of-Thought Prompting Elicits Reasoning in Large Language Models") report
that shots with worked rationales beat shots with bare answers only past a model size (an
"emergent" ability); below it, chain of thought does no better, or worse. This benchmark asks the
same question of two tiny GPTs pretrained here, on ``builtin:arith-cot`` (documents of one-digit
arithmetic with 1 to 3 operations, half worked step by step and half answered directly; character
tokenizer), with the ordinary ``prepare`` / ``train`` path. Each size is then prompted with k shots
of held-out two-operation questions (never in the corpus; every step of their rationales is):

- ``direct``: ``builtin:arith-direct``, shots ``Q: 2 * 6 + 1 = ?`` / ``A: The answer is 13.``;
- ``cot``: ``builtin:arith-cot``, the same questions and shots with their rationales
  (``A: 2 * 6 = 12.`` / ``12 + 1 = 13.`` / ``The answer is 13.``), greedy;
- ``cot-sc``: self-consistency (Wang et al., 2023), the majority answer of 5 rationales sampled at
  temperature 0.7.

Both prompts end at ``A:``, generation runs to a blank line and the answer is read after "The answer
is" in both, so the only difference is the rationales in the shots. Exact match with bootstrap
intervals; the JSON also keeps, for the greedy rationales, how often a step written by the model is
arithmetically right (``step_accuracy``), how often its first step is the right one
(``first_step_right``: the right operands, in the right order, and the right result) and how often
the whole rationale is (``rationale_right``), and where the wrong ones first go wrong
(``rationale_errors``: the wrong operands, or the right operation with a wrong result, by step).

    python benchmarks/cot.py [--steps 1500] [--limit 200] [--quick] [--out DIR] [--json FILE]

writes ``results/cot.json`` and ``results/cot.png`` (the runs and the prepared data go to ``--out``).

One thread (``--threads``): on a shared 2-core machine a single thread is faster per step than two
competing with other processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SEQ_LEN = 128
# two sizes: (name, model overrides); both gpt-nano with rotary positions and a 128-token window
SIZES = (("small", {"n_layer": 1, "d_model": 32, "n_head": 2}),
         ("large", {"n_layer": 2, "d_model": 64, "n_head": 4}))
_STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (-?\d+)\.")


def step_accuracy(generations: list[str]) -> tuple[float, int]:
    """The fraction of the steps ``a op b = r.`` written in ``generations`` whose result is right,
    and how many steps there were."""
    ok = n = 0
    for text in generations:
        for a, op, b, r in _STEP.findall(text):
            a, b, r = int(a), int(b), int(r)
            n += 1
            ok += r == (a + b if op == "+" else a - b if op == "-" else a * b)
    return (ok / n if n else float("nan")), n


def rationale_errors(generations: list[str], rows: list[dict]) -> dict:
    """Where each greedy rationale first departs from the right one: counts of ``right``, and of
    ``step N: wrong operands`` (the step works on other numbers or another operation than the
    right step) or ``step N: wrong result`` (the right operation, a wrong result)."""
    out = {"right": 0}
    for text, row in zip(generations, rows):
        got, want = text.strip().split("\n"), row["rationale"].splitlines()
        for n, step in enumerate(want, 1):
            mine = got[n - 1] if n <= len(got) else ""
            if mine != step:
                kind = "operands" if mine.split(" = ")[0] != step.split(" = ")[0] else "result"
                key = f"step {n}: wrong {kind}"
                out[key] = out.get(key, 0) + 1
                break
        else:
            out["right"] += 1
    return out


def main() -> None:
    t_process = time.perf_counter()
    load_before = os.getloadavg()[0]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="training steps per size (16 x 128 tokens each)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--shots", type=int, default=1, help="examples in each prompt (one worked example and the "
                   "question fill most of the 128-token window)")
    p.add_argument("--limit", type=int, default=200, help="held-out questions asked")
    p.add_argument("--samples", type=int, default=5, help="self-consistency: rationales sampled (0: skip)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--quick", action="store_true", help="smoke run: 2,000 documents, 30 steps, 20 questions")
    p.add_argument("--out", default=str(HERE / "results" / "cot"))
    p.add_argument("--json", default=str(HERE / "results" / "cot.json"))
    args = p.parse_args()
    corpus = "builtin:arith-cot:2000" if args.quick else "builtin:arith-cot"
    if args.quick:
        args.steps, args.limit = 30, 20

    from pretrainer import load
    from pretrainer.config import RunConfig, TrainConfig, model_preset
    from pretrainer.data.prepare import prepare
    from pretrainer.eval.icl import builtin_task, draw_examples, evaluate, fit_context
    from pretrainer.eval.scoring import generate_texts, window
    from pretrainer.tokenization import load_tokenizer
    from pretrainer.train.trainer import train

    say = lambda s: print(s, file=sys.stderr, flush=True)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    t0 = time.perf_counter()
    manifest = prepare(corpus, "char", data, overwrite=True, progress=False)
    prep_s = time.perf_counter() - t0
    tasks = {"direct": builtin_task("arith-direct", n=args.limit), "cot": builtin_task("arith-cot", n=args.limit)}
    assert [r["input"] for r in tasks["direct"].rows] == [r["input"] for r in tasks["cot"].rows]

    runs = []
    for name, overrides in SIZES:
        model = model_preset("gpt-nano")
        model.max_seq_len, model.position = SEQ_LEN, "rope"
        for key, value in overrides.items():
            setattr(model, key, value)
        model.validate()
        run = out / name
        if run.exists():
            shutil.rmtree(run)
        cfg = RunConfig(model=model, data=str(data), out=str(run), train=TrainConfig(
            batch_size=args.batch_size, seq_len=SEQ_LEN, lr=args.lr, warmup_steps=min(100, args.steps // 10),
            min_lr_ratio=0.1, eval_every=0, eval_batches=20, log_every=100, checkpoint_every=0, device="cpu",
            max_steps=args.steps))
        say(f"{name}: pretraining {overrides} on builtin:arith-cot for {args.steps} steps ({args.threads} thread(s))")
        t0 = time.perf_counter()
        summary = train(cfg, quiet=True)
        train_s = time.perf_counter() - t0
        net, tok = load(run), load_tokenizer(run / "tokenizer")
        params = sum(p_.numel() for p_ in net.parameters())
        say(f"{name}: {params:,} parameters, val loss {summary.get('val_loss')}, {train_s:.0f} s")

        t0 = time.perf_counter()
        res = {}
        for mode, task in tasks.items():
            r = evaluate(net, tok, task, [args.shots], batch_size=32)["shots"][str(args.shots)]
            res[mode] = _keep(r)
        if args.samples > 1:
            r = evaluate(net, tok, tasks["cot"], [args.shots], batch_size=32, samples=args.samples,
                         temperature=args.temperature)["shots"][str(args.shots)]
            res["cot-sc"] = _keep(r, ("samples", "temperature", "accuracy_single", "vote_share"))
        # the greedy rationales once more, to check the steps the model writes
        task = tasks["cot"]
        room = window(net) + 1 - task.max_new_tokens
        ctxs = [fit_context(tok, task, draw_examples(task, i, args.shots, 0), row, room)[0]
                for i, row in enumerate(task.rows)]
        gens = generate_texts(net, tok, ctxs, task.max_new_tokens, task.stops(), 32)
        res["cot"]["step_accuracy"], res["cot"]["steps_written"] = step_accuracy(gens)
        res["cot"]["first_step_right"] = sum(g.strip().split("\n")[0] == row["rationale"].split("\n")[0]
                                             for g, row in zip(gens, task.rows)) / len(gens)
        res["cot"]["rationale_right"] = sum(g.strip().startswith(row["rationale"])
                                            for g, row in zip(gens, task.rows)) / len(gens)
        res["cot"]["rationale_errors"] = rationale_errors(gens, task.rows)
        eval_s = time.perf_counter() - t0
        say(f"{name}: " + "  ".join(f"{m} {v['accuracy']:.3f}" for m, v in res.items())
            + f"  (cot: steps right {res['cot']['step_accuracy']:.3f}, first step "
            f"{res['cot']['first_step_right']:.3f}, whole rationale {res['cot']['rationale_right']:.3f}; "
            f"{eval_s:.0f} s)\n{name}: rationales: {res['cot']['rationale_errors']}")
        runs.append({"size": name, "overrides": overrides, "params": params, "val_loss": summary.get("val_loss"),
                     "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1), "accuracy": res})

    png = plot(runs, Path(args.json).with_suffix(".png"), f"{args.shots} shot(s), {args.limit} held-out questions, "
                                      f"{args.steps} steps each on builtin:arith-cot")
    result = {
        "benchmark": "cot", "quick": args.quick,
        "train": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": SEQ_LEN, "lr": args.lr,
                  "threads": args.threads, "tokens": args.steps * args.batch_size * SEQ_LEN,
                  "preset": "gpt-nano", "position": "rope"},
        "data": {"corpus": corpus, "tokenizer": "char", "vocab_size": manifest["vocab_size"],
                 "train_tokens": manifest["splits"]["train"]["tokens"], "prepare_seconds": round(prep_s, 1)},
        "eval": {"tasks": {"direct": "builtin:arith-direct", "cot": "builtin:arith-cot"}, "shots": args.shots,
                 "questions": args.limit, "scoring": "exact match of the answer after 'The answer is'",
                 "stop": tasks["cot"].stops(), "max_new_tokens": tasks["cot"].max_new_tokens,
                 "self_consistency": {"samples": args.samples, "temperature": args.temperature}},
        "runs": runs, "files": {"plot": str(png)}, "wall_seconds": round(time.perf_counter() - t_process, 1),
        "machine": {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
                    "note": f"{args.threads} torch thread(s) on a machine shared with other jobs: times are "
                            "wall-clock under that load; accuracies do not depend on it"},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'size':<8}{'params':>10}" + "".join(f"{m:>22}" for m in runs[0]["accuracy"]))
    for r in runs:
        print(f"{r['size']:<8}{r['params']:>10,}" + "".join(
            f"{v['accuracy']:>8.3f} [{v['interval'][0]:.2f}, {v['interval'][1]:.2f}]" for v in r["accuracy"].values()))
    print(f"wrote {args.json} and {png}")


def _keep(r: dict, extra=()) -> dict:
    out = {k: r[k] for k in ("accuracy", "interval", "answered", "truncated", "mean_shots_used", *extra)}
    out["examples"] = r["predictions"][:3]
    return out


def plot(runs: list[dict], out_png: Path, title: str) -> Path:
    from pretrainer.scaling.plots import _figure, _save

    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    modes = list(runs[0]["accuracy"])
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(runs))]
        ys = [r["accuracy"][mode]["accuracy"] for r in runs]
        err = [[y - r["accuracy"][mode]["interval"][0] for y, r in zip(ys, runs)],
               [r["accuracy"][mode]["interval"][1] - y for y, r in zip(ys, runs)]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=mode)
    ax.set_xticks(range(len(runs)), [f"{r['size']}\n{r['params']:,} params" for r in runs])
    ax.set_ylabel("exact match (95 % bootstrap interval)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.25)
    ax.legend(fontsize=8)
    try:
        return _save(fig, out_png)
    finally:
        plt.close(fig)


if __name__ == "__main__":
    main()
