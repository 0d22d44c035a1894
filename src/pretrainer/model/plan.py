"""Will a model train on N devices with M bytes each? Per-device memory under ddp and fsdp.

:func:`plan` estimates the peak memory of one device for every pair of parallel mode (``ddp``:
a full replica per device; ``fsdp``: FSDP2 ``fully_shard`` per block plus the root, ZeRO-3-like)
and activation checkpointing mode (``none``, ``selective``, ``full``), and the largest micro-batch
(sequences per device) that fits. The parameters are counted on PyTorch's ``meta`` device, as
:func:`pretrainer.model.info.model_info` counts them. Every term below is counted as alive at once
(gradients are, while micro-batches accumulate), so the estimate errs on the safe side.

Model state (mixed precision as this trainer runs it: fp32 weights under bf16 autocast, AdamW):
fp32 weights 4 B + fp32 gradients 4 B + AdamW's two fp32 moments 8 B = 16 B per parameter. That
is ZeRO's total for mixed-precision Adam (Rajbhandari et al. 2020, section 3.1: 2 + 2 + 12 = 16 B
per parameter), split differently: ZeRO keeps 16-bit weights and gradients next to an fp32 master
copy, autocast keeps fp32 weights and gradients and casts on the fly. ``ddp`` holds all of it on
every device; ``fsdp`` holds 1/N of it.

Buffers on top of the model state:

- ``ddp``: autocast's bf16 copy of every weight, made in the forward pass and kept until that
  layer's backward (2 B per parameter); with more than one device, DDP's gradient buckets, a second
  fp32 copy of the gradients (4 B per parameter; PyTorch's default ``gradient_as_bucket_view=False``,
  which the trainer uses).
- ``fsdp``: FSDP2 gathers one block's parameters at a time in bf16 and prefetches the next
  (2 x 2 B per parameter of the largest block), and holds that block's unsharded gradient in bf16
  plus its fp32 copy for the reduce-scatter (2 + 4 B). The root module (embeddings, final norm,
  output head: every parameter outside the blocks) is not resharded after its forward, so its
  gathered parameters and gradients (2 + 2 + 4 B per parameter) are held for the whole step.

Activations per sequence of ``s`` tokens (batch 1), in the itemisation of Korthikanti et al. (2022),
"Reducing Activation Recomputation in Large Transformer Models", section 4.1. They count, for a
GPT layer in 16-bit with dropout, sbh(34 + 5as/h) bytes; fused attention
(``scaled_dot_product_attention``) never stores the 5as/h attention-score term, and keeps only its
output and a fp32 log-sum-exp per head and token (4as bytes). Generalised to this codebase's
layers (GQA, gated MLPs, cross-attention, dropout off), one layer stores:

- ``none``: each norm's input (the residual stream: fp32 under autocast, as the fp32 embedding
  output plus bf16 branch outputs is fp32); the attention input; the storage the kernel's queries,
  keys and values keep alive (the QKV projection output, rotated queries and keys under RoPE, and
  on a GPU grouped key/value heads copied to every query head: ``_attention_inputs``); the
  attention output and its log-sum-exp; the MLP input, the activation's input and output (gated:
  the up/gate product, the activation and the product, 4 x s x d_ff; ReLU: its output only); a
  1-byte dropout mask per residual branch when dropout > 0. A parallel block
  (``model.parallel_block``) keeps one norm input (both norms read the block's input), and with one
  shared norm one normed input for attention and MLP.
  For a GPT-2-shaped layer with a 16-bit residual stream and dropout this is Korthikanti's 34sh
  (plus the 4as of the log-sum-exp). tests/test_plan.py checks the count against the tensors
  autograd saves for one block under bf16 autocast on a CPU (``saved_tensors_hooks``).
- ``selective``: torchtitan-style op-level selective checkpointing: the outputs of the matrix
  products and of the attention kernel are kept (QKV, attention output and log-sum-exp, output
  projection, MLP up/gate and down), everything elementwise is recomputed in the backward pass
  (norms, activation functions, dropout, rotary, the key/value copies, residual adds); plus the
  block input the checkpoint keeps. (Korthikanti's own "selective" recomputes exactly the
  attention-score term, which fused attention already never stores, so it would equal ``none``.)
- ``full``: only each block's input (s x h in the residual dtype), plus one layer's ``none``
  activations while that layer is recomputed in the backward pass.

Outside the blocks, in every mode: the final norm's input; the output head's input and its logits,
s x vocab x (2 B for the bf16 product + 4 B for the fp32 buffer the loss and its gradient are
computed in, :mod:`pretrainer.model.loss`); an encoder's MLM head runs on the 15 % masked positions
only. An encoder-decoder counts both stacks at ``seq_len`` tokens (the decoder's targets are
usually shorter, so this is an upper bound), the cross-attention's keys and values over the
encoder's output in every decoder layer, and that output once. Not counted: a T5 relative
position bias (one a x s x s table per micro-batch, shared by the layers) and the transient
gradients of one layer's backward, which the reserve is meant to cover.

Reserve: 1 GiB (CUDA context, cuBLAS workspaces, NCCL buffers) plus 5 % of the device's memory
(PyTorch caching-allocator fragmentation). These two are this planner's assumptions, not
measurements; pass ``reserve_bytes`` / ``reserve_fraction`` to change them.
"""

