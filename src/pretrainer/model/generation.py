"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling,
and blocking repeated n-grams (``no_repeat_ngram_size``, as in Hugging Face ``generate``)."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]. ``temperature <= 0`` means greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def repeated_ngram_bans(ids: torch.Tensor, n: int) -> list[list[int]]:
    """For each row of ``ids`` [B, L]: the tokens that would complete an n-gram the row already
    holds (the tokens that followed each earlier occurrence of its last ``n - 1`` tokens; for
    ``n = 1``, every token it holds). Empty lists when ``n <= 0``."""
    out: list[list[int]] = []
    for seq in ids.tolist():
        if n <= 0 or len(seq) < n:
            out.append([])
            continue
        tail = seq[len(seq) - n + 1:]
        out.append([seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == tail])
    return out


def block_repeated_ngrams(logits: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """``logits`` [B, V] with -inf for every token that would repeat an n-gram of its row of
    ``ids`` (in place; returned for chaining). Does nothing for ``n <= 0``."""
    if n > 0:
        for row, banned in enumerate(repeated_ngram_bans(ids, n)):
            if banned:
                logits[row, banned] = float("-inf")
    return logits
