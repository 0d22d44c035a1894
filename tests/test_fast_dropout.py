"""Dropout's fast path (model/fast.py's _Dropout, FastDropout, FastBlock's residual add and
_DroppedAttention over pretrainer.kernels): dropout's semantics (the identity at p = 0 and in
eval, keep probability 1 - p, kept values scaled by 1 / (1 - p), the backward through the same
mask), reproducible masks, attention against a float64 reference with the very same mask, and
training curves close to the plain layers'."""

import pytest
import torch

from conftest import objective
from pretrainer import kernels
from pretrainer.model import build_model
from pretrainer.model.fast import FastBlock, FastDropout, _DroppedAttention, apply_fast_paths

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="fused CPU kernels not built here")


def scale_of(p: float) -> torch.Tensor:
    return torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)


def test_the_identity_at_p0_and_in_eval():
    x = torch.randn(4, 5, 6)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.equal(FastDropout(0.3).eval()(x), x)
    block = FastBlock.__new__(FastBlock)  # only its dropout matters to the residual add
    torch.nn.Module.__init__(block)
    block.drop = FastDropout(0.3)
    y = torch.randn_like(x)
    assert torch.equal(block.eval().residual(x, y), x + y)
    block.drop.p = 0.0
    assert torch.equal(block.train().residual(x, y), x + y)
    # a whole model with dropout: in eval the fast layers give the plain model's logits
    torch.manual_seed(0)
    plain = build_model("bert-tiny", n_layer=2, d_model=64, n_head=4, max_seq_len=32, vocab_size=101,
                        dropout=0.2).eval()
    fast = apply_fast_paths(build_model("bert-tiny", n_layer=2, d_model=64, n_head=4, max_seq_len=32,
                                        vocab_size=101, dropout=0.2)).eval()
    fast.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 101, (3, 20))
    torch.testing.assert_close(fast(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_rate_scale_and_independence(p):
    n = 1 << 20
    x = torch.randn(n)
    torch.manual_seed(0)
    y = FastDropout(p).train()(x)
    kept = y != 0
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * sigma
    assert torch.equal(y[kept], x[kept] * scale_of(p))
    # neighbours and the next call's mask are independent of this one
    both = (kept[:-1] & kept[1:]).double().mean().item()
    again = (kept & (FastDropout(p).train()(x) != 0)).double().mean().item()
    q2 = (1 - p) ** 2
    for rate in (both, again):
        assert abs(rate - q2) < 5 * (q2 * (1 - q2) / n) ** 0.5
    # the attention probabilities' dropout: the same rate and scale
    scores = torch.randn(n // 256, 256)
    probs, dropped = kernels.softmax_dropout(scores, 0.5, p)
    torch.testing.assert_close(probs, torch.softmax(0.5 * scores, -1))
    kept = dropped != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * sigma
    assert torch.equal(dropped[kept], probs[kept] * scale_of(p))


def test_the_backward_uses_the_forward_mask():
    p = 0.3
    x = torch.randn(64, 50).add_(3.0).requires_grad_()  # no zeros: a dropped value shows as 0
    w = torch.randn(64, 50)
    y = FastDropout(p).train()(x)
    (g,) = torch.autograd.grad(y, x, w)
    assert torch.equal(g, torch.where(y != 0, w * scale_of(p), torch.zeros(())))
    assert 0 < (y == 0).sum() < y.numel()
    # fused with the residual add: the residual's gradient passes as it is
    block = FastBlock.__new__(FastBlock)
    torch.nn.Module.__init__(block)
    block.drop = FastDropout(p)
    r = torch.randn(64, 50, requires_grad=True)
    torch.manual_seed(7)
    out = block.train().residual(r, x)
    torch.manual_seed(7)
    _, mask = kernels.dropout_forward(torch.ones(64, 50), p)  # the same seed: the same mask
    torch.testing.assert_close(out, r + x * mask * scale_of(p), rtol=0, atol=1e-6)
    gx, gr = torch.autograd.grad(out, (x, r), w)
    assert torch.equal(gr, w) and torch.equal(gx, torch.where(mask, w * scale_of(p), torch.zeros(())))


def test_masks_repeat_with_the_seed_and_change_from_call_to_call():
    x = torch.randn(300, 70)
    drop = FastDropout(0.5).train()

    def two_calls(seed):
        torch.manual_seed(seed)
        return drop(x), drop(x)

    a, b = two_calls(0)
    a2, b2 = two_calls(0)
    c, _ = two_calls(1)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    threads = torch.get_num_threads()
    try:  # the draws are a function of (seed, position): threads do not change them
        torch.set_num_threads(1 if threads > 1 else 2)
        torch.manual_seed(0)
        assert torch.equal(drop(x), a)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", ["plain", "causal", "key-mask", "bias"])
def test_dropped_attention_matches_the_formula_with_the_same_mask(case):
    torch.manual_seed(0)
    B, H, T, S, D, p = 2, 3, 5, 7, 4, 0.3
    if case == "causal":
        S = T
    q, k, v = (torch.randn(B, n, H, D).transpose(1, 2).requires_grad_() for n in (T, S, S))
    mask = None
    if case == "key-mask":
        mask = torch.rand(B, 1, 1, S) > 0.3
        mask[1] = False  # an input with every key masked: zeros, as PyTorch's attention gives
    elif case == "bias":  # T5's: additive, takes gradients, masked entries at the lowest float
        mask = torch.randn(1, H, T, S).masked_fill(torch.rand(1, H, T, S) < 0.2, torch.finfo(torch.float32).min)
        mask.requires_grad_()
    torch.manual_seed(5)
    out = _DroppedAttention.apply(q, k, v, mask, case == "causal", 0.5, p)
    torch.manual_seed(5)
    _, keep = kernels.dropout_forward(torch.ones(B, H, T, S), p)  # the same draws, position by position
    inputs = [q, k, v] + ([mask] if case == "bias" else [])
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    s = 0.5 * ref_inputs[0] @ ref_inputs[1].transpose(-1, -2)
    if case == "causal":
        s = s.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
    elif case == "key-mask":
        s = s.masked_fill(~mask, float("-inf"))
    elif case == "bias":
        s = s + ref_inputs[3]
    ref = (torch.softmax(s, -1).nan_to_num() * keep / (1 - p)) @ ref_inputs[2]
    w = torch.randn(B, H, T, D)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(out, inputs, w), torch.autograd.grad(ref, ref_inputs, w.double())):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    if case == "key-mask":
        assert torch.equal(out[1], torch.zeros_like(out[1]))


SMALL = dict(n_layer=2, d_model=64, n_head=4, max_seq_len=32, vocab_size=101, dropout=0.1)
FAMILIES = {"bert-tiny": ("mlm", {}), "llama-tiny": ("clm", dict(n_kv_heads=2, d_ff=96)),
            "t5-tiny": ("span", dict(d_ff=96))}


def _batch(name: str, gen: torch.Generator) -> dict:
    # a learnable task: each sequence counts up from a random start
    x = (torch.randint(7, 60, (8, 1), generator=gen) + torch.arange(24)) % 94 + 7
    if name == "t5-tiny":
        return {"input_ids": x, "labels": x[:, :10] + 1}
    if name == "bert-tiny":
        y = torch.full_like(x, -100)
        y[:, 1::3] = x[:, 1::3]
        return {"input_ids": x, "labels": y}
    return {"input_ids": x, "labels": x.roll(-1, 1)}


def _curve(name: str, fast: bool, steps: int = 40) -> list[float]:
    torch.manual_seed(0)
    loss_name, extra = FAMILIES[name]
    model = build_model(name, **SMALL, **extra).train()
    if fast:
        apply_fast_paths(model)
    obj = objective(loss_name, model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen, losses = torch.Generator().manual_seed(1), []
    for _ in range(steps):
        loss = obj.loss(model, _batch(name, gen))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fast_dropout_trains_like_the_plain_layers(name):
    """Other masks, so not the same numbers: the same start, and the last steps' mean loss within
    a few percent, both well below the start."""
    kernels.used.clear()
    fast = _curve(name, True)
    assert {"dropout", "softmax_dropout"} <= kernels.used  # the fast path did run
    plain = _curve(name, False)
    assert abs(fast[0] - plain[0]) < 0.05 * plain[0]
    end_fast, end_plain = sum(fast[-10:]) / 10, sum(plain[-10:]) / 10
    assert end_plain < 0.8 * plain[0] and end_fast < 0.8 * fast[0]
    assert abs(end_fast - end_plain) < 0.1 * end_plain, (end_fast, end_plain)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_recomputes_the_same_masks(mode):
    """The recompute draws its seeds from the generator state checkpointing restores: the same
    loss and gradients as keeping the activations."""
    from pretrainer.train.parallel import apply_activation_checkpointing

    loss_name, extra = FAMILIES["llama-tiny"]
    ref_model = apply_fast_paths(build_model("llama-tiny", **SMALL, **extra)).train()
    model = apply_fast_paths(build_model("llama-tiny", **SMALL, **extra)).train()
    model.load_state_dict(ref_model.state_dict())
    apply_activation_checkpointing(model, mode)
    batch = _batch("llama-tiny", torch.Generator().manual_seed(1))
    results = []
    for m in (ref_model, model):
        torch.manual_seed(3)
        loss = objective(loss_name, m).loss(m, batch)
        results.append((loss, torch.autograd.grad(loss, list(m.parameters()))))
    (ref, g_ref), (loss, g) = results
    torch.testing.assert_close(loss, ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
