"""Command line: parse, call the library, print. ``pretrainer --help`` lists the commands.

Every error the user can fix is one line on stderr and exit status 2 (1 for anything unexpected);
``--debug`` shows the traceback instead. A diverged run exits with 3, a run stopped by SIGTERM or
Ctrl-C after saving its checkpoint with 75 (:data:`~pretrainer.errors.EXIT_PREEMPTED`): see
:data:`EXIT_STATUSES`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from ._version import __version__
from .errors import (EXIT_PREEMPTED, KernelWarning, PretrainerError, check_out_folder, os_error_of, storage,
                     storage_error, write_atomic)
from .eval import cli as icl_cli
from .finetune import cli as finetune_cli


#: What the exit statuses mean (``pretrainer --help`` shows them).
EXIT_STATUSES = ("exit status: 0 done; 1 unexpected error (a bug: --debug shows the traceback); 2 an "
                 "error you can fix (one line says what); 3 training diverged (non-finite or spiking "
                 f"loss; the last good checkpoint is kept); {EXIT_PREEMPTED} stopped by SIGTERM or Ctrl-C "
                 "after saving a checkpoint (continue with --resume); 130 a second Ctrl-C")


def _json_out(obj) -> None:
    print(json.dumps(obj, indent=2))


# ----------------------------------------------------------------------------------------------
# Commands


def cmd_info(args) -> None:
    from .config import model_preset, set_key
    from .model.info import human, human_bytes, model_info

    import yaml

    cfg = model_preset(args.model)
    for item in args.overrides:
        key, _, value = item.partition("=")
        set_key(cfg, key.removeprefix("model."), yaml.safe_load(value), where="override")
    if cfg.vocab_size is None:
        cfg.vocab_size = args.vocab_size
    cfg.validate()
    if args.plan:
        from .model.plan import parse_memory, plan, plan_table

        result = plan(cfg, devices=args.devices, device_memory_bytes=parse_memory(args.device_memory),
                      seq_len=args.seq_len, micro_batch=args.micro_batch,
                      checkpointing=args.activation_checkpointing)
        return _json_out(result) if args.json else print("\n".join(plan_table(result)))
    info = model_info(cfg, args.seq_len)
    if args.json:
        return _json_out(info)
    mem = info["memory_bytes"]
    layers = (f"{cfg.n_layer}+{cfg.decoder_layers} (encoder+decoder)" if cfg.arch == "encoder-decoder"
              else str(cfg.n_layer))
    inputs = (f"images {cfg.channels} x {cfg.image_size}^2 in {cfg.n_patches} patches of {cfg.patch_size}^2"
              if cfg.arch == "vit" else f"vocab {cfg.vocab_size}, context {cfg.max_seq_len}")
    print(f"{args.model}: {layers} layers x {cfg.d_model} wide, {cfg.n_head} heads "
          f"({cfg.kv_heads} key/value), FFN {cfg.ff_dim}, {inputs}")
    print(f"  parameters              {info['params']:>16,}")
    if "params_active" in info:
        print(f"  active per token        {info['params_active']:>16,}  ({info['experts_per_token']} of "
              f"{info['n_experts']} experts in each MoE layer)")
    print(f"  non-embedding (Kaplan)  {info['params_non_embedding']:>16,}"
          f"{'  (active)' if 'params_active' in info else ''}")
    if "params_reused" in info:
        print(f"  + applied again         {info['params_reused']:>16,}  (share_layers={info['share_layers']}: "
              f"shared weights run in every layer; in the FLOPs)")
    if "params_mlm_head" in info:
        what = "output bias" if cfg.tie_embeddings else "output bias and untied output matrix"
        print(f"  + MLM head (not above)  {info['params_mlm_head']:>16,}  (dense + norm transform, {what})")
    if "params_rtd_head" in info:
        print(f"  + RTD head (not above)  {info['params_rtd_head']:>16,}  (ELECTRA's discriminator: dense + "
              f"one logit per token)")
    if info.get("params_head"):
        print(f"  + classifier (not above){info['params_head']:>16,}  (linear on the <cls> state)")
    if "params_nsp_head" in info:
        print(f"  + NSP head (not above)  {info['params_nsp_head']:>16,}  (2-way linear on the pooled <cls>)")
    print(f"  training FLOPs / token  {human(info['flops_per_token_kaplan']):>16}  (6N + 6 n_layer n_ctx d)")
    print(f"  hardware FLOPs / token  {human(info['flops_per_token']):>16}  (with output head; used for MFU)")
    print(f"  weights fp32 / bf16     {human_bytes(mem['weights_fp32']):>16} / {human_bytes(mem['weights_bf16'])}")
    print(f"  AdamW training state    {human_bytes(mem['training_state_adamw']):>16}  (16 bytes/param)")
    print(f"  activations / sequence  {human_bytes(mem['activations_per_sequence_bf16']):>16}  "
          f"(bf16, {info['seq_len']} tokens, fused attention, no recomputation)")


def cmd_tokenizer_train(args) -> None:
    from .data.corpus import iter_documents
    from .tokenization import save_tokenizer, train_tokenizer

    check_out_folder(args.out, "tokenizer", ("tokenizer.json",))
    texts = (text for _, text in iter_documents(args.corpus, text_field=args.text_field))
    say = None if args.json else (lambda line: print(f"tokenizer: {line}", file=sys.stderr, flush=True))
    tok = train_tokenizer(texts, args.kind, args.vocab_size, sentinels=args.sentinels, sample_mb=args.sample_mb,
                          progress=say)
    save_tokenizer(tok, args.out)
    result = {"out": args.out, "kind": args.kind, "vocab_size": tok.get_vocab_size()}
    _json_out(result) if args.json else print(f"tokenizer ({args.kind}, {result['vocab_size']} tokens) "
                                              f"written to {args.out}/tokenizer.json")


def cmd_prepare(args) -> None:
    from .data.prepare import prepare

    if args.images:  # images: uint8 arrays + manifest (pretrainer.data.images)
        from .data.images import prepare_images

        manifest = prepare_images(args.images, args.out, image_size=args.image_size, val_fraction=args.val_fraction,
                                  seed=args.seed, overwrite=args.overwrite, progress=not args.json)
        if args.json:
            return _json_out(manifest)
        s = manifest["splits"]
        print(f"{args.out}: {s['train']['count']:,} train / {s['val']['count']:,} val images of "
              f"{manifest['channels']} x {manifest['image_size'][0]} x {manifest['image_size'][1]}, "
              f"{len(manifest['classes'])} classes")
        return
    if not (args.corpus and args.tokenizer):
        raise PretrainerError("prepare: --corpus and --tokenizer are required (or --images DIR for images)")
    manifest = prepare(args.corpus, args.tokenizer, args.out, val_fraction=args.val_fraction,
                       split=args.split, seed=args.seed,
                       text_field=args.text_field, doc_separator=args.doc_separator,
                       sentinels=args.sentinels, eos_token=args.eos_token, pad_token=args.pad_token,
                       mask_token=args.mask_token, overwrite=args.overwrite, progress=not args.json,
                       tokenizer_sample_mb=args.tokenizer_sample_mb)
    if args.json:
        return _json_out(manifest)
    s = manifest["splits"]
    print(f"{args.out}: {s['train']['tokens']:,} train / {s['val']['tokens']:,} val tokens, "
          f"vocab {manifest['vocab_size']} ({manifest['dtype']})")


def cmd_pretrain(args) -> int | None:
    from .config import load_config
    from .train.trainer import resume_config

    if args.resume:
        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    return cmd_pretrain_config(cfg, args)


def cmd_distill(args) -> int | None:
    from .errors import ConfigError
    from .train.distill import distill_config
    from .train.trainer import resume_config

    overrides = list(args.overrides)
    if args.teacher is not None and "=" in args.teacher:  # `distill --resume RUN key=value`
        overrides.insert(0, args.teacher)
        args.teacher = None
    if args.resume:
        if args.teacher or args.student or args.config:
            raise ConfigError("--resume RUN continues a distill run with its own teacher and student; "
                              "give only key=value overrides (train.max_steps=N)")
        cfg = resume_config(args.resume, overrides)
        if not cfg.distill.teacher:  # (a distill run is the one with a teacher)
            raise ConfigError(f"{args.resume}: objective={cfg.objective}, not a distill run; "
                              f"continue it with pretrainer pretrain --resume {args.resume}")
    elif args.teacher is None:
        raise ConfigError("TEACHER_RUN is missing: pretrainer distill TEACHER_RUN --student PRESET out=DIR")
    else:
        cfg = distill_config(args.teacher, args.student, args.config, overrides)
    return cmd_pretrain_config(cfg, args)


def cmd_pretrain_config(cfg, args) -> int | None:
    """Train ``cfg`` (resume when ``args.resume``) and print the summary as ``pretrain`` does."""
    from .train.trainer import train

    summary = train(cfg, resume=bool(args.resume), quiet=args.quiet)
    status = EXIT_PREEMPTED if summary["preempted"] else None  # every process of a job says the same
    if int(os.environ.get("RANK", "0")) != 0:
        return status
    if args.json:
        _json_out(summary)
    elif summary.get("nothing_to_do"):
        print(f"done already: {summary['run']} is at step {summary['step']}")
    elif summary.get("val_loss") is not None:
        print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, "
              f"run folder {summary['run']}, loss curve {summary['loss_png']}")
    return status


def add_token_options(s, roles=("eos", "pad")) -> None:
    """``--eos-token TEXT`` (and the other roles') on a command that reads a tokenizer."""
    what = {"eos": "that ends a text (document separator, end of generation)",
            "pad": "to pad with (default: the pad token, else the end-of-text one)",
            "mask": "that masks (objective=mlm, denoise)"}
    for role in roles:
        s.add_argument(f"--{role}-token", metavar="TEXT", default=None,
                       help=f"the tokenizer's token {what[role]}, when its tokenizer_config.json names "
                            f"none or the wrong one")


def add_section_flags(parser, cls, skip=()) -> None:
    """One flag per field of a settings dataclass (``--batch-size`` for ``batch_size``), typed from
    the field, with its help and choices from the field's metadata (:func:`pretrainer.config.option`).
    Flags default to None ("not given"), so a file's or a section's value is kept unless a flag
    says otherwise; the help shows the field's own default."""
    import dataclasses
    import typing

    from .config import _is_union, _resolve_type

    groups = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = _resolve_type(f.type)
        kinds = [t for t in (typing.get_args(hint) if _is_union(hint) else (hint,)) if t is not type(None)]
        kind = kinds[0] if kinds else str
        meta = dict(f.metadata)
        group_name = meta.pop("group", None)
        target = parser
        if group_name:
            target = groups.setdefault(group_name, parser.add_argument_group(group_name))
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if default in (None, "", False) else f" (default {default})"
        kw = {"help": meta.get("help", "") + shown, "default": None}
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:  # a default of true gets its --no- form
            target.add_argument(flag, action=argparse.BooleanOptionalAction if default else "store_true", **kw)
            continue
        if kind is dict:  # KEY=VALUE, repeatable
            target.add_argument(flag, action="append", metavar="KEY=VALUE", **kw)
            continue
        if "choices" in meta:
            kw["choices"] = list(meta["choices"])
        else:
            kw["metavar"] = {int: "N", float: "X"}.get(kind, "TEXT")
        target.add_argument(flag, type=kind, **kw)


def token_overrides(args) -> dict[str, str | None]:
    """``{role: TEXT}`` from the ``--ROLE-token`` options of :func:`add_token_options`."""
    return {role: getattr(args, f"{role}_token", None) for role in ("eos", "pad", "mask")}


def _load_run_and_tokenizer(run: str, device: str = "cpu", overrides: dict | None = None):
    from .api import load_with_tokenizer

    return load_with_tokenizer(run, device, overrides, warn=lambda s: print(s, file=sys.stderr))


def generate_samples(*args, **kw) -> list[str]:
    """:func:`pretrainer.api.generate_samples` (kept here for scripts that import it from the CLI)."""
    from .api import generate_samples as library

    return library(*args, **kw)


def cmd_generate(args) -> None:
    model, tok = _load_run_and_tokenizer(args.run, args.device, token_overrides(args))
    prompts = [args.prompt] if args.prompt is not None else []
    if args.input:
        from .embed import read_texts

        prompts += read_texts(args.input)  # one prompt per line (or JSONL rows with "text")
    if not prompts:
        prompts = [""]
    texts = generate_samples(model, tok, prompts * args.num_samples, args.max_new_tokens,
                             args.temperature, args.top_k, args.top_p, args.seed, args.beams,
                             args.no_repeat_ngram, chat=args.chat)
    if args.json:
        return _json_out([{"prompt": p, "text": t} for p, t in zip(prompts * args.num_samples, texts)])
    for t in texts:
        print(t)
        print("-" * 40)


def cmd_chat(args) -> None:
    import torch

    from .chat import chat_loop, stderr_prompt

    model, tok = _load_run_and_tokenizer(args.run, args.device, token_overrides(args))
    if getattr(model.cfg, "arch", "") != "decoder":
        raise PretrainerError(f"{args.run}: chat needs a decoder run (GPT, Llama); this one is {model.cfg.arch}")
    interactive = sys.stdin.isatty()
    if interactive:
        print("a prompt per line; /reset starts over, Ctrl-D ends", file=sys.stderr, flush=True)
    chat_loop(model, tok, sys.stdin, lambda text: print(text, flush=True), system=args.system,
              prompt=stderr_prompt if interactive else None, warn=lambda s: print(s, file=sys.stderr, flush=True),
              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, generator=torch.Generator().manual_seed(args.seed))


def cmd_embed(args) -> None:
    from .embed import embed_texts, read_texts, write_embeddings

    model, tok = _load_run_and_tokenizer(args.run, args.device, token_overrides(args))
    texts = read_texts(args.input, args.text_field)
    vectors = embed_texts(model, tok, texts, args.pooling, args.batch_size, args.max_len)
    if args.out:
        write_embeddings(args.out, texts, vectors, args.pooling)
    summary = {"run": args.run, "texts": len(texts), "pooling": args.pooling,
               "dim": int(vectors[0].shape[-1]), "out": args.out}
    if args.json:
        return _json_out(summary if args.out else {**summary, "embeddings": [v.tolist() for v in vectors]})
    print(f"{len(texts)} texts embedded ({args.pooling}, {summary['dim']} dimensions)"
          + (f" -> {args.out}" if args.out else ""))


def cmd_evaluate(args) -> None:
    from .config import config_from_file
    from .data.tokens import TokenSplit
    from .train.objectives import get_objective
    from .train.trainer import check_same_tokenizer, evaluate_split
    from .api import find_run_files
    from . import load

    from .finetune.backbone import is_finetune_run

    model = load(args.run, device=args.device, warn=lambda s: print(s, file=sys.stderr),
                 trained=True)  # ELECTRA's objective runs its generator too
    if is_finetune_run(Path(args.run)):  # its backbone, with the objective its architecture pretrains with
        from .config import RunConfig
        from .train.objectives import default_objective

        if not args.data:
            raise PretrainerError(f"{args.run}: a fine-tuning run has no pretraining data; name one with --data DIR")
        run_folder = Path(args.run)
        cfg = RunConfig(model=model.cfg, data=args.data, objective=default_objective(model.cfg.arch))
        cfg.train.seq_len = min(cfg.train.seq_len, model.cfg.max_seq_len)
    else:
        config_file, _ = find_run_files(args.run, warn=lambda s: None)  # load() above said it once
        cfg = config_from_file(config_file)
        run_folder = config_file.parent
    data = args.data or cfg.data
    check_same_tokenizer(run_folder, data, "--data")
    split = TokenSplit(data, args.split)
    seq_len = args.seq_len or cfg.train.seq_len
    n_windows = (len(split) - 1) // seq_len
    max_batches = args.max_batches or math.ceil(n_windows / args.batch_size)
    def progress(done: int, total: int, seconds: float) -> None:
        if not args.json:
            eta = seconds / max(done, 1) * (total - done)
            print(f"evaluate: {done:,}/{total:,} batches, {seconds:.0f} s, eta {eta:.0f} s", file=sys.stderr,
                  flush=True)

    objective = get_objective(cfg)
    scores = evaluate_split(model, objective, split, args.batch_size, max_batches,
                            seq_len=seq_len, progress=progress)  # mlm adds val_accuracy
    loss = scores["val_loss"]
    tokens = min(n_windows, max_batches * args.batch_size) * seq_len
    ppl = {"val_ppl": math.exp(min(loss, 50))} if objective.perplexity else {}  # ELECTRA: its generator's
    result = {"run": args.run, "data": str(data), "split": args.split, **ppl, **scores, "tokens": tokens,
              "seq_len": seq_len}
    if args.json:
        return _json_out(result)
    acc = f" | perplexity {result['val_ppl']:.2f}" if "val_ppl" in result else ""
    acc += f" | masked-token accuracy {scores['val_accuracy']:.4f}" if "val_accuracy" in scores else ""
    print(f"{args.split} loss {loss:.4f}{acc}{objective.eval_note(scores)} | {tokens:,} tokens of {data}")


def cmd_export(args) -> None:
    from . import load
    from .interop.hf import export_hf

    if args.unmerged:  # a LoRA run: the frozen base model, and its adapters apart (peft's format)
        from .train.lora import export_unmerged

        if args.generator:
            raise PretrainerError("--unmerged applies to a LoRA run; --generator to an ELECTRA run")
        tok_dir = Path(args.run) / "tokenizer"
        check_out_folder(args.out, "Hugging Face model", ("config.json", "model.safetensors"))
        export_unmerged(args.run, args.out, tokenizer_dir=tok_dir if tok_dir.is_dir() else None)
        print(f"exported {args.run} to {args.out} (Hugging Face format: the base model) and its LoRA adapters "
              f"to {Path(args.out) / 'adapter'} (peft.PeftModel.from_pretrained(model, that folder))")
        return
    model = load(args.run, trained=args.generator)
    if args.generator:
        if not hasattr(model, "generator"):
            raise PretrainerError(f"{args.run}: --generator applies to a run of objective=electra")
        model = model.generator
    tok_dir = Path(args.run) / "tokenizer"
    if getattr(model.cfg, "n_classes", 0):  # an image classifier: its data's class names as id2label
        from .data.images import run_class_names

        model.class_names = run_class_names(args.run)
    check_out_folder(args.out, "Hugging Face model", ("config.json", "model.safetensors"))
    export_hf(model, args.out, tokenizer_dir=tok_dir if tok_dir.is_dir() else None)
    print(f"exported {args.run} to {args.out} (Hugging Face format)")


def cmd_import(args) -> None:
    from .interop.hf import import_run

    import_run(args.hf_dir, args.out, say=lambda line: print(f"note: {line}", file=sys.stderr))
    print(f"imported {args.hf_dir} into run folder {args.out}")


def cmd_config(args) -> None:
    """The resolved run config (what ``pretrain`` with the same ``-c FILE`` and overrides would run),
    or with ``--keys`` every key with its default and meaning."""
    import yaml

    from .config import config_keys, load_config

    if args.keys:
        keys = config_keys()
        if args.json:
            return _json_out(keys)
        width = max(len(k["key"]) for k in keys)
        for k in keys:
            print(f"{k['key']:<{width}}  {str(k['default']):<12}  {k['meaning']}")
        return None
    cfg = load_config(args.config, args.overrides)
    if args.json:
        return _json_out(cfg.to_dict())
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return None


def cmd_lm_eval(args) -> int:
    """lm-eval's command line in this process, after registering the ``pretrainer`` model."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise PretrainerError("lm-eval is not installed; pip install 'pretrainer[eval]' (or lm-eval)") from None
    from .eval import lm_eval_adapter  # noqa: F401 - registers the model name 'pretrainer'

    saved = sys.argv
    sys.argv = ["lm_eval", *args.lm_eval_args]
    try:
        cli_evaluate()
    except SystemExit as e:  # lm_eval's --help and its own argument errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        sys.argv = saved
    return 0


def cmd_quickstart(args) -> None:
    from .quickstart import quickstart

    quickstart(out=args.out, minutes=args.minutes, corpus=args.corpus)


def _scaling_fit_from(path: str, form: str | None, n_boot: int, seed: int, quiet: bool = False):
    from .scaling.fit import fit_points, load_points

    points = load_points(path, require=("N", "D") if form == "chinchilla" else ())
    say = None if quiet else (lambda line: print(line, file=sys.stderr, flush=True))  # a long bootstrap's progress
    return points, fit_points(points, form, n_boot=n_boot, seed=seed, source=path, say=say)


def cmd_scaling_fit(args) -> None:
    from .scaling.plots import plot_fit

    points, result = _scaling_fit_from(args.path, args.form, args.bootstrap, args.seed, quiet=args.json)
    out = Path(args.out) if args.out else (Path(args.path) if Path(args.path).is_dir() else Path(args.path).parent)
    with storage(out, "create the folder"):
        out.mkdir(parents=True, exist_ok=True)
    fit_json, fit_png = out / "fit.json", out / "fit.png"
    write_atomic(fit_json, json.dumps(result, indent=2) + "\n")
    plot_fit(points, result, fit_png)
    if args.json:
        shown = {k: v for k, v in result.items() if k != "bootstrap"}
        for law in (shown.get("laws") or {}).values():
            law.pop("bootstrap", None)
        shown["files"] = {"fit_json": str(fit_json), "fit_png": str(fit_png)}
        _json_out(shown)
        return
    print(f"{result['form']} fit of {result['n_points']} points from {args.path}")
    for k, v in result["params"].items():
        lo, hi = result["intervals"].get(k, [None, None])
        ci = f"  [{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else ""
        print(f"  {k:>10} = {v:.4g}{ci}" if v is not None else f"  {k:>10} = -")
    if result.get("r2") is not None:
        print(f"  R² (log loss) = {result['r2']:.4f}")
    for note in result.get("notes", []):
        print(f"  note: {note}")
    if result["flags"]["demonstration"]:
        print("  DEMONSTRATION, not an estimate: " + "; ".join(result["flags"]["reasons"]))
    print(f"wrote {fit_json} and {fit_png}")


def cmd_scaling_plan(args) -> None:
    from .scaling.fit import load_fit
    from .scaling.plan import plan
    from .scaling.plots import plot_plan

    path = Path(args.path)
    if path.suffix.lower() == ".json":
        result = load_fit(path)
    else:
        _, result = _scaling_fit_from(args.path, args.form or "chinchilla", args.bootstrap, args.seed, quiet=args.json)
    if args.compute <= 0:
        raise PretrainerError(f"--compute is {args.compute:g}, expected a positive number of FLOPs (e.g. 1e18)")
    p = plan(result, args.compute)
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent)
    plan_png = plot_plan(result, out / "plan.png", compute=args.compute)
    if args.json:
        p["files"] = {"plan_png": str(plan_png)}
        _json_out(p)
        return
    print(f"compute budget C = {args.compute:.3g} FLOPs (C = 6ND)")
    ours = p["ours"]
    if ours:
        iv = ours.get("intervals") or {}

        def ci(k):
            lo, hi = iv.get(k) or [None, None]
            return f"  [{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else ""
        print(f"  ours:              N = {ours['N']:.3g}{ci('N')}  D = {ours['D']:.3g}{ci('D')}  "
              f"D/N = {ours['tokens_per_param']:.3g}{ci('tokens_per_param')}  loss = {ours['loss']:.4g}{ci('loss')}")
    ref, rule = p["chinchilla_paper"], p["rule_20_tokens"]
    print(f"  Chinchilla paper:  N = {ref['N']:.3g}  D = {ref['D']:.3g}  D/N = {ref['tokens_per_param']:.3g}")
    print(f"  20 tokens/param:   N = {rule['N']:.3g}  D = {rule['D']:.3g}")
    for r in p["flags"]["reasons"]:
        print(f"  DEMONSTRATION, not an estimate: {r}")
    for w in p["flags"].get("warnings", []):
        print(f"  warning: {w}")
    print(f"wrote {plan_png}")


def cmd_scaling_sweep(args) -> None:
    from .scaling.sweep import run_sweep

    import dataclasses

    from .config import SweepConfig

    opts = {f.name: getattr(args, f.name) for f in dataclasses.fields(SweepConfig)}
    r = run_sweep(args.config, args.out, args.overrides, print_commands=args.print_commands, quiet=args.json, **opts)
    if "commands" in r:
        return _json_out(r["commands"]) if args.json else print("\n".join(r["commands"]))
    if args.json:
        return _json_out(r)
    print(f"{r['n_runs']} runs in {args.out} ({r['wall_s_total']:.0f} s of training); lr: {', '.join(r['lr_rule'])}")
    ln = r.get("L_of_N")
    if ln:
        print(f"  L(N) = (N_c/N)^alpha_N: alpha_N = {ln['alpha_N']:.4f}, N_c = {ln['N_c']:.3g}, R² = {ln['r2']:.4f}")
    ch = r.get("chinchilla")
    if ch:
        p = ch["params"]
        print(f"  L(N, D) = {p['E']:.3g} + {p['A']:.3g}/N^{p['alpha']:.3f} + {p['B']:.3g}/D^{p['beta']:.3f}, "
              f"R² = {ch['r2']:.4f}" + ("  [demonstration]" if ch["flags"]["demonstration"] else ""))
    ours = (r.get("plan") or {}).get("ours")
    if ours:
        print(f"  plan for C = {r['plan']['compute']:.3g}: N = {ours['N']:.3g}, D = {ours['D']:.3g} "
              f"({ours['tokens_per_param']:.3g} tokens/parameter), loss {ours['loss']:.4g}")
    print(f"  loss falls with N at every fixed D: {all(r['loss_falls_with_N_at_fixed_D'].values())}; "
          f"larger models need fewer tokens: {r['sample_efficiency']['larger_needs_fewer']}")
    for w in r["warnings"]:
        print(f"  warning: {w}")
    print(f"wrote {args.out}/sweep.jsonl, summary.json, summary.csv, fit.json, plan.json and "
          f"{', '.join(Path(f).name for f in r['files'].values())}")


# ----------------------------------------------------------------------------------------------
# Parser


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in one line (and a pointer to ``--help``) instead of the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _number(kind, low=None, high=None, low_open=False, what=""):
    """An argparse ``type`` that reads ``kind`` and checks a finite value against its range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}") from None
        if (value != value or value in (float("inf"), float("-inf"))
                or (low is not None and (value <= low if low_open else value < low))
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"{text}: expected {what}")
        return value
    return parse