from __future__ import annotations

import math
import re

from ..config import ModelConfig
from ..errors import ConfigError

PARALLEL = ("ddp", "fsdp")
CHECKPOINTING = ("none", "selective", "full")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
STATE_BYTES_PER_PARAM = 16  # fp32 weights 4 + fp32 gradients 4 + AdamW moments 4 + 4
RESERVE_BYTES = 2**30
RESERVE_FRACTION = 0.05
MLM_FRACTION = 0.15  # BERT's share of predicted positions; the MLM head runs on those only
GIB = 2**30

_UNITS = {"": 1e9, "g": 1e9, "gb": 1e9, "gib": 2**30, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_memory(text: str | float, name: str = "--device-memory") -> float:
    """Bytes from a size such as ``80GB``, ``80GiB``, ``40000MB``, ``1.5TB``; a plain number is GB."""
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{name} '{text}': expected a size such as 80GB, 80GiB, 40000MB or 1.5TB "
                              f"(a plain number is GB)")
        value, unit = float(m.group(1)), m.group(2).lower()
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{name} '{text}': expected a positive size such as 80GB")
    return value * _UNITS[unit]


def _attention_inputs(cfg: ModelConfig) -> int:
    """Width (elements per token) of the storage that self-attention's kernel inputs keep alive, as
    ``layers.SelfAttention`` makes them: queries, keys and values are views of the one QKV
    projection output; rotary writes rotated queries and keys to a new buffer (values stay a view,
    which keeps the whole projection output alive); on a GPU grouped key/value heads are copied to
    every query head before the kernel (``layers._share_kv_heads``)."""
    inner, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    rotary, copied = cfg.position == "rope", kv < inner
    width = 2 * inner if copied else 0  # key and value copies
    width += inner + kv if rotary else 0  # rotated queries and keys
    if not rotary or not copied:  # a query or value view keeps the projection output
        width += inner + 2 * kv
    return width


