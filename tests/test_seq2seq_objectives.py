"""T5 span corruption and BART noising as data functions (no model)."""

import math

import pytest
import torch

from pretrainer.data.objectives import sample_generator
from pretrainer.data.seq2seq import (
    SpanCorruptionBatches,
    bart_noise,
    corrupted_lengths,
    infilling_spans,
    random_spans_noise_mask,
    shift_right,
    span_corrupt,
    span_counts,
    span_eval_batches,
    t5_lengths,
)
from pretrainer.data.tokens import TokenSplit
from pretrainer.errors import DataError

PAD, EOS, MASK = 0, 2, 6
SENTINELS = list(range(7, 107))  # <extra_id_0> .. <extra_id_99>, as a tokenizer with 100 sentinels
X, Y, Z = SENTINELS[:3]


def _runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the maximal runs of True in a boolean mask."""
    runs, current = [], 0
    for v in mask.tolist():
        if v:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs + ([current] if current else [])


# --- T5 span corruption ------------------------------------------------------------------------

def test_worked_example_i_love_this_red_car():
    I, love, this, red, car = 100, 101, 102, 103, 104
    tokens = torch.tensor([I, love, this, red, car])
    noise = torch.tensor([False, True, False, True, True])
    inputs, targets = span_corrupt(tokens, noise, SENTINELS, EOS)
    # <eos> is appended to both the input and the target
    assert inputs.tolist() == [I, X, this, Y, EOS]
    assert targets.tolist() == [X, love, Y, red, car, Z, EOS]
    assert (len(inputs), len(targets)) == corrupted_lengths(5, noise_density=3 / 5, mean_span_length=1.5)


def test_span_corrupt_edge_cases():
    tokens = torch.arange(100, 106)
    # a span at the very start, and no span at all
    inputs, targets = span_corrupt(tokens, torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool), SENTINELS, EOS)
    assert inputs.tolist() == [X, 102, 103, 104, 105, EOS]
    assert targets.tolist() == [X, 100, 101, Y, EOS]
    inputs, targets = span_corrupt(tokens, torch.zeros(6, dtype=torch.bool), SENTINELS, EOS)
    assert inputs.tolist() == tokens.tolist() + [EOS] and targets.tolist() == [X, EOS]
    with pytest.raises(DataError):  # two spans need three sentinels
        span_corrupt(tokens, torch.tensor([0, 1, 0, 1, 0, 0], dtype=torch.bool), SENTINELS[:2], EOS)


def test_input_and_target_reconstruct_the_original():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(200, 1000, (97,), generator=gen)
    mask = random_spans_noise_mask(97, generator=gen)
    inputs, targets = span_corrupt(tokens, mask, SENTINELS, EOS)
    # put each span back in place of its sentinel
    spans, current = {}, None
    for t in targets[:-1].tolist():
        if t in SENTINELS:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    rebuilt = []
    for t in inputs[:-1].tolist():
        rebuilt += spans[t] if t in SENTINELS else [t]
    assert rebuilt == tokens.tolist()
    assert spans[SENTINELS[len(spans) - 1]] == []  # the final sentinel closes the target


def test_noise_mask_statistics_over_many_draws():
    gen = torch.Generator().manual_seed(0)
    noise, total, spans = 0, 0, []
    masks = set()
    for _ in range(2000):
        m = random_spans_noise_mask(512, 0.15, 3.0, gen)
        assert not m[0]  # T5's masks start with a kept token
        noise += int(m.sum())
        total += len(m)
        spans += _runs(m)
        masks.add(tuple(m.nonzero().squeeze(1).tolist()))
    assert abs(noise / total - 0.15) < 0.005
    assert abs(sum(spans) / len(spans) - 3.0) < 0.2
    assert len(masks) == 2000  # the segmentations are random
    # the span lengths vary (not all 3)
    assert min(spans) == 1 and max(spans) > 6


@pytest.mark.parametrize("length", [2, 3, 7, 20, 101])
def test_noise_mask_counts_for_short_sequences(length):
    gen = torch.Generator().manual_seed(length)
    num_noise, num_spans = span_counts(length)
    for _ in range(50):
        m = random_spans_noise_mask(length, generator=gen)
        assert int(m.sum()) == num_noise and len(_runs(m)) == num_spans
    assert 1 <= num_noise < length


@pytest.mark.parametrize("inputs_length", [8, 64, 114, 512, 568, 1024])
def test_t5_lengths_fill_the_encoder_exactly(inputs_length):
    raw, targets_length = t5_lengths(inputs_length)
    assert corrupted_lengths(raw)[0] == inputs_length
    assert corrupted_lengths(raw + 1)[0] > inputs_length  # the largest raw length that fits
    gen = torch.Generator().manual_seed(inputs_length)
    for _ in range(200):
        tokens = torch.randint(200, 1000, (raw,), generator=gen)
        inputs, targets = span_corrupt(tokens, random_spans_noise_mask(raw, generator=gen), SENTINELS, EOS)
        assert len(inputs) == inputs_length and len(targets) == targets_length


def test_t5_lengths_for_the_paper_setting():
    # 512 encoder tokens at density 0.15 and mean span 3: 568 raw tokens, 85 noise tokens in 28
    # spans -> 568 - 85 + 28 + <eos> = 512 inputs; 85 + 28 + final sentinel + <eos> = 115 targets
    assert t5_lengths(512, 0.15, 3.0) == (568, 115)


# --- the batch builder over a prepared split ---------------------------------------------------

def test_span_corruption_batches_are_deterministic_and_padded(synthetic_data):
    split = TokenSplit(synthetic_data, "train")
    build = lambda seed: SpanCorruptionBatches(split, 64, seed, SENTINELS, EOS, PAD)
    batches = build(11)
    x, y = batches.batch(0, 8)
    raw, targets_length = t5_lengths(64)
    assert batches.raw_length == raw
    assert x.shape == (8, 64) and y.shape == (8, targets_length)
    assert (x[:, -1] == EOS).all()  # full inputs: no padding needed
    x2, y2 = build(11).batch(0, 8)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, y3 = build(11).batch(3, 2)  # a sample is the same whichever batch it is read in
    assert torch.equal(x3, x[3:5]) and torch.equal(y3, y[3:5])
    assert len({tuple(r) for r in y.tolist()}) == 8  # different samples differ
    assert not torch.equal(y, build(12).batch(0, 8)[1])
    # the same window seen in a later epoch is corrupted differently
    n = batches.order.n_windows
    start = batches.order.start(0)
    a = batches.corrupted([(start, 0)])[1]
    b = batches.corrupted([(start, n)])[1]
    assert torch.equal(a, y[:1]) and not torch.equal(a, b)
    # labels padding is -100 and shift_right makes decoder inputs starting with <pad>
    short = SpanCorruptionBatches(split, 64, 11, SENTINELS, EOS, PAD)
    short.targets_length += 3
    _, padded = short.batch(0, 2)
    assert (padded[:, -3:] == -100).all()
    dec = shift_right(padded, PAD, PAD)
    assert (dec[:, 0] == PAD).all() and torch.equal(dec[:, 1:targets_length + 1], padded[:, :targets_length])
    assert (dec >= 0).all()
    # fixed validation batches
    ex, ey = next(span_eval_batches(split, 64, 4, 1, SENTINELS, EOS, PAD))
    ex2, ey2 = next(span_eval_batches(split, 64, 4, 1, SENTINELS, EOS, PAD))
    assert ex.shape == (4, 64) and torch.equal(ex, ex2) and torch.equal(ey, ey2)


def test_batches_refuse_too_few_sentinels(synthetic_data):
    split = TokenSplit(synthetic_data, "train")
    with pytest.raises(DataError, match="sentinels"):
        SpanCorruptionBatches(split, 512, 0, SENTINELS[:10], EOS, PAD)


# --- BART noising ------------------------------------------------------------------------------

def _doc(n, seed=0):
    return torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(seed))


def test_text_infilling_masks_the_ratio_and_spans_are_poisson_3():
    masked, total, masks_in, lengths = 0, 0, 0, []
    for i in range(300):
        gen = sample_generator(5, i)
        tokens = _doc(400, i)
        noised, target = bart_noise(tokens, MASK, gen, mask_ratio=0.3)
        assert torch.equal(target, tokens)
        kept = int((noised != MASK).sum())
        masked += len(tokens) - kept
        total += len(tokens)
        masks_in += int((noised == MASK).sum())
        # the spans themselves, drawn with the same generator state
        span_lengths, gaps = infilling_spans(400, 120, 3.0, sample_generator(5, i))
        assert int(span_lengths.sum()) == 120 and len(set(gaps.tolist())) == len(gaps)
        assert int((noised == MASK).sum()) == len(span_lengths)  # one <mask> per span
        lengths += span_lengths[:-1].tolist()  # the last span is cut to fit
    assert abs(masked / total - 0.3) < 0.03
    assert abs(sum(lengths) / len(lengths) - 3.0) < 0.2
    assert lengths.count(0) > 0  # zero-length spans insert a <mask>
    zero_share = lengths.count(0) / len(lengths)
    assert abs(zero_share - math.exp(-3)) < 0.02


def test_infilling_keeps_order_of_unmasked_tokens():
    tokens = torch.arange(100, 200)
    noised, _ = bart_noise(tokens, MASK, torch.Generator().manual_seed(1), mask_ratio=0.3)
    kept = noised[noised != MASK]
    assert len(kept) == 70 and (kept.diff() > 0).all()
    # no two <mask> are adjacent: each span is one <mask> between kept tokens
    is_mask = (noised == MASK).int()
    assert int((is_mask[1:] * is_mask[:-1]).sum()) == 0


def test_token_deletion_and_token_masking_fractions():
    tokens = _doc(500)
    gen = torch.Generator().manual_seed(2)
    noised, target = bart_noise(tokens, MASK, gen, mask_ratio=0.0, delete_ratio=0.1)
    assert len(noised) == 450 and torch.equal(target, tokens)
    it = iter(tokens.tolist())  # a subsequence of the original
    assert all(any(t == u for u in it) for t in noised.tolist())
    noised, _ = bart_noise(tokens, MASK, gen, mask_ratio=0.0, token_mask_ratio=0.2)
    assert len(noised) == 500 and int((noised == MASK).sum()) == 100
    same = noised != MASK
    assert torch.equal(noised[same], tokens[same])


def test_sentence_permutation_keeps_the_sentences():
    DOT, QM = 900, 901
    sentences = [[10, 11, DOT], [12, QM], [13, 14, 15, DOT], [16, DOT], [17, 18]]
    tokens = torch.tensor([t for s in sentences for t in s])
    seen = set()
    for i in range(30):
        noised, target = bart_noise(tokens, MASK, sample_generator(0, i), mask_ratio=0.0,
                                    permute_sentences=True, sentence_end_ids=(DOT, QM))
        assert torch.equal(target, tokens)
        assert sorted(noised.tolist()) == sorted(tokens.tolist())
        pieces = sorted(map(tuple, sentences))
        # split the noised sequence at the sentence starts (the unterminated last sentence may
        # land anywhere) to recover whole sentences
        starts = {s[0] for s in sentences}
        rebuilt, cur = [], []
        for t in noised.tolist():
            if t in starts and cur:
                rebuilt.append(tuple(cur))
                cur = []
            cur.append(t)
        rebuilt.append(tuple(cur))
        assert sorted(rebuilt) == pieces
        seen.add(tuple(noised.tolist()))
    assert len(seen) > 5


def test_rotation_is_a_rotation():
    tokens = torch.arange(100, 140)
    offsets = set()
    for i in range(50):
        noised, target = bart_noise(tokens, MASK, sample_generator(1, i), mask_ratio=0.0, rotate=True)
        k = int(noised[0]) - 100
        assert torch.equal(noised, torch.roll(tokens, -k)) and torch.equal(target, tokens)
        offsets.add(k)
    assert len(offsets) > 20


def test_combined_noise_is_deterministic_and_target_is_original():
    tokens = _doc(300, 4)
    kw = {"mask_ratio": 0.3, "delete_ratio": 0.05, "token_mask_ratio": 0.05, "rotate": True,
          "permute_sentences": True, "sentence_end_ids": (tokens[17].item(), tokens[99].item())}
    a, ta = bart_noise(tokens, MASK, sample_generator(9, 3), **kw)
    b, tb = bart_noise(tokens, MASK, sample_generator(9, 3), **kw)
    c, _ = bart_noise(tokens, MASK, sample_generator(9, 4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(ta, tokens) and torch.equal(tb, tokens)
    assert len(a) < len(tokens)
    noised, target = bart_noise(tokens, MASK, sample_generator(0, 0), mask_ratio=0.0)
    assert torch.equal(noised, tokens) and torch.equal(target, tokens)
