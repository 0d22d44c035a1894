"""Fast paths: the same layers with hand-written backward passes and fused float32 CPU kernels,
applied to a built model from outside (:func:`apply_fast_paths`), never part of the plain layers.

The plain layers in :mod:`.layers` are the reference; each class here is a subclass that keeps
its parent's parameters and state-dict names and overrides one method:

- :class:`FastRMSNorm`: a backward written from ``q = dy * x`` (autograd's composite walks the
  activations about twice as often), and one-pass C kernels each way;
- :class:`FastSelfAttention`: the head split and the rotary rotation in one autograd Function whose
  backward writes the three gradients, rotated back, straight into one buffer laid out like the
  projection's output (autograd would concatenate and transpose: two copies); local (banded)
  layers computed block by block over the keys their band reaches (:func:`banded_attention`)
  instead of a T x T masked product; and T5's learned position bias as plain products with the
  bias add and the softmax fused each way (:func:`biased_attention`) instead of PyTorch's math
  path, which adds passes over the scores;
- :class:`FastMLP` (SwiGLU): both halves of the gradient written into one buffer, silu recomputed
  in the backward so its output is not kept; one-pass C kernels each way; GPT-2's tanh GELU in
  one-pass C kernels each way too (PyTorch's CPU op for it was twice its exact GELU's time);
- dropout (:class:`FastDropout`, :class:`FastBlock`'s residual add, attention with dropout through
  :class:`_DroppedAttention`): the mask drawn in the same pass by a counter-based generator seeded
  from PyTorch's (its CPU ``bernoulli_`` took a tenth of a BERT fine-tuning step), the residual
  add and the attention softmax fused with it. Other masks than PyTorch's, the same distribution.

The fused chunked LM-head loss (:func:`pretrainer.model.loss.linear_cross_entropy`) is the fourth
fast path; the LM objectives choose it (:mod:`pretrainer.train.objectives`).

``apply_fast_paths(model)`` swaps the classes of a model's modules in place (same parameters, same
outputs to float32 rounding: ``tests/test_fast_paths.py``). The trainer applies them where they
were measured to help: float32 on a CPU (``train.fast_paths=auto``; ``true``/``false`` to force).
On a GPU, bf16 autocast and ``torch.compile`` do this work instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from .layers import MLP, Block, CrossAttention, RMSNorm, SelfAttention, gelu_tanh


class FastRMSNorm(RMSNorm):
    """:class:`RMSNorm` with the hand-written backward (float32 on a CPU, while training)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32):  # elsewhere the native kernel is fused
            return _RMSNorm.apply(x, self.weight, self.eps)
        return super().forward(x)


