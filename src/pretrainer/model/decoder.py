"""Decoder-only language model (GPT, GPT-2, Llama): causal self-attention blocks and an LM head.

``DecoderLM(cfg)(input_ids)`` returns an :class:`LMOutput` whose ``logits`` is [batch, seq, vocab];
pass ``targets`` (``-100`` = ignored) to also get the mean cross-entropy ``loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ModelConfig
from .generation import block_repeated_ngrams, sample_next
from .loss import cross_entropy, linear_cross_entropy
from .layers import KVCache, Transformer


@dataclass
class LMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class DecoderLM(Transformer):
    """Causal blocks and an output head (``lm_head``, tied to ``tok_emb`` when ``tie_embeddings``)."""

    tied_output = "lm_head.weight"  # the state-dict entry that is ``tok_emb.weight`` when tied

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, causal=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    # -- forward -------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states [B, T, d_model] (after the last norm)."""
        return self.encode(input_ids, cache)

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
                 eos_id: int | None = None, generator: torch.Generator | None = None,
                 no_repeat_ngram_size: int = 0) -> torch.Tensor:
        """Extend ``input_ids`` [B, T] by up to ``max_new_tokens`` tokens.

        ``temperature=0`` is greedy; otherwise sample from the softmax at that temperature,
        restricted to the ``top_k`` most likely tokens and/or the smallest set whose probability
        reaches ``top_p``. A sequence that produced ``eos_id`` is padded with it; generation stops
        when all have. With ``use_cache`` the keys/values of past positions are kept, so each step
        costs one position; without it every step recomputes the whole (cropped) context. When the
        context reaches ``max_seq_len``, the oldest tokens are dropped (and the cache rebuilt).
        ``no_repeat_ngram_size=n`` > 0 never lets a row repeat an n-gram it holds (prompt included).
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
            nxt = sample_next(block_repeated_ngrams(logits[:, -1].float(), ids, no_repeat_ngram_size),
                              temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return ids
