"""The fused float32 CPU kernels (pretrainer.kernels) against the textbook formulas in float64, and
the fallback to PyTorch ops when they are turned off or cannot be built."""

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import step_grads, tiny_llama
from pretrainer import kernels
from pretrainer.model.fast import _RMSNorm, _SplitHeads, _SwiGLU
from pretrainer.model.layers import Rotary
from pretrainer.model.loss import linear_cross_entropy

needs_kernels = pytest.mark.skipif(kernels.load() is None, reason="fused CPU kernels not built here")


@pytest.fixture
def fresh_kernels():
    kernels.reset()
    yield
    kernels.reset()


def close(a, b, tol=2e-5):
    """float32 results against float64 references, relative to the reference's scale."""
    a, b = a.double(), b.double()
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item()), (a - b).abs().max().item()


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.machine() == "x86_64" and shutil.which("cc")),
                    reason="the kernels are expected to build on Linux x86-64 with a C compiler")
def test_kernels_build_where_a_compiler_exists():
    assert kernels.load() is not None  # else CI would test only the fallback


@needs_kernels
def test_swiglu_kernel_matches_the_formula():
    torch.manual_seed(0)
    h = torch.randn(3, 7, 2 * 45, dtype=torch.float64) * 3
    dy = torch.randn(3, 7, 45, dtype=torch.float64)
    h32 = h.float().requires_grad_()
    got = _SwiGLU.apply(h32)
    h64 = h.clone().requires_grad_()
    ref = F.silu(h64[..., :45]) * h64[..., 45:]  # Shazeer (2020)
    close(got, ref)
    close(torch.autograd.grad((got * dy.float()).sum(), h32)[0], torch.autograd.grad((ref * dy).sum(), h64)[0])


@needs_kernels
def test_rms_norm_kernel_matches_the_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 77, dtype=torch.float64) * 2
    w = torch.randn(77, dtype=torch.float64)
    dy = torch.randn(3, 7, 77, dtype=torch.float64)
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    got = _RMSNorm.apply(x32, w32, 1e-6)
    x64, w64 = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64  # Zhang & Sennrich (2019)
    close(got, ref)
    for a, b in zip(torch.autograd.grad((got * dy.float()).sum(), (x32, w32)),
                    torch.autograd.grad((ref * dy).sum(), (x64, w64))):
        close(a, b)


@needs_kernels
def test_rotary_kernel_matches_the_formula_with_grouped_heads_and_an_offset():
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 5, 4, 2, 10
    qkv = torch.randn(B, T, H + 2 * Hkv, D, dtype=torch.float64)
    rot = Rotary(D, 16, 10000.0)
    cos, sin = rot.tables(3, T, torch.float32)  # positions 3..7: the slices a KV cache uses
    c64, s64 = cos.double(), torch.cat([sin, sin], dim=-1).double()

    def rotate(x):  # x [B, h, T, D]: x * cos + rotate_half(x) * sin (Su et al. 2021; HF Llama)
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return x * c64 + torch.cat([-x2, x1], dim=-1) * s64

    q32 = qkv.float().requires_grad_()
    got = _SplitHeads.apply(q32, cos, sin, H, Hkv)
    q64 = qkv.clone().requires_grad_()
    heads = q64.transpose(1, 2)
    ref = (rotate(heads[:, :H]), rotate(heads[:, H:H + Hkv]), heads[:, H + Hkv:])
    for a, b in zip(got, ref):
        close(a, b)
    # upstream gradients with other layouts than the outputs' (as attention's backward gives them)
    w = [torch.randn(B, T, n, D, dtype=torch.float64).transpose(1, 2) for n in (H, Hkv, Hkv)]
    close(torch.autograd.grad(sum((a * wi.float()).sum() for a, wi in zip(got, w)), q32)[0],
          torch.autograd.grad(sum((b * wi).sum() for b, wi in zip(ref, w)), q64)[0])


@needs_kernels
def test_cross_entropy_kernel_matches_the_formula_with_ignored_targets():
    torch.manual_seed(0)
    N, d, V = 37, 16, 1003
    h = torch.randn(N, d, dtype=torch.float64)
    W = torch.randn(V, d, dtype=torch.float64) * 2
    t = torch.randint(0, V, (N,))
    t[::5] = -100
    h32, W32 = h.float().requires_grad_(), W.float().requires_grad_()
    got = linear_cross_entropy(h32, W32, t)
    h64, W64 = h.clone().requires_grad_(), W.clone().requires_grad_()
    ref = F.cross_entropy(h64 @ W64.t(), t, ignore_index=-100)
    close(got, ref)
    for a, b in zip(torch.autograd.grad(3 * got, (h32, W32)), torch.autograd.grad(3 * ref, (h64, W64))):
        close(a, b)
    with pytest.raises(IndexError, match="target ids"):
        linear_cross_entropy(h32, W32, torch.full((N,), V))


