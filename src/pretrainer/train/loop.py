"""The training step that pretraining and fine-tuning share, and where a process runs.

:func:`optimizer_step` is the one place an optimizer steps: the micro-batches of this process are
run under autocast (gradient synchronisation only after the last one: DDP's ``no_sync``, FSDP2's
``set_requires_gradient_sync``), each micro-batch's mean loss weighted by its share of the global
batch's predicted tokens (or examples), so that the gradient is that of one mean over the whole
global batch however it is split into micro-steps and processes; then gradient clipping, the
optimizer step and ``zero_grad``. The pretraining trainer (:mod:`.trainer`) and the fine-tuning
runner (:mod:`pretrainer.finetune.runner`) differ only in where batches come from and in their
evaluation and checkpoint policies.
"""

from __future__ import annotations

import contextlib
import os
import signal

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..errors import ConfigError
from ..model.layers import moe_aux_loss


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

    def forward(self, batch: dict, fn=None):
        """The training loss of the batch, or ``fn(model, batch)`` (evaluation: ``eval_sums``)."""
        if fn is not None:
            return fn(self.model, batch)
        loss = self.objective.loss(self.model, batch)
        aux = moe_aux_loss(self.model)
        return loss if aux is None else loss + aux.to(loss.dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def optimizer_step(step_fn: torch.nn.Module, model: torch.nn.Module, optimizer, micro_batches: list[dict],
                   count, env: Env, mode: str = "single", grad_clip: float = 0.0) -> torch.Tensor:
    """One optimizer step over this process's ``micro_batches``; returns this process's share of
    the step's mean loss (a float64 tensor: summed over the processes it is the mean).

    ``step_fn(batch)`` is the mean loss of a batch (a :class:`TrainStep`, possibly wrapped by DDP or
    sharded by FSDP2: ``mode`` is ``single``, ``ddp`` or ``fsdp``); ``count(batch)`` is the number
    of things that mean is over (predicted tokens, examples). Each micro-batch's loss is scaled by
    its share of the global count, times the number of processes since DDP and FSDP average
    gradients over them."""
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
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss
