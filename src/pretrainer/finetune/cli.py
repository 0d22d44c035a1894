"""``pretrainer finetune`` and ``pretrainer predict``: parse, call :mod:`pretrainer.finetune`,
print. ``register(subparsers)`` adds both commands to the main parser; nothing heavy is imported
until a command runs."""

from __future__ import annotations

import json


def cmd_finetune(args) -> None:
    from ..errors import ConfigError
    from .runner import finetune, resume_finetune

    if args.resume:
        result = resume_finetune(args.resume, quiet=args.quiet or args.json)
        return _report(result, args.json)
    missing = [flag for flag, value in (("FROM", args.source), ("--task", args.task), ("--train", args.train),
                                        ("--out", args.out)) if not value]
    if missing:
        raise ConfigError(f"finetune: {', '.join(missing)} required (or --resume RUN)")
    result = finetune(args.source, args.task, args.train, args.out, eval=args.eval,
                      text_column=args.text_column, text_pair_column=args.text_pair_column,
                      label_column=args.label_column, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                      max_len=args.max_len, stride=args.stride, patience=args.patience, select=args.select,
                      from_scratch=args.from_scratch, tokenizer=args.tokenizer,
                      vocab_size=args.vocab_size, eos_token=args.eos_token, pad_token=args.pad_token,
                      seed=args.seed, device=args.device,
                      quiet=args.quiet or args.json, input_column=args.input_column,
                      target_column=args.target_column, prefix=args.prefix, mixing=args.mixing,
                      mixing_temperature=args.mixing_temperature,
                      max_target_len=args.max_target_len, beams=args.beams,
                      no_repeat_ngram=args.no_repeat_ngram)
    _report(result, args.json)


def _report(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    if "stopped_at_step" in result:
        return  # the runner said where it stopped and how to go on
    skip = {"run", "task", "epoch", "epochs_run", "steps", "train_examples", "eval_examples", "seconds",
            "selected_by"}
    scores = " | ".join(f"{k} {v:.4f}" for k, v in result.items() if k not in skip)
    rule = f" (by {result['selected_by']})" if "selected_by" in result else ""
    print(f"done: best epoch {result['epoch']}{rule} of {result['epochs_run']}"
          f"{' | ' + scores if scores else ''} | {result['seconds']:.0f} s | run folder {result['run']}")


def cmd_predict(args) -> None:
    from .predict import predict_file

    result = predict_file(args.run, args.input, args.out, device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['predictions']} predictions written to {result['out']}")


def register(sub) -> None:
    from ..cli import add_token_options

    s = sub.add_parser(
        "finetune", help="fine-tune a pretrained (or fresh) model on a labeled task",
        description=(
            "Fine-tune FROM (a run folder, a Hugging Face folder, or a preset name with "
            "--from-scratch) on TRAIN, evaluating on EVAL every epoch; the best epoch is kept in "
            "OUT. Files: CSV/TSV (header row; GLUE's 'sentence<TAB>label' works as is), JSONL, "
            "CoNLL (tagging), SQuAD JSON (qa), input/target rows (text2text); or builtin:stdlib-package / "
            "builtin:stdlib-docstring / builtin:stdlib-summarize "
            "(their held-out split is the evaluation data when --eval is omitted)."))
    s.add_argument("source", metavar="FROM", nargs="?",
                   help="run folder, Hugging Face folder, or preset name (with --from-scratch)")
    s.add_argument("--resume", metavar="RUN", help="continue a stopped fine-tuning run with its own settings")
    s.add_argument("--task", metavar="TASK",
                   help="classification, regression, tagging, qa, or text2text (encoder-decoder "
                        "backbones; the registry pretrainer.finetune.TASKS)")
    s.add_argument("--train", metavar="FILE", help="training data (a file or builtin:NAME)")
    s.add_argument("--eval", metavar="FILE", help="evaluation data (default for builtin:NAME: its eval split)")
    s.add_argument("--out", metavar="RUN", help="the new run folder")
    s.add_argument("--text-column", metavar="C", help="default: text, sentence or sentence1 (tagging: tokens or words)")
    s.add_argument("--text-pair-column", metavar="C", help="second text of a pair (default: text_pair or sentence2 when present)")
    s.add_argument("--label-column", metavar="C", help="default: label (tagging: tags, ner_tags or labels)")
    t = s.add_argument_group("text2text (T5, BART)")
    t.add_argument("--input-column", metavar="C", help="default: input, source or text")
    t.add_argument("--target-column", metavar="C", help="default: target, summary or output")
    t.add_argument("--prefix", default="", help='put before every input, e.g. "summarize: " (a row\'s own '
                                                '"prefix" field wins; a "task" field names its task)')
    t.add_argument("--mixing", choices=["proportional", "temperature"], default="proportional",
                   help="several tasks in one file: each example once per epoch, or T5's "
                        "temperature-scaled rates")
    t.add_argument("--mixing-temperature", type=float, default=2.0)
    t.add_argument("--max-target-len", type=int, default=64, help="target tokens (training and generation)")
    t.add_argument("--beams", type=int, default=1, help="beam search width when evaluating (1 = greedy)")
    t.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                   help="when evaluating, never repeat an n-gram of N tokens (0 = off; 3 is common for summaries)")
    s.add_argument("--epochs", type=int, default=3)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    s.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent warming up (default 0.1)")
    s.add_argument("--weight-decay", type=float, default=0.01)
    s.add_argument("--max-len", type=int, default=128, help="tokens per input, special tokens included (default 128)")
    s.add_argument("--stride", type=int, default=None, help="qa: tokens shared by consecutive context windows")
    s.add_argument("--patience", type=int, default=None, help="stop after N epochs without a better score")
    s.add_argument("--select", choices=["metric", "loss"], default=None,
                   help="the epoch kept: best task metric (accuracy, f1, pearson; the default) or lowest "
                        "evaluation loss (the default for text2text, whose ROUGE-L favours generic outputs)")
    s.add_argument("--from-scratch", action="store_true", help="random weights (FROM's config and tokenizer)")
    s.add_argument("--tokenizer", metavar="DIR", help="preset + --from-scratch: tokenizer to use "
                                                      "(default: train a WordPiece one on the training texts)")
    s.add_argument("--vocab-size", type=int, default=8192, help="size of that WordPiece tokenizer")
    add_token_options(s, ("eos", "pad"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.add_argument("--json", action="store_true", help="print the final evaluation metrics as one JSON object")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("predict", help="predictions of a fine-tuned run for a file (JSONL out)")
    s.add_argument("run", metavar="RUN", help="a run folder made by 'pretrainer finetune'")
    s.add_argument("--input", required=True, metavar="FILE", help="rows in the run's training format (labels not needed)")
    s.add_argument("--out", required=True, metavar="FILE", help="JSONL: one prediction per input row")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_predict)
