"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float, lr_scale: str = "none") -> list[dict]:
    """Decay every parameter of two or more dimensions (weight matrices and embeddings); leave
    vectors (biases, norm gains) undecayed. Tied weights appear once.

    ``lr_scale="rms"`` gives every tensor its own group whose rate is the schedule's times the
    tensor's root-mean-square value now (at least 1e-3): a step then moves each tensor by about
    the same fraction of its size, as Adafactor's relative steps do (Shazeer & Stern 2018). This
    is what T5's initialisation was made for: N(0, 1) embeddings next to N(0, 1/fan_in) matrices
    leave plain AdamW moving the embeddings 10-100x more slowly, relative to their size, than the
    matrices (nanoT5, Nawrot 2023, found the same and scales AdamW this way). The factors are fixed
    here, from the weights the optimizer starts on, and are saved with the optimizer state, so a
    resumed run keeps them. :func:`set_lr` multiplies each group's ``lr_scale`` into its rate."""
    if lr_scale == "rms":
        return [{"params": [p], "weight_decay": weight_decay if p.ndim >= 2 else 0.0,
                 "lr_scale": max(1e-3, _rms(p))} for p in model.parameters() if p.requires_grad]
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() already yields a tied tensor once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _rms(p: torch.Tensor) -> float:
    """Root-mean-square value of a parameter (of the whole tensor when it is sharded)."""
    t = p.detach()
    if hasattr(t, "full_tensor"):  # a DTensor (FSDP2): the same factor on every process
        t = t.full_tensor()
    return t.float().pow(2).mean().sqrt().item()


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    # the fused kernel: one pass over all parameters (on a 2-core CPU about 4x faster than the
    # default per-tensor loop); available for CPU and CUDA
    fused = device_type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr_scale), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set this step's rate: ``lr`` times each group's ``lr_scale`` (1 unless ``lr_scale="rms"``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup to ``lr`` over
    ``warmup_steps``, then cosine (or linear) decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * factor
