"""Encoder-decoder model (T5, BART): a bidirectional encoder, a causal decoder that cross-attends to
the encoder's output, one shared token embedding and an LM head.

``EncoderDecoderLM(cfg)(input_ids, decoder_input_ids=...)`` returns a :class:`Seq2SeqOutput`
whose ``logits`` is [batch, target_seq, vocab]. For teacher forcing the decoder inputs are the
labels shifted right behind the decoder-start token ``<pad>`` (id 0, as in T5):
:func:`pretrainer.common.shift_right`. The model computes no loss; the objectives do.

Both stacks are the :class:`~pretrainer.model.layers.Transformer` of the other modes: the encoder
with bidirectional blocks, the decoder with causal blocks plus cross-attention. A T5 preset adds
the relative position bias (one per stack, shared by its layers) and RMSNorm pre-norm without
biases; a BART preset has learned positions, post-norm and a norm on the embeddings.

Generation (:meth:`EncoderDecoderLM.generate`): greedy, sampling, or beam search with a length
penalty and early stopping, batched; the decoder's self-attention keys/values are cached and the
cross-attention keys/values are computed once from the encoder output.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ModelConfig
from .generation import block_repeated_ngrams, sample_next
from .layers import KVCache, Transformer
from ..common import shift_right  # noqa: F401 - re-exported: the decoder inputs of labels
from .decoder import check_extras

PAD_ID, EOS_ID = 0, 2  # pretrainer tokenizers: <pad> = 0 (also T5's decoder start), <eos> = 2


@dataclass
class Seq2SeqOutput:
    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None  # the decoder's
    encoder_hidden_states: torch.Tensor | None = None


class EncoderDecoderLM(nn.Module):
    """``encoder`` and ``decoder`` stacks sharing ``encoder.tok_emb``, and ``lm_head`` (tied to the
    embedding when ``tie_embeddings``; T5 then scales the decoder output by d_model**-0.5)."""

    tied_output = "lm_head.weight"
    shared_copies = ("decoder.tok_emb.weight",)  # state-dict entries that are encoder.tok_emb.weight

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Transformer(cfg, causal=False)
        self.decoder = Transformer(dataclasses.replace(cfg, n_layer=cfg.decoder_layers), causal=True,
                                   cross=True, embedding=self.encoder.tok_emb)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.encoder.tok_emb.weight
        self.init_weights()

    def init_weights(self, materialise=None) -> None:
        """Both stacks' initialisation, then an untied output layer's (see
        :meth:`Transformer.reset_parameters`)."""
        self.decoder.reset_parameters(materialise)
        self.encoder.reset_parameters(materialise)
        if not self.cfg.tie_embeddings:  # T5 v1.1 draws its untied output like its embeddings
            std = 1.0 if self.cfg.init_scheme == "t5" else self.cfg.init_std
            (materialise or (lambda m, fn: fn(m)))(self.lm_head, lambda m: nn.init.normal_(m.weight, 0.0, std))

    @property
    def tok_emb(self) -> nn.Embedding:
        return self.encoder.tok_emb

    @property
    def stacks(self) -> list[Transformer]:
        """The encoder's and the decoder's stacks of blocks."""
        return [self.encoder, self.decoder]

    # -- forward -------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """``(encoder output [B, S, d_model], key mask [B, 1, 1, S] or None)``. Without an
        ``attention_mask`` the ``<pad>`` positions of ``input_ids`` are left out."""
        keep = attention_mask.bool() if attention_mask is not None else input_ids != PAD_ID
        mask = None if bool(keep.all()) else keep[:, None, None, :]
        return self.encoder.encode(input_ids, attn_mask=mask), mask

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
               memory_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """The decoder's final hidden states [B, T, d_model], scaled for a tied T5 head."""
        h = self.decoder.encode(decoder_input_ids, cache, memory=memory, memory_mask=memory_mask)
        if self.cfg.tie_embeddings and self.cfg.scale_tied_output:
            h = h * self.cfg.d_model ** -0.5
        return h

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None,
                      decoder_input_ids: torch.Tensor | None = None,
                      prefix_len: torch.Tensor | None = None, cache=None,
                      memory: tuple | None = None) -> torch.Tensor:
        """The decoder's final hidden states [B, T, d_model] for ``decoder_input_ids`` (scaled for
        a tied T5 head), or without them the encoder's [B, S, d_model] (frozen-encoder features).
        ``memory``: an ``encode`` result to reuse instead of running the encoder again."""
        check_extras("encoder-decoder", token_type_ids=token_type_ids, prefix_len=prefix_len,
                     cache=cache)
        enc, mask = memory if memory is not None else self.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            return enc
        return self.decode(decoder_input_ids, enc, mask)

    @property
    def output_weight(self) -> torch.Tensor:
        """The output matrix [vocab, d_model] (the embedding when tied), for fused losses."""
        return self.lm_head.weight

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of decoder hidden states."""
        return self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, *, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> Seq2SeqOutput:
        """Logits [B, T, vocab] of the decoder positions, with the decoder's and the encoder's
        hidden states."""
        memory, mask = self.encode(input_ids, attention_mask)
        h = self.decode(decoder_input_ids, memory, mask)
        return Seq2SeqOutput(self.lm_head(h), h, memory)

    # -- generation ----------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.cfg.decoder_layers, batch, self.cfg.kv_heads, max_len, self.cfg.head_dim,
                       p.device, p.dtype)

    def _next_logits(self, ids, memory, mask, cache):
        """Logits [B, V] of the token after ``ids`` (only the positions not yet in ``cache`` are fed)."""
        fed = ids[:, cache.length:] if cache is not None else ids
        h = self.decode(fed, memory, mask, cache)[:, -1]
        return self.lm_head(h).float()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, num_beams: int = 1,
                 use_cache: bool = True, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = EOS_ID,
                 attention_mask: torch.Tensor | None = None, length_penalty: float = 1.0,
                 early_stopping: bool = True, generator: torch.Generator | None = None,
                 no_repeat_ngram_size: int = 0) -> torch.Tensor:
        """Target ids [B, L] for the sources ``input_ids`` [B, S] (the decoder-start token not
        included; a row that ended at ``eos_id`` is padded with ``<pad>`` after it).

        ``num_beams=1``: greedy (``temperature=0``) or sampling (temperature, ``top_k``, ``top_p``).
        ``num_beams>1``: beam search; a finished hypothesis scores its summed log-probability over
        ``length ** length_penalty``. With ``early_stopping`` a batch row stops once it has
        ``num_beams`` finished hypotheses; otherwise once no running beam can still beat the worst
        of them. ``no_repeat_ngram_size=n`` > 0: no n-gram appears twice in a target (greedy,
        sampling and beams alike).
        """
        was_training = self.training
        self.eval()
        try:
            memory, mask = self.encode(input_ids, attention_mask)
            if num_beams > 1:
                return self._beam_search(memory, mask, max_new_tokens, num_beams, use_cache, eos_id,
                                         length_penalty, early_stopping, no_repeat_ngram_size)
            B = input_ids.shape[0]
            ids = torch.full((B, 1), PAD_ID, dtype=torch.long, device=input_ids.device)
            cache = self.new_cache(B, max_new_tokens + 1) if use_cache else None
            done = torch.zeros(B, dtype=torch.bool, device=ids.device)
            for _ in range(max_new_tokens):
                logits = block_repeated_ngrams(self._next_logits(ids, memory, mask, cache), ids[:, 1:],
                                               no_repeat_ngram_size)
                nxt = sample_next(logits, temperature, top_k, top_p, generator)
                nxt = nxt.masked_fill(done, PAD_ID)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                if eos_id is not None:
                    done |= nxt == eos_id
                    if bool(done.all()):
                        break
            return ids[:, 1:]
        finally:
            self.train(was_training)

    def _beam_search(self, memory, mask, max_new_tokens, K, use_cache, eos_id, length_penalty,
                     early_stopping, no_repeat_ngram_size: int = 0) -> torch.Tensor:
        B, device = memory.shape[0], memory.device
        memory = memory.repeat_interleave(K, dim=0)
        mask = mask.repeat_interleave(K, dim=0) if mask is not None else None
        ids = torch.full((B * K, 1), PAD_ID, dtype=torch.long, device=device)
        cache = self.new_cache(B * K, max_new_tokens + 1) if use_cache else None
        scores = torch.full((B, K), -math.inf, device=device)
        scores[:, 0] = 0.0  # all beams start identical: only the first may expand at step one
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        closed = [False] * B

        def final(score: float, length: int) -> float:
            return score / (length ** length_penalty)

        for step in range(1, max_new_tokens + 1):
            logp = block_repeated_ngrams(torch.log_softmax(self._next_logits(ids, memory, mask, cache), dim=-1),
                                         ids[:, 1:], no_repeat_ngram_size)
            V = logp.shape[-1]
            cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
            top_scores, top_idx = cand.topk(2 * K, dim=-1)
            new_rows, new_tokens, new_scores = [], [], []
            for b in range(B):
                keep: list[tuple[int, int, float]] = []
                if not closed[b]:
                    for s, i in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                        beam, tok = divmod(i, V)
                        if s == -math.inf:
                            break
                        if eos_id is not None and tok == eos_id:
                            seq = ids[b * K + beam, 1:].tolist() + [tok]
                            finished[b].append((final(s, step), seq))
                            finished[b].sort(key=lambda h: -h[0])
                            del finished[b][K:]
                        else:
                            keep.append((beam, tok, s))
                        if len(keep) == K:
                            break
                    if len(finished[b]) == K:
                        best_running = keep[0][2] if keep else -math.inf
                        # scores only fall as beams grow: the best a running beam can still reach
                        # is its score now, normalised by the length that flatters it most
                        bound = final(best_running, step if length_penalty <= 0 else max_new_tokens)
                        if early_stopping or bound <= finished[b][-1][0]:
                            closed[b] = True
                if closed[b] or not keep:  # a closed row keeps dummy beams that never win
                    closed[b] = True
                    keep = [(0, PAD_ID, -math.inf)] * K
                keep += [(keep[0][0], PAD_ID, -math.inf)] * (K - len(keep))
                for beam, tok, s in keep:
                    new_rows.append(b * K + beam)
                    new_tokens.append(tok)
                    new_scores.append(s)
            rows = torch.tensor(new_rows, device=device)
            ids = torch.cat([ids.index_select(0, rows),
                             torch.tensor(new_tokens, device=device)[:, None]], dim=1)
            scores = torch.tensor(new_scores, device=device).view(B, K)
            if cache is not None:
                cache.reorder(rows)
            if all(closed):
                break
        out = []
        for b in range(B):
            hyps = list(finished[b])
            if not closed[b]:  # ran out of length: the running beams compete as they are
                for k in range(K):
                    s = scores[b, k].item()
                    if s > -math.inf:
                        hyps.append((final(s, ids.shape[1] - 1), ids[b * K + k, 1:].tolist()))
            best = max(hyps, key=lambda h: h[0])[1] if hyps else []
            out.append(torch.tensor(best, dtype=torch.long))
        length = max(1, max(len(o) for o in out))
        result = torch.full((B, length), PAD_ID, dtype=torch.long)
        for b, o in enumerate(out):
            result[b, :len(o)] = o
        return result.to(device)
