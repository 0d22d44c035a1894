"""Scoring text with a decoder-only model: the one implementation behind ``pretrainer icl`` and the
lm-evaluation-harness adapter, so that both give the same numbers by construction.

- :func:`encode_pair` turns ``(context, continuation)`` into token ids: the context is preceded by
  ``<eos>`` (the separator the model saw between documents in training, as ``pretrainer generate``
  does) and the two parts are encoded separately, so every candidate continuation of a context is
  tokenised the same way whatever precedes it.
- :func:`loglikelihoods`: the summed log-probability of each continuation given its context, its
  token count and whether greedy decoding would produce it; batched (right padding: causal
  attention never lets a position see the padding after it, so the numbers are those of one
  sequence at a time up to float rounding).
- :func:`rolling_loglikelihood`: the log-probability of a whole text in windows of the model's
  context, every token predicted once with as much context as fits.
- :func:`greedy_generate` / :func:`generate_texts`: greedy (or sampled, seeded) continuations that
  stop at ``<eos>`` or at any stop string, batched without padding (rows with shorter prompts
  start generating while the others still read theirs; see the function).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import PretrainerError
from ..model.generation import sample_next


@dataclass(frozen=True)
class Score:
    logprob: float  # summed natural-log probability of the continuation's tokens
    n_tokens: int
    greedy: bool  # every continuation token is the argmax of its position

    @property
    def per_token(self) -> float:
        return self.logprob / max(self.n_tokens, 1)


def check_decoder(model) -> None:
    if not (hasattr(model, "hidden_states") and hasattr(model, "lm_head") and hasattr(model, "new_cache")):
        raise PretrainerError(f"in-context evaluation needs a decoder-only model (GPT/Llama run), "
                              f"got {type(model).__name__}")


def window(model) -> int:
    """The model's context length in tokens."""
    return int(model.cfg.max_seq_len)


def prefix_ids(tok) -> list[int]:
    """What every context starts with: what starts a document in training (the tokenizer's
    :attr:`~pretrainer.tokenization.Tok.document_prefix`: Llama's ``<s>``), else the end-of-text
    token that separates documents (``<eos>``, GPT-2's ``<|endoftext|>``), else the
    beginning-of-text one, else nothing (by role, see :class:`pretrainer.tokenization.Tok`)."""
    if getattr(tok, "document_prefix", None):
        return tok.document_prefix
    first = tok.role_id("eos") if tok.role_id("eos") is not None else tok.role_id("bos")
    return [first] if first is not None else []


