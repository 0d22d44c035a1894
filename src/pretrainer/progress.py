"""Progress lines for long work (``predict: 1,024/5,000 rows, 210 rows/s, 5 s, eta 19 s``), at most
one every few seconds and none for work that ends quickly. The caller decides where a line goes
(stderr, or nowhere under ``--json``): it passes ``say``."""

from __future__ import annotations

import time
from typing import Callable


#: Seconds before the first line (work that ends sooner shows none) and between two lines.
FIRST, EVERY = 2.0, 5.0


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``1 h 12 min``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Progress:
    """``update(done)`` calls ``say`` with a line once ``first`` seconds have passed, then at most
    every ``every`` seconds (default :data:`FIRST`, :data:`EVERY`): ``WHAT: done/total UNIT, rate
    UNIT/s, elapsed, eta``."""

    def __init__(self, what: str, total: int, unit: str, say: Callable[[str], None] | None,
                 first: float | None = None, every: float | None = None):
        self.what, self.total, self.unit, self.say = what, total, unit, say
        self.first = FIRST if first is None else first
        self.every = EVERY if every is None else every
        self.start = time.perf_counter()
        self.last: float | None = None

    def update(self, done: int, extra: str = "") -> None:
        if self.say is None:
            return
        now = time.perf_counter()
        if now - self.start < self.first or (self.last is not None and now - self.last < self.every):
            return
        self.last = now
        self.say(self.line(done, now - self.start, extra))

    def line(self, done: int, seconds: float, extra: str = "") -> str:
        rate = done / seconds if seconds > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        shown = f"{rate:.1f}" if rate < 100 else f"{rate:,.0f}"
        return (f"{self.what}: {done:,}/{self.total:,} {self.unit}, {shown} {self.unit}/s, {duration(seconds)}, "
                f"eta {duration(eta) if eta == eta else '?'}{extra}")
