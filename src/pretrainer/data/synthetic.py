"""A seeded synthetic corpus (``builtin:synthetic``) that a tiny model can learn in seconds.

Each document mixes a few kinds of short lines, all drawn from small vocabularies:

- templated English: ``the red cat sees a small dog .``
- arithmetic with correct answers: ``7 + 5 = 12``
- key-value records, then a recall question: ``color = blue ; size = 3 ; ... color ? blue``
- counting: ``count : 4 5 6 7 8``

The same ``(n, seed)`` always gives the same documents, on every platform.
"""

from __future__ import annotations

import random
from typing import Iterator

DEFAULT_DOCUMENTS = 2000

_ADJECTIVES = ["red", "blue", "small", "big", "old", "young", "happy", "quiet"]
_NOUNS = ["cat", "dog", "bird", "fish", "child", "farmer", "teacher", "robot"]
_VERBS = ["sees", "likes", "follows", "helps", "finds", "calls"]
_PLACES = ["in the garden", "near the river", "at home", "on the hill", "under the tree"]
_KEYS = ["color", "size", "name", "city", "pet", "day"]
_VALUES = {
    "color": ["red", "blue", "green", "black"],
    "size": [str(i) for i in range(1, 10)],
    "name": ["ada", "bob", "eve", "max", "zoe"],
    "city": ["paris", "tokyo", "lima", "oslo"],
    "pet": ["cat", "dog", "fish"],
    "day": ["monday", "friday", "sunday"],
}


def _sentence(rng: random.Random) -> str:
    subject = f"{rng.choice(['the', 'a'])} {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    obj = f"{rng.choice(['the', 'a'])} {rng.choice(_NOUNS)}"
    place = f" {rng.choice(_PLACES)}" if rng.random() < 0.5 else ""
    return f"{subject} {rng.choice(_VERBS)} {obj}{place} ."


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"{a} + {b} = {a + b}"
    a, b = max(a, b), min(a, b)
    return f"{a} - {b} = {a - b}"


def _record(rng: random.Random) -> str:
    keys = rng.sample(_KEYS, rng.randint(2, 4))
    values = {k: rng.choice(_VALUES[k]) for k in keys}
    asked = rng.choice(keys)
    return " ; ".join(f"{k} = {v}" for k, v in values.items()) + f" ; {asked} ? {values[asked]}"


def _counting(rng: random.Random) -> str:
    start = rng.randint(0, 50)
    return "count : " + " ".join(str(start + i) for i in range(rng.randint(3, 8)))


_LINE_KINDS = [_sentence, _sentence, _arithmetic, _record, _counting]


def synthetic_documents(n: int = DEFAULT_DOCUMENTS, seed: int = 1337) -> Iterator[str]:
    """Yield ``n`` deterministic documents of 3 to 8 lines each."""
    rng = random.Random(seed)
    for _ in range(n):
        lines = [rng.choice(_LINE_KINDS)(rng) for _ in range(rng.randint(3, 8))]
        yield "\n".join(lines) + "\n"