POSITIVE = _number(int, 1, what="a positive integer")
COUNT = _number(int, 0, what="an integer >= 0")
NONNEG = _number(float, 0.0, what="a finite number >= 0")
PROBABILITY = _number(float, 0.0, 1.0, low_open=True, what="a number in (0, 1]")
POSITIVE_FLOAT = _number(float, 0.0, low_open=True, what="a finite number > 0")


def build_parser() -> argparse.ArgumentParser:
    from .config import SweepConfig

    p = OneLineParser(prog="pretrainer", description=(
        "Pretrain, fine-tune, prompt and scale Transformers. Start with 'pretrainer quickstart'."),
        epilog=EXIT_STATUSES)
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--version", action="version", version=f"pretrainer {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("info", help="parameters, FLOPs per token and memory of a model preset", description=(
        "Parameters, FLOPs per token and memory of a model preset. With --plan: per-device memory of "
        "AdamW training under ddp and fsdp with each activation checkpointing mode (none, selective, "
        "full), whether it fits and the largest micro-batch, e.g. "
        "'pretrainer info llama2-7b --plan --devices 8 --device-memory 80GB'."))
    s.add_argument("model", help="preset name, e.g. gpt2-small, llama2-7b")
    s.add_argument("overrides", nargs="*", help="model field overrides, e.g. n_layer=6")
    s.add_argument("--vocab-size", type=POSITIVE, default=8192,
                   help="vocabulary for presets that take it from the data (default 8192)")
    s.add_argument("--seq-len", type=POSITIVE, default=None,
                   help="tokens per sequence, for the attention FLOPs and the plan (default: max_seq_len)")
    s.add_argument("--plan", action="store_true",
                   help="memory plan: model state, activations, fits yes/no and max micro-batch per device")
    s.add_argument("--devices", type=POSITIVE, default=1, help="--plan: number of devices (default 1)")
    s.add_argument("--device-memory", default="80GB",
                   help="--plan: memory per device, e.g. 80GB, 24GiB, 40000MB (plain number = GB; default 80GB)")
    s.add_argument("--micro-batch", type=POSITIVE, default=None,
                   help="--plan: sequences per device (default: report the largest that fits)")
    s.add_argument("--activation-checkpointing", choices=["none", "selective", "full"], default=None,
                   help="--plan: only this mode (default: all three)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("tokenizer", help="train a tokenizer")
    tsub = s.add_subparsers(dest="tok_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a BPE, WordPiece, Unigram or character tokenizer")
    t.add_argument("--corpus", required=True, help="file, folder, glob, .jsonl/.parquet, a datasets save_to_disk folder or .arrow, or builtin:stdlib, builtin:synthetic, builtin:icl-synthetic, builtin:arith-cot")
    t.add_argument("--kind", choices=["bpe", "wordpiece", "unigram", "char"], default="bpe")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--sentinels", type=int, default=0, help="T5 sentinel tokens to reserve")
    t.add_argument("--text-field", default="text", help="field/column with the text in JSONL/Parquet/datasets")
    t.add_argument("--sample-mb", type=NONNEG, default=None,
                   help="train on a uniform sample of the documents of about this many MB (default: 64 for "
                        "bpe and wordpiece, 5 for unigram; 0 = the whole corpus; char reads everything)")
    t.add_argument("--out", required=True)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_tokenizer_train)

    s = sub.add_parser("prepare", help="tokenise a corpus (or read images) into memory-mapped shards", description=(
        "With --images DIR|builtin:digits: images as uint8 arrays, labels from sub-folder names, and a "
        "manifest (for a ViT: objective=mae, finetune --task image-classification). Otherwise: "
        "tokenise a corpus into token shards and a manifest. Every document is followed by the "
        "tokenizer's end-of-text token (<eos> in ours, <|endoftext|> in GPT-2's, </s> in Llama's): a "
        "tokenizer's special tokens are read by role from its tokenizer_config.json / "
        "special_tokens_map.json (or known spellings in a bare tokenizer.json), and the manifest's "
        "special_ids records them. A tokenizer with no end-of-text token needs --eos-token TEXT."))
    s.add_argument("--corpus", help="file, folder, glob, .jsonl/.parquet, a datasets save_to_disk folder or .arrow, or builtin:stdlib, builtin:synthetic, builtin:icl-synthetic, builtin:arith-cot")
    s.add_argument("--images", metavar="DIR", help="images instead of text: a folder with one sub-folder of "
                   "PNG/JPEG files per class (the labels), or builtin:digits (scikit-learn's 1,797 8 x 8 digits)")
    s.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="--images: resize every image to N x N (needed when their sizes differ)")
    s.add_argument("--tokenizer",
                   help="a tokenizer folder or tokenizer.json (ours or a Hugging Face one: its special tokens "
                        "are read by role from tokenizer_config.json), 'char', or KIND:SIZE to train one "
                        "first (e.g. bpe:8192)")
    s.add_argument("--out", required=True)
    s.add_argument("--tokenizer-sample-mb", type=NONNEG, default=None,
                   help="KIND:SIZE tokenizers train on a uniform sample of the documents of about this many MB "
                        "(default: 64 for bpe and wordpiece, 5 for unigram; 0 = all)")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--split", choices=["document", "tail"], default="document",
                   help="validation = random documents, or the last tokens of the stream (nanoGPT)")
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--text-field", default="text")
    s.add_argument("--doc-separator", default=None, help=r"split text files into documents on this string, e.g. '\n\n'")
    s.add_argument("--sentinels", type=int, default=0,
                   help="T5 sentinel tokens <extra_id_0..N-1> added to a trained tokenizer (objective=span: 100)")
    add_token_options(s, ("eos", "pad", "mask"))
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("pretrain", help="pretrain a model (or resume a run)", description=(
        "Pretrain from a YAML config and/or key=value overrides, e.g. "
        "'pretrainer pretrain model=gpt-micro data=data/stdlib out=runs/a train.max_steps=2000'. "
        "Required: data, out. Resume with --resume RUN (overrides such as train.max_steps=N extend it). "
        "Every key, its default and meaning: 'pretrainer config --keys'; the config a command line resolves "
        "to: 'pretrainer config -c FILE KEY=VALUE ...'."),
        epilog=EXIT_STATUSES)
    s.add_argument("overrides", nargs="*", help="key=value settings (model=PRESET, data=DIR, out=DIR, train.lr=...)")
    s.add_argument("--config", "-c", help="YAML config file (or the name of one under configs/)")
    s.add_argument("--resume", metavar="RUN", help="continue RUN from its newest intact checkpoint")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.add_argument("--json", action="store_true", help="print the final summary as JSON")
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("distill", help="train a smaller student from a teacher run (DistilBERT's loss)",
                       description=(
        "Knowledge distillation (Sanh et al. 2019, DistilBERT): train a student from a frozen teacher (a run, "
        "checkpoint or Hugging Face folder; encoder or decoder) with ce_weight x the soft-target "
        "cross-entropy at temperature T (x T^2) + lm_weight x its own masked-LM (encoder) or causal-LM "
        "(decoder) loss + cos_weight x (1 - cosine) of the final hidden states (when the widths match); "
        "DistilBERT's 5 / 2 / 1 and T=2 by default (distill.ce_weight, distill.lm_weight, distill.cos_weight, "
        "distill.temperature, distill.masked_only). The student starts from one teacher layer in two (12 -> 6: "
        "0, 2, 4, 7, 9, 11) wherever the shapes fit; the first log line says which. The run starts from the "
        "teacher run's data, masking and train settings; key=value overrides refine them, e.g. "
        "'pretrainer distill runs/bert --student distilbert-mini out=runs/distil train.max_steps=2000'. "
        "Teacher and student share the tokenizer (else refused). It is objective=distill in the one training "
        "loop: checkpoints, exact resume (--resume RUN, or pretrain --resume RUN), torchrun."),
        epilog=EXIT_STATUSES)
    s.add_argument("teacher", nargs="?", metavar="TEACHER_RUN", help="the teacher: a run, checkpoint or "
                   "Hugging Face folder")
    s.add_argument("overrides", nargs="*", help="key=value settings (out=DIR, data=DIR, train.*, model.*, distill.*)")
    s.add_argument("--student", metavar="PRESET", help="the student's preset, e.g. distilbert-mini "
                   "(default: the teacher's architecture with half its layers)")
    s.add_argument("--config", "-c", help="YAML config file instead of the teacher run's settings")
    s.add_argument("--resume", metavar="RUN", help="continue a distill RUN from its newest intact checkpoint")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.add_argument("--json", action="store_true", help="print the final summary as JSON")
    s.set_defaults(func=cmd_distill)

    s = sub.add_parser("generate", help="sample text from a trained run (or answer, for T5/BART)")
    s.add_argument("run", help="run folder, checkpoint folder or HF folder")
    s.add_argument("--prompt", default=None)
    s.add_argument("--input", help="UTF-8 file with one prompt (encoder-decoder: one source) per line, "
                   "or .jsonl rows with a 'text' field")
    s.add_argument("--max-new-tokens", type=COUNT, default=200)
    s.add_argument("--beams", type=POSITIVE, default=1, help="beam search width (encoder-decoder runs; 1 = sample or greedy)")
    s.add_argument("--temperature", type=NONNEG, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=POSITIVE, default=None)
    s.add_argument("--top-p", type=PROBABILITY, default=None)
    s.add_argument("--no-repeat-ngram", type=COUNT, default=0, metavar="N",
                   help="never repeat an n-gram of N tokens (0 = off; 3 is common for summaries)")
    s.add_argument("--num-samples", type=POSITIVE, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--chat", action="store_true", help="decoders: each prompt is a user's message in the "
                   "tokenizer's chat template (an instruction-tuned run's); print the answer only")
    add_token_options(s, ("eos",))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="talk to an instruction-tuned decoder: a prompt per line on stdin", description=(
        "A conversation with a decoder run (an instruction-tuned one: finetune --task sft): each line "
        "of stdin is the user's next message, laid out with the earlier turns by the tokenizer's chat "
        "template, and the answer is printed. /reset starts a new conversation; end of input exits."))
    s.add_argument("run", help="run folder or HF folder of a decoder")
    s.add_argument("--system", default=None, help="a system message before the conversation")
    s.add_argument("--max-new-tokens", type=COUNT, default=200)
    s.add_argument("--temperature", type=NONNEG, default=0.0, help="0 = greedy (the default)")
    s.add_argument("--top-k", type=POSITIVE, default=None)
    s.add_argument("--top-p", type=PROBABILITY, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    add_token_options(s, ("eos",))
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("embed", help="encoder representations of texts (T5/BART encoder or BERT), frozen")
    s.add_argument("run", help="run folder or HF folder of an encoder-decoder or encoder model")
    s.add_argument("--input", required=True, help="one text per line, or .jsonl rows with --text-field")
    s.add_argument("--out", help=".npy (mean pooling: [N, d_model]) or .jsonl (text + embedding per row)")
    s.add_argument("--pooling", choices=["mean", "tokens"], default="mean",
                   help="mean over the text's tokens, or one vector per token")
    s.add_argument("--text-field", default="text")
    s.add_argument("--batch-size", type=POSITIVE, default=32)
    s.add_argument("--max-len", type=POSITIVE, default=512, help="tokens per text (longer texts are cut)")
    s.add_argument("--device", default="cpu")
    add_token_options(s, ("eos", "pad"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_embed)

    s = sub.add_parser("evaluate", help="validation loss and perplexity of a run")
    s.add_argument("run")
    s.add_argument("--data", help="a prepared data folder (default: the run's)")
    s.add_argument("--split", default="val")
    s.add_argument("--seq-len", type=POSITIVE, default=None)
    s.add_argument("--batch-size", type=POSITIVE, default=8)
    s.add_argument("--max-batches", type=POSITIVE, default=None, help="default: the whole split")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("export", help="write a run as a Hugging Face model folder")
    s.add_argument("run")
    s.add_argument("--format", choices=["hf"], default="hf")
    s.add_argument("--out", required=True)
    s.add_argument("--generator", action="store_true",
                   help="an ELECTRA run: write its generator (ElectraForMaskedLM) instead of the discriminator")
    s.add_argument("--unmerged", action="store_true",
                   help="a LoRA run: write the frozen base model and its adapters in OUT/adapter (for "
                        "peft.PeftModel.from_pretrained) instead of the weights with the adapters merged in")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("import", help="make a run folder from a Hugging Face model folder")
    s.add_argument("hf_dir")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("scaling", help="fit scaling laws to (N, D, loss) measurements and plan a compute budget")
    ssub = s.add_subparsers(dest="scaling_command", metavar="ACTION", required=True)
    t = ssub.add_parser("fit", help="fit Kaplan power laws or the Chinchilla form L(N, D) = E + A/N^a + B/D^b",
                        description="PATH: a .csv or .jsonl of N (non-embedding parameters), D (tokens), loss "
                                    "(C optional), or a sweep folder with sweep.jsonl. Writes fit.json and fit.png.")
    t.add_argument("path", metavar="PATH")
    t.add_argument("--form", choices=["kaplan", "chinchilla"], default=None,
                   help="default: chinchilla when N and D both vary, else kaplan")
    t.add_argument("--out", help="folder for fit.json and fit.png (default: the folder of PATH)")
    t.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_scaling_fit)
    t = ssub.add_parser("plan", help="compute-optimal N and D for a compute budget",
                        description="PATH: a fit.json from 'scaling fit', or data to fit first (Chinchilla form).")
    t.add_argument("path", metavar="PATH|FIT.json")
    t.add_argument("--compute", type=POSITIVE_FLOAT, required=True, help="training FLOPs, e.g. 1e18")
    t.add_argument("--form", choices=["kaplan", "chinchilla"], default=None, help="when PATH is data (default chinchilla)")
    t.add_argument("--out", help="folder for plan.png (default: the folder of PATH)")
    t.add_argument("--bootstrap", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_scaling_plan)
    t = ssub.add_parser("sweep", help="train a grid of model sizes x token budgets (or IsoFLOP sets), then fit, plan, plot",
                        description="Trains every size x budget from one base CONFIG (YAML; a 'sweep:' section in it "
                                    "may set any option below), records N, D, C and losses in OUT/sweep.jsonl, fits, "
                                    "plans and writes the plots into OUT. Resumable: run it again to continue.")
    t.add_argument("config", metavar="CONFIG", help="base run config (YAML, or a name under configs/)")
    t.add_argument("overrides", nargs="*", help="key=value changes to the base config (train.batch_size=8, ...)")
    t.add_argument("--out", required=True, help="sweep folder")
    add_section_flags(t, SweepConfig)  # every option of pretrainer.config.SweepConfig, declared there
    t.add_argument("--print-commands", action="store_true", help="print one 'pretrainer pretrain' command per "
                   "unfinished run (for a cluster) instead of training; run the sweep again to collect")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_scaling_sweep)

    finetune_cli.register(sub)  # finetune, predict

    icl_cli.register(sub)  # icl

    s = sub.add_parser("config", help="the resolved run config, or every key with its default and meaning",
                       description="Print the run config that pretrain -c FILE KEY=VALUE ... would run (YAML), "
                                   "or with --keys every settable key, its default and its meaning.")
    s.add_argument("-c", "--config", default=None, help="YAML file (or a name under configs/)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, as for pretrain")
    s.add_argument("--keys", action="store_true", help="list every key with its default and meaning")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("lm-eval", help="run lm-evaluation-harness with pretrainer runs as models",
                       description="lm-evaluation-harness's own command line (every lm_eval argument), with "
                                   "the model 'pretrainer' registered: pretrainer lm-eval --model pretrainer "
                                   "--model_args run=RUN --tasks TASK [--include_path DIR] [--device cpu] ... "
                                   "Needs lm-eval: pip install 'pretrainer[eval]'.", add_help=False)
    s.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm_eval (its --help lists them)")
    s.set_defaults(func=cmd_lm_eval)

    s = sub.add_parser("quickstart", help="prepare the embedded corpus, pretrain a small GPT, sample")
    s.add_argument("--out", default="runs/quickstart")
    s.add_argument("--minutes", type=POSITIVE_FLOAT, default=4.0, help="training time budget")
    s.add_argument("--corpus", default="builtin:stdlib")
    s.set_defaults(func=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] == "lm-eval":  # every later argument is lm_eval's own
        args, extra = parser.parse_known_args(argv[:command + 1])
        args.lm_eval_args = argv[command + 1:]
    else:
        args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (pretrain --quiet train.lr=1e-3)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    plain_format = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        # the kernels' fallback notice is for the user, not a traceback to a source line
        if issubclass(category, KernelWarning) and not args.debug:
            return f"warning: {message}\n"
        return plain_format(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        status = args.func(args)
    except PretrainerError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stdout = open(os.devnull, "w")
        return 0
    except Exception as e:  # noqa: BLE001 - last resort: one line unless --debug
        if args.debug:
            raise
        if os_error_of(e) is not None:  # a full disk, a read-only folder ... not wrapped where it happened
            print(f"error: {storage_error(os_error_of(e), doing='open')}", file=sys.stderr)
            return 2
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = plain_format
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
