"""Output projection and cross-entropy with the gradient computed in place.

Training needs the loss and its gradient, not the logits. After one matrix product for the logits,
the softmax and its gradient (softmax minus one-hot, over the number of counted tokens) are
computed in place in the logits buffer while each block of rows is still in cache: one row at a
time by a fused kernel for float32 on a CPU (:mod:`pretrainer.kernels`), else a few rows at a time
with PyTorch ops.
The plain path instead keeps the logits, a log-softmax copy and a zero-filled gradient, and walks
over each several times. The matrix products are the same three (logits, the hidden states'
gradient, the weight's gradient), each done once at full size.

This is for training steps that call ``backward`` on the result; evaluation uses the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..common import IGNORE  # noqa: F401 - also imported from here

# One logits/gradient buffer per (shape, device) is kept between training steps and reused: a
# fresh 10-100 MB allocation on a CPU costs page faults comparable to the product that fills it.
# A buffer is lent out from a forward until its backward, so two losses alive at once never share.
_buffers: dict[tuple, torch.Tensor] = {}
_lent: set[int] = set()


def _borrow(shape: tuple, device: torch.device) -> torch.Tensor:
    key = (shape, str(device))
    buf = _buffers.get(key)
    if buf is None or id(buf) in _lent:
        buf = torch.empty(shape, dtype=torch.float32, device=device)
        if key not in _buffers:
            _buffers.clear()  # keep one shape: training steps repeat theirs
            _buffers[key] = buf
    _lent.add(id(buf))
    return buf


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, rows):
        valid = targets != IGNORE
        count = valid.sum().clamp(min=1)
        safe_t = targets.clamp(min=0)
        # one large product (efficient), then softmax and its gradient a few rows at a time so
        # that every elementwise pass runs on a block that stays in cache
        grad = _borrow((h.shape[0], weight.shape[0]), h.device)
        autocast = torch.is_autocast_enabled(h.device.type)
        ctx.mm_dtype = torch.get_autocast_dtype(h.device.type) if autocast else h.dtype
        if ctx.mm_dtype == torch.float32 and weight.dtype == torch.float32:
            torch.mm(h, weight.t(), out=grad)
        else:  # a bf16/fp16 product, softmax in float32
            grad.copy_(h.to(ctx.mm_dtype) @ weight.to(ctx.mm_dtype).t())
        scale = valid.float() / count
        if kernels.usable(grad):  # one pass per row, from its maximum to its gradient
            loss = kernels.softmax_cross_entropy_(grad, safe_t, scale)
        else:
            picked = grad.gather(1, safe_t[:, None]).squeeze(1)
            lse = torch.empty_like(picked)
            for i in range(0, grad.shape[0], rows):
                block = grad[i:i + rows]
                top = block.amax(dim=-1, keepdim=True)
                block.sub_(top).exp_()
                total = block.sum(dim=-1, keepdim=True)
                lse[i:i + rows] = (total.log() + top).squeeze(1)
                block.mul_(scale[i:i + rows, None] / total)  # softmax / count, 0 on ignored rows
            grad[torch.arange(len(targets), device=h.device), safe_t] -= scale  # minus one-hot / count
            loss = lse - picked
        ctx.save_for_backward(h, weight, grad)
        return (loss * valid).sum() / count

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, grad = ctx.saved_tensors
        g = grad.to(ctx.mm_dtype)
        # the upstream gradient scales the two small products, not the vocabulary-wide buffer
        dh = (g @ weight.to(g.dtype)).mul_(grad_out)
        dw = (g.t() @ h.to(g.dtype)).mul_(grad_out)
        _lent.discard(id(grad))
        return dh.to(h.dtype), dw.to(weight.dtype), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         rows: int = 32) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (``-100`` = ignored), for
    ``h`` [..., d] and ``weight`` [vocab, d], without materialising the logits."""
    h2 = h.reshape(-1, h.shape[-1])
    return _LinearCrossEntropy.apply(h2, weight, targets.reshape(-1), rows)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain path: mean cross-entropy of full logits (computed in float32)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE)
