"""The fine-tuning loop: :func:`finetune` trains a task head (and the backbone under it) and
writes a run folder.

``OUT/`` holds ``config.yaml`` (the task, its columns and labels, where the backbone came from, the
model config, the input layout and every setting), ``labels.json``, ``tokenizer/``,
``metrics.jsonl`` (training-loss lines and one evaluation line per epoch: the task's metrics and
``eval_loss``), ``checkpoints/`` with the best epoch's weights only (safetensors, written
atomically), and ``predictions.jsonl``: the best model's prediction for every evaluation example,
beside the gold answer. The best epoch is the one with the highest task metric (accuracy, f1,
pearson), or with ``select="loss"`` (text2text's default) the lowest evaluation loss; a tie goes to
the lower evaluation loss, and a classifier that answers one class for every evaluation example
is never kept over one that does not (:func:`better_epoch`). ``config.yaml`` and the returned
summary also give the last epoch's metrics (``last``).

Optimisation is BERT's recipe: AdamW (decay on matrices only), linear warmup over ``warmup`` of
the steps, then linear decay to zero, gradient clipping at 1, dropout ``dropout`` (0.1) on the head
and in the backbone (``model={"dropout": ...}`` sets the backbone's alone). Batches are grouped by
length (:func:`group_by_length`) unless ``group_by_length=False``. The data order and dropout are
seeded by ``seed``: the same command gives the same numbers on the same machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

from ..common import IGNORE
from ..config import PRESETS, FinetuneConfig, TrainConfig
from ..errors import ConfigError, DivergenceError, check_out_folder, storage, write_atomic
from ..train.tracking import Trackers, check_installed, parse_loggers
from ..runlock import RunLock
from ..train.checkpoint import (latest_checkpoint, list_checkpoints, load_training_state, load_weights,
                                remove_failed_saves, save_checkpoint)
from ..train import lora
from ..train.loop import DivergenceGuard, Env, StopFlag, TrainStep, optimizer_step, to_device
from ..train.parallel import barrier, ddp
from ..model.fast import apply_fast_paths, wants_fast_paths
from ..train.optim import lr_at, make_optimizer, set_lr
from .backbone import load_backbone, with_settings
from .heads import InputFormat
from .tasks import TASKS, Task, make_task


#: the settings of :func:`finetune`: :class:`pretrainer.config.FinetuneConfig` (declared once there;
#: the CLI flags of ``pretrainer finetune`` are derived from it)
FinetuneOptions = FinetuneConfig


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available; use --device cpu")
    return torch.device(name)


def rows_as_jsonl(source, path: Path, master: bool, world: int):
    """``source`` unchanged, unless it is a Hugging Face ``datasets.Dataset`` or a ``save_to_disk``
    folder (a DatasetDict's train split): then its rows are written to ``path`` as JSON lines (the
    first process writes; resuming reads them from there) and ``path`` is returned."""
    from ..data.corpus import is_dataset, is_dataset_folder, load_dataset_folder

    if is_dataset(source):
        ds = source
    elif isinstance(source, (str, Path)) and is_dataset_folder(Path(source)):
        ds = load_dataset_folder(Path(source))
    else:
        return source
    if type(ds).__name__ != "Dataset":
        raise ConfigError("fine-tuning data: a streamed IterableDataset cannot be read twice per epoch; "
                          "pass a datasets.Dataset (or its save_to_disk folder)")
    if master:
        with storage(path.parent, "create the folder"):
            path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in ds))
    barrier(world)
    return str(path)


def resolve_eval(train: str, eval_source: str | None) -> str | None:
    """The evaluation data: ``eval``, or for a built-in training task without one, the same
    built-in task (whose ``eval`` split is held out by file)."""
    if eval_source is None and train.startswith("builtin:"):
        return train
    return eval_source


def infer(task: Task, model: torch.nn.Module, feats: list[dict], batch_size: int, pad_id: int,
          device: torch.device) -> list[torch.Tensor]:
    """The model's outputs for every feature (float32 on the CPU; token outputs cut to the
    feature's length), in batches of similar length."""
    return infer_with_loss(task, model, feats, batch_size, pad_id, device, loss=False)[0]


