"""Decoder-only language model (GPT, GPT-2, Llama): causal self-attention blocks and an LM head.

``DecoderLM(cfg)(input_ids)`` returns an :class:`LMOutput`: ``logits`` [batch, seq, vocab] and the
final ``hidden_states`` [batch, seq, d_model]. The model computes no loss: objectives do
(:mod:`pretrainer.train.objectives`), from :meth:`DecoderLM.hidden_states` and the output matrix
(``output_weight``) or from the logits. ``prefix_len`` [batch] makes the first ``prefix_len``
positions of each row see each other (a prefix LM, Raffel et al. 2020 section 3.2.1); later
positions stay causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ModelConfig
from .generation import block_repeated_ngrams, sample_next
from .layers import KVCache, Transformer


@dataclass
class LMOutput:
    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None


def prefix_attention_mask(prefix_len: torch.Tensor, T: int) -> torch.Tensor:
    """Boolean [B, 1, T, T]: query i sees key j when j <= i (causal) or j < prefix_len (the
    prefix is bidirectional)."""
    pos = torch.arange(T, device=prefix_len.device)
    return ((pos[None, :] <= pos[:, None])[None] | (pos[None, None, :] < prefix_len[:, None, None]))[:, None]


def check_extras(arch: str, **given) -> None:
    """Keyword inputs that an architecture cannot use are refused, not ignored."""
    bad = [name for name, value in given.items() if value is not None]
    if bad:
        raise ValueError(f"{arch} models take no {', '.join(bad)}")


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
    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None,
                      decoder_input_ids: torch.Tensor | None = None,
                      prefix_len: torch.Tensor | None = None,
                      cache: KVCache | None = None,
                      inputs_embeds: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, d_model] (after the last norm; times d_model**-0.5 for T5's
        tied head, ``scale_tied_output``). The keywords are the same for
        the three model kinds. ``attention_mask`` is accepted for right-padded batches and needs
        nothing here: causal attention never lets a real token see the padding after it.
        ``token_type_ids`` must be None or zeros (a decoder has no segment embeddings).
        ``inputs_embeds`` [B, T, embed_dim]: input vectors in place of the token embeddings of
        ``input_ids`` (:meth:`Transformer.encode`). ``attn_mask`` boolean [B, 1, T, T]: the keys each
        query sees, in place of the causal mask (packed SFT examples:
        :func:`pretrainer.finetune.sft.segment_mask`)."""
        check_extras("decoder-only", decoder_input_ids=decoder_input_ids)
        mask = attn_mask
        if prefix_len is not None:
            if cache is not None or attn_mask is not None:
                raise ValueError("prefix_len does not combine with a KV cache or an attn_mask")
            mask = prefix_attention_mask(prefix_len, input_ids.shape[1])
        h = self.encode(input_ids, cache, attn_mask=mask, inputs_embeds=inputs_embeds)
        if self.cfg.tie_embeddings and self.cfg.scale_tied_output:  # T5's tied head, as in encdec
            h = h * self.cfg.d_model ** -0.5
        return h

    @property
    def output_weight(self) -> torch.Tensor:
        """The output matrix [vocab, d_model] (the embedding when tied), for fused losses."""
        return self.lm_head.weight

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states."""
        return self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | None = None,
                last_only: bool = False, **extras) -> LMOutput:
        """Logits [B, T, vocab] (``last_only``: [B, 1, vocab]) and the hidden states; ``extras``
        as :meth:`hidden_states`."""
        h = self.hidden_states(input_ids, cache=cache, **extras)
        return LMOutput(logits=self.lm_head(h[:, -1:] if last_only else h), hidden_states=h)

    # -- generation ----------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty cache for ``batch`` rows of up to ``max_len`` positions (``max_seq_len``); local
        layers keep only their window."""
        p = self.tok_emb.weight
        return KVCache(self.cfg.n_layer, batch, self.cfg.kv_heads, max_len or self.cfg.max_seq_len,
                       self.cfg.head_dim, p.device, p.dtype, windows=[b.attn.window for b in self.blocks])

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