@needs_kernels
@pytest.mark.parametrize("scale", [None, 1.0])
@pytest.mark.parametrize("batch_bias", [False, True])
def test_biased_softmax_kernel_matches_pytorchs_attention(scale, batch_bias):
    """T5's attention with its learned position bias through the fused bias-and-softmax kernel
    (float32): output and gradients of the queries, keys, values and the bias (summed over the
    batch when it is shared) against PyTorch's attention in float64; strided heads as the
    projection's split gives them, masked entries at float's lowest value, two threads' rows."""
    from pretrainer.model.fast import biased_attention

    torch.manual_seed(0)
    B, H, T, S, D = 3, 2, 5, 7, 8
    qkv = [torch.randn(B, n, H, D, dtype=torch.float64).transpose(1, 2) for n in (T, S, S)]
    bias = torch.randn(B if batch_bias else 1, H, T, S, dtype=torch.float64)
    bias = bias.masked_fill(torch.rand(bias.shape) < 0.3, torch.finfo(torch.float32).min)
    w = torch.randn(B, H, T, D, dtype=torch.float64)
    ours = [x.float().requires_grad_() for x in (*qkv, bias)]
    ref = [x.clone().requires_grad_() for x in (*qkv, bias)]
    kernels.used.clear()
    got = biased_attention(*ours[:3], ours[3], scale)
    assert "biased_softmax" in kernels.used
    want = F.scaled_dot_product_attention(*ref[:3], attn_mask=ref[3], scale=scale)
    close(got, want)
    for a, b in zip(torch.autograd.grad((got * w.float()).sum(), ours), torch.autograd.grad((want * w).sum(), ref)):
        assert a.shape == b.shape
        close(a, b)


@pytest.mark.parametrize("use_kernels", [True, False])
def test_fused_loss_with_a_bias_and_changing_rows_matches_the_formula(use_kernels, fresh_kernels, monkeypatch):
    """The masked LM's head: an output bias, and a different number of rows at every step (the
    kept buffer grows and serves them); two losses alive at once do not share it."""
    if not use_kernels:
        monkeypatch.setenv("PRETRAINER_KERNELS", "0")
    elif kernels.load() is None:
        pytest.skip("fused CPU kernels not built here")
    torch.manual_seed(0)
    d, V = 16, 503
    W, b = torch.randn(V, d, dtype=torch.float64), torch.randn(V, dtype=torch.float64)
    W32, b32 = W.float().requires_grad_(), b.float().requires_grad_()
    W64, b64 = W.clone().requires_grad_(), b.clone().requires_grad_()
    for N in (30, 41, 35, 44):
        h = torch.randn(N, d, dtype=torch.float64)
        t = torch.randint(0, V, (N,))
        t[::3] = -100
        h32, h64 = h.float().requires_grad_(), h.clone().requires_grad_()
        got = linear_cross_entropy(h32, W32, t, bias=b32)
        other = linear_cross_entropy(h32[:7], W32, t[:7], bias=b32)  # alive beside it
        ref = F.cross_entropy(h64 @ W64.t() + b64, t, ignore_index=-100)
        close(got, ref)
        close(other, F.cross_entropy(h64[:7] @ W64.t() + b64, t[:7], ignore_index=-100))
        for x, y in zip(torch.autograd.grad(3 * got, (h32, W32, b32)), torch.autograd.grad(3 * ref, (h64, W64, b64))):
            close(x, y)
        other.backward()


def test_turned_off_kernels_leave_the_same_training_step(fresh_kernels, monkeypatch):
    model, x = tiny_llama()
    loss_k, grads_k = step_grads(model, x)
    monkeypatch.setenv("PRETRAINER_KERNELS", "0")
    kernels.reset()
    assert kernels.load() is None and not kernels.usable(x.float())
    loss_t, grads_t = step_grads(model, x)
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_k, grads_t):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_failed_build_warns_once_and_falls_back(fresh_kernels, monkeypatch, tmp_path):
    monkeypatch.setenv("PRETRAINER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="kernels unavailable.*no C compiler"):
        assert kernels.load() is None
    assert kernels.load() is None  # decided once: no second warning, no second attempt
    assert not kernels.usable(torch.zeros(2))


@pytest.mark.slow
def test_a_compiled_model_gives_the_same_step():
    """torch.compile runs through the kernel-backed functions (their calls stay eager): same loss and
    gradients as the eager model. About 30 s of compilation on 2 cores."""
    from pretrainer.train.parallel import compile_blocks

    model, x = tiny_llama()
    ref, g_ref = step_grads(model, x)
    compile_blocks(model)  # as the trainer compiles: each block in place
    loss, g = step_grads(model, x)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


@needs_kernels
def test_gelu_tanh_kernel_matches_the_formula():
    from pretrainer.model.fast import _GeluTanh

    torch.manual_seed(0)
    x = torch.cat([torch.randn(3, 7, 45, dtype=torch.float64) * 3, torch.tensor([[[-30.0, -9.0, 0.0, 9.0, 30.0] * 9]],
                                                                                  dtype=torch.float64).expand(1, 7, 45)])
    dy = torch.randn_like(x)
    x32 = x.float().requires_grad_()
    kernels.used.clear()
    got = _GeluTanh.apply(x32)
    x64 = x.clone().requires_grad_()
    ref = 0.5 * x64 * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x64 + 0.044715 * x64 ** 3)))  # Hendrycks & Gimpel
    close(got, ref)
    close(torch.autograd.grad((got * dy.float()).sum(), x32)[0], torch.autograd.grad((ref * dy).sum(), x64)[0])
    assert "gelu_tanh" in kernels.used
