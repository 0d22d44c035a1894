"""Synthetic in-context-learning tasks with exact answers, and a pretraining corpus made of them.

Four tasks, each a generator of rows ``{"input", "target", "choices"}`` (the target is always one
of the four distinct choices; the others are the answers a confused model would give):

- ``copy``: ``kqdw => kqdw`` (3 to 5 lowercase letters, never a palindrome);
- ``reverse``: ``kqdw => wdqk`` (the same inputs as copy: without examples the two are ambiguous);
- ``successor``: ``41 => 42``, ``kq => kr``, ``kz => la`` (a number 1..997, or two letters counted
  in base 26);
- ``lookup``: ``c=4 k=7 x=1 ? k => 7`` (a record of three keys with distinct digit values).

Every example is written with the template ``{input} => {target}`` and examples are separated by a
newline, GPT-3's layout without the instruction line: the task is to be inferred from the examples.

``builtin:icl-synthetic`` (see :mod:`pretrainer.data.corpus`) is a corpus of documents that are
each 1 to 16 such examples of one task, so that a tiny GPT pretrained on it learns to infer the task
from the examples before it: its accuracy rises with the number of shots. The same ``(n, seed)``
always gives the same documents; rows for evaluation come from other seeds (see :func:`task_rows`).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator

TASKS = ("copy", "reverse", "successor", "lookup")
TEMPLATE = "{input} => {target}"
SEPARATOR = "\n"
DEFAULT_DOCUMENTS = 20_000
_LETTERS = string.ascii_lowercase


def _word(rng: random.Random, length: int | None = None) -> str:
    while True:
        w = "".join(rng.choice(_LETTERS) for _ in range(length or rng.randint(3, 5)))
        if w != w[::-1]:
            return w


def _distinct(first: str, candidates: list[str], fill: Callable[[], str]) -> list[str]:
    """``first`` then the candidates that differ from everything before them, topped up with
    ``fill()`` to four."""
    out = [first]
    for c in candidates:
        if c not in out:
            out.append(c)
    while len(out) < 4:
        c = fill()
        if c not in out:
            out.append(c)
    return out[:4]


def _copy_or_reverse(rng: random.Random, reverse: bool) -> dict:
    w = _word(rng)
    target = w[::-1] if reverse else w
    other = w if reverse else w[::-1]
    rotated = w[1:] + w[0]
    return {"input": w, "target": target,
            "choices": _distinct(target, [other, rotated], lambda: _word(rng, len(w)))}


def _successor(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        n = rng.randint(1, 997)
        x, nxt, alts = str(n), str(n + 1), [str(n), str(n + 2), str(n - 1)]
    else:  # two letters counted in base 26: "kq" -> "kr", "kz" -> "la"
        i = rng.randint(1, 26 * 26 - 3)
        x, nxt, alts = _letters2(i), _letters2(i + 1), [_letters2(i), _letters2(i + 2), _letters2(i - 1)]
    return {"input": x, "target": nxt, "choices": _distinct(nxt, alts, lambda: "")}


def _letters2(i: int) -> str:
    return _LETTERS[i // 26] + _LETTERS[i % 26]


def _lookup(rng: random.Random) -> dict:
    keys = rng.sample(_LETTERS, 3)
    values = rng.sample("0123456789", 4)  # three in the record, one that is not
    asked = rng.randrange(3)
    record = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    target = values[asked]
    return {"input": f"{record} ? {keys[asked]}", "target": target,
            "choices": _distinct(target, values, lambda: "")}


_GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "copy": lambda rng: _copy_or_reverse(rng, reverse=False),
    "reverse": lambda rng: _copy_or_reverse(rng, reverse=True),
    "successor": _successor,
    "lookup": _lookup,
}


def shuffled_choices(row: dict, rng: random.Random) -> dict:
    """The row with its choices in a random order (so the target's position says nothing)."""
    choices = list(row["choices"])
    rng.shuffle(choices)
    return {**row, "choices": choices}


def task_rows(task: str, n: int, split: str, seed: int = 0) -> list[dict]:
    """``n`` rows of ``task`` for ``split`` (``"test"`` or ``"pool"``): the two splits come from
    different random streams, and pool rows whose input is also a test input (of the same ``n``
    and ``seed``) are replaced, so examples are never the query."""
    if task not in _GENERATORS:
        raise KeyError(task)
    gen = _GENERATORS[task]

    def stream(which: str) -> Iterator[dict]:
        rng = random.Random(f"icl-synthetic:{task}:{which}:{seed}")
        while True:
            yield shuffled_choices(gen(rng), rng)

    test = [row for row, _ in zip(stream("test"), range(n))]
    if split == "test":
        return test
    seen = {row["input"] for row in test}
    pool = []
    for row, _ in zip(stream("pool"), range(100 * n + 100)):
        if len(pool) == n:
            break
        if row["input"] not in seen:
            pool.append(row)
            seen.add(row["input"])
    return pool


def format_example(row: dict) -> str:
    return TEMPLATE.replace("{input}", row["input"]).replace("{target}", row["target"])


def icl_documents(n: int = DEFAULT_DOCUMENTS, seed: int = 1337) -> Iterator[str]:
    """``n`` documents, each 1 to 16 newline-separated examples of one task (chosen uniformly)."""
    rng = random.Random(f"icl-synthetic:documents:{seed}")
    for _ in range(n):
        gen = _GENERATORS[rng.choice(TASKS)]
        yield SEPARATOR.join(format_example(gen(rng)) for _ in range(rng.randint(1, 16))) + "\n"