def encode_context(tok, context: str) -> list[int]:
    return prefix_ids(tok) + (tok.encode(context) if context else [])


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)``: ``<eos>`` + context, and the continuation encoded alone."""
    return encode_context(tok, context), tok.encode(continuation)


def fit_pair(ctx: list[int], cont: list[int], max_len: int) -> list[int]:
    """``ctx`` cut from the left so that the model reads at most ``max_len`` tokens: the last
    continuation token is only predicted, never read, so ``len(ctx) + len(cont) <= max_len + 1``."""
    room = max_len + 1 - len(cont)
    if room < 1:
        raise PretrainerError(f"a continuation of {len(cont)} tokens does not fit the model's "
                              f"{max_len}-token context")
    return ctx[-room:]


@torch.no_grad()
def loglikelihoods(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16) -> list[Score]:
    """Score every ``(context ids, continuation ids)`` pair; contexts too long for the model's window
    are cut from the left (:func:`fit_pair`). Pairs are sorted by length and batched with right
    padding; the head is applied only at the positions that predict continuation tokens."""
    check_decoder(model)
    W = window(model)
    fitted = []
    for ctx, cont in pairs:
        if not cont:
            raise PretrainerError("cannot score an empty continuation (it has no tokens)")
        if not ctx:
            raise PretrainerError("a context needs at least one token (the <eos> prefix)")
        fitted.append((fit_pair(list(ctx), list(cont), W), list(cont)))
    order = sorted(range(len(fitted)), key=lambda i: -(len(fitted[i][0]) + len(fitted[i][1])))
    device = model.tok_emb.weight.device
    out: list[Score | None] = [None] * len(fitted)
    for b in range(0, len(order), max(1, batch_size)):
        idx = order[b:b + batch_size]
        seqs = [fitted[i][0] + fitted[i][1] for i in idx]
        T = max(len(s) for s in seqs) - 1
        x = torch.zeros(len(idx), T, dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, (i, s) in enumerate(zip(idx, seqs)):
            x[r, :len(s) - 1] = torch.tensor(s[:-1])
            n_ctx, n_cont = len(fitted[i][0]), len(fitted[i][1])
            rows += [r] * n_cont
            cols += range(n_ctx - 1, n_ctx - 1 + n_cont)
            targets += fitted[i][1]
        h = model.hidden_states(x.to(device))
        logits = model.head(h[torch.tensor(rows), torch.tensor(cols)]).float()
        logp = torch.log_softmax(logits, dim=-1)
        tgt = torch.tensor(targets, device=logp.device)
        tok_lp = logp.gather(-1, tgt[:, None]).squeeze(-1).tolist()
        hit = (logits.argmax(-1) == tgt).tolist()
        pos = 0
        for i in idx:
            n = len(fitted[i][1])
            out[i] = Score(float(sum(tok_lp[pos:pos + n])), n, all(hit[pos:pos + n]))
            pos += n
    return out  # type: ignore[return-value]


def rolling_windows(ids: list[int], prefix: list[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """``(context, continuation)`` pairs that predict every token of ``ids`` exactly once: chunks of
    ``max_len`` tokens, each with as much preceding context (``prefix`` first) as fits."""
    seq = list(prefix) + list(ids)
    start = len(prefix)
    if start == 0:
        raise PretrainerError("rolling log-likelihood needs a prefix token (an end-of-text or "
                              "beginning-of-text token; name one with --eos-token TEXT)")
    pairs = []
    for a in range(start, len(seq), max_len):
        b = min(a + max_len, len(seq))
        room = max_len + 1 - (b - a)
        pairs.append((seq[max(0, a - room):a], seq[a:b]))
    return pairs


def rolling_loglikelihood(model, tok, texts: Sequence[str], batch_size: int = 16) -> list[float]:
    """Summed log-probability of each whole text (after the ``<eos>`` prefix), any length."""
    pairs, owner = [], []
    for t, text in enumerate(texts):
        for pair in rolling_windows(tok.encode(text), prefix_ids(tok), window(model)):
            pairs.append(pair)
            owner.append(t)
    totals = [0.0] * len(texts)
    for t, s in zip(owner, loglikelihoods(model, pairs, batch_size)):
        totals[t] += s.logprob
    return totals


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = [text.index(s) for s in stop if s and s in text]
    return (text[:min(cut)], True) if cut else (text, False)


def greedy_generate(model, tok, contexts: Sequence[list[int]], max_new_tokens: int,
                    stop: Sequence[str] = ("\n",), batch_size: int = 16) -> list[str]:
    """Greedy continuation of each context (token ids), as text cut before the first stop string;
    a row also stops at ``<eos>`` or after ``max_new_tokens`` tokens (see :func:`generate_texts`)."""
    return generate_texts(model, tok, contexts, max_new_tokens, stop, batch_size)


@torch.no_grad()
def generate_texts(model, tok, contexts: Sequence[list[int]], max_new_tokens: int,
                   stop: Sequence[str] = ("\n",), batch_size: int = 16, *, temperature: float = 0.0,
                   seed: int = 0) -> list[str]:
    """Continuation of each context (token ids), as text cut before the first stop string; a row
    also stops at ``<eos>`` or after ``max_new_tokens`` tokens. Greedy with ``temperature`` 0, else
    sampled at that temperature from a generator seeded with ``seed`` (the same contexts, batch
    size and seed give the same texts). Contexts longer than the window allows are cut from the left.

    Batched without padding: a batch (contexts of similar length) reads its shortest prompt in
    one pass into the KV cache, then advances one position per step; at each step a row whose
    prompt is not finished is fed its next prompt token, the others their last greedy token. Every
    row therefore sees exactly its own tokens at its own positions, as if generated alone.
    """
    check_decoder(model)
    if max_new_tokens < 1:
        return ["" for _ in contexts]
    W = window(model)
    room = W + 1 - max_new_tokens  # the last new token is never read back
    if room < 1:
        raise PretrainerError(f"max_new_tokens {max_new_tokens} does not fit the model's {W}-token context")
    ctxs = [list(c)[-room:] for c in contexts]
    if any(not c for c in ctxs):
        raise PretrainerError("a context needs at least one token (the <eos> prefix)")
    device = model.tok_emb.weight.device
    order = sorted(range(len(ctxs)), key=lambda i: len(ctxs[i]))
    out = [""] * len(ctxs)
    eos = tok.role_id("eos")
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    for b in range(0, len(order), max(1, batch_size)):
        idx = order[b:b + batch_size]
        prompts = [ctxs[i] for i in idx]
        lens = [len(p) for p in prompts]
        start = min(lens)
        cache = model.new_cache(len(idx), max(lens) + max_new_tokens)
        x = torch.tensor([p[:start] for p in prompts], device=device)
        logits = model(x, cache=cache, last_only=True).logits[:, -1]
        new: list[list[int]] = [[] for _ in idx]
        text = [""] * len(idx)
        done = [False] * len(idx)
        pos = start  # the position the current logits predict
        while True:
            best = sample_next(logits.float(), temperature, generator=gen).tolist()
            feed = []
            for r, p in enumerate(prompts):
                if pos < lens[r]:
                    feed.append(p[pos])
                    continue
                if not done[r]:
                    new[r].append(best[r])
                    if best[r] == eos:
                        new[r].pop()
                        done[r] = True
                    else:
                        text[r], hit = _cut_at_stop(tok.decode(new[r]), stop)
                        done[r] = hit or len(new[r]) >= max_new_tokens
                feed.append(best[r] if not done[r] else (eos if eos is not None else 0))
            if all(done):
                break
            logits = model(torch.tensor(feed, device=device)[:, None], cache=cache, last_only=True).logits[:, -1]
            pos += 1
        for r, i in enumerate(idx):
            out[i] = text[r]
    return out
