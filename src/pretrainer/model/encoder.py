"""Encoder-only model (BERT, RoBERTa): bidirectional self-attention blocks and a masked-LM head.

``EncoderLM(cfg)(input_ids, token_type_ids=..., attention_mask=...)`` returns an
:class:`EncoderOutput`: ``logits`` [batch, seq, vocab] and the final ``hidden_states``
[batch, seq, d_model] that task heads read (the ``<cls>`` state is ``hidden_states[:, 0]``;
:meth:`EncoderLM.pooled` is BERT's pooler on it). The masked-LM loss is the ``mlm`` objective's
(:mod:`pretrainer.train.objectives`), which runs the head on the selected positions only.

The MLM head is BERT's: ``dense(d, d)`` (``d_embed`` wide with factorised embeddings) + activation + norm (``mlm_head``; left out, the hidden
states go straight to the output), then an output layer whose matrix is the token embedding
(``tie_embeddings``) plus a bias per vocabulary entry.

With ``rtd_head`` the model is ELECTRA's discriminator (Clark et al. 2020): instead of the MLM head,
:class:`RTDHead` gives one logit per token, "this token was replaced" (``logits`` [batch, seq]);
the ``electra`` objective trains it beside a small MLM generator.

``nsp_head`` adds BERT's next-sentence head (``cls.seq_relationship``): a 2-way linear layer on the
pooled ``<cls>`` state, whose logits are ``EncoderOutput.nsp_logits`` (class 0: B follows A, 1: B
does not; the ``mlm+nsp`` and ``mlm+sop`` objectives train it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ModelConfig
from .layers import Transformer, activation, make_norm
from .decoder import check_extras


@dataclass
class EncoderOutput:
    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None  # [batch, 2] with model.nsp_head


class MLMHead(nn.Module):
    """Hidden states to vocabulary logits: ``out(norm(act(dense(h))))`` (BERT's
    ``cls.predictions``), or ``out(h)`` without the transform."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.embed_dim  # factorised embeddings (d_embed): the transform maps back to their width
        self.dense = nn.Linear(cfg.d_model, E) if cfg.mlm_head else None
        self.act = activation(cfg.mlp)
        self.norm = make_norm(cfg, E) if cfg.mlm_head else None
        self.out = nn.Linear(E, cfg.vocab_size, bias=True)

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """What the output layer reads: ``norm(act(dense(h)))``, or ``h`` without the transform."""
        return self.norm(self.act(self.dense(h))) if self.dense is not None else h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.transform(h))


class RTDHead(nn.Module):
    """ELECTRA's replaced-token detection head (Clark et al. 2020, section 2): ``out(act(dense(h)))``,
    one logit per position, positive for "replaced" (``discriminator_predictions``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = activation(cfg.mlp)
        self.out = nn.Linear(cfg.d_model, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.dense(h))).squeeze(-1)


class EncoderLM(Transformer):
    """Bidirectional blocks, BERT's pooler (``pooler``) and the MLM head (``mlm``), or ELECTRA's
    replaced-token detection head (``rtd``) instead of it (``rtd_head``)."""

    tied_output = "mlm.out.weight"  # the state-dict entry that is ``tok_emb.weight`` when tied
    summarised_by_cls = True  # a sequence task head reads the first (<cls>) state (a decoder's: the last)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, causal=False)
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if cfg.pooler else None
        self.mlm = MLMHead(cfg) if not cfg.rtd_head else None
        self.rtd = RTDHead(cfg) if cfg.rtd_head else None
        self.nsp = nn.Linear(cfg.d_model, 2) if cfg.nsp_head else None
        if cfg.tie_embeddings and self.mlm is not None:
            self.mlm.out.weight = self.tok_emb.weight
        self.reset_parameters()

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None,
                      decoder_input_ids: torch.Tensor | None = None,
                      prefix_len: torch.Tensor | None = None, cache=None,
                      positions: slice | None = None) -> torch.Tensor:
        """Final hidden states [B, T, d_model]. ``attention_mask`` [B, T]: 1 for tokens, 0 for
        padding (padding keys are masked out of every attention; its own states are computed but
        meaningless). ``token_type_ids`` [B, T]: segment ids (0 everywhere when not given; a
        model without segment embeddings takes none). ``positions``: a slice of the positions
        whose states are wanted, [B, len, d_model] (``slice(0, 1)``: the ``<cls>`` state; the
        last layer then runs only its q/k/v projection on every position, the rest on that row)."""
        check_extras("encoder-only", decoder_input_ids=decoder_input_ids, prefix_len=prefix_len,
                     cache=cache)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]
        if self.type_emb is None:
            token_type_ids = None
        return self.encode(input_ids, token_type_ids=token_type_ids, attn_mask=mask, queries=positions)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """MLM logits of hidden states (of every position, or of the selected ones)."""
        if self.mlm is None:
            raise ValueError("this model has no MLM head (model.rtd_head=true: ELECTRA's discriminator)")
        return self.mlm(h)

    def pooled(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """BERT's pooler: ``tanh(dense(h[:, 0]))``, the first (``<cls>``) token's summary."""
        if self.pooler is None:
            raise ValueError("this model has no pooler (model.pooler=false)")
        return torch.tanh(self.pooler(hidden_states[:, 0]))

    def sentence_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The next-sentence head's logits [B, 2]: ``nsp(pooled(h))`` (BERT's ``seq_relationship``)."""
        if self.nsp is None:
            raise ValueError("this model has no next-sentence head (model.nsp_head=false)")
        return self.nsp(self.pooled(hidden_states))

    def forward(self, input_ids: torch.Tensor, **extras) -> EncoderOutput:
        """MLM logits [B, T, vocab] (with ``rtd_head``: replaced-token logits [B, T]), the hidden
        states and, with ``nsp_head``, the next-sentence logits [B, 2]; ``extras`` as :meth:`hidden_states`."""
        h = self.hidden_states(input_ids, **extras)
        nsp = self.sentence_logits(h) if self.nsp is not None else None
        return EncoderOutput(logits=self.mlm(h) if self.rtd is None else self.rtd(h), hidden_states=h,
                             nsp_logits=nsp)
