"""Output projection and cross-entropy fused, chunk by chunk.

Training only needs the loss, not the [tokens, vocab] logits. Computing them a chunk of rows at a
time, together with their gradient (softmax minus one-hot), means the full logits never exist in
memory and the softmax is computed once instead of in a log-softmax forward and a separate
backward pass. The matrix products are the same three as the plain path (logits, gradient for the
hidden states, gradient for the weight); the saving is memory traffic, which dominates the head's
elementwise work on CPUs and for large vocabularies on GPUs.

The gradients are computed during the forward pass, so this is for training steps that call
``backward`` on the result; evaluation uses the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        n = h.shape[0]
        valid = targets != IGNORE
        count = valid.sum().clamp(min=1)
        mm_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        with torch.autocast(h.device.type, enabled=False):
            hm, wm = h.to(mm_dtype), weight.to(mm_dtype)
            need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            grad_h = torch.empty_like(h) if need_grad else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for i in range(0, n, chunk):
                hc, tc, vc = hm[i:i + chunk], targets[i:i + chunk], valid[i:i + chunk]
                logits = (hc @ wm.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                safe_t = tc.clamp(min=0)
                picked = logits.gather(1, safe_t[:, None]).squeeze(1)
                total += ((lse - picked) * vc).sum()
                if need_grad:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                    probs[torch.arange(len(tc), device=h.device), safe_t] -= 1.0
                    probs *= (vc.float() / count)[:, None]
                    g = probs.to(mm_dtype)
                    grad_h[i:i + chunk] = (g @ wm).to(h.dtype)
                    grad_w.addmm_(g.t().float() if mm_dtype != torch.float32 else g.t(), hc.float() if mm_dtype != torch.float32 else hc)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 256) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (``-100`` = ignored), for
    ``h`` [..., d] and ``weight`` [vocab, d], without materialising the logits."""
    h2 = h.reshape(-1, h.shape[-1])
    return _LinearCrossEntropy.apply(h2, weight, targets.reshape(-1), chunk)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain path: mean cross-entropy of full logits (computed in float32)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE)