class _RMSNorm(torch.autograd.Function):
    """``x / rms(x) * weight`` with a hand-written backward (float32 training on a CPU, where
    ``F.rms_norm`` is a composite whose autograd walks over the activations about twice as often).

    With ``r = 1/rms(x)``, ``x^ = x r`` and ``g = dy * weight``, ``dx = r (g - x^ mean(g x^))`` and
    ``dweight = sum over positions of dy x^``. Both come from ``q = dy x`` (``x^`` is never formed):
    ``dweight = q^T r`` and ``dx = r (dy weight) - x r^3 (q . weight) / d``. With the fused CPU
    kernels (:mod:`pretrainer.kernels`) each direction is one pass instead."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.shape = x.shape
        ctx.kernel = kernels.usable(x2, weight)
        if ctx.kernel:  # one pass (pretrainer.kernels)
            x2 = x2.contiguous()
            y, r = kernels.rms_norm_forward(x2, weight, eps)
        else:
            r = torch.rsqrt(torch.linalg.vector_norm(x2, dim=-1, keepdim=True).square_().div_(x2.shape[-1]).add_(eps))
            y = torch.mul(x2, r).mul_(weight)
        ctx.save_for_backward(x2, weight, r)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, r = ctx.saved_tensors
        dy = dy.reshape(x2.shape)
        if ctx.kernel:
            dx, dweight = kernels.rms_norm_backward(dy, x2, weight, r)
            return dx.view(ctx.shape), dweight if ctx.needs_input_grad[1] else None, None
        q = dy * x2
        dweight = (q.t() @ r).squeeze(1) if ctx.needs_input_grad[1] else None
        k = (q @ weight)[:, None].mul_(r.pow(3)).div_(-x2.shape[-1])  # -r^3 (q . weight) / d per row
        dx = torch.mul(dy, weight, out=q).mul_(r).addcmul_(x2, k)  # written over q: 3 passes
        return dx.view(ctx.shape), dweight, None


class _SplitHeads(torch.autograd.Function):
    """The fused projection's output ``qkv`` [B, T, q + 2 kv heads, D] -> queries, keys and values
    [B, heads, T, D], the queries and keys rotated (``cos`` [T, R] and ``sin`` [T, R/2] from
    :meth:`Rotary.tables`, or None for no rotary; with R < D the first R dimensions of each head
    rotate and the rest pass through, as in :func:`~.layers.apply_rotary`). With no query heads
    (``n_q=0``: cross-attention's key/value projection) the queries come out empty.

    Autograd would take the gradients of the pieces, concatenate them (a copy of the whole
    tensor) and transpose them back (another copy), and on a CPU such memory-bound passes cost a
    sizeable part of a small model's step. Here the backward writes each gradient, rotated back
    (the inverse rotation: ``sin`` negated), straight into one buffer laid out as ``qkv``."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_q: int, n_kv: int):
        n_qk = n_q + n_kv
        ctx.n_q, ctx.n_qk = n_q, n_qk
        qk, v = qkv[:, :, :n_qk], qkv[:, :, n_qk:]
        if cos is not None:
            c, s = cos[:, None, :], sin[:, None, :]
            qk = _rotate_first(qk, c, s, qk.new_empty(qk.shape), 1.0)
            ctx.save_for_backward(c, s)
        return qk[:, :, :n_q].transpose(1, 2), qk[:, :, n_q:].transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        B, _, T, D = dv.shape
        g = dv.new_empty(B, T, ctx.n_qk + dv.shape[1], D)
        g[:, :, ctx.n_qk:].copy_(dv.transpose(1, 2))
        rotation = ctx.saved_tensors  # (cos, sin), or () without rotary
        for grad, out in ((dq, g[:, :, :ctx.n_q]), (dk, g[:, :, ctx.n_q:ctx.n_qk])):
            if rotation:  # the inverse rotation: the same with sin negated
                _rotate_first(grad.transpose(1, 2), *rotation, out, -1.0)
            else:
                out.copy_(grad.transpose(1, 2))
        return g, None, None, None, None


def _rotate_first(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
                  sign: float) -> torch.Tensor:
    """:func:`_rotate` on the first ``cos.shape[-1]`` dimensions of ``x``; the rest copied as they
    are (partial rotary)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        out[..., rot:].copy_(x[..., rot:])
        _rotate(x[..., :rot], cos, sin, out[..., :rot], sign)
        return out
    return _rotate(x, cos, sin, out, sign)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, sign: float) -> torch.Tensor:
    """``out = x * cos + rotate_half(x) * sign * sin`` with ``rotate_half(x) = [-x2, x1]`` (Su et al.
    2021, half-split layout as Hugging Face Llama), written on the halves so that no concatenated
    copy is made. ``sin`` holds one half (both halves of a row are equal)."""
    if kernels.usable(x, cos, sin, out) and out.stride(-1) == 1:  # one pass (pretrainer.kernels)
        return kernels.rotary(x, cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1), out, sign)
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    out[..., :half].addcmul_(x[..., half:], sin, value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin, value=sign)
    return out


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of ``h = [gate, up]`` (the fused projection's output), with a backward
    that writes both halves of the gradient into one buffer instead of concatenating two."""

    @staticmethod
    def forward(ctx, h):
        ctx.kernel = kernels.usable(h)
        if ctx.kernel:  # one pass each way, silu recomputed in the backward (pretrainer.kernels)
            ctx.save_for_backward(h)
            return kernels.swiglu_forward(h)
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate)
        ctx.save_for_backward(h, a)
        return a * up

    @staticmethod
    def backward(ctx, dy):
        if ctx.kernel:
            return kernels.swiglu_backward(dy, ctx.saved_tensors[0])
        h, a = ctx.saved_tensors
        n = a.shape[-1]
        gate, up = h.chunk(2, dim=-1)
        g = torch.empty_like(h)
        torch.mul(dy, a, out=g[..., n:])
        dgate = torch.mul(dy, up, out=g[..., :n])  # d(silu(gate)), then through silu in place
        torch.ops.aten.silu_backward.grad_input(dgate, gate, grad_input=dgate)
        return g


