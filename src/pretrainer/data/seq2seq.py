"""Encoder–decoder pretraining objectives as pure data functions: T5 span corruption and BART noising.

Both take a 1-D tensor of token ids and return ``(inputs, targets)`` tensors; randomness comes only
from a ``torch.Generator`` passed in, so a batch builder that seeds one generator per
``(seed, sample index)`` (:func:`~pretrainer.data.objectives.sample_generator`) keeps a batch a pure
function of its sample indices and resuming stays a seek, as for the MLM objective.

T5 span corruption (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", JMLR 21, section 3.1.4 and 3.3.4): 15 % of the tokens (noise density
0.15) are corrupted in spans of mean length 3. Each corrupted span is replaced in the input by ONE
sentinel, the sentinels used in order (the first span gets ``sentinel_ids[0]`` = ``<extra_id_0>``,
the next ``sentinel_ids[1]``, ...). The target lists each sentinel followed by the tokens of its span
and ends with the next unused sentinel (the paper's Figure 2: ``<X> love <Y> red car <Z>``).

``<eos>`` convention (the same everywhere in this module): ``<eos>`` is appended to BOTH the input
and the target, after the corrupted input and after the final sentinel. The worked example "I love
this red car" with "love" and "red car" corrupted gives

    input  = I <X> this <Y> <eos>
    target = <X> love <Y> red car <Z> <eos>

with X, Y, Z the sentinels 0, 1, 2. :func:`t5_lengths` counts both ``<eos>`` tokens and the final
sentinel, so packed raw windows of the length it returns corrupt to inputs of exactly
``inputs_length`` tokens.

BART noising (Lewis et al. 2020, "BART: Denoising Sequence-to-Sequence Pre-training for Natural
Language Generation, Translation, and Comprehension", ACL, section 2.2): token masking, token
deletion, text infilling (span lengths drawn from Poisson(lambda = 3), each span replaced by ONE
``<mask>``, a zero-length span inserts a ``<mask>``), sentence permutation and document rotation,
combinable; the target is always the original token sequence. The paper's best configuration
(section 5.1 / 6) is text infilling at a 30 % mask ratio plus sentence permutation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property

import torch

from ..errors import DataError
from ..common import IGNORE, shift_right  # noqa: F401 - decoder inputs of these batches
from .objectives import sample_generator
from .tokens import TokenSplit, WindowOrder, fixed_windows

NOISE_DENSITY, MEAN_SPAN_LENGTH = 0.15, 3.0  # T5 (Raffel et al. 2020, section 3.3.4)
BART_MASK_RATIO, BART_POISSON_LAMBDA = 0.3, 3.0  # BART (Lewis et al. 2020, sections 2.2 and 5.1)


# ---------------------------------------------------------------------------------------------
# T5 span corruption
# ---------------------------------------------------------------------------------------------

def span_counts(length: int, noise_density: float = NOISE_DENSITY,
                mean_span_length: float = MEAN_SPAN_LENGTH) -> tuple[int, int]:
    """``(num_noise_tokens, num_noise_spans)`` of a sequence of ``length`` tokens.

    ``num_noise = round(length * noise_density)`` and ``num_spans = round(num_noise /
    mean_span_length)``, clamped so that there is at least one noise token and one non-noise token
    (for ``length >= 2``) and at least one span, and so that every span, noise or not, is non-empty.
    Both :func:`random_spans_noise_mask` and :func:`t5_lengths` use these counts.
    """
    if length < 1:
        raise DataError(f"span corruption needs at least one token, got {length}")
    if length == 1:
        return 0, 0
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)
    return num_noise, num_spans


def _random_segmentation(n_items: int, n_segments: int, generator: torch.Generator) -> torch.Tensor:
    """Lengths of a uniformly random split of ``n_items`` items into ``n_segments`` non-empty
    consecutive segments (``n_segments - 1`` distinct cut points among the ``n_items - 1`` gaps)."""
    cuts = torch.randperm(n_items - 1, generator=generator)[:n_segments - 1] + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values,
                        torch.tensor([n_items])])
    return bounds.diff()


def random_spans_noise_mask(length: int, noise_density: float = NOISE_DENSITY,
                            mean_span_length: float = MEAN_SPAN_LENGTH,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask of ``length`` positions, ``True`` where the token is corrupted (noise).

    Exactly ``num_noise`` noise tokens in exactly ``num_spans`` spans (see :func:`span_counts`);
    the noise tokens and the non-noise tokens are each split into ``num_spans`` non-empty runs at
    random, and the runs alternate non-noise, noise, non-noise, noise, ... so the mask always starts
    with a non-noise token (as in T5) and the noise spans never touch each other.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    if num_noise == 0:
        return torch.zeros(length, dtype=torch.bool)
    noise_lengths = _random_segmentation(num_noise, num_spans, generator)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, generator)
    run_lengths = torch.stack([keep_lengths, noise_lengths], dim=1).reshape(-1)
    run_is_noise = torch.tensor([False, True]).repeat(num_spans)
    return run_is_noise.repeat_interleave(run_lengths)


def span_corrupt(tokens: torch.Tensor, noise_mask: torch.Tensor, sentinel_ids: Sequence[int],
                 eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of T5 span corruption (see the module docstring for the format).

    ``tokens`` [T] and ``noise_mask`` [T] (bool). Each maximal run of ``True`` in the mask is one
    span; span ``k`` becomes ``sentinel_ids[k]`` in the input. The target is ``sentinel_ids[k]``
    followed by span ``k``'s tokens for every span, then ``sentinel_ids[num_spans]``, then
    ``eos_id``; the input ends with ``eos_id`` too. Needs ``num_spans + 1`` sentinels.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    noise = torch.as_tensor(noise_mask, dtype=torch.bool)
    if tokens.shape != noise.shape or tokens.dim() != 1:
        raise DataError(f"tokens {tuple(tokens.shape)} and noise mask {tuple(noise.shape)} must be "
                        f"1-D of the same length")
    previous = torch.cat([torch.zeros(1, dtype=torch.bool), noise[:-1]])
    starts = noise & ~previous
    num_spans = int(starts.sum())
    if len(sentinel_ids) < num_spans + 1:
        raise DataError(f"{num_spans} corrupted spans need {num_spans + 1} sentinels, "
                        f"the tokenizer has {len(sentinel_ids)}")
    sentinels = torch.as_tensor(list(sentinel_ids[:num_spans + 1]), dtype=torch.long)
    eos = torch.tensor([eos_id], dtype=torch.long)
    span = starts.cumsum(0) - 1  # the span each position belongs to (or the last one before it)

    # input: keep non-noise tokens and the first position of each span, which becomes its sentinel
    replaced = torch.where(starts, sentinels[span.clamp(min=0)], tokens)
    inputs = torch.cat([replaced[~noise | starts], eos])

    # target: noise token number r of span k goes to position r + k + 1 (k + 1 sentinels before
    # it); span k's sentinel goes just before the span's first token
    num_noise = int(noise.sum())
    targets = torch.empty(num_noise + num_spans + 2, dtype=torch.long)
    rank = torch.arange(num_noise)
    noise_span = span[noise]
    targets[rank + noise_span + 1] = tokens[noise]
    first_rank = rank[starts[noise]]
    targets[first_rank + torch.arange(num_spans)] = sentinels[:num_spans]
    targets[-2] = sentinels[num_spans]
    targets[-1] = eos_id
    return inputs, targets


def corrupted_lengths(raw_length: int, noise_density: float = NOISE_DENSITY,
                      mean_span_length: float = MEAN_SPAN_LENGTH) -> tuple[int, int]:
    """``(input length, target length)`` that :func:`span_corrupt` produces from ``raw_length``
    tokens and a :func:`random_spans_noise_mask` mask, ``<eos>`` and the final sentinel included:
    input = kept tokens + one sentinel per span + eos; target = noise tokens + one sentinel per
    span + the final sentinel + eos."""
    num_noise, num_spans = span_counts(raw_length, noise_density, mean_span_length)
    return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 2


def t5_lengths(inputs_length: int, noise_density: float = NOISE_DENSITY,
               mean_span_length: float = MEAN_SPAN_LENGTH) -> tuple[int, int]:
    """``(raw_length, targets_length)``: the largest number of raw tokens whose corrupted input is
    at most ``inputs_length`` tokens long, and the length of its target.

    The corrupted input length never decreases as the raw length grows by one (it grows by 1, or
    by 0 when one more token becomes noise), so it takes every value, and for ``inputs_length >=
    2`` the returned raw length corrupts to an input of exactly ``inputs_length`` tokens: packed
    windows of ``raw_length`` tokens fill the encoder with no padding. (The idea of T5's
    ``random_spans_helper``; here the final sentinel and both ``<eos>`` are counted.)
    """
    if inputs_length < 2:
        raise DataError(f"span corruption needs inputs_length >= 2 (a token and <eos>), "
                        f"got {inputs_length}")
    # the input keeps about (1 - density + density / mean_span) of the raw tokens: start above it
    # and walk down to the largest raw length that fits
    keep = 1.0 - noise_density + noise_density / mean_span_length
    raw = max(1, math.ceil(inputs_length / max(keep, 1e-6)) + 2)
    while raw > 1 and corrupted_lengths(raw, noise_density, mean_span_length)[0] > inputs_length:
        raw -= 1
    while corrupted_lengths(raw + 1, noise_density, mean_span_length)[0] <= inputs_length:
        raw += 1
    return raw, corrupted_lengths(raw, noise_density, mean_span_length)[1]


def pad_stack(rows: Iterable[torch.Tensor], length: int, value: int) -> torch.Tensor:
    """Rows stacked into [N, length], each padded at the end with ``value`` (never cut)."""
    rows = list(rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise DataError(f"a sequence of {len(row)} tokens does not fit in {length}")
        out[i, :len(row)] = row
    return out


class _Windows:
    """Shared part of the window-based builders: the seeded window order over the split, and
    ``batch(first, count)`` as a pure function of the sample indices."""

    raw_length: int
    inputs_length: int
    targets_length: int
    pad_id: int

    @cached_property
    def order(self) -> WindowOrder:
        return WindowOrder(len(self.split), self.raw_length, self.seed)

    @property
    def decoder_length(self) -> int:
        """Tokens a decoder-only model reads for one example laid out as ``input + target``
        (shifted by one: the longest input plus the longest target, less one)."""
        return self.inputs_length + self.targets_length - 1

    def example(self, start: int, index: int, seed: int | None = None):
        raise NotImplementedError

    def corrupted(self, items, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``(input_ids, labels)`` of the windows at ``(start, sample index)`` ``items``:
        inputs padded with ``pad_id``, labels with ``-100``."""
        pairs = [self.example(start, index, seed) for start, index in items]
        return (pad_stack((p[0] for p in pairs), self.inputs_length, self.pad_id),
                pad_stack((p[1] for p in pairs), self.targets_length, IGNORE))

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.corrupted((self.order.start(g), g) for g in range(first, first + count))

    def eval_batches(self, batch_size: int, max_batches: int):
        """Fixed validation batches: consecutive windows from the start, corrupted with seed 0."""
        for items in fixed_windows(self.split, self.raw_length, batch_size, max_batches):
            yield self.corrupted(items, 0)


