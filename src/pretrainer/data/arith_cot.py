"""Multi-step arithmetic written out step by step: a chain-of-thought task and its pretraining data.

A question is an expression of one-digit numbers with ``+``, ``-`` and ``*`` (multiplication first,
then left to right); its rationale does one operation per line, so every line is a small fact::

    Q: 3 + 4 * 2 = ?
    A: 4 * 2 = 8.
    3 + 8 = 11.
    The answer is 11.

The direct-answer form of the same question leaves the rationale out (``A: The answer is 11.``).
Every intermediate result lies in 0..20 (questions that would leave that range are not drawn).

``builtin:arith-cot`` (see :mod:`pretrainer.data.corpus`) is a corpus of documents that are each 1
to 8 examples in one of the two forms (chosen per document, half and half), separated by a blank
line, with 1 to 3 operations per question: a small decoder pretrained on it learns both formats,
and which one to follow from the examples before it. The two-operation questions whose hash falls
in :func:`held_out` never appear in it: they are the queries of the ``builtin:arith-cot`` and
``builtin:arith-direct`` in-context tasks (:func:`task_rows`), so a model is asked questions it has
not seen, while every single step of their rationales is a fact the corpus teaches.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator

TEMPLATE = "Q: {input}\nA: {rationale}The answer is {target}."
SEPARATOR = "\n\n"
DEFAULT_DOCUMENTS = 20_000
TASK_OPS = 2  # operations per question of the in-context tasks
MAX_NEW_TOKENS = 44  # the longest worked answer of a task question is 43 characters
MAX_VALUE = 20
_PRECEDENCE = {"*": 1, "+": 0, "-": 0}


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def solve(numbers: list[int], ops: list[str]) -> tuple[list[str], int]:
    """The steps (``"4 * 2 = 8."``) and the value of ``numbers[0] ops[0] numbers[1] ...``: each step
    does the leftmost operation of the highest precedence left."""
    nums, ops = list(numbers), list(ops)
    steps = []
    while ops:
        top = max(_PRECEDENCE[o] for o in ops)
        i = next(j for j, o in enumerate(ops) if _PRECEDENCE[o] == top)
        r = _apply(nums[i], ops[i], nums[i + 1])
        steps.append(f"{nums[i]} {ops[i]} {nums[i + 1]} = {r}.")
        nums[i:i + 2] = [r]
        del ops[i]
    return steps, nums[0]


def question(rng: random.Random, n_ops: int) -> dict:
    """A row ``{"input": "3 + 4 * 2 = ?", "target": "11", "rationale": "4 * 2 = 8.\\n3 + 8 = 11.\\n"}``
    whose intermediate results all lie in 0..20."""
    while True:
        numbers = [rng.randint(1, 9) for _ in range(n_ops + 1)]
        ops = [rng.choice("+-*") for _ in range(n_ops)]
        steps, value = solve(numbers, ops)
        if all(0 <= int(s.rsplit("= ", 1)[1][:-1]) <= MAX_VALUE for s in steps):
            text = " ".join(f"{n} {o}" for n, o in zip(numbers, ops)) + f" {numbers[-1]} = ?"
            return {"input": text, "target": str(value), "rationale": "".join(s + "\n" for s in steps)}


def held_out(row: dict) -> bool:
    """Whether the question is kept out of the pretraining corpus (a fifth of them, by hash)."""
    return zlib.crc32(row["input"].encode()) % 5 == 0


def format_example(row: dict, rationale: bool = True) -> str:
    return (TEMPLATE.replace("{input}", row["input"]).replace("{target}", row["target"])
            .replace("{rationale}", row["rationale"] if rationale else ""))


def task_rows(n: int, split: str, seed: int = 0, rationale: bool = True) -> list[dict]:
    """``n`` distinct two-operation questions for ``split``: ``"test"`` rows are held-out questions
    (never in the corpus), ``"pool"`` rows (the shots) are not; without ``rationale`` the rows carry
    none (the direct-answer form of the same questions)."""
    rng = random.Random(f"arith-cot:{split}:{seed}")
    rows, seen = [], set()
    for _ in range(1000 * n + 1000):
        if len(rows) == n:
            break
        row = question(rng, TASK_OPS)
        if row["input"] not in seen and held_out(row) == (split == "test"):
            seen.add(row["input"])
            rows.append(row if rationale else {k: v for k, v in row.items() if k != "rationale"})
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} distinct {split} questions, {n} asked")
    return rows


def documents(n: int = DEFAULT_DOCUMENTS, seed: int = 1337) -> Iterator[str]:
    """``n`` documents of 1 to 8 examples (1 to 3 operations each), all with their rationale or all
    without, separated by a blank line; held-out questions are skipped."""
    rng = random.Random(f"arith-cot:documents:{seed}")
    for _ in range(n):
        with_rationale = rng.random() < 0.5
        count, examples = rng.randint(1, 8), []
        while len(examples) < count:
            row = question(rng, rng.choice((1, 2, 2, 3)))
            if not held_out(row):
                examples.append(format_example(row, with_rationale))
        yield SEPARATOR.join(examples) + "\n"
