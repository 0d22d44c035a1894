"""Decoder-only language model (GPT, GPT-2, Llama): causal self-attention blocks and an LM head.

``DecoderLM(cfg)(input_ids)`` returns an :class:`LMOutput` whose ``logits`` is [batch, seq, vocab];
pass ``targets`` (``-100`` = ignored) to also get the mean cross-entropy ``loss``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ModelConfig
from .generation import sample_next
from .loss import cross_entropy, linear_cross_entropy
from .layers import Block, KVCache, Rotary, make_norm, sinusoidal_table


@dataclass
class LMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set (a preset with vocab from data needs it)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model),
                                 persistent=False)
        self.rotary = (Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
                       if cfg.position == "rope" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i, causal=True) for i in range(cfg.n_layer))
        # pre-norm stacks end with a norm; post-norm blocks already end with one
        self.norm_f = make_norm(cfg) if cfg.prenorm else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    # -- initialisation ------------------------------------------------------------------------
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

    # -- forward -------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states [B, T, d_model] (after the last norm)."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=input_ids.device))
        elif self.cfg.position == "sinusoidal":
            x = x + self.pos_table[start:start + T].to(x.dtype)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, self.rotary, cache)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                return_logits: bool = True) -> LMOutput:
        """Logits [B, T, vocab] (``last_only``: [B, 1, vocab]) and, given ``targets``, the mean
        cross-entropy. ``return_logits=False`` with targets, in a training step, computes the loss
        with the fused chunked head (:mod:`.loss`) and returns no logits."""
        h = self.hidden_states(input_ids, cache)
        if targets is not None and not return_logits and torch.is_grad_enabled():
            return LMOutput(logits=None, loss=linear_cross_entropy(h, self.lm_head.weight, targets))
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(h)
        loss = cross_entropy(logits, targets) if targets is not None else None
        return LMOutput(logits=logits, loss=loss)

    # -- generation ----------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.cfg.n_layer, batch, self.cfg.kv_heads, max_len or self.cfg.max_seq_len,
                       self.cfg.head_dim, p.device, p.dtype)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 eos_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend ``input_ids`` [B, T] by up to ``max_new_tokens`` tokens.

        ``temperature=0`` is greedy; otherwise sample from the softmax at that temperature,
        restricted to the ``top_k`` most likely tokens and/or the smallest set whose probability
        reaches ``top_p``. A sequence that produced ``eos_id`` is padded with it; generation stops
        when all have. With ``use_cache`` the keys/values of past positions are kept, so each step
        costs one position; without it every step recomputes the whole (cropped) context. When the
        context reaches ``max_seq_len``, the oldest tokens are dropped (and the cache rebuilt).
        """
        was_training = self.training
        self.eval()
        ids = input_ids
        window = self.cfg.max_seq_len
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        cache, fed = None, 0  # fed: how many tokens of ids are already in the cache
        for _ in range(max_new_tokens):
            if use_cache:
                if cache is None or cache.length + (ids.shape[1] - fed) > window:
                    ctx = ids[:, -window:]
                    cache = self.new_cache(ids.shape[0])
                    logits = self(ctx, cache=cache, last_only=True).logits
                else:
                    logits = self(ids[:, fed:], cache=cache, last_only=True).logits
                fed = ids.shape[1]
            else:
                logits = self(ids[:, -window:], last_only=True).logits
            nxt = sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return ids
