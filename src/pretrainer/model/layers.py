"""The pieces every model is built from: norms, positions, attention, MLPs and the block.

One implementation covers the families by options (see :class:`~pretrainer.config.ModelConfig`):
LayerNorm or RMSNorm, pre- or post-norm; learned, sinusoidal or rotary positions; multi-head,
grouped-query or multi-query attention through ``n_kv_heads``; GELU, ReLU, SwiGLU or GeGLU MLPs.
Attention always goes through ``F.scaled_dot_product_attention``.

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


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


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
    """Rotary position embedding (Su et al. 2021), half-split layout as in Hugging Face Llama."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [T, head_dim]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate ``x`` [B, H, T, D] as positions ``start .. start+T-1``:
        ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``, written on the
        halves so that no concatenated copy is made."""
        T = x.shape[-2]
        cos = self.cos[start:start + T].to(x.dtype)
        sin = self.sin[start:start + T, : x.shape[-1] // 2].to(x.dtype)  # both halves are equal
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = x * cos
        out[..., :half].sub_(x2 * sin)
        out[..., half:].add_(x1 * sin)
        return out


# ----------------------------------------------------------------------------------------------
# Attention


class KVCache:
    """Keys and values of past positions for every layer, preallocated to ``max_len``."""

    def __init__(self, n_layer: int, batch: int, n_kv: int, max_len: int, head_dim: int,
                 device, dtype):
        shape = (batch, n_kv, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0  # positions filled (same for every layer once a forward pass completes)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, end = self.length, self.length + k.shape[-2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class SelfAttention(nn.Module):
    """Multi-head self-attention with grouped key/value heads (``n_kv_heads``) and an optional cache."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, causal: bool):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.causal = causal
        self.layer_idx = layer_idx
        qkv_out = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_out = True
        self.dropout = cfg.dropout

    def forward(self, x, rotary: Rotary | None = None, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None):
        """``attn_mask`` (bidirectional attention only): a boolean [B, 1, 1, T] mask of the keys
        that take part (``True``), e.g. to leave out padding."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # [B, heads, T, D]
        qk, v = qkv.split([H + Hkv, Hkv], dim=1)
        start = cache.length if cache is not None else 0
        if rotary is not None:  # queries and keys rotated in one pass
            qk = rotary(qk, start)
        q, k = qk.split([H, Hkv], dim=1)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if Hkv != H:  # grouped-query: each key/value head serves H // Hkv query heads
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        mask, is_causal = attn_mask, False
        if self.causal:
            if start == 0:
                is_causal = T > 1
            elif T > 1:  # a chunk after cached positions: query i sees keys <= start + i
                S = k.shape[-2]
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


# ----------------------------------------------------------------------------------------------
# MLP


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "swiglu": F.silu,
    "geglu": F.gelu,
}


def activation(mlp: str):
    """The elementwise activation of ``model.mlp`` (for gated MLPs, the gate's)."""
    return _ACTIVATIONS[mlp]


class MLP(nn.Module):
    """Position-wise feed-forward: ``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp in ("swiglu", "geglu")
        hidden = cfg.ff_dim
        self.up = nn.Linear(cfg.d_model, 2 * hidden if self.gated else hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.down.is_residual_out = True
        self.act = activation(cfg.mlp)

    def forward(self, x):
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down(h)


# ----------------------------------------------------------------------------------------------
# Block


class Block(nn.Module):
    """Attention then MLP, each in a residual branch, normed before (pre-norm) or after (post-norm)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, causal: bool):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1 = make_norm(cfg)
        self.attn = SelfAttention(cfg, layer_idx, causal)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rotary=None, cache=None, attn_mask=None):
        if self.prenorm:
            x = x + self.drop(self.attn(self.norm1(x), rotary, cache, attn_mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, rotary, cache, attn_mask)))
        return self.norm2(x + self.drop(self.mlp(x)))


# ----------------------------------------------------------------------------------------------
# The stack both models share


class Transformer(nn.Module):
    """Embeddings, blocks and final norm: the part of every model that is not a head.

    Token embedding ``tok_emb``; positions (``pos_emb``: learned, a fixed sinusoidal table, or
    rotary in every attention); segment embeddings ``type_emb`` when ``type_vocab_size`` > 0; a
    norm on the summed embeddings when ``embed_norm`` (BERT); dropout; ``n_layer`` blocks, causal or
    bidirectional; a final norm for pre-norm stacks (post-norm blocks already end with one).
    Subclasses add their heads, then call :meth:`reset_parameters`.
    """

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set (a preset with vocab from data needs it)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model),
                                 persistent=False)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.rotary = (Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
                       if cfg.position == "rope" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i, causal=causal) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg) if cfg.prenorm else nn.Identity()

    def reset_parameters(self) -> None:
        """N(0, init_std) for matrices and embeddings, zero biases, unit norms; GPT-2 scales the
        residual output projections by 1/sqrt(2 n_layer) so the residual stream's variance does not
        grow with depth."""
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layer) if self.cfg.scaled_residual_init else std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                s = resid_std if getattr(module, "is_residual_out", False) else std
                nn.init.normal_(module.weight, 0.0, s)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) and module.weight.ndim == 1:
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def encode(self, input_ids: torch.Tensor, cache: KVCache | None = None,
               token_type_ids: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, d_model] of ``input_ids`` [B, T] (after the last norm)."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=input_ids.device))
        elif self.cfg.position == "sinusoidal":
            x = x + self.pos_table[start:start + T].to(x.dtype)
        if self.type_emb is not None:
            x = x + (self.type_emb(token_type_ids) if token_type_ids is not None
                     else self.type_emb.weight[0])
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, self.rotary, cache, attn_mask)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)
