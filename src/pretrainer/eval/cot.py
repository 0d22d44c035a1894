"""Chain-of-thought prompting: reading the answer out of a worked rationale, and self-consistency.

Chain of thought (Wei et al., 2022, "Chain-of-Thought Prompting Elicits Reasoning in Large Language
Models"): the shots show a worked rationale before their answer (``4 * 2 = 8.`` / ``3 + 8 = 11.`` /
``The answer is 11.``), so the model writes one too; the generation runs over several lines until a
stop string (the shot separator, a blank line), and the answer is read out of it:
:func:`extract_answer` with a regular expression, by default the words after "the answer is".

Self-consistency (Wang et al., 2023, "Self-Consistency Improves Chain of Thought Reasoning in
Language Models"): sample k rationales at a temperature and answer with the most frequent of their
answers (:func:`majority_vote`; a tie goes to the answer sampled first, so the vote is
deterministic given the samples).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from ..errors import DataError

#: The default answer pattern of chain-of-thought tasks: what follows "the answer is" (any case, an
#: optional colon) up to the end of its sentence or line; a final period is not part of the answer,
#: a decimal point is (``The answer is 3.5.`` gives ``3.5``).
ANSWER_IS = r"(?i)the answer is:?\s*(.*?)\s*(?:\.(?=\s|$)|\n|$)"


def compile_answer(pattern: str, where: str = "--answer") -> re.Pattern:
    """The compiled answer pattern, or a one-line error naming ``where``."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise DataError(f"{where} {pattern!r}: not a regular expression ({e})") from None


def extract_answer(text: str, pattern: str | re.Pattern | None = ANSWER_IS) -> str | None:
    """The answer in a generation: group 1 of the first match of ``pattern`` (the whole match when it
    has no group), whitespace stripped; ``None`` when nothing matches or the match is empty. With
    ``pattern`` None the answer is the whole generation, stripped."""
    if pattern is None:
        return text.strip()
    m = (pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)).search(text)
    if m is None:
        return None
    found = (m.group(1) if m.re.groups else m.group(0)) or ""
    return found.strip() or None


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, int]:
    """``(answer, votes)``: the most frequent answer among ``answers`` (``None``, no answer, does not
    vote); among answers with as many votes, the one that comes first in ``answers``. ``(None, 0)``
    when no sample gave an answer."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0
    top = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == top)
    return winner, top


def parse_stop(text: str) -> str:
    """A stop string from the command line, with the escapes ``\\n``, ``\\t`` and ``\\\\`` read as a
    newline, a tab and a backslash (``--stop '\\n\\n'`` is a blank line)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    stop = "".join(out)
    if not stop:
        raise DataError(f"--stop {text!r}: expected a non-empty string (such as '\\n\\n')")
    return stop


__all__ = ["ANSWER_IS", "compile_answer", "extract_answer", "majority_vote", "parse_stop"]
