"""Objectives as batch builders: token windows in, ``(inputs, labels)`` out.

- ``clm`` (:class:`~pretrainer.data.tokens.CLMBatches`): labels are the inputs shifted by one.
- ``mlm`` (:class:`MLMBatches`): BERT's masked language modelling. A window is
  ``<cls> tokens <sep>``; 15 % of its non-special positions are selected, and of those 80 % become
  ``<mask>``, 10 % a random token and 10 % stay as they are; labels hold the original token at the
  selected positions and ``-100`` (ignored) elsewhere. The masks are drawn anew each time a window
  is seen (RoBERTa's dynamic masking) from a generator seeded by (seed, sample index), so a batch is
  a pure function of its sample indices and resuming stays a seek. ``masking`` chooses what is
  selected, always 15 % of the tokens: single tokens (``token``, BERT), whole words (``word``: all
  sub-words of a word together), or contiguous spans (``span``, SpanBERT: lengths from a geometric
  distribution with p = 0.2, clipped at 10).
- ``mlm+nsp`` / ``mlm+sop`` (:class:`SentencePairBatches`): ``<cls> A <sep> B <sep>`` with segment
  ids, masked as ``mlm``, and a sentence label: B is the actual next segment of A's document or,
  half of the time, a segment of another document (BERT's next-sentence prediction); or A and B
  are consecutive and swapped half of the time (ALBERT's sentence-order prediction). Documents
  are the spans between the end-of-text tokens of the stream.

Every builder has ``batch(first, count)`` (samples ``first .. first+count-1`` of the global order)
and ``eval_batches(batch_size, max_batches)``, the fixed validation batches. Which builder an
objective uses, and what it does with the batches, is the objective's
(:mod:`pretrainer.train.objectives`).
"""

from __future__ import annotations

import functools
import json
import math
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import DataError
from ..common import IGNORE
from .tokens import TokenSplit, WindowOrder, fixed_windows

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, index) over the generator's seeds
SPAN_P, SPAN_MAX = 0.2, 10  # SpanBERT's geometric span lengths
_WORD_STARTS = ("Ġ", "Ċ", "ĉ", "▁", " ", "\n", "\t")  # a space or line break before the word


