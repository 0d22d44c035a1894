"""Reading prepared token shards, and the seekable order in which training visits them.

A split (``train`` or ``val``) is one long token stream stored as memory-mapped shards; documents
are separated by ``<eos>``. Training cuts the stream into windows of ``seq_len + 1`` tokens (inputs
and targets shifted by one) that start every ``seq_len`` tokens, and visits them epoch by epoch in a
seeded random order, with a seeded phase so that each epoch cuts at different places. Which window
the g-th sample is depends only on (seed, g): resuming at any step is a seek, not a replay.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError


class TokenSplit:
    """One split of a prepared data folder as a random-access token stream."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        from .prepare import load_manifest

        self.dir = Path(data_dir)
        self.manifest = load_manifest(self.dir)
        info = self.manifest["splits"].get(split)
        if info is None:
            raise DataError(f"{self.dir / 'manifest.json'}: no split '{split}'")
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = [np.memmap(self.dir / s["file"], dtype=dtype, mode="r")
                       for s in info["shards"] if s["tokens"] > 0]
        self.starts = [0]
        for shard in self.shards:
            self.starts.append(self.starts[-1] + len(shard))
        self.n_tokens = self.starts[-1]
        self.split = split

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64, across shard boundaries if needed."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.n_tokens})")
        i = bisect.bisect_right(self.starts, start) - 1
        parts, pos, left = [], start, length
        while left > 0:
            off = pos - self.starts[i]
            take = min(left, len(self.shards[i]) - off)
            parts.append(self.shards[i][off:off + take])
            pos, left, i = pos + take, left - take, i + 1
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)


class WindowOrder:
    """Maps a global sample index to a window start, epoch by epoch (seeded permutation + phase)."""

    def __init__(self, n_tokens: int, seq_len: int, seed: int):
        self.seq_len, self.seed = seq_len, seed
        # windows of seq_len+1 tokens every seq_len tokens, leaving room for a phase < seq_len
        self.n_windows = (n_tokens - 1 - seq_len) // seq_len
        if self.n_windows < 1:
            raise DataError(f"only {n_tokens} tokens: too few for one window of seq_len={seq_len} "
                            f"(need at least {2 * seq_len + 1})")
        self._epoch, self._perm, self._phase = -1, None, 0

    def epoch_of(self, sample: int) -> int:
        return sample // self.n_windows

    def _load_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._phase = int(torch.randint(self.seq_len, (1,), generator=g))
            self._perm = torch.randperm(self.n_windows, generator=g).numpy()
            self._epoch = epoch

    def start(self, sample: int) -> int:
        self._load_epoch(sample // self.n_windows)
        return self._phase + int(self._perm[sample % self.n_windows]) * self.seq_len


class CLMBatches:
    """Causal-LM batches: inputs = window[:-1], targets = window[1:] (GPT: targets are the inputs
    shifted by one). ``batch(first, count)`` returns samples ``first .. first+count-1`` of the
    global order; the trainer decides which slice each process and micro-step reads."""

    def __init__(self, split: TokenSplit, seq_len: int, seed: int):
        self.split, self.seq_len = split, seq_len
        self.order = WindowOrder(len(split), seq_len, seed)

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return shifted_pairs(self.split, [self.order.start(g) for g in range(first, first + count)],
                             self.seq_len)

    def eval_batches(self, batch_size: int, max_batches: int):
        """Fixed validation batches (:func:`eval_batches`)."""
        return eval_batches(self.split, self.seq_len, batch_size, max_batches)


def shifted_pairs(split: TokenSplit, starts, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of the ``seq_len + 1``-token windows at ``starts``."""
    t = torch.from_numpy(np.stack([split.read(start, seq_len + 1) for start in starts]))
    return t[:, :-1], t[:, 1:]


def fixed_windows(split: TokenSplit, length: int, batch_size: int, max_batches: int,
                  stride: int | None = None):
    """Validation order for every objective: windows of ``length`` tokens starting every
    ``stride`` (default ``length``) tokens from the start of the split, at most
    ``batch_size * max_batches`` of them, as lists of ``(start, window index)`` per batch."""
    stride = stride or length
    n_windows = (len(split) - length) // stride + 1 if len(split) >= length else 0
    if n_windows < 1:
        raise DataError(f"{split.dir}: split '{split.split}' has {len(split)} tokens, too few for "
                        f"one window of {length} tokens")
    total = min(n_windows, batch_size * max_batches)
    for first in range(0, total, batch_size):
        yield [(i * stride, i) for i in range(first, min(first + batch_size, total))]


def eval_batches(split: TokenSplit, seq_len: int, batch_size: int, max_batches: int):
    """Fixed causal-LM validation batches: consecutive windows from the start of the split."""
    for items in fixed_windows(split, seq_len + 1, batch_size, max_batches, stride=seq_len):
        yield shifted_pairs(split, [start for start, _ in items], seq_len)
