"""One training loop for every objective.

``train(cfg)`` pretrains ``cfg.model`` on ``cfg.data`` with ``cfg.objective`` (a registered
:class:`~pretrainer.train.objectives.Objective`: its batches, its loss, its metrics) and writes the run
folder ``cfg.out``: ``config.yaml`` (fully resolved), ``metrics.jsonl``, ``loss.png``,
``tokenizer/`` and ``checkpoints/``. ``train(cfg, resume=True)`` continues from the newest intact
checkpoint: weights, optimizer moments, RNG streams and the data position (a sample index: the
batch order is a pure function of it, so resuming is a seek) are restored, and the losses that
follow are bit for bit those of a run that never stopped (same device and world size).

Under ``torchrun`` each process trains on its own slice of every global batch (gloo on CPU, nccl
on CUDA), as a DistributedDataParallel replica or, with ``train.parallel=fsdp``, one FSDP2 shard
(:mod:`.parallel`; sharded checkpoints through ``torch.distributed.checkpoint``). Every predicted
token of a global batch weighs the same however it is split, so two processes log the losses of
one with the same global batch, and a run resumes at another number of processes (the global batch
kept by recomputing ``train.grad_accum``). ``init_from`` starts from another run's or a Hugging
Face model's weights (its architecture, a fresh optimizer, step 0).

Divergence guards (:class:`~.loop.DivergenceGuard`): a step with a non-finite loss or gradient norm
is skipped (the data position still advances past it) and counted (``skipped_steps``);
``train.max_skipped_steps`` of them in a row, a loss spike over ``train.spike_factor`` times the
recent median, or non-finite weights stop the run with a :class:`~pretrainer.errors.DivergenceError`,
or with ``train.on_spike=rollback`` reload the last checkpoint and go on with the data after the
spike (at most :data:`MAX_ROLLBACKS` times). A checkpoint is written only with finite weights, and
a periodic one not right after a skipped step, so rotation never removes the last good one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import kernels
from ..config import RunConfig, config_from_file, save_config
from ..data.images import open_split
from ..data.tokens import TokenSplit
from ..errors import (CheckpointError, ConfigError, DataError, DivergenceError, check_out_folder, os_error_of,
                      storage)
from ..model import make_model
from ..model.fast import apply_fast_paths, wants_fast_paths
from ..model.info import human, model_info
from ..model.layers import router_stats
from .objectives import Objective, get_objective
from . import lora
from .parallel import parallel_mode, parallelize
from ..runlock import RunLock
from .checkpoint import (latest_checkpoint, list_checkpoints, remove_failed_saves, restore, resume_point,
                         save_checkpoint, save_sharded_checkpoint)
from .loop import DivergenceGuard, Env, StopFlag, TrainStep, finite_weights, optimizer_step, to_device
from .optim import lr_at, make_optimizer, set_lr
from .prefetch import Prefetcher
from .tracking import Trackers, check_installed, parse_loggers

#: ``train.on_spike=rollback``: rollbacks to the last checkpoint before a divergence stops the run
MAX_ROLLBACKS = 3

# ----------------------------------------------------------------------------------------------
# Logging


def read_metrics(path: Path, warn=None) -> list[dict]:
    """The rows of a ``metrics.jsonl``. A last line cut short (a process killed while writing it)
    is dropped, with a warning through ``warn``; a damaged line before the last is a DataError
    naming the file and the line."""
    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k < len(lines) - 1:
                raise DataError(f"{path}:{i}: not a JSON row ({e.msg})") from None
            if warn is not None:
                warn(f"warning: {path}:{i}: dropped a last line cut short ({len(line)} characters)")
    return rows


class RunLog:
    """Progress on stderr and one JSON object per event in ``metrics.jsonl`` (master only)."""

    def __init__(self, run: Path, enabled: bool, quiet: bool = False):
        self.path = run / "metrics.jsonl"
        self.enabled, self.quiet = enabled, quiet
        self.trackers = None

    def track(self, loggers: str, config: dict, resume_step: int | None) -> None:
        """Send every line's scalars to the loggers ``train.loggers`` names besides jsonl."""
        if self.enabled:
            self.trackers = Trackers(self.path.parent, parse_loggers(loggers), config, resume_step)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint we restart from."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path, warn=lambda text: print(text, file=sys.stderr, flush=True))
                if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with storage(self.path, "rewrite", cleanup=tmp):
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with storage(self.path, "append to"), open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.trackers is not None:
                self.trackers.log(record)

    def say(self, text: str) -> None:
        if self.enabled and not self.quiet:
            print(text, file=sys.stderr, flush=True)


