"""The training step that pretraining and fine-tuning share, and where a process runs.

:func:`optimizer_step` is the one place an optimizer steps: the micro-batches of this process are
run under autocast (gradient synchronisation only after the last one: DDP's ``no_sync``, FSDP2's
``set_requires_gradient_sync``), each micro-batch's mean loss weighted by its share of the global
batch's predicted tokens (or examples), so that the gradient is that of one mean over the whole
global batch however it is split into micro-steps and processes; then gradient clipping, the
optimizer step and ``zero_grad``. A step whose loss or gradient norm is not finite never reaches
the weights: the optimizer does not step (every process agrees: the loss and a non-finite flag are
summed over them), and the caller counts it (:class:`DivergenceGuard`). The pretraining trainer (:mod:`.trainer`) and the fine-tuning
runner (:mod:`pretrainer.finetune.runner`) differ only in where batches come from and in their
evaluation and checkpoint policies.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import statistics
from collections import deque
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..errors import ConfigError
from ..model.layers import moe_aux_loss, moe_layers


#: Peak dense bf16 throughput (FLOP/s) of accelerators we know, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


# ----------------------------------------------------------------------------------------------
# Environment


class Env:
    """Where this process runs: device, distributed rank/world, autocast dtype."""

    def __init__(self, t: TrainConfig):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = t.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError("train.device='cuda' but no CUDA device is available; use train.device=cpu")
            if self.world > 1:
                device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(torch.device(device))
        self.device = torch.device(device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        dtype = t.dtype
        if dtype == "auto":
            dtype = ("bfloat16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported()
                     else "float32")
        self.dtype = getattr(torch, dtype)
        compile_opt = str(t.compile).lower()
        self.compile = compile_opt == "true" or (compile_opt == "auto" and self.device.type == "cuda")
        self.master = self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def all_mean(self, value: float) -> float:
        return self.all_sum(value) / self.world

    def all_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def all_sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the processes of a tensor (no host sync)."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        for key, peak in PEAK_FLOPS.items():
            if key in name:
                return peak if self.dtype != torch.float32 else None
        return None




class StopFlag:
    """Turns SIGINT/SIGTERM into a clean stop: finish the step, save a checkpoint, exit."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.stop:  # second signal: give up at once
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)




class TrainStep(torch.nn.Module):
    """The model and its objective's (or fine-tuning task's) loss as one module:
    ``TrainStep(model, objective)(batch)`` is ``objective.loss(model, batch)``, plus the auxiliary
    losses a mixture-of-experts model leaves from that forward pass (load balance, router z-loss:
    :func:`~pretrainer.model.layers.moe_aux_loss`). Data-parallel wrappers (DDP, FSDP2) wrap this
    module, so everything the loss touches, the output layer of the fused head included, runs
    inside their forward."""

    def __init__(self, model: torch.nn.Module, objective):
        super().__init__()
        self.model, self.objective = model, objective
        self.moe = moe_layers(model)  # found once: a plain list, not submodules of this one

    def forward(self, batch: dict, fn=None):
        """The training loss of the batch, or ``fn(model, batch)`` (evaluation: ``eval_sums``)."""
        if fn is not None:
            return fn(self.model, batch)
        loss = self.objective.loss(self.model, batch)
        aux = moe_aux_loss(self.moe)
        return loss if aux is None else loss + aux.to(loss.dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class StepResult(NamedTuple):
    """What :func:`optimizer_step` did; the same on every process."""

    loss: float  # the global batch's mean loss
    grad_norm: float  # the gradient's norm over all parameters, before clipping
    skipped: bool  # the loss or the gradient norm was not finite: the weights were left as they were


def optimizer_step(step_fn: torch.nn.Module, model: torch.nn.Module, optimizer, micro_batches: list[dict],
                   count, env: Env, mode: str = "single", grad_clip: float = 0.0) -> StepResult:
    """One optimizer step over this process's ``micro_batches``, unless the loss or the gradient
    norm is not finite (then the gradients are dropped and the weights and optimizer state stay as
    they were: the step is skipped, as PaLM skips them).

    ``step_fn(batch)`` is the mean loss of a batch (a :class:`TrainStep`, possibly wrapped by DDP or
    sharded by FSDP2: ``mode`` is ``single``, ``ddp`` or ``fsdp``); ``count(batch)`` is the number
    of things that mean is over (predicted tokens, examples). Each micro-batch's loss is scaled by
    its share of the global count, times the number of processes since DDP and FSDP average
    gradients over them. The loss and the non-finite check are summed over the processes in one
    collective, so that every process takes the same decision."""
    counts = [count(b) for b in micro_batches]
    total = env.all_sum_tensor(torch.stack(counts).sum())
    step_loss = torch.zeros((), dtype=torch.float64, device=env.device)
    last = len(micro_batches) - 1
    for m, batch in enumerate(micro_batches):
        if mode == "ddp" and m < last:
            ctx = step_fn.no_sync()
        else:
            ctx = contextlib.nullcontext()
            if mode == "fsdp":
                step_fn.set_requires_gradient_sync(m == last)
        with ctx, env.autocast():
            loss = step_fn(batch)
        share = counts[m] / total
        (loss * (share * env.world).to(loss.dtype)).backward()
        step_loss += loss.detach().double() * share
    norm = grad_norm(model, grad_clip)
    summed = env.all_sum_tensor(torch.stack([step_loss, (~torch.isfinite(norm)).double()]))
    loss, bad_norms, norm = torch.cat([summed, norm.double().reshape(1)]).tolist()  # the step's one host sync
    skipped = not math.isfinite(loss) or bad_norms > 0
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, norm, skipped)