class _GeluTanh(torch.autograd.Function):
    """GELU in its tanh form (GPT-2's) in one pass each way (:mod:`pretrainer.kernels`), the input
    kept for the backward; PyTorch's op where the kernel does not apply."""

    @staticmethod
    def forward(ctx, x):
        ctx.kernel = kernels.usable(x)
        ctx.save_for_backward(x)
        return kernels.gelu_tanh_forward(x) if ctx.kernel else F.gelu(x, approximate="tanh")

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        if ctx.kernel:
            return kernels.gelu_tanh_backward(dy, x)
        return torch.ops.aten.gelu_backward(dy, x, approximate="tanh")


def banded_attention(q, k, v, window: int, scale: float | None, dropout_p: float) -> torch.Tensor:
    """Causal attention over the last ``window`` positions (a local layer; queries, keys and values
    [B, H, T, D] from position 0), block by block: the queries in blocks of ``window`` positions,
    each block over its own keys and the previous block's, the only ones its band reaches. That is
    T x 2 window scores instead of the T x T of the masked dense attention, most of them masked;
    the result is the same."""
    B, H, T, D = q.shape
    W = window
    n = -(-T // W)  # blocks; the last one padded with zero positions, which no real query sees
    q, k, v = (F.pad(x, (0, 0, 0, n * W - T)) for x in (q, k, v))

    def with_previous(x):  # [B * H, n, 2W, D]: each block's keys after the previous block's
        blocks = x.reshape(B, H, n, W, D)
        previous = F.pad(blocks, (0, 0, 0, 0, 1, 0))[:, :, :-1]  # zeros before the first block
        return torch.cat([previous, blocks], dim=3).flatten(0, 1)

    # query r of a block sees key j of [previous; own] (position W + r - j back) when 0 <= W + r - j < W
    r, j = torch.arange(W, device=q.device)[:, None], torch.arange(2 * W, device=q.device)[None, :]
    mask = ((j > r) & (j <= r + W)).expand(n, W, 2 * W).clone()
    mask[0, :, :W] = False  # the first block has no previous one
    y = F.scaled_dot_product_attention(q.reshape(B * H, n, W, D), with_previous(k), with_previous(v),
                                       attn_mask=mask[None], dropout_p=dropout_p, scale=scale)
    return y.reshape(B, H, n * W, D)[:, :, :T]


def biased_attention(q, k, v, bias: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` for queries [B, H, T, D], keys and values [B, H, S, D]
    and an additive float ``bias`` [B or 1, H, T, S] that takes gradients (T5's learned relative
    positions), as plain products under autograd. PyTorch's attention sends such a mask to its
    math path, which also multiplies the queries and the keys by sqrt(scale) (even a scale of 1)
    and checks every row of the scores for being all -inf (three more passes over them); a
    position bias never has such rows (masked entries hold the dtype's lowest value), so the
    result is the same."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if (kernels.usable(q, k, v, bias) and bias.dim() == 4 and bias.shape[0] in (1, q.shape[0])
            and bias.shape[1:] == (q.shape[1], q.shape[2], k.shape[2])):
        return _BiasedAttention.apply(q, k, v, bias, scale)
    if scale != 1.0:
        q = q * scale  # (the smaller tensor: D against S)
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores.add_(bias)  # (in place: the product's backward keeps its inputs, not its output)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class _BiasedAttention(torch.autograd.Function):
    """:func:`biased_attention` with the bias add and the softmax in one pass each way
    (:mod:`pretrainer.kernels`), the bias's gradient summed over the batch in the backward's pass.
    The queries, keys and values are copied once into contiguous tensors, kept for the backward
    (heads split from one projection are strided views, which each product would copy)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float):
        q = (q * scale) if scale != 1.0 else q.contiguous()
        k, v = k.contiguous(), v.contiguous()
        probs = kernels.biased_softmax_(torch.matmul(q, k.transpose(-1, -2)), bias)
        ctx.scale, ctx.shared = scale, bias.shape[0] == 1
        ctx.save_for_backward(q, k, v, probs)
        return torch.matmul(probs, v)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, probs = ctx.saved_tensors
        dout = dout.contiguous()
        dv = torch.matmul(probs.transpose(-1, -2), dout)
        ds = torch.matmul(dout, v.transpose(-1, -2))
        wants = ctx.needs_input_grad[3]
        dbias = kernels.biased_softmax_backward_(ds, probs, ctx.shared and wants)
        if wants and not ctx.shared:  # a bias per batch entry: the scores' own (only read below)
            dbias = ds
        dq = torch.matmul(ds, k)
        if ctx.scale != 1.0:
            dq.mul_(ctx.scale)
        return dq, torch.matmul(ds.transpose(-1, -2), q), dv, dbias, None


class _Dropout(torch.autograd.Function):
    """``residual + dropout(x, p)`` (``residual`` None: ``dropout(x, p)``) in one pass each way
    (:mod:`pretrainer.kernels`): the mask drawn by a counter-based generator seeded from PyTorch's
    and kept as bytes; the backward multiplies by it. PyTorch's CPU dropout draws its mask at
    about 10 ns per element, a few times the cost of the multiplication itself."""

    @staticmethod
    def forward(ctx, x, residual, p: float):
        y, mask = kernels.dropout_forward(x, p, residual)
        ctx.p, ctx.residual = p, residual is not None
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, dy):
        (mask,) = ctx.saved_tensors
        return kernels.dropout_backward(dy, mask, ctx.p), dy if ctx.residual else None, None


def _fused_dropout(module: nn.Module, p: float, *tensors: torch.Tensor) -> bool:
    """Whether a dropout of rate ``p`` in ``module`` runs as :class:`_Dropout`: while training, for
    ``0 < p < 1``, on float32 CPU tensors with the kernels built."""
    return module.training and 0 < p < 1 and kernels.usable(*tensors)


class FastDropout(nn.Dropout):
    """:class:`torch.nn.Dropout` as :class:`_Dropout` (float32 on a CPU, while training)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.inplace and _fused_dropout(self, self.p, x):
            return _Dropout.apply(x, None, self.p)
        return super().forward(x)


class FastBlock(Block):
    """:class:`Block` whose residual adds take the branch's dropout in the same pass
    (:class:`_Dropout` with a residual)."""

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape == y.shape and _fused_dropout(self.drop, self.drop.p, x, y):
            return _Dropout.apply(y, x, self.drop.p)
        return super().residual(x, y)


class _DroppedAttention(torch.autograd.Function):
    """``dropout(softmax(q k^T * scale + mask), p) v`` for queries [B, H, T, D] and keys and values
    [B, H, S, D], with the softmax and the dropout in one pass each way (:mod:`pretrainer.kernels`)
    and the products written out. ``mask``: None, boolean (``True`` takes part; broadcast to
    [B, H, T, S]) or additive float (may take gradients: T5's position bias); ``causal``: keys after
    the query left out. PyTorch's attention takes its math path whenever ``dropout_p > 0`` on a
    CPU: queries and keys scaled apart, the dropout as its own slow op and the softmax with a check
    of every row. Here the softmax and the dropped-out probabilities are kept, and no mask: the
    gradient needs only those two (see cpu.c)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal: bool, scale: float, p: float):
        # heads split from one projection are strided views: each product would copy them, twice
        # more in the backward; one copy each, kept for the backward, serves all of them
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        # (the products' outputs are never written over: selective checkpointing may keep them)
        scores = torch.matmul(q, k.transpose(-1, -2))
        T, S = scores.shape[-2:]
        a = scale  # the softmax's factor: the scale, unless an additive mask was added after it
        if causal:
            scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool).triu_(1), float("-inf"))
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            scores, a = torch.add(mask, scores, alpha=scale), 1.0
        probs, y = kernels.softmax_dropout(scores, a, p)
        ctx.a, ctx.scale = a, scale
        ctx.mask_shape = mask.shape if mask is not None else None
        ctx.save_for_backward(q, k, v, probs, y)
        return torch.matmul(y, v)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, probs, y = ctx.saved_tensors
        dout = dout.contiguous()
        dv = torch.matmul(y.transpose(-1, -2), dout)
        ds = kernels.softmax_dropout_backward_(torch.matmul(dout, v.transpose(-1, -2)), probs, y, ctx.a)
        dmask = None
        if ctx.needs_input_grad[3]:  # an additive mask: the gradient of the softmax's input, summed
            dmask = ds.sum_to_size(ctx.mask_shape)  # over the dimensions it was broadcast along
        if ctx.a != ctx.scale:
            ds.mul_(ctx.scale)
        return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), dv, dmask, None, None, None


class _AttentionWithDropout:
    """Mixed into the fast attention classes: attention with dropout as :class:`_DroppedAttention`
    (float32 on a CPU), PyTorch's otherwise."""

    def attention(self, q, k, v, mask, is_causal, dropout_p, gqa):
        if 0 < dropout_p < 1 and kernels.usable(q, k, v) and (mask is None or mask.dtype in (torch.bool, q.dtype)):
            if k.shape[1] != q.shape[1]:  # grouped-query: each key/value head serves several query heads
                group = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
            return _DroppedAttention.apply(q, k, v, mask, is_causal, scale, dropout_p)
        return super().attention(q, k, v, mask, is_causal, dropout_p, gqa)


class FastSelfAttention(_AttentionWithDropout, SelfAttention):
    """:class:`SelfAttention` whose head split and rotation run as :class:`_SplitHeads`, whose
    local layers attend block by block (:func:`banded_attention`) over a sequence longer than two
    windows (no cache, no mask: training and scoring), and whose attention with a learned
    position bias runs as :func:`biased_attention` in a training step without dropout."""

    def split_heads(self, qkv, tables):
        cos, sin = tables if tables is not None else (None, None)
        return _SplitHeads.apply(qkv, cos, sin, self.n_head, self.n_kv)

    def attend(self, q, k, v, start, key_pos, attn_mask):
        if (attn_mask is not None and attn_mask.requires_grad and attn_mask.dtype == q.dtype
                and torch.is_grad_enabled() and self.window is None and not (self.training and self.dropout)):
            if k.shape[1] != self.n_head:  # grouped-query: each key/value head serves several query heads
                group = self.n_head // k.shape[1]
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            return biased_attention(q, k, v, attn_mask, self.scale)
        banded = (self.window is not None and start == 0 and key_pos is None and attn_mask is None
                  and q.shape[-2] > 2 * self.window)
        if not banded:
            return super().attend(q, k, v, start, key_pos, attn_mask)
        if k.shape[1] != self.n_head:  # grouped-query: each key/value head serves several query heads
            group = self.n_head // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return banded_attention(q, k, v, self.window, self.scale, self.dropout if self.training else 0.0)


class FastMLP(MLP):
    """:class:`MLP` whose SwiGLU runs as :class:`_SwiGLU` and whose ungated tanh GELU (GPT-2's) as
    :class:`_GeluTanh` (other activations are left plain)."""

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.act is F.silu and self.gated:
            return _SwiGLU.apply(h)
        if self.act is gelu_tanh and not self.gated:
            return _GeluTanh.apply(h)
        return super().activate(h)


class FastCrossAttention(_AttentionWithDropout, CrossAttention):
    """:class:`CrossAttention` whose keys and values come out of the projection through
    :class:`_SplitHeads` (no query heads): their gradients written straight into one buffer laid
    out as the projection's output, where autograd would concatenate them and then copy the
    transposed result."""

    def split_kv(self, kv):
        _, k, v = _SplitHeads.apply(kv, None, None, 0, self.n_kv)
        return k, v


#: plain class -> its fast subclass
FAST = {RMSNorm: FastRMSNorm, SelfAttention: FastSelfAttention, CrossAttention: FastCrossAttention, MLP: FastMLP,
        Block: FastBlock, nn.Dropout: FastDropout}


def apply_fast_paths(model: nn.Module) -> nn.Module:
    """Swap every plain layer of ``model`` that has a fast subclass for it, in place (parameters,
    buffers and state-dict names unchanged); returns ``model``. ``model.fast_paths`` records it."""
    return _swap(model, FAST, True)


def remove_fast_paths(model: nn.Module) -> nn.Module:
    """The inverse of :func:`apply_fast_paths`: back to the plain layers."""
    return _swap(model, {fast: base for base, fast in FAST.items()}, False)


def _swap(model: nn.Module, classes: dict, fast: bool) -> nn.Module:
    for module in model.modules():
        new = classes.get(type(module))
        if new is not None:
            module.__class__ = new
    model.fast_paths = fast
    return model


def wants_fast_paths(setting: str, device: torch.device, dtype: torch.dtype) -> bool:
    """``train.fast_paths``: ``auto`` turns them on for float32 on a CPU, where they were measured
    to help (benchmarks/throughput.py); ``true`` / ``false`` force."""
    setting = str(setting).lower()
    if setting in ("true", "false"):
        return setting == "true"
    return device.type == "cpu" and dtype == torch.float32