def plot_losses(run: Path) -> Path | None:
    """Train and validation loss against steps, as ``RUN/loss.png``."""
    try:
        from ..plotting import pyplot, save

        plt = pyplot()
    except ImportError:
        return None
    rows = read_metrics(run / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2, alpha=0.85)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.6, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run / "loss.png"
    try:
        return save(fig, out, dpi=110)
    except Exception as e:  # noqa: BLE001 - a plot is not worth failing a finished run for
        if os_error_of(e) is None:
            raise
        print(f"warning: {out}: not written ({os_error_of(e).strerror})", file=sys.stderr, flush=True)
        return None


# ----------------------------------------------------------------------------------------------
# The loop


def prepare_run_config(cfg: RunConfig, split: TokenSplit) -> RunConfig:
    """Fill what depends on the data (vocabulary size; for images, the image size, channels and
    classes) and validate."""
    from ..data.images import ImageSplit

    if isinstance(split, ImageSplit) or cfg.model.arch == "vit":
        if not isinstance(split, ImageSplit):
            raise ConfigError(f"model.arch=vit reads images, but data={cfg.data} holds token shards "
                              f"(prepare images with: pretrainer prepare --images DIR --out DATA)")
        from .image_objectives import fit_model_to_images

        fit_model_to_images(cfg, split)
        cfg.validate()
        return cfg
    from .objectives import OBJECTIVES

    # the data's tokens, and those an objective adds (gato: the value bins, its separator and patch place)
    extra = getattr(OBJECTIVES.get(cfg.objective), "extra_vocab", 0)
    data_vocab = split.vocab_size + extra
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = data_vocab
    elif cfg.model.vocab_size < data_vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's "
                          f"vocabulary ({split.vocab_size}, {Path(cfg.data) / 'manifest.json'})"
                          f"{' + %d tokens of objective=%s' % (extra, cfg.objective) if extra else ''}")
    cfg.validate()
    return cfg


#: What a run folder holds (any one makes a folder a run folder for ``out``).
RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.jsonl", ".lock")


def train(cfg: RunConfig, resume: bool = False, stop_at: int | None = None, quiet: bool = False) -> dict:
    """Run (or resume) training; returns a summary dict. ``stop_at`` ends the run early after
    checkpointing at that step, as a preemption would (used to test exact resume). The run folder
    is locked for the run's life (:mod:`pretrainer.runlock`): a second writer is refused."""
    if not (cfg.data and cfg.out):
        cfg.validate()  # names what is missing, in one line, before anything touches a folder
    check_out_folder(cfg.out, "run", RUN_MARKERS)
    threads = torch.get_num_threads()
    try:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        with RunLock(cfg.out, "run") as lock:
            return _train(cfg, resume, stop_at, quiet, lock)
    finally:
        torch.set_num_threads(threads)  # a library caller's setting is theirs


