"""``pretrainer icl``: few-shot accuracy of one or more runs on a task (see :mod:`.icl`)."""

from __future__ import annotations

from pathlib import Path

from . import BUILTIN_TASKS, SCORINGS


def register(sub) -> None:
    """Add the ``icl`` command to the top-level subparsers."""
    from ..cli import add_token_options

    s = sub.add_parser(
        "icl", help="zero-, one- and few-shot accuracy of decoder runs on a task",
        description=(
            "Evaluate in-context learning: for each number of shots, k solved examples from the task's "
            "pool (seeded) precede each query, GPT-3 style. Writes TASK.json and TASK.png (accuracy vs "
            "shots; with several runs also accuracy vs parameters) into --out. Chain of thought: a template "
            "with {rationale} before {target} shows each shot's worked rationale; the model writes its own "
            "until --stop and the answer is read out with --answer; --samples K votes over K sampled "
            "rationales (self-consistency). Built-in tasks: "
            + ", ".join(f"builtin:{t}" for t in BUILTIN_TASKS) + "."))
    s.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s), checkpoint or HF folder(s)")
    s.add_argument("--task", required=True, metavar="FILE|builtin:NAME",
                   help="a .jsonl of rows (input, target, optional choices and split=pool), a task .yaml, "
                        "or builtin:NAME")
    s.add_argument("--shots", default="0,1,5", help="comma-separated numbers of examples (default 0,1,5)")
    s.add_argument("--template", help="YAML with instruction, template, separator, scoring, choices, ...")
    s.add_argument("--scoring", choices=SCORINGS, default=None, help="override the task's scoring")
    s.add_argument("--limit", type=int, default=None, help="evaluate only the first N queries")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--max-new-tokens", type=int, default=None, help="generate: override the task's limit")
    s.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="generate: stop at this string (repeatable; \\n, \\t read as newline, tab: "
                        "--stop '\\n\\n' stops at a blank line); default the task's, else the separator "
                        "for chain-of-thought templates, else a newline")
    s.add_argument("--answer", default=None, metavar="REGEX",
                   help="generate: read the answer out of the generation as group 1 of the first match "
                        "(the whole match without a group); default the task's, else for chain-of-thought "
                        "templates the words after 'the answer is', else the whole generation")
    s.add_argument("--samples", type=int, default=1, metavar="K",
                   help="generate: self-consistency, sample K continuations per query and score their "
                        "majority answer (a tie goes to the answer sampled first); default 1, greedy")
    s.add_argument("--temperature", type=float, default=None,
                   help="generate: sampling temperature (default 0.7 with --samples > 1, else 0: greedy)")
    s.add_argument("--seed", type=int, default=0, help="shots drawn, built-in rows, sampling and bootstrap")
    s.add_argument("--out", default=None, help="output folder (default RUN/icl for one run, ./icl for several)")
    s.add_argument("--device", default="cpu")
    add_token_options(s, ("eos",))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_icl)


def cmd_icl(args) -> None:
    import sys

    from ..cli import _json_out, _load_run_and_tokenizer, token_overrides
    from ..errors import DataError
    from .cot import compile_answer, parse_stop
    from .icl import check_sampling, load_task, parse_shots, run_icl

    if args.limit is not None and args.limit < 1:
        raise DataError(f"--limit {args.limit}: expected a positive number of queries")
    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: expected a positive number")
    shots = parse_shots(args.shots)
    temperature = args.temperature if args.temperature is not None else 0.7 if args.samples > 1 else 0.0
    check_sampling(args.samples, temperature)
    stop = [parse_stop(t) for t in args.stop] if args.stop else None
    if args.answer is not None:
        compile_answer(args.answer)
    task = load_task(args.task, args.template, scoring=args.scoring, seed=args.seed)
    if task.scoring != "generate":
        given = [o for o, v in (("--stop", stop), ("--answer", args.answer), ("--samples", args.samples > 1 or None),
                                ("--temperature", args.temperature)) if v is not None]
        if given:
            raise DataError(f"{given[0]}: only for scoring 'generate' (task '{task.name}' scores by 'choice')")
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise DataError(f"--max-new-tokens {args.max_new_tokens}: expected a positive number")
        task.max_new_tokens = args.max_new_tokens
    if stop is not None:
        task.stop = stop
    if args.answer is not None:
        task.answer = args.answer
    models = [(run, *_load_run_and_tokenizer(run, args.device, token_overrides(args))) for run in args.runs]
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "icl" if len(args.runs) == 1 else Path("icl"))
    result = run_icl(models, task, shots, out=out, seed=args.seed, batch_size=args.batch_size,
                     limit=args.limit, warn=lambda s: print(s, file=sys.stderr), samples=args.samples,
                     temperature=temperature,
                     progress=None if args.json else lambda s: print(f"icl: {s}", file=sys.stderr, flush=True))
    if args.json:
        for r in result["runs"]:
            for v in r["shots"].values():
                v.pop("predictions", None)
        return _json_out(result)
    print(f"{task.name}: {result['n_queries']} queries, pool of {result['n_pool']}, seed {args.seed}; "
          f"{result['headline']}")
    width = max(len(r["run"]) for r in result["runs"]) + 2
    print(f"{'run':<{width}}{'params':>10}" + "".join(f"{str(k) + ' shots':>22}" for k in shots))
    for r in result["runs"]:
        cells = "".join(f"{_cell(r['shots'][str(k)]):>22}" for k in shots)
        print(f"{r['run']:<{width}}{r['params']:>10,}{cells}")
    chance = result["runs"][0]["shots"][str(shots[0])].get("chance")
    if chance is not None:
        print(f"chance: {chance:.3f}")
    print("wrote " + ", ".join(result["files"].values()))


def _cell(v: dict) -> str:
    lo, hi = v["interval"]
    return f"{v['accuracy']:.3f} [{lo:.2f}, {hi:.2f}]"
