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

# One flat logits/gradient buffer per device is kept between training steps and reused, grown to
# the largest size asked for: a fresh 10-100 MB allocation on a CPU costs page faults comparable to
# the product that fills it. (The masked LM asks for a slightly different number of rows at every
# step: the buffer is grown with some room to spare, then serves them all.) A buffer is lent out
# from a forward until its backward, so two losses alive at once never share.
_buffers: dict[str, torch.Tensor] = {}
_lent: set[int] = set()


def _borrow(shape: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tensor of shape, owner)``: a view of the kept buffer and that buffer (to hand back with
    :func:`_give_back`), or a fresh tensor and None while the buffer is lent out."""
    n = shape[0] * shape[1]
    buf = _buffers.get(str(device))
    if buf is not None and id(buf) in _lent:
        return torch.empty(shape, dtype=torch.float32, device=device), None
    if buf is None or buf.numel() < n:  # the first exactly, a larger one with room to spare
        size = n if buf is None else n + n // 8
        buf = _buffers[str(device)] = torch.empty(size, dtype=torch.float32, device=device)
    _lent.add(id(buf))
    return buf[:n].view(shape), buf


def _give_back(owner: torch.Tensor | None) -> None:
    if owner is not None:
        _lent.discard(id(owner))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, rows):
        valid = targets != IGNORE
        count = valid.sum().clamp(min=1)
        safe_t = targets.clamp(min=0)
        # one large product (efficient), then softmax and its gradient a few rows at a time so
        # that every elementwise pass runs on a block that stays in cache
        grad, ctx.owner = _borrow((h.shape[0], weight.shape[0]), h.device)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        autocast = torch.is_autocast_enabled(h.device.type)
        ctx.mm_dtype = torch.get_autocast_dtype(h.device.type) if autocast else h.dtype
        # the kernel adds the bias row by row and sums its gradient in the same pass; without it the
        # bias is copied into every row, then the product added to it
        kernel = kernels.usable(grad)
        unfused_bias = bias is not None and not kernel
        if ctx.mm_dtype == torch.float32 and weight.dtype == torch.float32:
            if unfused_bias:
                torch.addmm(bias.float(), h, weight.t(), out=grad)
            else:
                torch.mm(h, weight.t(), out=grad)
        else:  # a bf16/fp16 product, softmax in float32
            grad.copy_(h.to(ctx.mm_dtype) @ weight.to(ctx.mm_dtype).t())
            if unfused_bias:
                grad.add_(bias.float())
        scale = valid.float() / count
        ctx.dbias = None
        if kernel:  # one pass per row, from its maximum to its gradient
            loss, ctx.dbias = kernels.softmax_cross_entropy_(grad, safe_t, scale, bias, ctx.needs_input_grad[2])
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
        # the upstream gradient scales the small products and sums, not the vocabulary-wide buffer
        dh = (g @ weight.to(g.dtype)).mul_(grad_out)
        dw = (g.t() @ h.to(g.dtype)).mul_(grad_out)
        db = None
        if ctx.needs_input_grad[2]:
            db = (ctx.dbias if ctx.dbias is not None else grad.sum(0)).mul_(grad_out).to(ctx.bias_dtype)
        _give_back(ctx.owner)
        return dh.to(h.dtype), dw.to(weight.dtype), db, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         rows: int = 32, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T (+ bias)`` against ``targets`` (``-100`` = ignored),
    for ``h`` [..., d], ``weight`` [vocab, d] and ``bias`` [vocab], without materialising the
    logits."""
    h2 = h.reshape(-1, h.shape[-1])
    return _LinearCrossEntropy.apply(h2, weight, bias, targets.reshape(-1), rows)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain path: mean cross-entropy of full logits (computed in float32)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE)