def _train(cfg: RunConfig, resume: bool, stop_at: int | None, quiet: bool, lock: RunLock) -> dict:
    run = Path(cfg.out)
    if resume and not (run / "config.yaml").is_file():
        shared = (" (under torchrun on several machines, out= must be a folder all of them share)"
                  if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
        raise CheckpointError(f"{run}: not a run folder (no config.yaml){shared}")
    if cfg.init_from and not resume:  # the source's architecture and sizes, its weights below
        cfg.model = initial_model_config(cfg.init_from, cfg.data)
    cfg.validate()
    check_installed(parse_loggers(cfg.train.loggers))  # a missing tensorboard or wandb: before any work
    if resume:  # the data must speak the run's tokenizer (checked before its vocabulary size)
        check_same_tokenizer(run, cfg.data, "data")
    env = Env(cfg.train)
    torch.manual_seed(cfg.train.seed)
    train_split = open_split(cfg.data, "train")  # token shards, or images (pretrainer.data.images)
    cfg = prepare_run_config(cfg, train_split)
    log = RunLog(run, env.master, quiet)
    t = cfg.train
    val_split = open_split(cfg.data, "val", t.seq_len)
    if len(val_split) < t.seq_len + 1:
        log.say(f"warning: {cfg.data} has {len(val_split)} validation tokens, fewer than one window "
                f"of seq_len={t.seq_len}; training without validation")
        val_split = None
    objective = get_objective(cfg)
    batches = objective.batches(train_split)
    if cfg.train.prefetch:  # the next steps' batches built while the model computes
        batches = Prefetcher(batches, stride=env.world * cfg.train.batch_size, count=cfg.train.batch_size,
                             depth=cfg.train.prefetch)
    step, samples = 0, 0
    lock.acquire(env.rank, env.world)  # from here on this job is the folder's only writer
    if env.master:
        for gone in remove_failed_saves(run):
            log.say(f"note: removed {gone}, left by a checkpoint save that did not finish")
    if resume:
        ckpt, meta = resume_point(run, warn=(lambda s: print(s, file=sys.stderr, flush=True))
                                  if env.master else (lambda s: None))
        step, samples = meta["step"], meta["samples"]
        if step >= t.max_steps:  # a finished run: say so, change nothing
            if env.master:  # said even with --quiet: the command did nothing
                print(f"{run}: nothing to do, the run is at step {step} and train.max_steps={t.max_steps}; "
                      f"to train further: pretrainer pretrain --resume {run} train.max_steps=N", file=sys.stderr)
            return {"run": str(run), "step": step, "val_loss": None, "tokens": samples * t.seq_len, "seconds": 0.0,
                    "loss_png": str(run / "loss.png"), "skipped_steps": meta.get("skipped_steps", 0),
                    "preempted": False, "nothing_to_do": True}
        keep_global_batch(t, meta, env.world, log.say)
        explain_schedule_change(run, t, step, lambda text: env.master and print(text, file=sys.stderr, flush=True))
    global_batch = t.batch_size * t.grad_accum * env.world
    tokens_per_step = global_batch * t.seq_len
    if tokens_per_step > len(train_split):
        raise ConfigError(
            f"train.batch_size={t.batch_size} x train.grad_accum={t.grad_accum}"
            f"{' x %d processes' % env.world if env.world > 1 else ''} x train.seq_len={t.seq_len} = "
            f"{tokens_per_step:,} tokens per step, more than the {len(train_split):,} tokens of {cfg.data}'s "
            f"train split; lower them or prepare more data")
    guard = DivergenceGuard(t.max_skipped_steps, t.spike_factor, meta if resume else None)
    rollbacks = meta.get("rollbacks", 0) if resume else 0

    mode = parallel_mode(t, env.world)
    with torch.device("meta") if mode == "fsdp" else contextlib.nullcontext():  # sharded: no full copy
        product = make_model(cfg.model)  # what the run produces
        model = objective.wrap(product)  # what it trains and checkpoints (ELECTRA: + its generator)
    if wants_fast_paths(t.fast_paths, env.device, env.dtype):
        apply_fast_paths(model)
    if t.lora.r:  # LoRA: adapters in place and every other weight frozen, before DDP takes the parameters
        lora.check_run(cfg, mode, product, model)
        lora.add_lora(product, t.lora)
    step_fn = parallelize(model, objective, env, t)
    if cfg.init_from and not resume:
        load_initial_weights(product, cfg.init_from, sharded=mode == "fsdp")
    # the objective's own start (distill: the teacher, and the student's weights taken from it)
    note = objective.prepare(product, env.device, initialise=not resume and not cfg.init_from,
                             sharded=mode == "fsdp")
    optimizer = make_optimizer(model, t, env.device.type)

    if resume:
        restore(ckpt, model, optimizer, meta, env.rank, sharded=mode == "fsdp")
        resumed_window = (meta.get("window_loss", 0.0), meta.get("window_steps", 0),
                          meta.get("window_skipped", 0), meta.get("window_grad_norm", 0.0))
        objective.load_window_state(meta.get("objective_window") if env.master else None)  # (a global sum)
        log.say(f"resuming {run} from {ckpt.name} (step {step}, {samples * t.seq_len:,} tokens"
                f"{', written by %d processes' % meta['world_size'] if meta.get('world_size', 1) != env.world else ''})")
        log.truncate_after(step)
        if env.master:  # the values in force from here (train.max_steps=... extends a run)
            save_config(cfg, run / "config.yaml")
    elif env.master:
        if list_checkpoints(run):  # (a folder whose first save never finished holds none)
            raise ConfigError(f"out={run}: already holds a run; resume it with --resume {run} "
                              f"or choose another out")
        with storage(run, "write the run folder"):
            run.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run / "config.yaml")
            tok_src = Path(cfg.data) / "tokenizer"
            if tok_src.is_dir():
                shutil.copytree(tok_src, run / "tokenizer", dirs_exist_ok=True)
            (run / "metrics.jsonl").write_text("")
    if env.world > 1:
        dist.barrier()
        if not (run / "config.yaml").is_file():  # another machine's first process wrote it
            raise CheckpointError(f"{run}: process {env.rank} cannot see the run folder that process 0 "
                                  f"wrote; on several machines out= must be a folder all of them share")
    log.track(t.loggers, cfg.to_dict(), step if resume else None)

    info = model_info(cfg.model, t.seq_len)
    flops_per_step = (info["flops_per_token"] + objective.extra_flops_per_token(t.seq_len)) * tokens_per_step
    peak = env.peak_flops()

    if step == 0:
        log.say(f"model {cfg.model.preset or 'custom'}: {info['params']:,} parameters "
                f"({info['params_non_embedding']:,} non-embedding), {human(info['flops_per_token'])}"
                f"FLOP/token; objective {objective.name}; {t.max_steps} steps x {tokens_per_step:,} "
                f"tokens on {env.device}{' x%d (%s)' % (env.world, mode) if env.world > 1 else ''} "
                f"({str(env.dtype).replace('torch.', '')}{', compiled' if env.compile else ''}"
                f"{', activation checkpointing ' + t.activation_checkpointing if t.activation_checkpointing != 'none' else ''}"
                f"); data {len(train_split):,} train tokens"
                f"{'; weights from ' + cfg.init_from if cfg.init_from else ''}"
                f"{'; ' + note if note else ''}{'; ' + lora.summary(model, t.lora) if t.lora.r else ''}")

    def evaluate() -> dict:
        """The eval line's fields (loss; perplexity for a language model's loss; masked-token accuracy
        for mlm; what the objective adds), and prints them."""
        # eval_batches global batches of windows: the same windows however the global batch is
        # split into processes and micro-steps (a run resumed at another world size included)
        r = evaluate_split(model, objective, val_split, t.batch_size, t.eval_batches * t.grad_accum, env,
                           step=step_fn if mode == "fsdp" else None)
        v = r["val_loss"]
        rec = {"val_loss": v, **({"val_ppl": math.exp(min(v, 50))} if objective.perplexity else {}), **r}
        acc = f" | ppl {rec['val_ppl']:.1f}" if "val_ppl" in rec else ""
        acc += f" | accuracy {r['val_accuracy']:.4f}" if "val_accuracy" in r else ""
        acc += "".join(f" | {k[4:-9]} accuracy {r[k]:.4f}" for k in ("val_nsp_accuracy", "val_sop_accuracy") if k in r)
        log.say(f"step {step:>6} | val loss {v:.4f}{acc}{objective.eval_note(r)}")
        return rec

    def checkpoint(at_step: int) -> None:
        if not finite_weights(model, env):  # never saved: the last good checkpoint stays the newest
            diverged("the weights are not finite")  # stops the run, or rolls back (and saves that)
        # the partial logging window goes too, so the next logged loss averages the same steps as
        # in a run that never stopped; and the divergence guard's counts and recent losses
        state = {"step": at_step, "samples": samples, "tokens": samples * t.seq_len,
                 "global_batch": global_batch, "window_loss": window_loss, "window_steps": window_steps,
                 "window_skipped": window_skipped, "window_grad_norm": window_norm,
                 "rollbacks": rollbacks, **guard.state()}
        window = objective.window_state(lambda x: env.all_sum_tensor(x.to(env.device)).cpu())
        if window:  # what the objective's own logged metrics have gathered, over every process
            state["objective_window"] = window
        if mode == "fsdp":
            save_sharded_checkpoint(run, model, optimizer, state, env.rank, env.world,
                                    keep=t.keep_checkpoints)
            return
        if env.master:
            save_checkpoint(run, model, optimizer, dict(state, world_size=env.world),
                            keep=t.keep_checkpoints)
        if env.world > 1:
            dist.barrier()

    def diverged(reason: str) -> None:
        """Roll back to the last checkpoint (``train.on_spike=rollback``) or stop the run."""
        nonlocal rollbacks
        try:
            ckpt, meta = latest_checkpoint(run, warn=lambda s: None)
        except CheckpointError:
            ckpt = None
        where = {"step": step, "tokens": samples * t.seq_len, "reason": reason}
        if t.on_spike == "rollback" and ckpt is not None and rollbacks < MAX_ROLLBACKS:
            restore(ckpt, model, optimizer, meta, env.rank, sharded=mode == "fsdp")
            rollbacks += 1
            guard.in_a_row = 0
            log.write({**where, "rollback": ckpt.name})
            log.say(f"step {step}: {reason}; rolled back to {ckpt.name} ({rollbacks}/{MAX_ROLLBACKS}), "
                    f"going on with the data after step {step}")
            return
        log.write({**where, "diverged": True, "skipped_steps": guard.skipped})
        then = (f"the last good checkpoint is {ckpt}; lower train.lr (or raise train.warmup_steps) and "
                f"continue with --resume {run}" if ckpt else "no checkpoint was written; start again "
                "with a lower train.lr (or a longer train.warmup_steps)")
        raise DivergenceError(f"step {step}: {reason}; stopped: {then}")

    if step == 0 and val_split is not None:
        log.write({"step": 0, "tokens": 0, **evaluate()})

    model.train()
    start_step = step
    window_t0, window_tokens, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
    window_skipped, window_norm = 0, 0.0
    if resume:
        window_loss, window_steps, window_skipped, window_norm = resumed_window
    run_t0 = time.perf_counter()
    last_val, preempted = None, False
    kernels.used.clear()  # what the training steps run, reported after the first one
    with StopFlag() as flag:
        while step < t.max_steps:
            lr = lr_at(step, t)
            set_lr(optimizer, lr)
            micro_batches = [to_device(batches.batch(samples + (m * env.world + env.rank) * t.batch_size,
                                                     t.batch_size), env.device)
                             for m in range(t.grad_accum)]
            result = optimizer_step(step_fn, model, optimizer, micro_batches, objective.count, env,
                                    mode, t.grad_clip)
            step += 1
            if step == start_step + 1 and kernels.used:
                log.say(f"fused CPU kernels: {', '.join(sorted(kernels.used))}")
            samples += global_batch  # a skipped step's data is skipped too
            window_steps += 1
            window_tokens += tokens_per_step
            if result.skipped:
                window_skipped += 1
                log.say(f"step {step}: loss {result.loss:.4g}, gradient norm {result.grad_norm:.4g}; "
                        f"not finite, step skipped")
            else:
                window_loss += result.loss
                window_norm += result.grad_norm
            problem = guard.check(result)
            if problem:
                diverged(problem)

            if step % t.log_every == 0 or step == t.max_steps:
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - window_t0
                applied = window_steps - window_skipped  # the steps not skipped: their mean loss
                loss_avg = window_loss / applied if applied else math.nan
                tps = window_tokens / dt
                rec = {"step": step, "loss": loss_avg, "lr": lr, "tokens": samples * t.seq_len,
                       "tokens_per_s": tps, "ms_per_step": 1000 * dt / window_steps,
                       "flops_per_s": flops_per_step * window_steps / dt,
                       "grad_norm": window_norm / applied if applied else math.nan,
                       "skipped_steps": guard.skipped}
                if not applied:  # a window of skipped steps only: no loss (JSON has no NaN)
                    del rec["loss"], rec["grad_norm"]
                if peak:
                    rec["mfu"] = rec["flops_per_s"] / (peak * env.world)
                routing = router_stats(model, all_sum=lambda x: env.all_sum_tensor(x.to(env.device)).cpu())
                rec.update(routing or {})
                rec.update(objective.train_metrics(lambda x: env.all_sum_tensor(x.to(env.device)).cpu()))
                log.write(rec)
                elapsed = time.perf_counter() - run_t0
                eta = elapsed / (step - start_step) * (t.max_steps - step)
                log.say(f"step {step:>6}/{t.max_steps} | loss {loss_avg:.4f} | lr {lr:.2e} | "
                        f"{tps:,.0f} tok/s | {rec['ms_per_step']:.0f} ms/step"
                        f"{' | mfu %.1f%%' % (100 * rec['mfu']) if 'mfu' in rec else ''} | "
                        f"{'experts max/mean %.2f, dropped %.1f%% | ' % (routing['moe_load_max'], 100 * routing['moe_dropped']) if routing else ''}"
                        f"{'skipped %d | ' % guard.skipped if guard.skipped else ''}"
                        f"eta {_fmt_time(eta)}")
                window_t0, window_tokens, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
                window_skipped, window_norm = 0, 0.0

            out_of_time = bool(t.max_minutes) and time.perf_counter() - run_t0 >= 60 * t.max_minutes
            if t.max_minutes and env.world > 1:  # the clocks of the processes differ: agree
                out_of_time = env.all_mean(float(out_of_time)) > 0
            is_last = step == t.max_steps or out_of_time
            if val_split is not None and ((t.eval_every and step % t.eval_every == 0) or is_last):
                rec = evaluate()
                last_val = rec["val_loss"]
                log.write({"step": step, "tokens": samples * t.seq_len, **rec})
                if t.plot and env.master:
                    plot_losses(run)
                window_t0 = time.perf_counter()
            signalled = flag.stop
            if env.world > 1:  # a signal may reach the processes at different steps: agree
                signalled = env.all_mean(float(signalled)) > 0
            stopping = signalled or (stop_at is not None and step >= stop_at)
            # not while steps are being skipped (those weights just gave a non-finite loss), but
            # always at the end, or to resume a stopped run
            due = t.checkpoint_every and step % t.checkpoint_every == 0 and not guard.in_a_row
            if due or is_last or stopping:
                checkpoint(step)
                window_t0 = time.perf_counter()
            if stopping and not is_last:
                log.say(f"stopped at step {step}; continue with: pretrainer pretrain --resume {run}")
                preempted = signalled
                break
            if out_of_time and step < t.max_steps:
                log.say(f"time budget of {t.max_minutes:g} min reached at step {step} of {t.max_steps}; "
                        f"continue with: pretrainer pretrain --resume {run}")
                break
    log.close()
    if isinstance(batches, Prefetcher):
        batches.close()
    if t.plot and env.master:
        plot_losses(run)
    return {"run": str(run), "step": step, "val_loss": last_val,
            "tokens": samples * t.seq_len, "seconds": time.perf_counter() - run_t0,
            "loss_png": str(run / "loss.png"), "skipped_steps": guard.skipped, "preempted": preempted,
            "out_of_time": step < t.max_steps and not preempted and stop_at is None}


