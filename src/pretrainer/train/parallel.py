"""Parallelism applied to a plain model from outside: :func:`parallelize`.

``train.parallel`` picks how several processes (``torchrun``) share the work:

- ``ddp`` (the default): every process holds the whole model and optimizer; gradients are averaged
  by :class:`~torch.nn.parallel.DistributedDataParallel`.
- ``fsdp``: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``): each block is one group whose
  parameters, gradients and optimizer state are split across the processes and gathered for its
  forward and backward only; the root group holds the rest (embeddings, the tied output layer,
  final norms: a tied embedding and head are one parameter, in one group). The model is built on
  the ``meta`` device, sharded, then initialised module by module (:func:`init_sharded`): no
  process ever holds a full copy of the model, and the weights equal a one-process run's. A model
  whose blocks share weights (``model.share_layers``, ALBERT) is refused: use ``ddp``. On CUDA
  the parameters are gathered in bf16 and gradients reduced in fp32 (``MixedPrecisionPolicy``).

``train.activation_checkpointing``: ``full`` recomputes every block's activations in the backward
(keeping only its input), ``selective`` keeps the matrix products' and attention's outputs and
recomputes the elementwise rest; ``none`` keeps them all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import TrainConfig
from ..errors import ConfigError


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of any of the three model kinds (an encoder-decoder: both stacks')."""
    return [b for s in model.stacks for b in s.blocks]


def parallel_mode(t: TrainConfig, world: int) -> str:
    """``single`` (one process), ``ddp`` or ``fsdp``."""
    if world == 1:
        return "single"
    return "ddp" if t.parallel == "auto" else t.parallel


def parallelize(model: nn.Module, objective, env, t: TrainConfig) -> nn.Module:
    """The module a training step runs, for ``train.parallel`` on ``env.world`` processes: the
    model and its objective's loss as one :class:`~pretrainer.train.loop.TrainStep`, with
    activation checkpointing and ``torch.compile`` (per block) as configured, then

    - one process: the weights its construction drew, moved to the device;
    - ``ddp``: the same, wrapped in DistributedDataParallel;
    - ``fsdp``: ``model`` must have been built on the ``meta`` device (right after the same seeding);
      each block and the root are sharded (:func:`shard`), then the weights drawn shard by shard
      (:func:`init_sharded`), equal to one process's.

    Returns the step module; the model's parameters are the ones to optimise (sharded or not)."""
    from .loop import TrainStep

    mode = parallel_mode(t, env.world)
    if mode == "fsdp" and model.cfg.share_layers != "none":
        raise ConfigError(f"model.share_layers={model.cfg.share_layers}: train.parallel=fsdp shards each block "
                          f"apart and cannot shard weights that several blocks share; use train.parallel=ddp")
    apply_activation_checkpointing(model, t.activation_checkpointing)
    if env.compile:
        compile_blocks(model)
    step = TrainStep(model, objective)
    if mode == "fsdp":
        shard(step, model, env.device, env.world,
              mixed_bf16=env.device.type == "cuda" and env.dtype == torch.bfloat16)
        init_sharded(model, env.device)
        return step
    model.to(env.device)  # the weights its construction drew
    return ddp(step, model, env.device) if mode == "ddp" else step


def _keep_matmuls(ctx, op, *args, **kwargs):
    """Selective checkpointing's policy: keep what the matrix products and the attention kernel
    computed, recompute the cheap elementwise rest (norms, activations, rotary, dropout)."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SAVED_OPS = {getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name)}


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap every block so that the backward recomputes activations instead of keeping them:
    ``full`` keeps only each block's input and recomputes the whole block; ``selective`` keeps the
    outputs of the matrix products and the attention kernel and recomputes the elementwise ops
    (op-level selective checkpointing, ``torch.utils.checkpoint``'s policy contexts; what
    ``pretrainer info --plan`` counts). The state-dict names do not change."""
    if mode == "none":
        return
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kw = {"preserve_rng_state": True}  # the wrapper checkpoints without reentrancy by default
    if mode == "selective":
        kw["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_matmuls)
    for stack in model.stacks:
        for i, block in enumerate(stack.blocks):
            stack.blocks[i] = checkpoint_wrapper(block, **kw)


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each block in place (as torchtitan does; the state-dict names stay): the
    objectives call the model's methods, not only its ``forward``, so the model as a whole is not
    compiled."""
    for block in blocks(model):
        block.compile()


def shard(step: nn.Module, model: nn.Module, device: torch.device, world: int,
          mixed_bf16: bool) -> nn.Module:
    """FSDP2 over ``world`` processes: ``fully_shard`` on each block, then on ``step`` (the root,
    which owns the model's remaining parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    kw = {"mesh": mesh}
    if mixed_bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks(model):
        fully_shard(block, reshard_after_forward=True, **kw)
    # the root's parameters are needed again at once by the loss and the backward: keep them
    fully_shard(step, reshard_after_forward=False, **kw)
    return step


@torch.no_grad()
def init_sharded(model: nn.Module, device: torch.device) -> None:
    """Give a sharded model built on the ``meta`` device the weights that
    ``make_model(cfg)`` draws on one process, without a full copy of it: module by module, the
    module's parameters are drawn at full size on the CPU and each process keeps its shard. The
    random stream is used as the one-process construction uses it: first every layer's default
    initialisation in the order the layers were made (``nn.Linear``, ``nn.Embedding``: draws a
    ``meta`` build skipped), then the model's own (:meth:`init_weights`). Buffers (rotary and
    sinusoidal tables) are computed again."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()

    def materialise(module: nn.Module, fn) -> None:
        """Run ``fn(module)`` on full-size CPU stand-ins of its own parameters, then shard them in."""
        real = dict(module.named_parameters(recurse=False))
        for name, p in real.items():
            shape = p.shape
            module._parameters[name] = nn.Parameter(torch.empty(shape, dtype=p.dtype))
        try:
            fn(module)
        finally:
            for name, p in real.items():
                full = module._parameters[name].data
                module._parameters[name] = p
                if isinstance(p, DTensor):
                    p.to_local().copy_(distribute_tensor(full.to(device), p.device_mesh, p.placements).to_local())
                else:
                    p.copy_(full)

    for module in model.modules():  # the construction's default draws, in the same order
        if isinstance(module, (nn.Linear, nn.Embedding)):
            materialise(module, lambda m: m.reset_parameters())
    model.init_weights(materialise)


def ddp(step: nn.Module, model: nn.Module, device: torch.device, find_unused: bool | None = None) -> nn.Module:
    """DistributedDataParallel over ``step``; parameters that take no part in the loss (BERT's
    pooler in MLM pretraining, a backbone's pretraining head in fine-tuning) need
    ``find_unused``."""
    ids = [device.index] if device.type == "cuda" else None
    unused = getattr(model, "pooler", None) is not None if find_unused is None else find_unused
    return torch.nn.parallel.DistributedDataParallel(step, device_ids=ids, find_unused_parameters=unused)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
