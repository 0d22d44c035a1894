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
            "shots; with several runs also accuracy vs parameters) into --out. Built-in tasks: "
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
    s.add_argument("--seed", type=int, default=0, help="shots drawn, built-in rows and bootstrap")
    s.add_argument("--out", default=None, help="output folder (default RUN/icl for one run, ./icl for several)")
    s.add_argument("--device", default="cpu")
    add_token_options(s, ("eos",))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_icl)


def cmd_icl(args) -> None:
    import sys

    from ..cli import _json_out, _load_run_and_tokenizer, token_overrides
    from ..errors import DataError
    from .icl import load_task, parse_shots, run_icl

    if args.limit is not None and args.limit < 1:
        raise DataError(f"--limit {args.limit}: expected a positive number of queries")
    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: expected a positive number")
    shots = parse_shots(args.shots)
    task = load_task(args.task, args.template, scoring=args.scoring, seed=args.seed)
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise DataError(f"--max-new-tokens {args.max_new_tokens}: expected a positive number")
        task.max_new_tokens = args.max_new_tokens
    models = [(run, *_load_run_and_tokenizer(run, args.device, token_overrides(args))) for run in args.runs]
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "icl" if len(args.runs) == 1 else Path("icl"))
    result = run_icl(models, task, shots, out=out, seed=args.seed, batch_size=args.batch_size,
                     limit=args.limit, warn=lambda s: print(s, file=sys.stderr),
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