def layer_activation_bytes(cfg: ModelConfig, seq: int, mode: str, *, elt: int = 2, residual: int = 4,
                           cross_len: int | None = None) -> int:
    """Bytes one block keeps for the backward pass, per sequence of ``seq`` tokens (see the module
    docstring). ``elt``: bytes of a 16-bit (or fp32) activation; ``residual``: bytes of the residual
    stream; ``cross_len``: the encoder's length for a decoder block with cross-attention."""
    s, h, f, a = seq, cfg.d_model, cfg.ff_dim, cfg.n_head
    inner = cfg.n_head * cfg.head_dim  # query (and, on a GPU, copied key/value) width
    kv = cfg.kv_heads * cfg.head_dim  # key/value projection width
    gated = cfg.mlp in ("swiglu", "geglu", "geglu_tanh")
    lse = 4 * a * s  # the attention kernel's fp32 log-sum-exp
    if mode == "full":
        return residual * s * h
    if mode == "selective":  # matmul and attention-kernel outputs, plus the block input
        kept = residual * s * h
        kept += elt * s * (inner + 2 * kv) + elt * s * inner + lse + elt * s * h  # qkv, attn out, proj
        if cross_len is not None:
            m = cross_len
            kept += elt * s * inner + elt * m * 2 * kv + elt * s * inner + 4 * a * s + elt * s * h
        kept += elt * s * f * (2 if gated else 1) + elt * s * h  # up (and gate), down
        return kept
    if mode != "none":
        raise ConfigError(f"activation checkpointing '{mode}': expected one of {', '.join(CHECKPOINTING)}")
    mask = s * h if cfg.dropout > 0 else 0  # one byte per element of a residual branch
    norms = (3 if cross_len is not None else 2) * residual * s * h
    if cfg.parallel_block:  # both norms read the block input, one stored tensor
        norms = residual * s * h
    attn = elt * s * h + elt * s * _attention_inputs(cfg) + elt * s * inner + lse + mask
    if cross_len is not None:
        m = cross_len
        attn += elt * s * h + elt * m * h + elt * s * inner + 2 * elt * m * inner + elt * s * inner \
            + 4 * a * s + mask
    act = 4 if gated else (1 if cfg.mlp == "relu" else 2)
    mlp = elt * s * h + act * elt * s * f + mask
    if cfg.parallel_block and cfg.parallel_norms == 1:  # the MLP reads the attention's input
        mlp -= elt * s * h
    return norms + attn + mlp


def activation_bytes(cfg: ModelConfig, seq: int, mode: str, *, elt: int = 2, residual: int = 4) -> dict:
    """Activation bytes per sequence of the whole model: ``layers`` (all blocks as kept),
    ``recompute`` (one layer's activations while it is recomputed; 0 for ``none``), ``outside``
    (embeddings, final norm, head and logits), and ``total``."""
    s, h, V = seq, cfg.d_model, cfg.vocab_size
    stacks = [(cfg.n_layer, None)]
    if cfg.arch == "encoder-decoder":
        stacks.append((cfg.decoder_layers, s))  # decoder blocks, cross-attending to s encoder tokens
    layers = sum(n * layer_activation_bytes(cfg, s, mode, elt=elt, residual=residual, cross_len=m)
                 for n, m in stacks)
    recompute = 0  # while one layer is recomputed, the rest of its "none" activations exist too
    if mode != "none":
        recompute = max(0, *(layer_activation_bytes(cfg, s, "none", elt=elt, residual=residual, cross_len=m)
                             - layer_activation_bytes(cfg, s, mode, elt=elt, residual=residual, cross_len=m)
                             for _, m in stacks))
    logit_bytes = 4 + (elt if elt < 4 else 0)  # the 16-bit product, then the fp32 loss buffer
    outside = 0
    for _ in stacks:
        outside += (residual * s * h if cfg.embed_norm else 0) + (s * h if cfg.dropout > 0 else 0)
        outside += residual * s * h if cfg.prenorm else 0  # the final norm's input
    if cfg.arch == "encoder":  # MLM head on the masked positions: transform, then the logits
        rows = math.ceil(MLM_FRACTION * s)
        outside += rows * (3 * 4 * h + V * logit_bytes)
    else:
        outside += elt * s * h + s * V * logit_bytes
        if cfg.arch == "encoder-decoder":
            outside += residual * s * h  # the encoder's output, read by every cross-attention
    return {"layers": layers, "recompute": recompute, "outside": outside,
            "total": layers + recompute + outside}


def _parameter_units(cfg: ModelConfig) -> dict:
    """Distinct parameters in all, in the largest block, and outside the blocks (the root)."""
    from . import make_model

    import torch

    with torch.device("meta"):
        model = make_model(cfg)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    blocks = [sum(p.numel() for p in b.parameters()) for st in model.stacks for b in st.blocks]
    in_blocks = sum(p.numel() for st in model.stacks for p in st.blocks.parameters())  # shared ones once
    return {"params": total, "largest_block": max(blocks), "root": total - in_blocks}