def grad_norm(model: torch.nn.Module, clip: float = 0.0) -> torch.Tensor:
    """The norm of all the model's gradients (of the whole model when they are sharded), after
    scaling them down to ``clip`` when it is larger (``clip`` > 0)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


def finite_weights(model: torch.nn.Module, env: Env) -> bool:
    """Whether every weight is finite, on every process (FSDP2: each checks its shards)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    bad = torch.stack([~torch.isfinite(t.detach()).all() for t in local]).sum().double()
    return env.all_sum_tensor(bad).item() == 0


class DivergenceGuard:
    """Watches the steps for divergence (PaLM, Chowdhery et al. 2022, section 5.1: loss spikes).

    :meth:`check` takes each step's :class:`StepResult` and returns why the run should stop, or
    None: ``max_skipped`` skipped steps in a row (0: never), or a loss above ``spike_factor`` times
    the median of the last :attr:`WINDOW` steps' losses, the median counted as at least 1 nat so that
    a memorised corpus' tiny losses raise no false alarm (0: off). Skipped and spiking steps are not
    added to that window. Its :meth:`state` goes into checkpoints, so a resumed run decides alike."""

    WINDOW = 100

    def __init__(self, max_skipped: int, spike_factor: float = 0.0, state: dict | None = None):
        self.max_skipped, self.spike_factor = max_skipped, spike_factor
        state = state or {}
        self.skipped = state.get("skipped_steps", 0)  # over the whole run
        self.in_a_row = state.get("skipped_in_a_row", 0)
        self.recent = deque(state.get("recent_losses", []), maxlen=self.WINDOW)

    def check(self, r: StepResult) -> str | None:
        self.skipped += r.skipped
        self.in_a_row = self.in_a_row + 1 if r.skipped else 0
        if self.max_skipped and self.in_a_row >= self.max_skipped:
            return (f"{self.in_a_row} steps in a row with a non-finite loss or gradient norm "
                    f"(train.max_skipped_steps={self.max_skipped})")
        if self.spike_factor and self.recent:  # a finite loss, even of a skipped step, may spike
            median = statistics.median(self.recent)
            if math.isfinite(r.loss) and r.loss > self.spike_factor * max(median, 1.0):
                return (f"loss spike: {r.loss:.4g}, over {self.spike_factor:g}x the median of the last "
                        f"{len(self.recent)} steps' losses ({median:.4g}; train.spike_factor)")
        if not r.skipped:
            self.recent.append(r.loss)
        return None

    def state(self) -> dict:
        return {"skipped_steps": self.skipped, "skipped_in_a_row": self.in_a_row,
                "recent_losses": list(self.recent)}
