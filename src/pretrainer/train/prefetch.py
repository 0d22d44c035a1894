"""Training batches built ahead of the step, on a background thread.

An objective's batch is a pure function of its first sample index (masks and spans come from
generators seeded by the index), so building the next ones early changes nothing but when the work
is done: while the model computes step ``n`` (PyTorch releases the interpreter inside its kernels),
the thread builds the batches of step ``n + 1``. The trainer asks for micro-batches at indices
``samples + (m * world + rank) * batch_size``: consecutive requests of one process are always
``world * batch_size`` apart, across steps too, so that stride is what is built ahead. A request
that was not foreseen (the first one, or after a rollback skipped data) is built on the same thread
while the caller waits; all building happens on that one thread, so a builder never runs twice at
once.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor


class Prefetcher:
    """``batches.batch(first, count)`` with the next ``depth`` batches (``first + i * stride``)
    built ahead."""

    def __init__(self, batches, stride: int, count: int, depth: int = 2):
        self.batches, self.stride, self.count, self.depth = batches, stride, count, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pretrainer-batches")
        self.pending: dict[int, Future] = {}

    @property
    def order(self):
        return self.batches.order

    def batch(self, first: int, count: int) -> dict:
        if count != self.count:
            return self.batches.batch(first, count)
        wanted = self.pending.pop(first, None) or self.pool.submit(self.batches.batch, first, count)
        ahead = {first + i * self.stride for i in range(1, self.depth + 1)}
        for key in [k for k in self.pending if k not in ahead]:  # foreseen wrongly (a rollback): drop
            self.pending.pop(key).cancel()
        for key in sorted(ahead - set(self.pending)):
            self.pending[key] = self.pool.submit(self.batches.batch, key, count)
        return wanted.result()

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)
