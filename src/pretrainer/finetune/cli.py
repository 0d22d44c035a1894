"""``pretrainer finetune`` and ``pretrainer predict``: parse, call :mod:`pretrainer.finetune`,
print. ``register(subparsers)`` adds both commands to the main parser; nothing heavy is imported
until a command runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_finetune(args) -> int | None:
    from ..errors import ConfigError
    from .runner import finetune, resume_finetune

    if args.resume:
        if args.overrides:
            raise ConfigError(f"finetune --resume: {args.overrides[0]}: a resumed run keeps its own settings")
        from .images import finetune_images, is_image_run

        if is_image_run(args.resume):  # image-classification: a run of the trainer's
            result = finetune_images(None, None, args.resume, resume=True, quiet=bool(args.quiet))
        else:
            result = resume_finetune(args.resume, quiet=bool(args.quiet))
        return _report(result, args.json)
    args.train = args.train or args.data
    if args.source and "=" in args.source and not Path(args.source).exists():  # a KEY=VALUE, not FROM
        args.overrides, args.source = [args.source, *args.overrides], None
    missing = [flag for flag, value in (("FROM", args.source), ("--task", args.task), ("--train", args.train),
                                        ("--out", args.out)) if not value]
    if missing:
        raise ConfigError(f"finetune: {', '.join(missing)} required (or --resume RUN)")
    result = finetune(args.source, args.task, args.train, args.out, eval=args.eval,
                      **finetune_options(args))
    return _report(result, args.json)


def _report(result: dict, as_json: bool) -> int | None:
    """Print the result; the exit status of a run stopped by a signal (resumable)."""
    from ..errors import EXIT_PREEMPTED

    status = EXIT_PREEMPTED if result.get("preempted") else None
    if as_json:
        print(json.dumps(result, indent=2))
        return status
    if "stopped_at_step" in result:
        return status  # the runner said where it stopped and how to go on
    skip = {"run", "task", "epoch", "epochs_run", "steps", "train_examples", "eval_examples", "seconds",
            "selected_by", "one_class", "last"}
    scores = " | ".join(f"{k} {v:.4f}" for k, v in result.items() if k not in skip)
    rule = f" (by {result['selected_by']})" if "selected_by" in result else ""
    if result.get("one_class") is not None:
        scores += f" | predicts {result['one_class']!r} for every example"
    last = result.get("last")
    if last and last.get("epoch") != result["epoch"]:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k not in ("epoch", "one_class"))
        one = f", predicts {last['one_class']!r} for every example" if last.get("one_class") is not None else ""
        scores += f" | last epoch {last['epoch']}: {shown}{one}"
    print(f"done: best epoch {result['epoch']}{rule} of {result['epochs_run']}"
          f"{' | ' + scores if scores else ''} | {result['seconds']:.0f} s | run folder {result['run']}")


def finetune_options(args) -> dict:
    """The fine-tuning options: defaults, then the ``finetune:`` section of ``-c FILE``, then the
    flags given, then ``--set key=value``, then the ``key=value`` arguments after FROM (types
    checked, misspelt keys named, as for pretraining). ``model.KEY=VALUE`` (or ``--model
    KEY=VALUE``, or a ``model:`` mapping in the section) changes a backbone setting."""
    import dataclasses

    import yaml

    from ..config import FinetuneConfig, _find_config_file, apply_override, section
    from ..errors import ConfigError

    raw = {}
    if args.config:
        file = _find_config_file(args.config)
        try:
            raw = dict((yaml.safe_load(file.read_text()) or {}).get("finetune", {}))
        except (yaml.YAMLError, AttributeError, TypeError, ValueError):
            raise ConfigError(f"{file}: expected YAML with a 'finetune:' mapping") from None
    model = raw.pop("model", None) or {}
    if not isinstance(model, dict):
        raise ConfigError(f"{args.config}: finetune.model: expected a mapping of model keys (dropout: 0.1)")
    opts = section(FinetuneConfig, raw, str(args.config))
    opts.model = dict(model)
    for f in dataclasses.fields(FinetuneConfig):
        given = getattr(args, f.name, None)
        if given is not None and f.name != "model":
            setattr(opts, f.name, given)
    items = [f"model.{item}" for item in (args.model or [])] + list(args.set) + list(getattr(args, "overrides", []))
    for item in items:
        key, eq, value = item.partition("=")
        if key.strip().startswith("model."):
            if not eq:
                raise ConfigError(f"override '{item}': expected model.KEY=VALUE (e.g. model.dropout=0.1)")
            opts.model[key.strip().removeprefix("model.")] = yaml.safe_load(value) if value.strip() else None
        else:
            apply_override(opts, item)
    opts.validate_model()
    return dataclasses.asdict(opts)


def cmd_predict(args) -> None:
    from .predict import predict_file

    say = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))  # --json: quiet
    result = predict_file(args.run, args.input, args.out, device=args.device, say=say)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['predictions']} predictions written to {result['out']}")


def register(sub) -> None:
    from ..cli import add_section_flags
    from ..config import FinetuneConfig

    s = sub.add_parser(
        "finetune", help="fine-tune a pretrained (or fresh) model on a labeled task",
        description=(
            "Fine-tune FROM (a run folder, a Hugging Face folder, or a preset name with "
            "--from-scratch) on TRAIN, evaluating on EVAL every epoch; the best epoch is kept in "
            "OUT. Files: CSV/TSV (header row; GLUE's 'sentence<TAB>label' works as is), JSONL, "
            "CoNLL (tagging), SQuAD JSON (qa), input/target rows (text2text), Alpaca "
            "instruction/input/output, messages or prompt/completion rows (sft); or builtin:stdlib-package / "
            "builtin:stdlib-docstring / builtin:stdlib-summarize / builtin:stdlib-instruct "
            "(their held-out split is the evaluation data when --eval is omitted)."))
    s.add_argument("source", metavar="FROM", nargs="?",
                   help="run folder, Hugging Face folder, or preset name (with --from-scratch)")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="model.KEY=VALUE: a backbone setting (see --model), e.g. model.dropout=0.2; or any "
                        "option below, as --set")
    s.add_argument("--resume", metavar="RUN", help="continue a stopped fine-tuning run with its own settings")
    s.add_argument("--task", metavar="TASK",
                   help="classification, regression, tagging, qa, text2text (encoder-decoder "
                        "backbones), sft (instruction tuning of a decoder: loss on the answers, chat "
                        "template), or image-classification (ViT; --data IMAGES); the registry "
                        "pretrainer.finetune.TASKS")
    s.add_argument("--train", metavar="FILE", help="training data (a file, a datasets save_to_disk folder, or builtin:NAME)")
    s.add_argument("--eval", metavar="FILE", help="evaluation data, as --train (default for builtin:NAME: its eval split)")
    s.add_argument("--data", metavar="DIR", help="image-classification: a folder from 'pretrainer prepare --images' "
                                                 "(trains on its train split, evaluates on its val split); as --train")
    s.add_argument("--out", metavar="RUN", help="the new run folder")
    s.add_argument("-c", "--config", metavar="FILE", help="YAML whose 'finetune:' section sets any option below")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one option by its name (batch_size=16); wins over the flags and the file")
    add_section_flags(s, FinetuneConfig)  # every option of pretrainer.config.FinetuneConfig, declared there
    s.add_argument("--json", action="store_true", help="print the final evaluation metrics as one JSON object "
                                                       "(stdout; progress lines stay on stderr)")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("predict", help="predictions of a fine-tuned run for a file (JSONL out)")
    s.add_argument("run", metavar="RUN", help="a run folder made by 'pretrainer finetune'")
    s.add_argument("--input", required=True, metavar="FILE",
                   help="rows in the run's training format (labels not needed); for an image-classification run, "
                        "a folder of images (resized to the model's) or of 'pretrainer prepare --images' (its val split)")
    s.add_argument("--out", required=True, metavar="FILE", help="JSONL: one prediction per input row")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_predict)