def sample_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, index)``."""
    return torch.Generator().manual_seed((seed * _MIX + index + 1) % 2**63)


class MLMMasking:
    """BERT's corruption of one sequence (see the module docstring).

    ``special_ids`` are never selected and never drawn as random replacements; random tokens are
    drawn uniformly from the other ids below ``vocab_size``. The number of selected positions is
    ``mask_prob`` x the non-special positions, rounded up or down at random so that the expected
    fraction is exactly ``mask_prob``. ``unit`` is what is selected (``token``, ``word`` or
    ``span``, as ``RunConfig.masking``); ``word`` needs ``continues``, a boolean per vocabulary id:
    the token continues the previous one's word. Spans are contiguous among the non-special
    positions (token spans; SpanBERT aligns them to whole words).
    """

    def __init__(self, mask_id: int, special_ids, vocab_size: int, mask_prob: float = 0.15,
                 mask_frac: float = 0.8, random_frac: float = 0.1, unit: str = "token",
                 continues: torch.Tensor | None = None):
        if unit == "word" and continues is None:
            raise DataError("whole-word masking needs the tokenizer's word boundaries")
        self.mask_id, self.mask_prob, self.unit, self.continues = mask_id, mask_prob, unit, continues
        self.mask_frac, self.random_frac = mask_frac, random_frac
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        regular = torch.ones(vocab_size, dtype=torch.bool)
        regular[self.special[self.special < vocab_size]] = False
        self.regular = regular.nonzero().squeeze(1)
        if len(self.regular) == 0:
            raise DataError(f"vocabulary of {vocab_size} has no token besides the special ones")

    @classmethod
    def for_split(cls, split: TokenSplit, **kw) -> "MLMMasking":
        """Masking for a prepared data folder: its ``<mask>`` id, and as special ids the
        manifest's plus every special token of its tokenizer (T5 sentinels included)."""
        ids = split.manifest.get("special_ids") or {}
        if ids.get("mask") is None:
            raise DataError(f"{split.dir / 'manifest.json'}: the tokenizer has no mask token, "
                            f"which objective=mlm needs; prepare the data with --mask-token TEXT")
        special = {i for i in ids.values() if i is not None}
        tok_file = Path(split.dir) / "tokenizer" / "tokenizer.json"
        if tok_file.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))
            special |= {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
            kw.setdefault("continues", word_continuations(tok, split.vocab_size))
        return cls(ids["mask"], special, split.vocab_size, **kw)

    def select(self, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A boolean mask of the positions of ``ids`` [T] to predict."""
        candidates = ~torch.isin(ids, self.special)
        want = self.mask_prob * int(candidates.sum())
        count = int(want) + int(torch.rand((), generator=gen) < want - int(want))
        if self.unit == "span":
            return self._select_spans(candidates, count, gen)
        if self.unit == "word":
            return self._select_words(ids, candidates, count, gen)
        scores = torch.rand(ids.shape, generator=gen).masked_fill_(~candidates, 2.0)
        selected = torch.zeros_like(candidates)
        selected[scores.argsort()[:count]] = True
        return selected

    def _select_words(self, ids, candidates, count, gen) -> torch.Tensor:
        """Whole words in random order, each taken when it still fits in ``count``."""
        after_special = torch.cat([torch.ones(1, dtype=torch.bool), ~candidates[:-1]])
        starts = candidates & (~self.continues[ids] | after_special)
        word = starts.cumsum(0) - 1
        sizes = torch.bincount(word[candidates], minlength=int(starts.sum())).tolist()
        chosen, total = [], 0
        for w in torch.randperm(len(sizes), generator=gen).tolist():
            if total + sizes[w] <= count:
                chosen.append(w)
                total += sizes[w]
            if total == count:
                break
        return candidates & torch.isin(word, torch.tensor(chosen, dtype=torch.long))

    def _select_spans(self, candidates, count, gen) -> torch.Tensor:
        """SpanBERT: spans of geometric length (clipped) at random starts among the candidates,
        until ``count`` positions are selected (the last span cut to fit)."""
        positions = candidates.nonzero().squeeze(1)
        selected = torch.zeros_like(candidates)
        total = 0
        while total < count:
            u = float(torch.rand((), generator=gen))
            length = min(SPAN_MAX, 1 + int(math.log(1.0 - u) / math.log(1.0 - SPAN_P)))
            first = int(torch.randint(len(positions), (1,), generator=gen))
            span = positions[first:first + length]
            new = span[~selected[span]][:count - total]
            selected[new] = True
            total += len(new)
        return selected

    def corrupt(self, ids: torch.Tensor, selected: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)``: the selected positions replaced 80/10/10 and labelled."""
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
        u = torch.rand(ids.shape, generator=gen)
        random_ids = self.regular[torch.randint(len(self.regular), ids.shape, generator=gen)]
        inputs = torch.where(selected & (u < self.mask_frac), torch.full_like(ids, self.mask_id), ids)
        to_random = selected & (u >= self.mask_frac) & (u < self.mask_frac + self.random_frac)
        inputs = torch.where(to_random, random_ids, inputs)
        return inputs, labels

    def __call__(self, ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.corrupt(ids, self.select(ids, gen), gen)


class MLMBatches:
    """Masked-LM batches: windows ``<cls> + seq_len - 2 tokens + <sep>`` in the seeded window order
    (documents inside a window stay separated by ``<eos>``, which is never selected), each masked
    with the generator of its sample index. ``masking_kw`` go to :class:`MLMMasking` (``mask_prob``,
    ``mask_frac``, ``random_frac``)."""

    def __init__(self, split: TokenSplit, seq_len: int, seed: int, masking: str = "token", **masking_kw):
        if seq_len < 3:
            raise DataError(f"objective=mlm: seq_len={seq_len} leaves no room besides <cls> and <sep>")
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.masking = MLMMasking.for_split(split, unit=masking, **masking_kw)  # (ELECTRA: its own split)
        ids = split.manifest["special_ids"]
        self.cls, self.sep = ids["cls"], ids["sep"]

    @cached_property
    def order(self) -> WindowOrder:
        """The training order (validation reads fixed windows and never needs it)."""
        return WindowOrder(len(self.split), self.seq_len - 2, self.seed)

    def window(self, start: int) -> torch.Tensor:
        body = self.split.read(start, self.seq_len - 2)
        return torch.from_numpy(np.concatenate([[self.cls], body, [self.sep]]))

    def masked(self, items, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked ``(inputs, labels)`` of the windows at ``(start, sample index)`` ``items``."""
        pairs = [self.masking(self.window(start), sample_generator(seed, index))
                 for start, index in items]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.masked(((self.order.start(g), g) for g in range(first, first + count)), self.seed)

    def eval_batches(self, batch_size: int, max_batches: int):
        """Fixed validation batches: consecutive windows from the start, masked as for seed 0."""
        for items in fixed_windows(self.split, self.seq_len - 2, batch_size, max_batches):
            yield self.masked(items, 0)


class ElectraBatches(MLMBatches):
    """ELECTRA's batches: masked-LM ``(inputs, labels)`` and one uniform number per position,
    ``uniform``, drawn from the same generator of the sample index: what the generator's sample at
    a selected position is drawn with (inverse CDF of its softmax), so that the replacements too
    are a pure function of the sample index (resuming stays exact at any number of processes)."""

    def masked(self, items, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = []
        for start, index in items:
            gen = sample_generator(seed, index)
            inputs, labels = self.masking(self.window(start), gen)
            rows.append((inputs, labels, torch.rand(self.seq_len, generator=gen)))
        return tuple(torch.stack(column) for column in zip(*rows))


def word_continuations(tok, vocab_size: int) -> torch.Tensor:
    """For each id below ``vocab_size``: does the token continue the previous token's word?
    WordPiece marks continuations with ``##``; byte-level BPE (``Ġ``, ``Ċ``), Unigram (``▁``) and
    character tokenizers mark word starts with a space, so there a token continues the word when it
    begins with a letter or digit."""
    wordpiece = json.loads(tok.to_str())["model"]["type"] == "WordPiece"
    table = torch.zeros(vocab_size, dtype=torch.bool)
    for token, i in tok.get_vocab().items():
        if i < vocab_size:
            table[i] = token.startswith("##") or (
                not wordpiece and not token.startswith(_WORD_STARTS) and token[:1].isalnum())
    return table


@functools.lru_cache(maxsize=8)
def _tokenizer_ids(path: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(sentinel ids, sentence-end ids)`` of a data folder's tokenizer, read once per process:
    every evaluation builds its batches again, and finding the sentence ends decodes the whole
    vocabulary."""
    from ..tokenization import load_tokenizer
    from .seq2seq import sentence_end_ids

    tok = load_tokenizer(path)
    return tuple(tok.sentinel_ids), tuple(sentence_end_ids(tok))


# ----------------------------------------------------------------------------------------------
# Sentence pairs: next-sentence prediction (BERT) and sentence-order prediction (ALBERT)


class Documents:
    """The documents of a split: the spans between its end-of-text tokens (which belong to no
    document), as ``starts`` and ``ends`` (exclusive) in stream positions. Only documents of at
    least two tokens are kept: a pair needs a first and a second part."""

    def __init__(self, split: TokenSplit, eos: int):
        cuts = [np.flatnonzero(np.asarray(shard) == eos) + first
                for shard, first in zip(split.shards, split.starts)]
        eos_at = np.concatenate(cuts) if cuts else np.zeros(0, dtype=np.int64)
        starts = np.concatenate([[0], eos_at + 1]).astype(np.int64)
        ends = np.concatenate([eos_at, [len(split)]]).astype(np.int64)
        keep = ends - starts >= 2
        self.starts, self.ends = starts[keep], ends[keep]

    def __len__(self) -> int:
        return len(self.starts)

    def at(self, position: int) -> int:
        """The document holding stream ``position``, else the next one (the last one past the end)."""
        d = max(int(np.searchsorted(self.starts, position, side="right")) - 1, 0)
        if position >= self.ends[d] and d + 1 < len(self):
            d += 1
        return d


class SentencePair(NamedTuple):
    """One example before masking: the stream spans ``[start, end)`` of its first and second
    segments, the documents they come from, and the label (0: in order / the actual next
    segment; 1: swapped (sop) / from another document (nsp))."""

    first: tuple[int, int]
    second: tuple[int, int]
    first_doc: int
    second_doc: int
    label: int


class SentencePairBatches:
    """``mlm+nsp`` and ``mlm+sop`` examples: ``<cls> A <sep> B <sep>`` (segment ids 0 for
    ``<cls> A <sep>``, 1 for ``B <sep>``), padded to ``seq_len``, masked as ``mlm`` masks (the
    special tokens never), with a sentence label.

    Each sample starts at a window of the seeded order over the token stream (so documents are
    visited in proportion to their length, epoch by epoch); the document holding that position
    gives a chunk of up to ``seq_len - 3`` consecutive tokens, cut at a random point into A and
    the actual next segment B. ``nsp`` (Devlin et al. 2019): half of the time B is replaced by a
    segment of the same length budget from a random *other* document (label 1). ``sop`` (Lan et
    al. 2020): half of the time A and B are swapped (label 1). Every draw comes from the
    generator of (seed, sample index), so a batch is a pure function of its sample indices.
    BERT's occasional shorter sequences (``short_seq_prob``) are left out: every chunk is as long
    as its document allows."""

    def __init__(self, split: TokenSplit, seq_len: int, seed: int, task: str, masking: str = "token",
                 mask_prob: float = 0.15):
        from ..tokenization import padding_id

        if seq_len < 5:
            raise DataError(f"objective=mlm+{task}: seq_len={seq_len} leaves no room for two segments "
                            f"besides <cls> and two <sep>")
        self.split, self.seq_len, self.seed, self.task = split, seq_len, seed, task
        self.masking = MLMMasking.for_split(split, unit=masking, mask_prob=mask_prob)
        ids = split.manifest["special_ids"]
        for role in ("cls", "sep", "eos"):
            if ids.get(role) is None:
                raise DataError(f"{split.dir / 'manifest.json'}: the tokenizer has no {role} token, which "
                                f"objective=mlm+{task} needs")
        self.cls, self.sep, self.pad = ids["cls"], ids["sep"], padding_id(ids)
        self.docs = Documents(split, ids["eos"])
        need = 2 if task == "nsp" else 1
        if len(self.docs) < need:
            raise DataError(f"{split.dir}: split '{split.split}' has {len(self.docs)} document(s) of two or "
                            f"more tokens; objective=mlm+{task} needs at least {need} (documents end at "
                            f"the end-of-text token)")

    @property
    def body(self) -> int:
        """Tokens of A and B together, at most."""
        return self.seq_len - 3

    @cached_property
    def order(self) -> WindowOrder:
        return WindowOrder(len(self.split), self.body, self.seed)

    def pair(self, start: int, gen: torch.Generator) -> SentencePair:
        """The pair drawn for a sample whose window starts at stream position ``start``."""
        docs = self.docs
        d = docs.at(start)
        s, e = int(docs.starts[d]), int(docs.ends[d])
        p = min(max(start, s), e - 2)  # at least two tokens of the document from p on
        end = min(p + self.body, e)
        begin = max(s, end - self.body)  # a document's last window fills up from before p
        cut = begin + 1 + int(torch.randint(end - begin - 1, (), generator=gen))  # A, B non-empty
        a, b = (begin, cut), (cut, end)
        flip = bool(torch.rand((), generator=gen) < 0.5)
        if not flip:
            return SentencePair(a, b, d, d, 0)
        if self.task == "sop":
            return SentencePair(b, a, d, d, 1)
        other = int(torch.randint(len(docs) - 1, (), generator=gen))
        other += other >= d  # any document but A's
        s2, e2 = int(docs.starts[other]), int(docs.ends[other])
        room = end - cut  # B's length budget
        b_start = s2 + int(torch.randint(max(e2 - s2 - room, 0) + 1, (), generator=gen))
        return SentencePair(a, (b_start, min(b_start + room, e2)), d, other, 1)

    def example(self, start: int, index: int, seed: int) -> dict:
        """The masked example of the sample ``index`` whose window starts at ``start``."""
        gen = sample_generator(seed, index)
        pair = self.pair(start, gen)
        first = self.split.read(pair.first[0], pair.first[1] - pair.first[0])
        second = self.split.read(pair.second[0], pair.second[1] - pair.second[0])
        used = len(first) + len(second) + 3
        ids = torch.full((self.seq_len,), self.pad, dtype=torch.long)
        ids[:used] = torch.from_numpy(np.concatenate([[self.cls], first, [self.sep], second, [self.sep]]))
        types = torch.zeros(self.seq_len, dtype=torch.long)
        types[len(first) + 2:used] = 1
        mask = torch.zeros(self.seq_len, dtype=torch.long)
        mask[:used] = 1
        inputs, labels = self.masking(ids, gen)
        return {"input_ids": inputs, "labels": labels, "token_type_ids": types, "attention_mask": mask,
                "sentence_labels": torch.tensor(pair.label)}

    def stack(self, items, seed: int) -> dict:
        examples = [self.example(start, index, seed) for start, index in items]
        return {k: torch.stack([x[k] for x in examples]) for k in examples[0]}

    def batch(self, first: int, count: int) -> dict:
        return self.stack(((self.order.start(g), g) for g in range(first, first + count)), self.seed)

    def eval_batches(self, batch_size: int, max_batches: int):
        """Fixed validation batches: windows from the start of the split, drawn as for seed 0."""
        for items in fixed_windows(self.split, self.body, batch_size, max_batches):
            yield self.stack(items, 0)