def plan(cfg: ModelConfig, devices: int = 1, device_memory_bytes: float = 80e9,
         seq_len: int | None = None, micro_batch: int | None = None, dtype: str = "bf16",
         checkpointing: str | list[str] | None = None, reserve_bytes: float = RESERVE_BYTES,
         reserve_fraction: float = RESERVE_FRACTION) -> dict:
    """Per-device memory of training ``cfg`` with AdamW on ``devices`` devices of
    ``device_memory_bytes`` each, for ddp and fsdp and each activation checkpointing mode (or only
    ``checkpointing``). ``micro_batch`` None: report each row at its largest micro-batch.
    Returns rows of bytes, ``fits`` and ``max_micro_batch`` (0: not even one sequence fits), and a
    one-line ``verdict``. See the module docstring for what is counted and why."""
    if cfg.vocab_size is None:
        raise ConfigError("model.vocab_size is unknown for this preset until data is chosen; "
                          "expected model.vocab_size=N")
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"--devices {devices}: expected a positive number of devices")
    if not device_memory_bytes > 0:
        raise ConfigError(f"--device-memory {device_memory_bytes}: expected a positive size such as 80GB")
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype '{dtype}': expected one of {', '.join(DTYPE_BYTES)}")
    seq = seq_len or cfg.max_seq_len
    if seq < 1 or seq > cfg.max_seq_len:
        raise ConfigError(f"--seq-len {seq}: expected 1 to model.max_seq_len={cfg.max_seq_len}")
    if micro_batch is not None and micro_batch < 1:
        raise ConfigError(f"--micro-batch {micro_batch}: expected a positive number of sequences")
    modes = [checkpointing] if isinstance(checkpointing, str) else list(checkpointing or CHECKPOINTING)
    for mode in modes:
        if mode not in CHECKPOINTING:
            raise ConfigError(f"--activation-checkpointing '{mode}': expected one of {', '.join(CHECKPOINTING)}")

    elt = DTYPE_BYTES[dtype]
    residual = 4  # fp32 weights under autocast keep the residual stream in fp32 (see above)
    mixed = elt < 4  # a 16-bit working copy exists next to the fp32 weights and gradients
    units = _parameter_units(cfg)
    n = units["params"]
    reserve = reserve_bytes + reserve_fraction * device_memory_bytes
    acts = {mode: activation_bytes(cfg, seq, mode, elt=elt, residual=residual) for mode in modes}

    rows = []
    for parallel in PARALLEL if cfg.share_layers == "none" else ("ddp",):  # fsdp refuses shared blocks
        share = 1 if parallel == "ddp" else devices
        params_b, grads_b, optim_b = 4 * n / share, 4 * n / share, 8 * n / share
        if parallel == "ddp":
            buffers = (elt * n if mixed else 0) + (4 * n if devices > 1 else 0)
        else:
            grad_unsharded = elt + (4 if mixed else 0)  # the gradient, and its fp32 copy to reduce
            buffers = units["largest_block"] * (2 * elt + grad_unsharded) + units["root"] * (elt + grad_unsharded)
        state = params_b + grads_b + optim_b
        fixed = state + buffers + reserve
        for mode in modes:
            per_seq = acts[mode]["total"]
            free = device_memory_bytes - fixed
            max_mb = max(0, math.floor(free / per_seq)) if free > 0 else 0
            shown = micro_batch if micro_batch is not None else max(max_mb, 1)
            total = fixed + shown * per_seq
            rows.append({
                "parallel": parallel, "checkpointing": mode,
                "params_bytes": params_b, "grads_bytes": grads_b, "optimizer_bytes": optim_b,
                "model_state_bytes": state, "buffers_bytes": buffers, "reserve_bytes": reserve,
                "activations_per_sequence_bytes": per_seq, "activations": acts[mode],
                "micro_batch": shown, "total_bytes": total,
                "fits": total <= device_memory_bytes and max_mb >= 1,
                "max_micro_batch": max_mb,
            })
    result = {
        "preset": cfg.preset, "arch": cfg.arch, "params": n,
        "params_largest_block": units["largest_block"], "params_outside_blocks": units["root"],
        "devices": devices, "device_memory_bytes": device_memory_bytes, "seq_len": seq,
        "micro_batch": micro_batch, "dtype": dtype, "reserve_bytes": reserve,
        "assumptions": [
            "AdamW, fp32 weights under bf16 autocast: 16 B/param of model state "
            "(ZeRO's mixed-precision Adam total, Rajbhandari et al. 2020)",
            "ddp: + bf16 weight copies (2 B/param) + gradient buckets (4 B/param, >1 device)",
            "fsdp: state / devices + largest block gathered and prefetched + root kept gathered",
            "activations: Korthikanti et al. 2022 itemisation, fused attention, fp32 residual stream",
            "logits: seq x vocab x (2 B bf16 + 4 B fp32 loss buffer)",
            f"reserve: {reserve_bytes / GIB:g} GiB + {reserve_fraction:.0%} of device memory",
        ],
        "rows": rows,
    }
    result["verdict"] = verdict(result)
    return result


