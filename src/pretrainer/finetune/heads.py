"""Task heads on either backbone, and how inputs are laid out for each.

An encoder (BERT) reads ``<cls> a <sep> b <sep>`` with segment (token-type) ids 0 for the first
part and 1 for the second; a sequence head reads BERT's pooled ``<cls>`` state (the pooler, or the
raw ``<cls>`` state for a model without one). A decoder (GPT) reads GPT-1's layout ``<bos> a <sep>
b <eos>`` (``<bos> a <eos>`` for one text); with causal attention only the last token has seen the
whole input, so a sequence head reads the final non-pad token's state. Batches are padded on the
right, so for a decoder the padding comes after every real token and never reaches their states.

Token heads (tagging, the start/end logits of extractive QA) read every position on both.

The special tokens are the tokenizer's by role (:class:`pretrainer.tokenization.Tok`), so a Hugging
Face BERT (``[CLS]``, ``[SEP]``), RoBERTa (``<s>``, ``</s>``) or GPT-2 (``<|endoftext|>``) tokenizer
is laid out the same way as ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import POOLING
from ..tokenization import Tok

@dataclass
class InputFormat:
    """Where the special tokens go for one backbone (``arch`` encoder or decoder)."""

    arch: str
    start_id: int  # <cls> (encoder) or <bos> (decoder)
    sep_id: int  # between the two texts (and the end of an encoder input)
    end_id: int  # <sep> (encoder) or <eos> (decoder): closes the input
    pad_id: int
    type_ids: bool  # whether the backbone has segment embeddings to feed

    @classmethod
    def for_backbone(cls, arch: str, tok: Tok, type_vocab_size: int = 0) -> "InputFormat":
        """The layout for ``arch`` with ``tok``'s tokens by role: an encoder needs cls and sep; a
        decoder needs eos, and uses it where it has no bos (start) or sep. Padding is the pad
        token, else the end token."""
        if arch == "encoder":
            start = tok.need("cls", f"to lay out an {arch}'s inputs")
            sep = end = tok.need("sep", f"to lay out an {arch}'s inputs")
        else:
            end = tok.need("eos", f"to lay out a {arch}'s inputs")
            start = tok.role_id("bos") if tok.role_id("bos") is not None else end
            sep = tok.role_id("sep") if tok.role_id("sep") is not None else end
        pad = tok.role_id("pad")
        return cls(arch, start, sep, end, pad if pad is not None else end, type_vocab_size >= 2)

    #: special tokens around one text / a pair
    def overhead(self, pair: bool) -> int:
        return 3 if pair else 2

    def build(self, a: list[int], b: list[int] | None = None) -> tuple[list[int], list[int]]:
        """``(input_ids, token_type_ids)``; ``a`` starts at position 1, ``b`` at ``len(a) + 2``."""
        ids = [self.start_id] + a + [self.sep_id if b is not None else self.end_id]
        types = [0] * len(ids)
        if b is not None:
            ids += b + [self.end_id]
            types += [1 if self.type_ids else 0] * (len(b) + 1)
        return ids, types

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def truncate_pair(a: list[int], b: list[int] | None, room: int) -> tuple[list[int], list[int] | None]:
    """Cut the longer of the two until both fit in ``room`` tokens (BERT's longest-first)."""
    if b is None:
        return a[:room], None
    a, b = list(a), list(b)
    while len(a) + len(b) > room:
        (a if len(a) >= len(b) else b).pop()
    return a, b


class SequenceHead(nn.Module):
    """Dropout and a linear layer on one summary vector per input (classes, or 1 for regression)."""

    def __init__(self, d_model: int, n_out: int, dropout: float = 0.1):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, n_out)
        nn.init.normal_(self.out.weight, 0.0, 0.02)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(h))


class TokenHead(SequenceHead):
    """The same on every position: tags, or (``n_out=2``) QA start/end logits."""


class TaskModel(nn.Module):
    """A backbone (``EncoderLM`` or ``DecoderLM``) with a task head.

    ``reads="sequence"``: the head sees one vector per input and returns [B, n_out]: with
    ``pooling="cls"`` the pooled ``<cls>`` state (or the last non-pad token's state on a decoder), with
    ``pooling="mean"`` the mean of the final states over the non-pad positions (special tokens
    included, as Sentence-BERT's mean pooling); ``reads="tokens"``: every position,
    [B, T, n_out]. The backbone keeps its pretraining output layer (unused here), so a checkpoint
    holds a complete model; ``cfg``, ``tied_output`` and ``shared_copies`` let the checkpoint helpers
    store the tied output matrix and the weights shared across layers once.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, reads: str, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLING:
            raise ValueError(f"pooling={pooling!r}: expected one of {', '.join(POOLING)}")
        self.backbone, self.head, self.reads, self.pooling = backbone, head, reads, pooling
        self.cfg = backbone.cfg
        self.tied_output = "backbone." + backbone.tied_output
        self.shared_copies = tuple("backbone." + k for k in getattr(backbone, "shared_copies", ()))
        self.by_cls = getattr(backbone, "summarised_by_cls", False)
        # a head on <cls> reads one row of the last layer, which then computes that row alone (the
        # same numbers); not with experts, whose capacity depends on the tokens routed
        self.cls_row_only = reads == "sequence" and pooling == "cls" and self.by_cls and not self.cfg.moe.n_experts

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's hidden states (a decoder's causal attention never sees right padding)."""
        return self.backbone.hidden_states(input_ids, attention_mask=attention_mask,
                                           token_type_ids=token_type_ids)

    def summary(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One vector per input: the mean over the non-pad positions (``pooling="mean"``), else the
        pooled ``<cls>`` (encoder) or the last non-pad token (decoder)."""
        if self.pooling == "mean":
            keep = attention_mask.to(h.dtype).unsqueeze(-1)
            return (h * keep).sum(dim=1) / keep.sum(dim=1)
        if self.by_cls:
            return self.backbone.pooled(h) if self.backbone.pooler is not None else h[:, 0]
        last = attention_mask.long().sum(dim=1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.cls_row_only:
            h = self.backbone.hidden_states(input_ids, attention_mask=attention_mask,
                                            token_type_ids=token_type_ids, positions=slice(0, 1))
        else:
            h = self.states(input_ids, attention_mask, token_type_ids)
        if self.reads == "sequence":
            h = self.summary(h, attention_mask)
        return self.head(h)
