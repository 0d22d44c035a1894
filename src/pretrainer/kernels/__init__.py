"""Fused float32 CPU kernels for the memory-bound pieces of a training step.

On a CPU, a small model's step is mostly matrix products (MKL, already near the machine's peak)
plus elementwise work that PyTorch's eager ops do in several passes over activations that do not
fit in cache: SwiGLU, GPT-2's tanh GELU, RMSNorm and their backward passes, the rotary embedding, the softmax of the
fused cross-entropy head; and dropout, whose PyTorch CPU op spends about 10 ns per element drawing
its mask. ``cpu.c`` does each in one pass. On a 2-core machine that takes about
8 % off a Llama-style step (numbers in benchmarks/README.md).

The C file is compiled on first use with the machine's C compiler (``$CC``, else ``cc``), for the
machine's own CPU (``-march=native``), into a cache folder keyed by the source, the flags, the
compiler and the CPU (``$PRETRAINER_CACHE`` or ``~/.cache/pretrainer``); that takes under a
second. It is loaded with :mod:`ctypes` after torch, so the ``libgomp.so.1`` it asks for is the
copy PyTorch has already loaded and its OpenMP loops run on PyTorch's own threads. Without a compiler, or when the build fails, a warning says so once and every caller
keeps its PyTorch implementation (the same results to float32 rounding). ``PRETRAINER_KERNELS=0``
turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ..errors import KernelWarning

SOURCE = Path(__file__).with_name("cpu.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]
# first with the vector exp of glibc's libmvec, then without it (other C libraries)
VARIANTS = [(FLAGS, ["-lmvec", "-lm"]), (FLAGS + ["-DPRETRAINER_NO_VECTOR_MATH"], ["-lm"])]



_lib: ctypes.CDLL | None = None
_tried = False
#: the kernels that have run in this process (callers may clear it to watch a stretch of work)
used: set[str] = set()
_lock = threading.Lock()
_P, _I, _F, _U = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_uint64
_SIGNATURES = {
    "swiglu_forward": [_P, _P, _I, _I],
    "swiglu_backward": [_P, _P, _P, _I, _I],
    "gelu_tanh_forward": [_P, _P, _I],
    "gelu_tanh_backward": [_P, _P, _P, _I],
    "rms_norm_forward": [_P, _P, _P, _P, _I, _I, _F],
    "rms_norm_backward": [_P, _P, _P, _P, _P, _P, _I, _I, _I],
    "rotary": [_P, _P, _P, _P, _P, _I, _P, _I, _I, _I, _I, _I, _F],
    "softmax_cross_entropy": [_P, _P, _P, _P, _P, _P, _I, _I, _I],
    "biased_softmax_forward": [_P, _P, _I, _I, _I, _I],
    "biased_softmax_backward": [_P, _P, _P, _I, _I, _I],
    "dropout_forward": [_P, _P, _P, _P, _I, _U, _U, _F],
    "dropout_backward": [_P, _P, _P, _I, _F],
    "softmax_dropout_forward": [_P, _P, _P, _I, _I, _F, _U, _U, _F],
    "softmax_dropout_backward": [_P, _P, _P, _P, _I, _I, _F],
}


def _cache_dir() -> Path:
    base = os.environ.get("PRETRAINER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pretrainer")
    path = Path(base) / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = Path(tempfile.gettempdir()) / f"pretrainer-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_signature() -> str:
    """What ``-march=native`` compiled for: the CPU's flags (Linux), else the machine's name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build() -> Path:
    """Compile cpu.c (or find it compiled) and return the shared library's path."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')!r} not found)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    source = SOURCE.read_bytes()
    errors, cache = [], _cache_dir()
    for flags, libs in VARIANTS:
        key = hashlib.sha256(b"\0".join([source, " ".join(flags + libs).encode(), cc.encode(),
                                         version.encode(), _cpu_signature().encode()])).hexdigest()[:16]
        target = cache / f"pretrainer_cpu_{key}.so"
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), *libs], capture_output=True, text=True,
                              timeout=300)
        if done.returncode == 0:
            os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same file
            return target
        os.unlink(tmp)
        errors.append((done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1])
    raise RuntimeError(f"{cc} could not build {SOURCE.name}: {errors[-1]}")


def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None (turned off, no compiler, or the build failed: warned once)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("PRETRAINER_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
            _tried = True
            return None
        try:
            lib = ctypes.CDLL(str(_build()))
            for name, args in _SIGNATURES.items():
                getattr(lib, name).argtypes = args
                getattr(lib, name).restype = None
            _lib = lib
        except Exception as e:  # any failure leaves the PyTorch implementations in place
            warnings.warn(f"pretrainer: fused CPU kernels unavailable, using PyTorch ops ({e})",
                          KernelWarning, stacklevel=2)
        _tried = True
        return _lib


def reset() -> None:
    """Forget the loaded library so that the next :func:`load` decides again (tests)."""
    global _lib, _tried
    with _lock:
        _lib, _tried = None, False


def usable(*tensors: torch.Tensor) -> bool:
    """True when the kernels are loaded and every tensor is a float32 CPU tensor."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and load() is not None)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