class SpanCorruptionBatches(_Windows):
    """T5 span-corruption batches over a prepared token split.

    Windows of ``raw_length`` tokens (:func:`t5_lengths`) are cut from the token stream in the
    seeded :class:`~pretrainer.data.tokens.WindowOrder` (documents inside a window stay separated
    by ``<eos>``, T5's packing), and each is corrupted with the generator of its sample index, so
    ``batch(first, count)`` is a pure function of ``(seed, first, count)``. Returns ``(input_ids,
    labels)``: ``input_ids`` [count, inputs_length] padded with ``pad_id`` (with the computed raw
    length they are always exactly full), ``labels`` [count, targets_length] padded with ``-100``.
    Decoder inputs are :func:`shift_right` of the labels.
    """

    def __init__(self, split: TokenSplit, inputs_length: int, seed: int, sentinel_ids: Sequence[int],
                 eos_id: int, pad_id: int, noise_density: float = NOISE_DENSITY,
                 mean_span_length: float = MEAN_SPAN_LENGTH):
        self.split, self.inputs_length, self.seed = split, inputs_length, seed
        self.sentinel_ids, self.eos_id, self.pad_id = list(sentinel_ids), eos_id, pad_id
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.raw_length, self.targets_length = t5_lengths(inputs_length, noise_density,
                                                          mean_span_length)
        spans = span_counts(self.raw_length, noise_density, mean_span_length)[1]
        if len(self.sentinel_ids) < spans + 1:
            raise DataError(f"objective=span: inputs_length={inputs_length} makes {spans} spans "
                            f"per window and needs {spans + 1} sentinels; the tokenizer has "
                            f"{len(self.sentinel_ids)} (prepare the data with more sentinels)")

    def example(self, start: int, index: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of the window at ``start`` corrupted for sample ``index``."""
        gen = sample_generator(self.seed if seed is None else seed, index)
        tokens = torch.from_numpy(self.split.read(start, self.raw_length))
        mask = random_spans_noise_mask(self.raw_length, self.noise_density, self.mean_span_length, gen)
        return span_corrupt(tokens, mask, self.sentinel_ids, self.eos_id)


def span_eval_batches(split: TokenSplit, inputs_length: int, batch_size: int, max_batches: int,
                      sentinel_ids: Sequence[int], eos_id: int, pad_id: int,
                      **kw) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches: consecutive raw windows from the start of the split, corrupted
    with seed 0 (the same at every evaluation)."""
    builder = SpanCorruptionBatches(split, inputs_length, 0, sentinel_ids, eos_id, pad_id, **kw)
    yield from builder.eval_batches(batch_size, max_batches)


# ---------------------------------------------------------------------------------------------
# BART noising
# ---------------------------------------------------------------------------------------------

def _count(ratio: float, n: int) -> int:
    return min(max(round(ratio * n), 0), n)


def shuffle_sentences(tokens: torch.Tensor, sentence_end_ids: Iterable[int],
                      generator: torch.Generator) -> torch.Tensor:
    """The sentences of ``tokens`` in a random order. A sentence ends with (and includes) a token
    of ``sentence_end_ids``; trailing tokens without an end token form the last sentence."""
    ends = torch.isin(tokens, torch.as_tensor(list(sentence_end_ids), dtype=torch.long))
    bounds = (ends.nonzero().squeeze(1) + 1).tolist()
    if not bounds or bounds[-1] != len(tokens):
        bounds.append(len(tokens))
    sentences = list(torch.tensor_split(tokens, bounds[:-1]))
    order = torch.randperm(len(sentences), generator=generator).tolist()
    return torch.cat([sentences[i] for i in order]) if sentences else tokens


def rotate_document(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``tokens`` rotated to start at a uniformly random position."""
    if len(tokens) < 2:
        return tokens.clone()
    shift = int(torch.randint(len(tokens), (1,), generator=generator))
    return torch.roll(tokens, -shift)


def mask_tokens(tokens: torch.Tensor, count: int, mask_id: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` positions chosen at random replaced by ``mask_id`` (BART token masking)."""
    picked = torch.randperm(len(tokens), generator=generator)[:count]
    out = tokens.clone()
    out[picked] = mask_id
    return out


def delete_tokens(tokens: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``tokens`` with ``count`` positions chosen at random removed (BART token deletion)."""
    keep = torch.ones(len(tokens), dtype=torch.bool)
    keep[torch.randperm(len(tokens), generator=generator)[:count]] = False
    return tokens[keep]


def infilling_spans(n: int, num_to_mask: int, poisson_lambda: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Span lengths for text infilling and where they go: ``(lengths, gaps)``.

    Lengths are drawn from Poisson(``poisson_lambda``) (zeros included) until they add up to at
    least ``num_to_mask``; the last one is cut so they add up exactly. The ``n - num_to_mask`` kept
    tokens leave ``n - num_to_mask + 1`` gaps (before the first, between two, after the last); each
    span goes to a different gap chosen at random, so two spans are never adjacent and each becomes
    its own ``<mask>``. Spans beyond the number of gaps are dropped (only when almost everything is
    masked); then fewer than ``num_to_mask`` tokens are masked. ``gaps`` is sorted and
    ``lengths[i]`` is the span in ``gaps[i]``.
    """
    if num_to_mask <= 0 or n == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    lengths = torch.zeros(0, dtype=torch.long)
    while int(lengths.sum()) < num_to_mask:
        want = max(8, math.ceil(2 * (num_to_mask - int(lengths.sum())) / max(poisson_lambda, 1e-3)))
        rate = torch.full((want,), float(poisson_lambda))
        lengths = torch.cat([lengths, torch.poisson(rate, generator=generator).long()])
    cum = lengths.cumsum(0)
    last = int(torch.searchsorted(cum, torch.tensor(num_to_mask)))  # first with cum >= num_to_mask
    lengths = lengths[:last + 1].clone()
    lengths[-1] -= int(cum[last]) - num_to_mask
    n_gaps = n - num_to_mask + 1
    lengths = lengths[:n_gaps]
    gaps = torch.randperm(n_gaps, generator=generator)[:len(lengths)].sort().values
    return lengths, gaps


def infill(tokens: torch.Tensor, num_to_mask: int, mask_id: int, poisson_lambda: float,
           generator: torch.Generator) -> torch.Tensor:
    """BART text infilling: spans from :func:`infilling_spans`, each replaced by one ``<mask>``
    (a zero-length span inserts a ``<mask>``)."""
    n = len(tokens)
    lengths, gaps = infilling_spans(n, num_to_mask, poisson_lambda, generator)
    # walk the gaps: before kept token j comes the span assigned to gap j (if any)
    span_at = dict(zip(gaps.tolist(), lengths.tolist()))
    out, pos, kept = [], 0, 0
    values = tokens.tolist()
    while True:
        if kept in span_at:
            out.append(mask_id)
            pos += span_at[kept]
        if pos >= n:
            break
        out.append(values[pos])
        pos += 1
        kept += 1
    return torch.tensor(out, dtype=torch.long)


def bart_noise(tokens: torch.Tensor, mask_id: int, generator: torch.Generator,
               mask_ratio: float = BART_MASK_RATIO, poisson_lambda: float = BART_POISSON_LAMBDA,
               delete_ratio: float = 0.0, token_mask_ratio: float = 0.0,
               permute_sentences: bool = False, sentence_end_ids: Iterable[int] = (),
               rotate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noised, target)`` of BART's noising; ``target`` is always a copy of ``tokens``.

    The transformations run in this order, each one skipped when its argument is 0 / False:

    1. sentence permutation (``permute_sentences``; sentences end with a ``sentence_end_ids`` token);
    2. document rotation (``rotate``): start at a random token;
    3. token masking: ``round(token_mask_ratio * n)`` random tokens become ``mask_id``;
    4. token deletion: ``round(delete_ratio * n)`` random tokens are removed;
    5. text infilling: ``round(mask_ratio * n)`` tokens are masked in spans of Poisson(
       ``poisson_lambda``) length, each span one ``mask_id`` (zero-length spans insert one).

    ``n`` is always the original length (counts are clipped to the tokens left). The defaults are
    text infilling at 30 %, BART's setting; pass ``mask_ratio=0`` to turn it off.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    target = tokens.clone()
    n = len(tokens)
    x = tokens
    if permute_sentences:
        x = shuffle_sentences(x, sentence_end_ids, generator)
    if rotate:
        x = rotate_document(x, generator)
    if token_mask_ratio > 0:
        x = mask_tokens(x, _count(token_mask_ratio, n), mask_id, generator)
    if delete_ratio > 0:
        x = delete_tokens(x, min(_count(delete_ratio, n), len(x)), generator)
    if mask_ratio > 0:
        x = infill(x, min(_count(mask_ratio, n), len(x)), mask_id, poisson_lambda, generator)
    return x.clone() if x is tokens else x, target


# ---------------------------------------------------------------------------------------------
# Batch builders of the noising and prefix-LM objectives
# ---------------------------------------------------------------------------------------------

def sentence_end_ids(tok) -> list[int]:
    """Ids of the tokens that end a sentence for BART's permutation: those whose text ends with a
    newline or a full stop (code and prose alike)."""
    ends = []
    for i in range(tok.vocab_size):
        text = tok.decode([i])
        if text.rstrip(" ").endswith(("\n", ".")):
            ends.append(i)
    return ends


class DenoiseBatches(_Windows):
    """BART batches: windows of ``seq_len - 1`` tokens noised by :func:`bart_noise` (``noise``: a
    :class:`~pretrainer.config.NoiseConfig`); input = noised + ``<eos>`` (cut to ``seq_len`` in the
    rare case insertions make it longer), target = original + ``<eos>``."""

    def __init__(self, split: TokenSplit, seq_len: int, seed: int, mask_id: int, eos_id: int,
                 pad_id: int, noise, sentence_ends: Sequence[int] = ()):
        if seq_len < 3:
            raise DataError(f"objective=denoise: seq_len={seq_len} is too short")
        self.split, self.seed, self.noise = split, seed, noise
        self.mask_id, self.eos_id, self.pad_id = mask_id, eos_id, pad_id
        self.sentence_ends = list(sentence_ends)
        self.raw_length = seq_len - 1
        self.inputs_length = self.targets_length = seq_len

    def example(self, start: int, index: int, seed: int | None = None):
        gen = sample_generator(self.seed if seed is None else seed, index)
        tokens = torch.from_numpy(self.split.read(start, self.raw_length))
        n = self.noise
        noised, target = bart_noise(tokens, self.mask_id, gen, mask_ratio=n.mask_ratio,
                                    poisson_lambda=n.poisson_lambda, delete_ratio=n.delete_ratio,
                                    token_mask_ratio=n.token_mask_ratio,
                                    permute_sentences=n.permute_sentences,
                                    sentence_end_ids=self.sentence_ends, rotate=n.rotate)
        eos = torch.tensor([self.eos_id])
        return torch.cat([noised[:self.inputs_length - 1], eos]), torch.cat([target, eos])


class PrefixLMBatches(_Windows):
    """Prefix-LM for an encoder-decoder (Raffel et al. 2020, 3.3.1): a window of ``seq_len`` tokens
    is split at a uniformly drawn point; the encoder reads the prefix, the decoder predicts the
    rest followed by ``<eos>``."""

    def __init__(self, split: TokenSplit, seq_len: int, seed: int, eos_id: int, pad_id: int):
        if seq_len < 3:
            raise DataError(f"objective=prefix_lm: seq_len={seq_len} is too short")
        self.split, self.seed, self.eos_id, self.pad_id = split, seed, eos_id, pad_id
        self.raw_length = self.inputs_length = seq_len
        self.targets_length = seq_len

    @property
    def decoder_length(self) -> int:
        """Prefix and rest are the window and ``<eos>``: ``raw_length + 1`` tokens, shifted by one."""
        return self.raw_length

    def example(self, start: int, index: int, seed: int | None = None):
        gen = sample_generator(self.seed if seed is None else seed, index)
        tokens = torch.from_numpy(self.split.read(start, self.raw_length))
        cut = int(torch.randint(1, self.raw_length, (1,), generator=gen))
        return tokens[:cut], torch.cat([tokens[cut:], torch.tensor([self.eos_id])])