def verdict(result: dict) -> str:
    """One line: with which parallel modes it fits, at what micro-batch and checkpointing."""
    parts = []
    mb = result["micro_batch"]
    for parallel in PARALLEL:
        rows = [r for r in result["rows"] if r["parallel"] == parallel]
        if not rows:  # fsdp for a model with shared blocks (model.share_layers), which it refuses
            continue
        fitting = sorted((r for r in rows if r["fits"]), key=lambda r: -r["max_micro_batch"])
        if fitting:
            best = ", ".join(f"{r['max_micro_batch']} with " + (
                f"{r['checkpointing']} activation checkpointing" if i == 0 else r["checkpointing"])
                for i, r in enumerate(fitting))
            at = f" at micro-batch {mb}" if mb is not None else ""
            parts.append((0, f"fits with {parallel}{at} (max micro-batch {best})"))
            continue
        best = max(rows, key=lambda r: r["max_micro_batch"])
        fixed = best["model_state_bytes"] + best["buffers_bytes"] + best["reserve_bytes"]
        if fixed > result["device_memory_bytes"]:
            why = (f"model state {best['model_state_bytes'] / GIB:.1f} GiB + buffers "
                   f"{best['buffers_bytes'] / GIB:.1f} GiB + reserve {best['reserve_bytes'] / GIB:.1f} GiB "
                   f"> {result['device_memory_bytes'] / GIB:.1f} GiB per device")
        elif best["max_micro_batch"] == 0:
            why = (f"the model state fits but not one sequence of {result['seq_len']} tokens "
                   f"({best['activations_per_sequence_bytes'] / GIB:.1f} GiB with "
                   f"{best['checkpointing']} activation checkpointing)")
        else:
            why = f"max micro-batch {best['max_micro_batch']} with {best['checkpointing']} activation checkpointing"
        at = f" at micro-batch {mb}" if mb is not None else ""
        parts.append((1, f"does not fit with {parallel}{at} ({why})"))
    return "; ".join(text for _, text in sorted(parts, key=lambda p: p[0]))


def plan_table(result: dict) -> list[str]:
    """The plan as text lines: a header, one row per parallel x checkpointing mode, the verdict."""
    mem = result["device_memory_bytes"]
    lines = [f"{result['preset'] or 'model'}: {result['params']:,} parameters, {result['seq_len']} tokens "
             f"per sequence, {result['devices']} x {mem / 1e9:.4g} GB ({mem / GIB:.1f} GiB) per device, "
             f"{result['dtype']} autocast + AdamW",
             f"{'parallel':<8} {'checkpointing':<13} {'state GiB':>9} {'buffers':>8} {'act/seq GiB':>11} "
             f"{'micro-batch':>11} {'total GiB':>9} {'fits':>4} {'max micro-batch':>15}"]
    for r in result["rows"]:
        lines.append(f"{r['parallel']:<8} {r['checkpointing']:<13} {r['model_state_bytes'] / GIB:>9.2f} "
                     f"{r['buffers_bytes'] / GIB:>8.2f} {r['activations_per_sequence_bytes'] / GIB:>11.3f} "
                     f"{r['micro_batch']:>11} {r['total_bytes'] / GIB:>9.2f} {'yes' if r['fits'] else 'no':>4} "
                     f"{r['max_micro_batch']:>15}")
    lines.append("state: fp32 weights + gradients + AdamW moments, 16 B/param (/ devices under fsdp); "
                 "buffers: bf16 weight copies + DDP gradient buckets,")
    lines.append(f"  or FSDP's gathered blocks and root; act/seq: activations per sequence; total: at "
                 f"that micro-batch, with a {result['reserve_bytes'] / GIB:.1f} GiB reserve")
    lines.append(result["verdict"])
    return lines