@torch.no_grad()
def evaluate_split(model, objective: Objective, split: TokenSplit, batch_size: int,
                   max_batches: int, env: Env | None = None, seq_len: int | None = None,
                   step: torch.nn.Module | None = None, progress=None) -> dict:
    """The objective's validation metrics (``val_loss``: the mean cross-entropy over the predicted
    tokens; the masked LM adds ``val_accuracy``) over the first ``max_batches * world`` validation
    batches of ``batch_size`` windows: the same windows for the same global batch, whatever the
    number of processes (each process takes every world-th batch and the sums are added).

    ``step``: the module to run the batches through (a sharded :class:`TrainStep` under fsdp, whose
    forward gathers the weights; every process then runs the same number of forwards).
    ``progress(done, total, seconds)`` is called every 5 seconds (the ``evaluate`` command's lines)."""
    run = step if step is not None else TrainStep(model, objective)
    was_training = run.training
    run.eval()
    device = env.device if env else next(model.parameters()).device
    rank, world = (env.rank, env.world) if env else (0, 1)
    batches = list(objective.eval_batches(split, batch_size, max_batches * world, seq_len))
    mine = batches[rank::world]
    sums: dict[str, float] = {}
    started = last = time.perf_counter()
    n = -(-len(batches) // world) if step is not None else len(mine)
    for i in range(n):
        if progress is not None and time.perf_counter() - last > 5:
            last = time.perf_counter()
            progress(i, n, last - started)
        batch = mine[i] if i < len(mine) else batches[0]  # a spare forward, not counted
        with env.autocast() if env else contextlib.nullcontext():
            part = run(to_device(batch, device), objective.eval_sums)
        if i < len(mine):
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v.double()
    keys = objective.sums  # every process reduces the same keys, even one that had no batch
    total = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(total)
    run.train(was_training)
    return objective.metrics(dict(zip(keys, total.tolist())))


def explain_schedule_change(run: Path, t, step: int, say) -> None:
    """On resume with settings of the schedule changed (``train.max_steps=`` to extend a run, a new
    ``lr`` ...): say what the learning rate does from here, since the schedule is recomputed from
    the new values (extending a cosine run lifts its rate again)."""
    try:
        before = config_from_file(run / "config.yaml").train
    except Exception:  # noqa: BLE001 - the run's own file was read already; nothing to compare
        return
    keys = ("max_steps", "lr", "warmup_steps", "schedule", "min_lr_ratio")
    changed = [k for k in keys if getattr(before, k) != getattr(t, k)]
    if not changed:
        return
    was, now = lr_at(step, before), lr_at(step, t)
    what = ", ".join(f"train.{k} {getattr(before, k)} -> {getattr(t, k)}" for k in changed)
    say(f"note: {what}: the {t.schedule} schedule is recomputed, so at step {step} the learning rate "
        f"goes from {was:.3g} to {now:.3g}{' (rising again)' if now > was * 1.001 else ''}, then "
        f"{'decays' if t.schedule != 'constant' else 'stays'} to step {t.max_steps}")


def keep_global_batch(t, meta: dict, world: int, say) -> None:
    """Resuming at another number of processes keeps the global batch (sequences per optimizer
    step) the checkpoint was trained with: ``train.grad_accum`` is recomputed, or the run is
    refused with the keys to change."""
    saved = meta.get("global_batch")
    if saved is None or t.batch_size * t.grad_accum * world == saved:
        return
    if saved % (t.batch_size * world) == 0:
        new = saved // (t.batch_size * world)
        say(f"note: {world} processes now, {meta.get('world_size', '?')} before: train.grad_accum "
            f"{t.grad_accum} -> {new} keeps the global batch of {saved} sequences")
        t.grad_accum = new
        return
    raise ConfigError(f"resuming at {world} processes: the run's global batch is {saved} sequences "
                      f"(train.batch_size x train.grad_accum x processes), which train.batch_size="
                      f"{t.batch_size} cannot give; set train.batch_size and train.grad_accum so that "
                      f"their product x {world} = {saved}")


def initial_model_config(source: str, data: str | None = None):
    """``init_from``: the model config of the source (a run, a checkpoint folder or a Hugging Face
    folder), checked against the data: the data must be tokenized with the source's tokenizer."""
    from ..api import find_run_files

    p = Path(source)
    if not p.exists():
        raise ConfigError(f"init_from={source}: no such run, checkpoint or Hugging Face folder")
    if (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        from ..interop.hf import hf_folder_config

        model_cfg = hf_folder_config(p)  # (a BertForMaskedLM without its pooler, ...: as imported)
        tok_dirs = [p]
    else:
        config_file, _ = find_run_files(p, warn=lambda s: None)  # load_initial_weights says it
        model_cfg = config_from_file(config_file).model
        tok_dirs = [config_file.parent / "tokenizer"]
    tok_dirs = [d for d in tok_dirs if (d / "tokenizer.json").is_file()]  # (an image model has none)
    if data and tok_dirs:
        from ..data.prepare import load_manifest
        from ..tokenization import load_tokenizer

        want = load_manifest(Path(data))["tokenizer"].get("hash")
        for d in tok_dirs:
            if want and not load_tokenizer(d).has_hash(want):
                raise ConfigError(f"data={data} was tokenized with another tokenizer than init_from="
                                  f"{source}'s; prepare it with --tokenizer {d}")
    return model_cfg


def check_same_tokenizer(run: Path, data: str | Path, what: str) -> None:
    """A ConfigError when the data folder was tokenized with another tokenizer than the run was
    trained with (the manifest's tokenizer hash against the run's ``tokenizer/``): token ids would
    mean other words, and every number computed on them would be silently wrong."""
    from ..data.prepare import load_manifest
    from ..tokenization import load_tokenizer

    tok_dir = Path(run) / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():  # (an image run has no tokenizer)
        return
    want = load_manifest(Path(data))["tokenizer"].get("hash")
    if not want:
        return
    have = load_tokenizer(tok_dir)
    if not have.has_hash(want):
        raise ConfigError(f"{what}={data} was tokenized with another tokenizer (hash {want}) than the run "
                          f"{run} (hash {have.hash}); use data prepared with --tokenizer {tok_dir}")


def load_initial_weights(model: torch.nn.Module, source: str, sharded: bool = False) -> None:
    """``init_from``: the weights of a run, a checkpoint folder or a Hugging Face folder (their
    model config is the run's; :func:`initial_model_config`), loaded into ``model`` (each process
    keeping its shards when ``sharded``)."""
    from ..api import load

    src = load(source, fast_paths=False).float()
    weights = src.state_dict()
    if not sharded:
        lora.load_base(model, weights)  # (a LoRA run's: into the frozen base layers; a ViT's classifier may start fresh)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def resume_config(run: str | Path, overrides: list[str] = ()) -> RunConfig:
    """The config a run was started with, plus overrides (e.g. ``train.max_steps=`` to extend)."""
    from ..config import apply_override

    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run}: not a run folder (no config.yaml)")
    cfg = config_from_file(path)
    for item in overrides:
        apply_override(cfg, item)
    cfg.out = str(run)
    return cfg


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