# ----------------------------------------------------------------------------------------------
# The operations (callers check :func:`usable` first). Inputs are made contiguous where the kernel
# needs it; outputs are new tensors unless ``out`` is given.


def swiglu_forward(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``h = [gate, up]`` (last dimension)."""
    h = h.contiguous()
    n = h.shape[-1] // 2
    y = h.new_empty(*h.shape[:-1], n)
    used.add("swiglu")
    _lib.swiglu_forward(_ptr(h), _ptr(y), h.numel() // h.shape[-1], n)
    return y


def gelu_tanh_forward(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh form (``F.gelu(x, approximate="tanh")``)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    used.add("gelu_tanh")
    _lib.gelu_tanh_forward(_ptr(x), _ptr(y), x.numel())
    return y


def gelu_tanh_backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`gelu_tanh_forward` with respect to ``x``."""
    dy, x = dy.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    used.add("gelu_tanh")
    _lib.gelu_tanh_backward(_ptr(dy), _ptr(x), _ptr(dx), x.numel())
    return dx


def swiglu_backward(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to ``h`` (laid out as ``h``, contiguous)."""
    dy, h = dy.contiguous(), h.contiguous()
    dh = torch.empty_like(h)
    used.add("swiglu")
    _lib.swiglu_backward(_ptr(dy), _ptr(h), _ptr(dh), dy.numel() // dy.shape[-1], dy.shape[-1])
    return dh


def rms_norm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` and ``r = 1/rms`` ([N, 1]) of the rows of ``x2`` [N, d]."""
    x2, weight = x2.contiguous(), weight.contiguous()
    y = torch.empty_like(x2)
    r = x2.new_empty(x2.shape[0], 1)
    used.add("rms_norm")
    _lib.rms_norm_forward(_ptr(x2), _ptr(weight), _ptr(y), _ptr(r), x2.shape[0], x2.shape[1], eps)
    return y, r


def rms_norm_backward(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor,
                      r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dx`` [N, d] and ``dweight`` [d]."""
    dy, x2, weight, r = dy.contiguous(), x2.contiguous(), weight.contiguous(), r.contiguous()
    dx = torch.empty_like(x2)
    threads = max(1, torch.get_num_threads())
    partial = x2.new_empty(threads, x2.shape[1])
    used.add("rms_norm")
    _lib.rms_norm_backward(_ptr(dy), _ptr(x2), _ptr(weight), _ptr(r), _ptr(dx), _ptr(partial),
                           x2.shape[0], x2.shape[1], threads)
    return dx, partial.sum(0)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, sign: float) -> torch.Tensor:
    """``out = x * cos + rotate_half(x) * sign * sin`` for ``x``, ``out`` [B, T, H, D] (any strides,
    the last made contiguous), ``cos`` [T, D] and ``sin`` [T, D/2]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    assert out.stride(-1) == 1, "rotary: the output's last dimension must be contiguous"
    B, T, H, D = x.shape
    xs, os_ = (ctypes.c_int64 * 3)(*x.stride()[:3]), (ctypes.c_int64 * 3)(*out.stride()[:3])
    used.add("rotary")
    _lib.rotary(_ptr(x), xs, _ptr(out), os_, _ptr(cos), cos.stride(0), _ptr(sin), sin.stride(0),
                B, T, H, D, sign)
    return out


def softmax_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                           bias: torch.Tensor | None = None,
                           bias_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row cross-entropy of ``logits`` [N, V] (+ ``bias`` [V] on every row, if given)
    (contiguous; overwritten with ``scale * (softmax - one_hot)``, the gradient of
    ``sum(scale * loss)``); ``targets`` [N] in ``0 .. V-1``, ``scale`` [N]. Returns ``(loss,
    dbias)``: with a bias and ``bias_grad``, the bias's gradient summed over the rows in the same
    pass, else None."""
    assert logits.is_contiguous(), "softmax_cross_entropy_: logits must be contiguous"
    targets = targets.to(torch.int64).contiguous()
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise IndexError(f"target ids must lie in 0 .. {logits.shape[1] - 1}; got "
                         f"{int(targets.min())} .. {int(targets.max())}")
    scale = scale.to(torch.float32).contiguous()
    loss = logits.new_empty(logits.shape[0])
    used.add("softmax_cross_entropy")
    parts = max(1, min(torch.get_num_threads(), logits.shape[0]))
    dbias = logits.new_zeros(parts, logits.shape[1]) if bias is not None and bias_grad else None
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    _lib.softmax_cross_entropy(_ptr(logits), _ptr(bias) if bias is not None else None, _ptr(targets), _ptr(scale),
                               _ptr(loss), _ptr(dbias) if dbias is not None else None, parts, logits.shape[0],
                               logits.shape[1])
    return loss, dbias.sum(0) if dbias is not None else None


def biased_softmax_(scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(scores + bias)`` over the last dimension, written over ``scores`` [B, H, T, S]
    (contiguous); ``bias`` [1 or B, H, T, S]. Returns ``scores``."""
    assert scores.is_contiguous(), "biased_softmax_: scores must be contiguous"
    B, S = scores.shape[0], scores.shape[-1]
    R = scores.numel() // (B * S)
    bias = bias.contiguous()
    used.add("biased_softmax")
    _lib.biased_softmax_forward(_ptr(scores), _ptr(bias), B, R, S, 0 if bias.shape[0] == 1 else R * S)
    return scores


def biased_softmax_backward_(dp: torch.Tensor, probs: torch.Tensor, shared_bias: bool) -> torch.Tensor | None:
    """The gradient of :func:`biased_softmax_` with respect to its scores, from that of its output
    (``dp``, contiguous: overwritten with the result); ``probs`` its output. With ``shared_bias``
    returns the gradient of a bias [1, H, T, S], the scores' summed over the batch, else None (a bias
    [B, H, T, S] has the scores' own; a bias that takes none needs neither)."""
    assert dp.is_contiguous() and probs.is_contiguous(), "biased_softmax_backward_: contiguous tensors only"
    B, S = dp.shape[0], dp.shape[-1]
    R = dp.numel() // (B * S)
    dbias = dp.new_empty(1, *dp.shape[1:]) if shared_bias else None
    used.add("biased_softmax")
    _lib.biased_softmax_backward(_ptr(dp), _ptr(probs), _ptr(dbias) if dbias is not None else None, B, R, S)
    return dbias


def dropout_seed() -> int:
    """A seed for one dropout call, drawn from PyTorch's default CPU generator: ``torch.manual_seed``
    and a saved and restored generator state (resuming, activation checkpointing's recompute) give
    the same masks."""
    return int(torch.empty((), dtype=torch.int64).random_())


def _keep_threshold(p: float) -> int:
    """``(1 - p) 2^32``: a draw's high 32 bits below it keep the value."""
    return min(1 << 32, round((1.0 - p) * 2.0 ** 32))


def dropout_forward(x: torch.Tensor, p: float, residual: torch.Tensor | None = None,
                    seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + dropout(x, p)`` (no ``residual``: ``dropout(x, p)``) and the keep mask (bool,
    shaped as ``x``); ``0 < p < 1``."""
    x = x.contiguous()
    if residual is not None:
        residual = residual.contiguous()
    y, mask = torch.empty_like(x), torch.empty(x.shape, dtype=torch.bool)
    used.add("dropout")
    _lib.dropout_forward(_ptr(x), None if residual is None else _ptr(residual), _ptr(y), _ptr(mask), x.numel(),
                         _keep_threshold(p), dropout_seed() if seed is None else seed, 1.0 / (1.0 - p))
    return y, mask


def dropout_backward(dy: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """``dy * mask / (1 - p)``."""
    dy = dy.contiguous()
    dx = torch.empty_like(dy)
    used.add("dropout")
    _lib.dropout_backward(_ptr(dy), _ptr(mask), _ptr(dx), dy.numel(), 1.0 / (1.0 - p))
    return dx


def softmax_dropout(scores: torch.Tensor, a: float, p: float,
                    seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs = softmax(a * scores)`` over the last dimension and ``dropout(probs, p)``
    (``0 < p < 1``); ``scores`` is left as it is."""
    scores = scores.contiguous()
    probs, y = torch.empty_like(scores), torch.empty_like(scores)
    S = scores.shape[-1]
    used.add("softmax_dropout")
    _lib.softmax_dropout_forward(_ptr(scores), _ptr(probs), _ptr(y), scores.numel() // S, S, a,
                                 _keep_threshold(p), dropout_seed() if seed is None else seed, 1.0 / (1.0 - p))
    return probs, y


def softmax_dropout_backward_(dy: torch.Tensor, probs: torch.Tensor, y: torch.Tensor, a: float) -> torch.Tensor:
    """The gradient of :func:`softmax_dropout` with respect to its ``scores``, from that of its
    output ``y`` (``dy``, contiguous: overwritten with the result) and ``probs`` (no mask needed:
    see cpu.c)."""
    assert dy.is_contiguous(), "softmax_dropout_backward_: dy must be contiguous"
    probs, y = probs.contiguous(), y.contiguous()
    S = y.shape[-1]
    used.add("softmax_dropout")
    _lib.softmax_dropout_backward(_ptr(dy), _ptr(probs), _ptr(y), _ptr(dy), y.numel() // S, S, a)
    return dy
