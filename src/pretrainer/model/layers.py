"""The pieces every model is built from: norms, positions, attention, MLPs and the block.

One implementation covers the families by options (see :class:`~pretrainer.config.ModelConfig`):
LayerNorm or RMSNorm, pre- or post-norm, serial or parallel blocks; learned, sinusoidal, rotary
(whole heads or their first dimensions) or T5 relative positions;
multi-head, grouped-query or multi-query attention through ``n_kv_heads``; cross-attention for
encoder-decoders; GELU, ReLU, SwiGLU or GeGLU MLPs. Attention always goes through
``F.scaled_dot_product_attention``.

These are the plain layers: each line is the textbook formula in PyTorch ops. The faster versions
(hand-written backward passes, fused CPU kernels) are subclasses in :mod:`.fast`, swapped in at
build time by :func:`~pretrainer.model.fast.apply_fast_paths` and tested against these.

Weight layout follows the Hugging Face Llama/GPT-2 conventions where it matters for conversion:
rotary embeddings rotate the two halves of each head (``rotate_half``), and the fused projections
are stored as one matrix whose rows are [q; k; v] (attention) or [gate; up] (gated MLPs).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): scale only, no centring, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over ``dim`` features (``d_model`` unless given)."""
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


# ----------------------------------------------------------------------------------------------
# Positions


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of Vaswani et al. (2017): sin on even, cos on odd features."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), half-split layout as in Hugging Face Llama.

    ``dim``: the dimensions of each head that are rotated, the first ones (GPT-NeoX and Pythia
    rotate a quarter of each head, ``model.rope_fraction``); the tables are ``dim`` wide."""

    def __init__(self, dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.dim, self.max_seq_len, self.theta = dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Compute the tables (again, e.g. after a model built on the ``meta`` device is placed)."""
        if self.cos.is_meta:
            return
        d = self.dim
        inv_freq = 1.0 / self.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [T, dim]
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def tables(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` [length, dim] and ``sin`` [length, dim // 2] (both halves of a row are equal) of
        positions ``start .. start+length-1``."""
        return (self.cos[start:start + length].to(dtype),
                self.sin[start:start + length, : self.cos.shape[-1] // 2].to(dtype))


def relative_buckets(rel: torch.Tensor, bidirectional: bool, n_buckets: int,
                     max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position ``rel = key - query`` (Raffel et al. 2020, 2.1).

    Half the buckets hold the exact distances 0 .. n/2 - 1, the other half cover n/2 ..
    ``max_distance`` on a log scale, and anything further shares the last bucket. A bidirectional
    stack splits the buckets in two, keys after the query taking the upper half; a causal one only
    sees keys at or before the query."""
    if bidirectional:
        n_buckets //= 2
        offset = (rel > 0).long() * n_buckets
        dist = rel.abs()
    else:
        offset = torch.zeros_like(rel)
        dist = (-rel).clamp(min=0)
    exact = n_buckets // 2
    log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (n_buckets - exact)).long()).clamp(max=n_buckets - 1)
    return offset + torch.where(dist < exact, dist, far)


class RelativeBias(nn.Module):
    """One learned scalar per (head, distance bucket), added to the attention scores; computed
    once per forward pass and shared by all layers of a stack, as in T5."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.n_buckets, self.max_distance = cfg.rel_buckets, cfg.rel_max_distance
        self.bias = nn.Embedding(cfg.rel_buckets, cfg.n_head)
        self.bias.is_position_bias = True  # T5's init draws it N(0, 1/d_model)

    def forward(self, q_start: int, q_len: int, k_len: int) -> torch.Tensor:
        """Bias [1, heads, q_len, k_len] for queries at ``q_start ..`` and keys at ``0 .. k_len-1``
        (contiguous: every layer of the stack reads it whole)."""
        device = self.bias.weight.device
        q = torch.arange(q_start, q_start + q_len, device=device)[:, None]
        k = torch.arange(k_len, device=device)[None, :]
        buckets = relative_buckets(k - q, self.bidirectional, self.n_buckets, self.max_distance)
        return self.bias(buckets).permute(2, 0, 1).contiguous()[None]


# ----------------------------------------------------------------------------------------------
# Attention


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` [B, H, T, D] rotated by position: ``x * cos + rotate_half(x) * sin`` with
    ``rotate_half(x) = [-x2, x1]`` (Su et al. 2021, the half-split layout of Hugging Face Llama).
    ``cos`` [T, R] and ``sin`` [T, R/2] as :meth:`Rotary.tables` gives them; when R < D only the
    first R dimensions rotate and the rest pass through (partial rotary, GPT-NeoX)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    half = rot // 2
    x1, x2 = x[..., :half], x[..., half:]
    c = cos[:, :half]
    return torch.cat([x1 * c - x2 * sin, x2 * c + x1 * sin], dim=-1)


class KVCache:
    """Keys and values of past positions for every layer.

    A global layer's are preallocated to ``max_len`` positions. A local layer (``windows[i]`` = W,
    GPT-3 / GPT-Neo) never looks further back than W - 1 positions, so it keeps only the last W,
    in a ring buffer: position p in slot p % W (a window of at least ``max_len`` needs no ring)."""

    def __init__(self, n_layer: int, batch: int, n_kv: int, max_len: int, head_dim: int,
                 device, dtype, windows: list[int | None] | None = None):
        windows = windows or [None] * n_layer
        self.windows = [w if w is not None and w < max_len else None for w in windows]
        sizes = [max_len if w is None else w for w in self.windows]
        self.k = [torch.zeros(batch, n_kv, n, head_dim, device=device, dtype=dtype) for n in sizes]
        self.v = [torch.zeros(batch, n_kv, n, head_dim, device=device, dtype=dtype) for n in sizes]
        # the position each slot of a ring holds (-1: none yet)
        self.slot_pos = [None if w is None else torch.full((w,), -1, device=device) for w in self.windows]
        self.max_len = max_len
        self.length = 0  # positions filled (same for every layer once a forward pass completes)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer  # enc-dec

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (in that order): beam search follows its surviving beams."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        self.cross = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                      for kv in self.cross]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the keys and values [B, Hkv, T, D] of positions ``length .. length+T-1``; return
        the keys and values those positions attend over, and the keys' positions (None when they
        are ``0 .. S-1`` in order)."""
        start, end = self.length, self.length + k.shape[-2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        W = self.windows[layer]
        if W is None:
            self.k[layer][:, :, start:end] = k
            self.v[layer][:, :, start:end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end], None
        ring_k, ring_v, pos = self.k[layer], self.v[layer], self.slot_pos[layer]
        if end - start == 1:  # one position: it takes the slot of the one that left its window
            slot = start % W
            ring_k[:, :, slot] = k[:, :, 0]
            ring_v[:, :, slot] = v[:, :, 0]
            pos[slot] = start
            n = min(end, W)
            return ring_k[:, :, :n], ring_v[:, :, :n], pos[:n]
        # a chunk: its first positions still need keys that its last ones will overwrite
        n = min(start, W)
        keys, values = torch.cat([ring_k[:, :, :n], k], dim=2), torch.cat([ring_v[:, :, :n], v], dim=2)
        key_pos = torch.cat([pos[:n], torch.arange(start, end, device=pos.device)])
        kept = torch.arange(max(start, end - W), end, device=pos.device)  # the last W positions
        ring_k[:, :, kept % W] = k[:, :, kept - start]
        ring_v[:, :, kept % W] = v[:, :, kept - start]
        pos[kept % W] = kept
        return keys, values, key_pos


# torch >= 2.5: scaled_dot_product_attention takes fewer key/value heads than query heads itself
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def _share_kv_heads(k: torch.Tensor, v: torch.Tensor, n_head: int):
    """Keys and values [B, Hkv, S, D] made ready for ``n_head`` query heads (grouped-query: each
    key/value head serves ``n_head // Hkv`` of them), and the extra attention argument. On a CPU
    the attention kernel shares the heads itself (``enable_gqa``; causal fwd + bwd of 8 query heads
    over 2 key/value heads, 8 x 256 tokens: 12.1 ms against 13.8 with copies); elsewhere the heads
    are copied, since not every GPU kernel takes ``enable_gqa``."""
    if k.shape[1] == n_head:
        return k, v, {}
    if _SDPA_GQA and k.device.type == "cpu":
        return k, v, {"enable_gqa": True}
    return k.repeat_interleave(n_head // k.shape[1], dim=1), v.repeat_interleave(n_head // k.shape[1], dim=1), {}


class SelfAttention(nn.Module):
    """Multi-head self-attention with grouped key/value heads (``n_kv_heads``) and an optional cache."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, causal: bool):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.causal = causal
        self.layer_idx = layer_idx
        qkv_out = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.has_qkv_bias)
        self.qkv.query_rows = self.n_head * self.head_dim
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_out = True
        self.dropout = cfg.dropout
        self.scale = None if cfg.attn_scale else 1.0
        # GPT-3 / GPT-Neo: some layers attend to a local window only (model.attention_layers)
        self.window = cfg.attention_window if causal and cfg.layer_kind(layer_idx) == "local" else None

    def local_mask(self, start: int, T: int, S: int, attn_mask: torch.Tensor | None, device,
                   key_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Queries at ``start .. start+T-1`` see keys at most ``window - 1`` positions back: with the
        causal part when no mask is given, else within the given mask (which holds it). The keys
        are at ``key_pos`` [S] (a cache's ring buffer), or at ``0 .. S-1``."""
        q = torch.arange(start, start + T, device=device)[:, None]
        k = (key_pos if key_pos is not None else torch.arange(S, device=device))[None, :]
        near = q - k < self.window
        if attn_mask is None:
            return near & (k <= q)
        if attn_mask.dtype == torch.bool:
            return attn_mask & near
        return attn_mask.masked_fill(~near, torch.finfo(attn_mask.dtype).min)

    def split_heads(self, qkv: torch.Tensor, tables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [B, heads, T, D] from the fused projection's output
        [B, T, q + 2 kv heads, D]; queries and keys rotated when ``tables`` is ``(cos, sin)``."""
        q, k, v = qkv.split([self.n_head, self.n_kv, self.n_kv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if tables is not None:
            q, k = apply_rotary(q, *tables), apply_rotary(k, *tables)
        return q, k, v

    def forward(self, x, rotary: Rotary | None = None, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None, queries: slice | None = None):
        """``attn_mask``: a boolean mask of the keys that take part (``True``), [B, 1, 1, T], e.g.
        to leave out padding, or an additive float mask [B or 1, H, T, S] (a position bias). For a
        causal layer, a given mask must already hold the causal part. ``queries``: the positions
        whose outputs are wanted (a bidirectional layer only; keys and values stay everywhere)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv, self.head_dim
        start = cache.length if cache is not None else 0
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, D)
        tables = rotary.tables(start, T, qkv.dtype) if rotary is not None else None
        q, k, v = self.split_heads(qkv, tables)
        key_pos = None  # keys at 0 .. S-1, unless a local layer's cache keeps only its window
        if cache is not None:
            k, v, key_pos = cache.update(self.layer_idx, k, v)
        if queries is not None:
            if self.causal or cache is not None:
                raise ValueError("queries= selects outputs of a bidirectional layer without a cache")
            q = q[:, :, queries]
            if attn_mask is not None and attn_mask.shape[-2] == T > 1:  # a bias per query row
                attn_mask = attn_mask[..., queries, :]
        y = self.attend(q, k, v, start, key_pos, attn_mask)
        return self.proj(y.transpose(1, 2).reshape(B, q.shape[2], H * D))

    def attend(self, q, k, v, start: int, key_pos: torch.Tensor | None,
               attn_mask: torch.Tensor | None) -> torch.Tensor:
        """``softmax(q k^T * scale + mask) v`` [B, H, T, D] for the queries at ``start ..
        start+T-1`` over the keys and values [B, Hkv, S, D] at ``key_pos`` (or ``0 .. S-1``)."""
        T, S = q.shape[-2], k.shape[-2]
        k, v, gqa = _share_kv_heads(k, v, self.n_head)
        mask, is_causal = attn_mask, False
        if self.window is not None and start + T > self.window:  # a local layer: the last `window`
            mask = self.local_mask(start, T, S, attn_mask, q.device, key_pos)  # positions, itself included
        elif self.causal and attn_mask is None:  # (a window that reaches every key is plain causal)
            if start == 0:
                is_causal = T > 1
            elif T > 1:  # a chunk after cached positions: query i sees keys <= start + i
                mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return self.attention(q, k, v, mask, is_causal, self.dropout if self.training else 0.0, gqa)

    def attention(self, q, k, v, mask, is_causal: bool, dropout_p: float, gqa: dict) -> torch.Tensor:
        """``softmax(q k^T * scale + mask) v`` with dropout on the probabilities: PyTorch's attention."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                              scale=self.scale, **gqa)


class CrossAttention(nn.Module):
    """Decoder queries attend to every encoder output (``memory``). Keys and values depend on the
    memory only, so generation computes them once and keeps them in ``cache.cross``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.layer_idx = layer_idx
        self.q = nn.Linear(cfg.d_model, self.n_head * self.head_dim, bias=cfg.has_qkv_bias)
        self.q.query_rows = self.n_head * self.head_dim
        self.kv = nn.Linear(cfg.d_model, 2 * self.n_kv * self.head_dim, bias=cfg.has_qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_out = True
        self.dropout = cfg.dropout
        self.scale = None if cfg.attn_scale else 1.0

    def split_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv heads, S, D] from the projection's output [B, S, 2 kv heads, D]."""
        return kv.transpose(1, 2).split([self.n_kv, self.n_kv], dim=1)

    def forward(self, x, memory: torch.Tensor, cache: KVCache | None = None,
                memory_mask: torch.Tensor | None = None):
        """``memory_mask``: boolean [B, 1, 1, S], ``True`` for the encoder positions that are not
        padding."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv, self.head_dim
        kv = cache.cross[self.layer_idx] if cache is not None else None
        if kv is None:
            S = memory.shape[1]
            k, v = self.split_kv(self.kv(memory).view(B, S, 2 * Hkv, D))
            if cache is not None:
                cache.cross[self.layer_idx] = (k, v)
        else:
            k, v = kv
        q = self.q(x).view(B, T, H, D).transpose(1, 2)
        k, v, gqa = _share_kv_heads(k, v, H)
        y = self.attention(q, k, v, memory_mask, False, self.dropout if self.training else 0.0, gqa)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))

    attention = SelfAttention.attention


# ----------------------------------------------------------------------------------------------
# MLP


def gelu_tanh(t: torch.Tensor) -> torch.Tensor:
    """GELU in its tanh form (Hendrycks & Gimpel 2016), as GPT-2 uses it."""
    return F.gelu(t, approximate="tanh")


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "relu": F.relu,
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}
GATED = ("swiglu", "geglu", "geglu_tanh")


def activation(mlp: str):
    """The elementwise activation of ``model.mlp`` (for gated MLPs, the gate's)."""
    return _ACTIVATIONS[mlp]


class MLP(nn.Module):
    """Position-wise feed-forward: ``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        self.gated = cfg.mlp in GATED
        hidden = hidden or cfg.ff_dim
        self.up = nn.Linear(cfg.d_model, 2 * hidden if self.gated else hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.down.is_residual_out = True
        self.act = activation(cfg.mlp)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """The activation of the up projection's output (gated: ``act(gate) * up`` of its halves)."""
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(h)

    def forward(self, x):
        return self.down(self.activate(self.up(x)))


class MoE(nn.Module):
    """A mixture of expert MLPs with token-choice routing (Shazeer et al. 2017; Switch
    Transformers, Fedus et al. 2021; Mixtral, Jiang et al. 2024).

    A linear router scores each token against every expert; the softmax of the scores gives
    probabilities p, and the token goes to its ``top_k`` most probable experts, whose outputs are
    summed weighted by p (renormalised over the chosen experts when ``top_k`` > 1, as Mixtral;
    Switch's top-1 keeps p itself, so that the router gets a gradient).

    While training, an expert takes at most ``capacity = ceil(capacity_factor * tokens * top_k /
    n_experts)`` of the tokens it is sent, first choices before second choices and earlier tokens
    first (GShard, Lepikhin et al. 2020); a token that gets no expert passes through the block's
    residual unchanged. Evaluation and generation route every token (no capacity), so a token's
    output never depends on the other tokens of its batch.

    Each forward pass leaves ``aux_loss`` on the layer: Switch's load-balancing loss
    ``n_experts * sum_i f_i * P_i`` (f_i: the fraction of routed assignments that chose expert i,
    P_i: the mean router probability of expert i; 1 when balanced) times ``aux_loss_weight``, plus
    the router z-loss ``mean(logsumexp(scores)^2)`` (ST-MoE, Zoph et al. 2022) times
    ``z_loss_weight``. Training passes also add to ``load`` (assignments per expert), ``dropped``
    (assignments over capacity) and ``aux_sum``, which the trainer reads and resets
    (:func:`router_stats`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.n_experts, self.top_k = m.n_experts, m.top_k
        self.capacity_factor = m.capacity_factor
        self.aux_weight, self.z_weight = m.aux_loss_weight, m.z_loss_weight
        self.router = nn.Linear(cfg.d_model, m.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg, m.d_ff) for _ in range(m.n_experts))
        self.aux_loss: torch.Tensor | None = None
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the router statistics (plain tensors, not state: on the CPU even in a ``meta`` build)."""
        self.load = torch.zeros(self.n_experts, dtype=torch.float64, device="cpu")
        self.dropped = torch.zeros((), dtype=torch.float64, device="cpu")
        self.aux_sum, self.passes = torch.zeros((), device="cpu"), 0

    def within_capacity(self, expert: torch.Tensor) -> torch.Tensor:
        """Boolean [N, top_k]: which of the assignments ``expert`` [N, top_k] an expert takes."""
        N = expert.shape[0]
        capacity = math.ceil(self.capacity_factor * N * self.top_k / self.n_experts)
        chosen = F.one_hot(expert.t().reshape(-1), self.n_experts)  # [k*N, E]: first choices first
        place = (chosen.cumsum(0) * chosen).sum(-1) - 1  # each assignment's place in its expert's queue
        return (place < capacity).view(self.top_k, N).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N tokens, d_model]
        scores = self.router(x).float()
        probs = scores.softmax(dim=-1)
        weight, expert = probs.topk(self.top_k, dim=-1)  # [N, top_k]
        if self.top_k > 1:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        keep = torch.ones_like(expert, dtype=torch.bool)
        if self.training and self.capacity_factor > 0:
            keep = self.within_capacity(expert)
        weight = (weight * keep).to(x.dtype)
        y = torch.zeros_like(x)
        for e, mlp in enumerate(self.experts):  # every expert runs, on no tokens if none chose it
            token, slot = torch.where((expert == e) & keep)
            y.index_add_(0, token, mlp(x[token]) * weight[token, slot, None])
        self.aux_loss = self.router_losses(scores, probs, expert)
        if self.training and not _in_backward():  # (not again when a checkpointed block recomputes)
            with torch.no_grad():
                self.load = self.load.to(x.device) + torch.bincount(expert.flatten(), minlength=self.n_experts)
                self.dropped = self.dropped.to(x.device) + (~keep).sum()
                self.aux_sum, self.passes = self.aux_sum.to(x.device) + self.aux_loss.detach(), self.passes + 1
        return y.view(shape)

    def router_losses(self, scores: torch.Tensor, probs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """``aux_loss_weight`` x Switch's load-balancing loss + ``z_loss_weight`` x the z-loss."""
        f = F.one_hot(expert, self.n_experts).float().mean(dim=(0, 1))  # fraction of assignments
        balance = self.n_experts * (f * probs.mean(dim=0)).sum()
        z = torch.logsumexp(scores, dim=-1).square().mean()
        return self.aux_weight * balance + self.z_weight * z


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation checkpointing recomputes blocks there)."""
    return torch._C._current_graph_task_id() != -1


def moe_layers(model: nn.Module) -> list[MoE]:
    """The model's mixture-of-experts layers (none for a dense model)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_aux_loss(layers: list[MoE]) -> torch.Tensor | None:
    """The sum of the MoE ``layers``' auxiliary losses from their last forward pass (None without
    layers): what the training step adds to the objective's loss."""
    losses = [m.aux_loss for m in layers if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def router_stats(model: nn.Module, reset: bool = True, all_sum=None) -> dict | None:
    """Routing in the training passes since the last reset, over the MoE layers of ``model`` (None
    for a dense model or before any pass): ``moe_load`` (each expert's share of the assignments,
    averaged over layers), ``moe_load_max`` (the busiest expert's assignments over the mean,
    averaged over layers; 1 is perfectly balanced), ``moe_dropped`` (the fraction of
    assignments over capacity) and ``moe_aux_loss`` (the weighted auxiliary losses of a pass, summed
    over layers, averaged over passes). ``all_sum(tensor)`` adds every process's counts first."""
    layers = moe_layers(model)
    if not layers or not layers[0].passes:
        return None
    load = torch.stack([m.load.double().cpu() for m in layers])  # [layers, experts]
    sums = torch.stack([torch.stack([m.dropped.double().cpu() for m in layers]).sum(),
                        sum(m.aux_sum.double().cpu() / m.passes for m in layers), torch.tensor(1.0).double()])
    if all_sum is not None:
        load, sums = all_sum(load), all_sum(sums)
    if reset:
        for m in layers:
            m.reset_stats()
    dropped, aux, processes = sums.tolist()
    return {"moe_load": [round(f, 4) for f in (load / load.sum(dim=1, keepdim=True)).mean(dim=0).tolist()],
            "moe_load_max": float((load.max(dim=1).values / load.mean(dim=1)).mean()),
            "moe_dropped": dropped / float(load.sum()), "moe_aux_loss": aux / processes}


# ----------------------------------------------------------------------------------------------
# Block


class Block(nn.Module):
    """Self-attention, cross-attention to an encoder's output (``cross``, encoder-decoder decoders
    only), then the MLP (a mixture of experts in the layers ``model.moe`` names), each in a residual branch normed before (pre-norm) or after (post-norm).

    The parallel block (``model.parallel_block``; GPT-J, GPT-NeoX, PaLM: Chowdhery et al. 2022,
    section 2) computes both branches from the block's input and adds them at once:
    ``x + attn(norm1(x)) + mlp(norm2(x))``, or with one shared norm (``parallel_norms=1``, GPT-J
    and PaLM) ``x + attn(norm1(x)) + mlp(norm1(x))``; the block then has no ``norm2``.

    ``attn`` / ``mlp``: modules to use instead of new ones, another block's (cross-layer sharing,
    ``model.share_layers``)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, causal: bool, cross: bool = False,
                 attn: nn.Module | None = None, mlp: nn.Module | None = None):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.parallel = cfg.parallel_block
        self.norm1 = make_norm(cfg)
        self.attn = attn if attn is not None else SelfAttention(cfg, layer_idx, causal)
        self.norm_x = make_norm(cfg) if cross else None
        self.xattn = CrossAttention(cfg, layer_idx) if cross else None
        self.norm2 = None if self.parallel and cfg.parallel_norms == 1 else make_norm(cfg)
        self.mlp = mlp if mlp is not None else MoE(cfg) if cfg.moe.is_moe_layer(layer_idx) else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A residual branch's output ``y`` added to the stream ``x``: ``x + dropout(y)``."""
        return x + self.drop(y)

    def forward(self, x, rotary=None, cache=None, attn_mask=None, memory=None, memory_mask=None, queries=None):
        """The block's output [B, T, d_model]; with ``queries`` (a slice of the positions, in a
        bidirectional stack) the outputs at those positions only: the attention reads every
        position, everything after it runs on the queries' rows (a classifier on ``<cls>`` needs
        one row of the last block)."""
        add = self.residual
        rows = x if queries is None else x[:, queries]
        if self.parallel:
            h = self.norm1(x)
            h_rows = h if queries is None else h[:, queries]
            h_mlp = self.norm2(rows) if self.norm2 is not None else h_rows
            return add(add(rows, self.attn(h, rotary, cache, attn_mask, queries)), self.mlp(h_mlp))
        if self.prenorm:
            x = add(rows, self.attn(self.norm1(x), rotary, cache, attn_mask, queries))
            if self.xattn is not None:
                x = add(x, self.xattn(self.norm_x(x), memory, cache, memory_mask))
            return add(x, self.mlp(self.norm2(x)))
        x = self.norm1(add(rows, self.attn(x, rotary, cache, attn_mask, queries)))
        if self.xattn is not None:
            x = self.norm_x(add(x, self.xattn(x, memory, cache, memory_mask)))
        return self.norm2(add(x, self.mlp(x)))


def shared_blocks(cfg: ModelConfig, causal: bool, cross: bool = False) -> list[Block]:
    """The ``n_layer`` blocks of a stack, with ALBERT's cross-layer parameter sharing (Lan et al.
    2020, section 3.1; ``model.share_layers``): ``all`` is one block run ``n_layer`` times;
    ``attention`` / ``ffn`` give every block the first block's self-attention / MLP module and
    its own other parts; ``none``, a block of its own for every layer."""
    if cfg.share_layers == "all":
        return [Block(cfg, 0, causal=causal, cross=cross)] * cfg.n_layer
    first = Block(cfg, 0, causal=causal, cross=cross)
    attn = first.attn if cfg.share_layers == "attention" else None
    mlp = first.mlp if cfg.share_layers == "ffn" else None
    return [first] + [Block(cfg, i, causal=causal, cross=cross, attn=attn, mlp=mlp) for i in range(1, cfg.n_layer)]


def init_each(root: nn.Module, init, materialise=None) -> None:
    """``init(module)`` for every module under ``root``, one at a time in ``root.modules()`` order,
    each setting the parameters the module itself holds; ``materialise(module, fn)`` may wrap each
    call (a sharded model runs it on full-size stand-ins of the module's own parameters:
    ``train.parallel.init_sharded``)."""
    run = materialise or (lambda module, fn: fn(module))
    for module in root.modules():
        run(module, init)


# ----------------------------------------------------------------------------------------------
# The stack both models share


class Transformer(nn.Module):
    """Embeddings, blocks and final norm: the part of every model that is not a head.

    Token embedding ``tok_emb``; positions (``pos_emb``: learned, a fixed sinusoidal table, or
    rotary in every attention); segment embeddings ``type_emb`` when ``type_vocab_size`` > 0; a
    norm on the summed embeddings when ``embed_norm`` (BERT); the token embeddings times
    sqrt(d_model) when ``embed_scale`` (Gemma); dropout; with ``d_embed`` (factorised
    embeddings, ALBERT and ELECTRA-small) the embeddings are ``d_embed`` wide and ``embed_proj`` maps
    them up to ``d_model``; ``n_layer`` blocks (sharing their weights with ``share_layers``:
    :func:`shared_blocks`), causal or bidirectional; a final norm for pre-norm stacks (post-norm blocks already end with one).
    With ``position="relative"`` a T5 bias (:class:`RelativeBias`) is added in every attention.
    An encoder-decoder's decoder stack has ``cross`` attention and shares the encoder's
    ``embedding``. Subclasses add their heads, then call :meth:`reset_parameters`.
    """

    def __init__(self, cfg: ModelConfig, causal: bool, cross: bool = False,
                 embedding: nn.Embedding | None = None):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set (a preset with vocab from data needs it)")
        self.cfg = cfg
        self.causal = causal
        E = cfg.embed_dim
        self.tok_emb = embedding if embedding is not None else nn.Embedding(cfg.vocab_size, E)
        # learned positions: RoBERTa's table keeps position_offset rows in front that no input reaches
        self.pos_emb = (nn.Embedding(cfg.max_seq_len + cfg.position_offset, E)
                        if cfg.position == "learned" else None)
        if cfg.position == "sinusoidal":
            self.register_buffer("pos_table", torch.empty(cfg.max_seq_len, E), persistent=False)
            self.reset_buffers()
        self.type_emb = nn.Embedding(cfg.type_vocab_size, E) if cfg.type_vocab_size else None
        self.embed_norm = make_norm(cfg, E) if cfg.embed_norm else None
        self.embed_proj = nn.Linear(E, cfg.d_model) if E != cfg.d_model else None
        self.rotary = (Rotary(cfg.rotary_dim, cfg.max_seq_len, cfg.rope_theta)
                       if cfg.position == "rope" else None)
        self.rel_bias = RelativeBias(cfg, bidirectional=not causal) if cfg.position == "relative" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(shared_blocks(cfg, causal, cross))
        self.norm_f = make_norm(cfg) if cfg.prenorm else nn.Identity()
        # state-dict entries that name the first block's tensors again (share_layers): saved once
        first = {id(t) for t in self.blocks[0].state_dict(keep_vars=True).values()}
        self.shared_copies = tuple(f"blocks.{i}.{k}" for i in range(1, len(self.blocks))
                                   for k, t in self.blocks[i].state_dict(keep_vars=True).items() if id(t) in first)

    @property
    def stacks(self) -> list["Transformer"]:
        """The stacks of blocks this model is made of (itself; an encoder-decoder has two)."""
        return [self]

    def reset_buffers(self) -> None:
        """Compute the fixed sinusoidal table (again, after a ``meta``-device build is placed)."""
        if hasattr(self, "pos_table") and not self.pos_table.is_meta:
            self.pos_table.copy_(sinusoidal_table(self.cfg.max_seq_len, self.cfg.embed_dim))

    def reset_parameters(self, materialise=None) -> None:
        """N(0, init_std) for matrices and embeddings, zero biases, unit norms; GPT-2 scales the
        residual output projections by 1/sqrt(2 n_layer) so the residual stream's variance does not
        grow with depth. Without ``attn_scale`` (T5) the query rows start 1/sqrt(head_dim) smaller,
        so the first scores have the size that scaled attention would give them.

        ``init_scheme="t5"`` is Mesh TensorFlow's, as T5 was trained: each matrix N(0, 1/fan_in),
        embeddings N(0, 1), the relative position bias N(0, 1/d_model). (T5's tied output is scaled
        by d_model**-0.5, which is what keeps N(0, 1) embeddings from giving huge logits.)

        Each module by :meth:`init_module` (:func:`init_each`, where ``materialise`` is told)."""
        init_each(self, self.init_module, materialise)

    def init_weights(self, materialise=None) -> None:
        """Draw every weight afresh (:meth:`reset_parameters`; an encoder-decoder overrides it)."""
        self.reset_parameters(materialise)

    def init_module(self, module: nn.Module) -> None:
        """Initialise the parameters that ``module`` itself holds (not its children's)."""
        if self.cfg.init_scheme == "t5":
            self._t5_init(module)
            return
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layer) if self.cfg.scaled_residual_init else std
        if isinstance(module, nn.Linear):
            s = resid_std if getattr(module, "is_residual_out", False) else std
            nn.init.normal_(module.weight, 0.0, s)
            if not self.cfg.attn_scale and hasattr(module, "query_rows"):
                module.weight.data[:module.query_rows] /= math.sqrt(self.cfg.head_dim)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.ndim == 1:
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def encode(self, input_ids: torch.Tensor, cache: KVCache | None = None,
               token_type_ids: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None, memory: torch.Tensor | None = None,
               memory_mask: torch.Tensor | None = None,
               inputs_embeds: torch.Tensor | None = None, queries: slice | None = None) -> torch.Tensor:
        """Final hidden states [B, T, d_model] of ``input_ids`` [B, T] (after the last norm).
        ``queries``: a slice of the positions whose final states are wanted (bidirectional stacks;
        the last block computes those rows only): [B, len, d_model].
        ``attn_mask``: boolean [B, 1, 1, T] keys that take part (padding left out; bidirectional
        stacks). ``memory`` [B, S, d_model] and ``memory_mask`` [B, 1, 1, S]: the encoder output
        that a decoder stack cross-attends to. ``inputs_embeds`` [B, T, embed_dim]: the input
        vectors in place of ``tok_emb(input_ids)`` (Gato's image patches among the tokens:
        :mod:`pretrainer.model.gato`); positions and the rest apply as to token embeddings."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        if self.cfg.embed_scale:  # Vaswani et al. 2017, section 3.4 (Gemma; BART's scale_embedding)
            x = x * math.sqrt(self.cfg.d_model)
        if self.pos_emb is not None:
            first = start + self.cfg.position_offset
            x = x + self.pos_emb(torch.arange(first, first + T, device=input_ids.device))
        elif self.cfg.position == "sinusoidal":
            x = x + self.pos_table[start:start + T].to(x.dtype)
        if self.type_emb is not None:
            x = x + (self.type_emb(token_type_ids) if token_type_ids is not None
                     else self.type_emb.weight[0])
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        if self.rel_bias is not None:
            attn_mask = self.position_bias(start, T, attn_mask, x.dtype)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, self.rotary, cache, attn_mask, memory, memory_mask, queries if i == last else None)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)

    def position_bias(self, start: int, T: int, key_mask: torch.Tensor | None,
                      dtype: torch.dtype) -> torch.Tensor:
        """The additive mask [B or 1, H, T, start + T] of a relative-position stack: T5's bias, with
        the causal part (causal stacks) and the masked-out keys (``key_mask``) at the dtype's
        lowest value (not -inf, so that no row is ever all -inf)."""
        S = start + T
        bias = self.rel_bias(start, T, S).to(dtype)
        low = torch.finfo(dtype).min
        if self.causal and T > 1 and (key_mask is None or key_mask.shape[-2] == 1):
            allowed = torch.ones(T, S, dtype=torch.bool, device=bias.device).tril(diagonal=start)
            bias = bias.masked_fill(~allowed, low)
        if key_mask is not None:
            bias = bias.masked_fill(~key_mask, low)
        return bias

    def _t5_init(self, module: nn.Module) -> None:
        d, head = self.cfg.d_model, self.cfg.head_dim
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, module.in_features ** -0.5)
            if not self.cfg.attn_scale and hasattr(module, "query_rows"):  # unscaled scores: start small
                module.weight.data[:module.query_rows] /= math.sqrt(head)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and getattr(module, "is_position_bias", False):
            nn.init.normal_(module.weight, 0.0, d ** -0.5)
        elif isinstance(module, nn.Embedding) and module is self.tok_emb:
            nn.init.normal_(module.weight, 0.0, 1.0)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, self.cfg.init_std)
        elif isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.ndim == 1:
            nn.init.ones_(module.weight)
