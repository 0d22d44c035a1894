"""What the pretrained-vs-scratch benchmarks share: a pretraining corpus without the evaluation
files, and whether a fine-tuning run left by an earlier invocation can be reused instead of trained
again."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml


def fresh_corpus(folder: Path, source: str) -> int:
    """Empty ``folder`` and fill it with links to the standard library less ``source``'s evaluation
    files (emptied first: links left by a run for another task could hold this one's eval files).
    Returns the number of files linked."""
    from pretrainer.finetune.builtin import corpus_without_eval

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return corpus_without_eval(folder, source)


def finished_finetune(out: Path, *, epochs: int, lr: float, seed: int, scratch: bool, checkpoint,
                      selected_by: str | None = None, **same_options) -> dict | None:
    """The best epoch (``{"epoch", "metrics"}``) of the fine-tuning run in ``out`` when it finished
    with these settings (and kept its epoch by ``selected_by``, when given, with the options
    ``same_options`` as given, a missing option counting as 0); a pretrained one must
    also have started from ``checkpoint`` (it is stale once pretraining has gone on). None when it
    must be trained (again)."""
    file = Path(out) / "config.yaml"
    if not file.is_file():
        return None
    done = yaml.safe_load(file.read_text()) or {}
    opts = done.get("options", {})
    if not (done.get("best") and opts.get("epochs") == epochs and opts.get("lr") == lr
            and opts.get("seed") == seed and opts.get("from_scratch") == scratch):
        return None
    if selected_by is not None and done["best"].get("metric") != selected_by:
        return None
    if any(opts.get(k, 0) != v for k, v in same_options.items()):
        return None
    started = (done.get("origin") or {}).get("checkpoint")
    if not scratch and (started is None or Path(started).resolve() != Path(checkpoint).resolve()):
        return None
    return done["best"]


def rates(first: float, more: str) -> list[float]:
    """``first`` then the comma-separated rates of ``more`` that differ from it, in order."""
    out = [first]
    for x in more.split(","):
        if x.strip() and float(x) not in out:
            out.append(float(x))
    return out