@torch.no_grad()
def infer_with_loss(task: Task, model: torch.nn.Module, feats: list[dict], batch_size: int, pad_id: int,
                    device: torch.device, loss: bool = True) -> tuple[list[torch.Tensor], float | None]:
    """``(outputs, loss)``: :func:`infer`'s outputs and, from the same forward passes, what
    :func:`eval_loss` gives (the same batches: both sort the features by length; ``None``
    without targets or with ``loss=False``)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(feats)), key=lambda i: task.length(feats[i]))
    outputs: list[torch.Tensor | None] = [None] * len(feats)
    total, count = 0.0, 0
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        batch = task.collate([feats[i] for i in idx], pad_id)
        loss = loss and _has_targets(batch)
        batch = {name: t.to(device) for name, t in batch.items()}
        out = task.forward(model, batch)
        if loss:
            n = _loss_weight(batch)
            total += float(task.loss_from(out, batch)) * n
            count += n
        out = out.float().cpu()
        for row, i in enumerate(idx):
            outputs[i] = out[row, :len(feats[i]["ids"])] if out.dim() == 3 else out[row]
    model.train(was_training)
    return outputs, total / count if loss and count else None


#: batches per group sorted by length (Hugging Face's LengthGroupedSampler also takes 50)
GROUP_BATCHES = 50


def group_by_length(order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator,
                    group: int | None = None) -> list[int]:
    """``order`` (one epoch's shuffled features) rearranged into batches of similar lengths: each
    run of ``group`` batches sorted by length (ties keep their shuffled order), cut into batches,
    and the full batches shuffled with ``generator``; a last, smaller batch stays last, so the
    runner's ``batch_size`` slices are these batches. ``group`` defaults to
    :data:`GROUP_BATCHES`, fewer on a small data set so that an epoch has at least four groups
    (as ``transformers``' length-grouped sampler does): sorting a whole small epoch would make
    the same batches every epoch. Each feature keeps its place count (an epoch is the same
    multiset), and the order is a function of ``order`` and the generator's state."""
    if group is None:
        group = max(1, min(GROUP_BATCHES, len(order) // (4 * batch_size)))
    span = batch_size * group
    batches = []
    for s in range(0, len(order), span):
        chunk = sorted(order[s:s + span], key=lengths.__getitem__)
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    rest = [i for b in batches if len(b) < batch_size for i in b]
    return [i for k in torch.randperm(len(full), generator=generator).tolist() for i in full[k]] + rest


def _has_targets(batch: dict) -> bool:
    return not set(batch) <= {"input_ids", "attention_mask", "token_type_ids"}


def _loss_weight(batch: dict) -> int:
    """What a batch's mean loss is over: its target tokens when the labels are per token, else its rows."""
    labels = batch.get("labels")
    return int((labels != IGNORE).sum()) if labels is not None and labels.dim() == 2 else len(batch["input_ids"])


@torch.no_grad()
def eval_loss(task: Task, model: torch.nn.Module, feats: list[dict], batch_size: int, pad_id: int,
              device: torch.device) -> float | None:
    """The task's training loss on the evaluation features with dropout off: the mean over target
    tokens when the labels are per token (text2text, tagging), else over features. ``None`` when
    the features carry no targets."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    feats = sorted(feats, key=task.length)  # batches of similar length: less padding
    for k in range(0, len(feats), batch_size):
        batch = task.collate(feats[k:k + batch_size], pad_id)
        if not _has_targets(batch):
            model.train(was_training)
            return None
        batch = {name: t.to(device) for name, t in batch.items()}
        n = _loss_weight(batch)
        total += float(task.loss(model, batch)) * n
        count += n
    model.train(was_training)
    return total / count if count else None


def evaluate(task: Task, model, examples: list[dict], feats: list[dict], batch_size: int, pad_id: int,
             device: torch.device, loss: bool = False) -> tuple[dict, list[dict]]:
    """``(metrics, predictions)`` on labelled examples; with ``loss``, ``eval_loss`` among the
    metrics when the features carry targets. A task whose outputs are one forward pass gets the
    loss from the same pass; one that generates them (its own ``infer``: text2text, sft) needs a
    teacher-forced pass of its own (:func:`eval_loss`)."""
    if type(task).infer is Task.infer:
        outputs, loss_now = infer_with_loss(task, model, feats, batch_size, pad_id, device, loss)
    else:
        outputs = task.infer(model, feats, batch_size, pad_id, device)
        loss_now = eval_loss(task, model, feats, batch_size, pad_id, device) if loss else None
    preds = task.decode(examples, feats, outputs)
    scores = task.metrics(examples, preds)
    if loss_now is not None:
        scores["eval_loss"] = round(loss_now, 6)
    return scores, preds


def write_predictions(path: Path, task: Task, examples: list[dict], preds: list[dict],
                      with_gold: bool) -> None:
    lines = []
    for i, (ex, p) in enumerate(zip(examples, preds)):
        rec = {"index": i, **p}
        if with_gold:
            rec["gold"] = task.gold(ex)
        lines.append(json.dumps(rec, ensure_ascii=False))
    write_atomic(path, "".join(line + "\n" for line in lines))


def finetune(source: str, task: str, train: str, out: str, eval: str | None = None,
             resume: bool = False, stop_at: int | None = None, **options) -> dict:
    """Fine-tune ``source`` (a run folder, a Hugging Face folder, or a preset name with
    ``from_scratch=True``) on ``task`` (``classification``, ``regression``, ``tagging``, ``qa``,
    ``text2text``) with the examples in ``train``, evaluating on ``eval`` after every epoch; writes
    the run folder ``out`` and returns the best epoch's evaluation metrics (``accuracy``, ``f1``,
    ... as fit the task) with ``epoch``, ``run`` and a few counts. ``options`` are
    :class:`FinetuneOptions` fields.

    ``train``/``eval`` are files (CSV, TSV, JSONL, CoNLL, SQuAD JSON), Hugging Face
    ``datasets.Dataset`` objects or ``save_to_disk`` folders (their rows are copied into
    ``OUT/data/*.jsonl``, columns named as in the files), or a built-in task
    (``builtin:stdlib-package``, ``builtin:stdlib-docstring``), whose held-out split is the
    evaluation data when ``eval`` is omitted or names the same built-in task.

    Steps go through the trainer's :func:`~pretrainer.train.loop.optimizer_step` (autocast, the
    loss weighted by examples or target tokens, clipping). Under ``torchrun`` each process takes its
    share of every batch (a DistributedDataParallel replica; the first process evaluates and
    writes). The training state is saved after every epoch and when the run is stopped (Ctrl-C,
    ``stop_at``) in ``OUT/resume/``; :func:`resume_finetune` continues from it, with the losses of a
    run that never stopped. ``out`` is locked for the run's life (:mod:`pretrainer.runlock`): a
    second writer is refused.
    """
    runs_itself = getattr(TASKS.get(task), "run", None)  # image-classification: finetune.images
    if runs_itself is not None:
        return runs_itself(source, train, out, eval=eval, resume=resume, stop_at=stop_at, **options)
    check_out_folder(out, "fine-tuning run", ("config.yaml", "checkpoints", "resume", "metrics.jsonl", ".lock"))
    with RunLock(out, "fine-tuning run") as lock:
        return _finetune(source, task, train, out, eval, resume, stop_at, lock, options)


def _finetune(source: str, task: str, train: str, out: str, eval: str | None, resume: bool,
              stop_at: int | None, lock: RunLock, options: dict) -> dict:
    opts = FinetuneOptions(**options)
    opts.validate()
    check_installed(parse_loggers(opts.loggers, "--loggers"), "--loggers")
    run = Path(out)
    if not resume and list_checkpoints(run):
        raise ConfigError(f"--out {run}: already holds a fine-tuning or training run; choose another folder")
    t0 = time.perf_counter()
    _device(opts.device)  # a one-line error for a device that is not there
    env = Env(TrainConfig(device=opts.device, compile="false"))
    device = env.device
    say = lambda text: _say(opts.quiet or not env.master, text)  # noqa: E731
    lock.acquire(env.rank, env.world)  # from here on this job is the folder's only writer
    if env.master:
        for gone in remove_failed_saves(run) + remove_failed_saves(run / "resume"):
            say(f"note: removed {gone}, left by a checkpoint save that did not finish")

    kw = dict(text_column=opts.text_column, text_pair_column=opts.text_pair_column, label_column=opts.label_column)
    if task == "qa":
        kw["stride"] = opts.stride
    if task == "text2text":
        kw = dict(input_column=opts.input_column or opts.text_column,
                  target_column=opts.target_column or opts.label_column, prefix=opts.prefix,
                  mixing=opts.mixing, mixing_temperature=opts.mixing_temperature,
                  max_target_len=opts.max_target_len, beams=opts.beams,
                  no_repeat_ngram=opts.no_repeat_ngram)
    if task == "sft":
        kw = dict(packing=opts.packing, max_new_tokens=opts.max_new_tokens, chat_template=opts.chat_template)
    the_task = make_task(task, **kw)
    if not resume:  # a datasets object or save_to_disk folder: its rows as JSON lines in the run folder
        train, eval = (rows_as_jsonl(src, run / "data" / f"{name}.jsonl", env.master, env.world)
                       for src, name in ((train, "train"), (eval, "eval")))
    train_ex = the_task.load(train, "train")
    the_task.fit_labels(train_ex)
    eval_source = resolve_eval(train, eval)
    eval_ex = the_task.load(eval_source, "eval") if eval_source else None

    torch.manual_seed(opts.seed)
    tokenizer = opts.tokenizer
    if resume and source in PRESETS:  # the tokenizer the run trained (training one again may differ)
        tokenizer = str(run / "tokenizer")
    backbone = load_backbone(source, opts.from_scratch, tokenizer, opts.vocab_size,
                             texts=lambda: the_task.texts(train_ex), warn=say)
    model_settings = {"dropout": opts.dropout, **opts.model}  # the backbone's dropout follows --dropout
    backbone.model = with_settings(backbone.model, model_settings)
    cfg, tok = backbone.model.cfg, backbone.tok.with_roles({"eos": opts.eos_token, "pad": opts.pad_token})
    fmt = InputFormat.for_backbone(cfg.arch, tok, cfg.type_vocab_size)
    max_len = opts.max_len
    if max_len > cfg.max_seq_len:
        say(f"note: --max-len {max_len} capped at the model's context, {cfg.max_seq_len}")
        max_len = cfg.max_seq_len
    train_feats = the_task.encode(train_ex, tok, fmt, max_len)
    eval_feats = the_task.encode(eval_ex, tok, fmt, max_len) if eval_ex else None
    the_task.bind(tok)
    if opts.pooling != "cls" and the_task.reads != "sequence":
        raise ConfigError(f"--pooling {opts.pooling}: pools a sequence head (classification, regression); "
                          f"the {task} task reads {'every token' if the_task.reads == 'tokens' else 'text'}")
    model = the_task.build_model(backbone.model, opts.dropout, opts.pooling).to(device)
    if wants_fast_paths("auto", device, env.dtype):  # as the trainer: float32 on a CPU
        apply_fast_paths(backbone.model)
    lora_cfg = opts.lora_config()
    if lora_cfg is not None:  # LoRA on the backbone: its weights frozen, adapters and task head trained
        lora.add_lora(backbone.model, lora_cfg, "finetune.lora")
    if opts.batch_size < env.world:
        raise ConfigError(f"--batch-size {opts.batch_size}: fewer examples per step than the "
                          f"{env.world} processes that share them")

    steps_per_epoch = math.ceil(len(train_feats) / opts.batch_size)
    total = steps_per_epoch * opts.epochs
    tcfg = TrainConfig(lr=opts.lr, weight_decay=opts.weight_decay, beta1=0.9, beta2=0.999, eps=1e-8,
                       warmup_steps=int(opts.warmup * total), max_steps=total, schedule="linear",
                       min_lr_ratio=0.0)
    optimizer = make_optimizer(model, tcfg, device.type)
    step_fn = TrainStep(model, the_task)
    mode = "single"
    if env.world > 1:  # the backbone's pretraining head takes no part: find_unused_parameters
        step_fn, mode = ddp(step_fn, model, device, find_unused=True), "ddp"
    log_every = opts.log_every or max(1, steps_per_epoch // 5)

    # the run folder: settings first, weights when an epoch is done
    settings = {
        **the_task.state(),
        "from": str(source), "from_scratch": opts.from_scratch, "origin": backbone.origin,
        "train": str(train) + (" (train split)" if train.startswith("builtin:") else ""),
        "eval": (eval_source + " (eval split)") if (eval_source or "").startswith("builtin:") else eval_source,
        "max_len": max_len, "format": fmt.to_dict(),
        "options": {k: v for k, v in dataclasses.asdict(opts).items()
                    if k not in ("text_column", "text_pair_column", "label_column", "quiet")},
        "model": dataclasses.asdict(cfg),
        "call": {"source": str(source), "task": task, "train": str(train), "eval": eval,
                 "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "quiet"}},
        "best": None,
    }
    metrics_path = run / "metrics.jsonl"
    step, start_epoch, start_k = 0, 1, 0
    best, best_metrics, bad_epochs, last_metrics = None, None, 0, None
    if resume:
        ckpt, meta = latest_checkpoint(run / "resume")
        load_weights(model, ckpt)
        load_training_state(ckpt, optimizer, meta)
        step, start_epoch, start_k = meta["step"], meta["epoch"], meta["k"]
        best, best_metrics, bad_epochs = meta["best"], meta["best_metrics"], meta["bad_epochs"]
        last_metrics = meta.get("last_metrics")
        say(f"resuming {run} at epoch {start_epoch}, step {step}")
        if env.master:
            keep = [line for line in metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
            write_atomic(metrics_path, "".join(line + "\n" for line in keep))
    elif env.master:
        with storage(run, "write the run folder"):
            run.mkdir(parents=True, exist_ok=True)
        tok.save(run / "tokenizer")
        write_atomic(run / "config.yaml", yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))
        if the_task.labels is not None:
            write_atomic(run / "labels.json", json.dumps(the_task.labels, ensure_ascii=False, indent=1) + "\n")
        write_atomic(metrics_path, "")
    barrier(env.world)
    guard = DivergenceGuard(tcfg.max_skipped_steps, state=meta if resume else None)  # no spike check
    trackers = Trackers(run, parse_loggers(opts.loggers, "--loggers"), settings, step if resume else None,
                        enabled=env.master)

    def log(record: dict) -> None:
        if env.master:
            with storage(metrics_path, "append to"), open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            trackers.log(record)

    def save_state(epoch: int, k: int) -> None:
        """What resuming needs: weights, optimizer, RNG, and where the loop stands."""
        if env.master:
            save_checkpoint(run / "resume", model, optimizer,
                            {"step": step, "epoch": epoch, "k": k, "best": best,
                             "best_metrics": best_metrics, "bad_epochs": bad_epochs, "last_metrics": last_metrics,
                             **guard.state()}, keep=1)
        barrier(env.world)

    n_params = sum(p.numel() for p in model.parameters())
    say(f"fine-tuning {cfg.preset or cfg.arch} ({n_params:,} parameters, "
        f"{'random weights' if opts.from_scratch else 'pretrained'}) for {task}: "
        f"{len(train_ex):,} training examples ({len(train_feats):,} inputs), "
        f"{len(eval_ex) if eval_ex else 0:,} evaluation examples, {opts.epochs} epochs x "
        f"{steps_per_epoch} steps on {device}{' x%d' % env.world if env.world > 1 else ''}; dropout "
        f"{cfg.dropout:g} in the model{' (model.dropout)' if 'dropout' in opts.model else ''}, "
        f"{opts.dropout:g} on the head; batches {'grouped by length' if opts.group_by_length else 'shuffled'}"
        f"{'; ' + lora.summary(model, lora_cfg) if lora_cfg else ''}")

    select = opts.select or the_task.select
    if select == "loss" and eval_ex is not None and not _has_targets(the_task.collate(eval_feats[:1], fmt.pad_id)):
        raise ConfigError(f"--select loss: the {task} evaluation data gives no loss (no targets); "
                          f"use --select metric")
    criterion = "eval_loss" if select == "loss" else the_task.main_metric

    def count(batch: dict) -> torch.Tensor:
        return batch["_count"] if "_count" in batch else the_task.count(batch)

    model.train()
    epoch, stopped = start_epoch - 1, False
    lengths = [the_task.length(f) for f in train_feats]
    with StopFlag() as flag:
        for epoch in range(start_epoch, opts.epochs + 1):
            gen = torch.Generator().manual_seed(opts.seed * 1000 + epoch)
            order = the_task.epoch_order(train_ex, train_feats, gen)
            if opts.group_by_length:
                order = group_by_length(order, lengths, opts.batch_size, gen)
            window_loss, window_n, window_applied, window_t = 0.0, 0, 0, time.perf_counter()
            for k in range(start_k if epoch == start_epoch else 0, steps_per_epoch):
                idx = order[k * opts.batch_size:(k + 1) * opts.batch_size]
                mine = idx[env.rank::env.world]
                micro = [to_device(b, device) for b in _micro_batches(the_task, train_feats, mine or idx[:1],
                                                                      opts.grad_accum, fmt.pad_id)]
                if not mine:  # a last step with fewer examples than processes: this one adds nothing
                    micro = micro[:1]
                    micro[0]["_count"] = torch.zeros((), dtype=torch.float64, device=device)
                lr = lr_at(step, tcfg)
                set_lr(optimizer, lr)
                result = optimizer_step(step_fn, model, optimizer, micro, count, env, mode, grad_clip=1.0)
                step += 1
                window_n += len(idx)
                if result.skipped:
                    say(f"step {step}: loss {result.loss:.4g}, gradient norm {result.grad_norm:.4g}; "
                        f"not finite, step skipped")
                else:
                    window_loss += result.loss * len(idx)
                    window_applied += len(idx)
                problem = guard.check(result)
                if problem:
                    raise DivergenceError(f"step {step}: {problem}; stopped: fine-tune again with a lower --lr")
                if step % log_every == 0 or k == steps_per_epoch - 1:
                    dt = time.perf_counter() - window_t
                    rec = {"epoch": epoch, "step": step,
                           "loss": window_loss / window_applied if window_applied else None, "lr": lr,
                           "examples_per_s": window_n / dt if dt > 0 else None, "skipped_steps": guard.skipped}
                    log(rec)
                    say(f"epoch {epoch}/{opts.epochs} | step {step:>5}/{total} | loss {math.nan if rec['loss'] is None else rec['loss']:.4f} | "
                        f"lr {lr:.2e} | {rec['examples_per_s'] or 0:,.1f} ex/s"
                        f"{' | skipped %d' % guard.skipped if guard.skipped else ''}")
                    window_loss, window_n, window_applied, window_t = 0.0, 0, 0, time.perf_counter()
                stop = flag.stop or (stop_at is not None and step >= stop_at)
                if env.world > 1:
                    stop = env.all_sum(float(stop)) > 0
                if stop and k < steps_per_epoch - 1:
                    save_state(epoch, k + 1)
                    stopped = True
                    break
            if stopped:
                break

            early_stop = False
            if eval_ex is None:  # nothing to choose by: keep the latest epoch
                if env.master:
                    save_checkpoint(run, model, None, {"step": step, "epoch": epoch}, keep=1)
                best = epoch
            elif env.master:
                scores, preds = evaluate(the_task, model, eval_ex, eval_feats, opts.batch_size, fmt.pad_id, device,
                                         loss=True)
                one = the_task.one_class(preds)
                scores = {**scores, **({"one_class": one} if one is not None else {})}
                value = scores[criterion]
                improved = better_epoch(scores, best_metrics, criterion, lower=select == "loss")
                last_metrics = {"epoch": epoch, **scores}
                log({"epoch": epoch, "step": step, "split": "eval", **scores})
                shown = " | ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "one_class")
                say(f"epoch {epoch}/{opts.epochs} | eval {shown}"
                    f"{f' | predicts {one!r} for every example' if one is not None else ''}"
                    f"{' | best so far' if improved else ''}")
                if improved:
                    best, best_metrics, bad_epochs = epoch, scores, 0
                    save_checkpoint(run, model, None, {"step": step, "epoch": epoch, "metric": criterion,
                                                       "value": value, "metrics": scores}, keep=1)
                else:
                    bad_epochs += 1
                    if opts.patience and bad_epochs >= opts.patience:
                        say(f"early stop: no {'lower' if select == 'loss' else 'better'} {criterion} for "
                            f"{bad_epochs} epochs (--patience)")
                        early_stop = True
            if env.world > 1:  # the first process decided; the others follow
                early_stop = env.all_sum(float(early_stop)) > 0
            save_state(epoch + 1, 0)
            stop = flag.stop or (stop_at is not None and step >= stop_at)
            if env.world > 1:
                stop = env.all_sum(float(stop)) > 0
            if early_stop or (stop and epoch < opts.epochs):
                stopped = not early_stop
                break

    trackers.close()
    if stopped:
        say(f"stopped at step {step}; continue with: pretrainer finetune --resume {run}")
        return {"run": str(run), "task": task, "stopped_at_step": step, "epoch": epoch,
                "preempted": stop_at is None or step < stop_at}  # by a signal, not stop_at
    summary = {"run": str(run), "task": task, "epoch": best, "epochs_run": epoch, "steps": step,
               "train_examples": len(train_ex), "seconds": round(time.perf_counter() - t0, 1)}
    if not env.master:
        return summary
    ckpt, _ = latest_checkpoint(run)
    load_weights(model, ckpt)
    if eval_ex is not None:
        scores, preds = evaluate(the_task, model, eval_ex, eval_feats, opts.batch_size, fmt.pad_id, device)
        write_predictions(run / "predictions.jsonl", the_task, eval_ex, preds, with_gold=True)
        one = the_task.one_class(preds)
        if one is not None:
            print(f"warning: the kept model predicts '{one}' for every evaluation example "
                  f"(accuracy {scores['accuracy']:.4f} = the majority-class baseline "
                  f"{scores['majority_baseline']:.4f} or below), as every epoch's did: it has not learned the "
                  f"task; try another learning rate, more epochs, or --select loss", file=sys.stderr, flush=True)
        scores = {**scores, **({"eval_loss": best_metrics["eval_loss"]} if "eval_loss" in best_metrics else {})}
        flag = {"one_class": one} if the_task.labels is not None and task == "classification" else {}
        summary = {**scores, **summary, **flag, "eval_examples": len(eval_ex), "selected_by": criterion,
                   "last": last_metrics}
        settings["best"] = {"epoch": best, "metric": criterion, "metrics": {**scores, **flag},
                            "checkpoint": str(ckpt.relative_to(run))}
        settings["last"] = last_metrics
    else:
        settings["best"] = {"epoch": best, "checkpoint": str(ckpt.relative_to(run))}
    write_atomic(run / "config.yaml", yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))
    return summary


def better_epoch(scores: dict, best: dict | None, criterion: str, lower: bool = False) -> bool:
    """Whether an epoch with evaluation ``scores`` replaces the kept one (``best``; None: none yet).
    A classifier that gives every example one class (``one_class`` in the scores) never replaces
    one that does not, and one that does not always replaces it; otherwise the better ``criterion``
    wins (``lower``: the lower), and a tie goes to the lower ``eval_loss``, then to the kept epoch."""
    if best is None:
        return True
    constant, kept_constant = scores.get("one_class") is not None, best.get("one_class") is not None
    if constant != kept_constant:
        return kept_constant
    a, b = scores[criterion], best[criterion]
    if a != b:
        return a < b if lower else a > b
    if criterion != "eval_loss" and scores.get("eval_loss") is not None and best.get("eval_loss") is not None:
        return scores["eval_loss"] < best["eval_loss"]
    return False


def _micro_batches(task: Task, feats: list[dict], idx: list[int], n: int, pad_id: int) -> list[dict]:
    """This process's examples of a step as up to ``n`` collated micro-batches (never empty ones)."""
    size = -(-len(idx) // n)
    return [task.collate([feats[i] for i in idx[j:j + size]], pad_id) for j in range(0, len(idx), size)]


def resume_finetune(out: str, quiet: bool = False, stop_at: int | None = None) -> dict:
    """Continue a fine-tuning run that was stopped (or whose machine went away) from its saved
    training state, with the settings it was started with."""
    run = Path(out)
    try:
        settings = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        raise ConfigError(f"{run}: not a fine-tuning run folder (no readable config.yaml)") from None
    if not isinstance(settings, dict) or "call" not in settings or not list_checkpoints(run / "resume"):
        raise ConfigError(f"{run}: no saved training state to resume (resume/ checkpoints)")
    call = settings["call"]
    options = dict(call["options"], quiet=quiet)
    if "group_by_length" not in options:  # a run started before these settings: as it was started
        options["group_by_length"] = False
        options.setdefault("model", {"dropout": (settings.get("model") or {}).get("dropout", 0.0)})
    return finetune(call["source"], call["task"], call["train"], str(run), eval=call["eval"],
                    resume=True, stop_at=stop_at, **options)
