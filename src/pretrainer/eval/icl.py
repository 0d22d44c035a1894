"""In-context learning: zero-, one- and few-shot accuracy of a decoder-only model on a task.

A task is a list of query rows and a separate pool of solved examples, plus a template::

    instruction: "Translate English to French:"   # optional first line
    template: "{input} => {target}"              # one example; ends with {target} (see below)
    separator: "\\n"                              # between examples (and before the query)
    scoring: choice                              # choice (needs choices) | generate
    choices: [yes, no]                           # optional: the same candidates for every row
    max_new_tokens: 32                           # generate: at most this many tokens
    stop: "\\n"                                   # generate: stop strings (a string or a list)
    answer: "(?i)the answer is (\\S+)"            # generate: regex; group 1 is the answer
    data: rows.jsonl                             # a task YAML may name its rows ...
    pool: pool.jsonl                             # ... and its pool (else rows with "split": "pool")

Rows are JSON lines ``{"input": ..., "target": ..., "choices": [...], "rationale": ..., "split":
"pool"}`` (``split``, ``choices`` and ``rationale`` optional; rows whose split is ``pool`` or
``train`` are the pool, the rest are queries). A prompt with k shots is GPT-3's layout: the
instruction line, k examples drawn from the pool (a seeded permutation per query, so the k-shot
examples are the first k of the (k+1)-shot ones), then the query cut just before the target::

    Translate English to French:
    sea otter => loutre de mer
    cheese =>

The whitespace between the query and the target belongs to the continuation (`` fromage``).

Scoring (see :mod:`.scoring`, shared with the lm-evaluation-harness adapter):

- ``choice``: the log-likelihood of each candidate continuation; the headline ``accuracy`` picks
  the candidate with the highest log-likelihood per token (length-normalised, so long candidates
  are not penalised for their length); ``accuracy_sum`` picks by the raw sum.
- ``generate``: greedy decoding until a stop string (default a newline) or ``<eos>``; the headline
  ``accuracy`` is exact match of the answer (whitespace at both ends ignored), ``f1`` the token F1
  (lowercased, split on whitespace). The answer is the whole generation, or what the ``answer``
  regex extracts from it (group 1 of its first match).

Chain of thought (:mod:`.cot`): a template may hold ``{rationale}`` before ``{target}``, as in
``Q: {input}\\nA: {rationale}The answer is {target}.``; shots show each pool row's worked
``rationale`` there (empty for rows without one: the direct-answer form), and the query is cut where
the answer begins (``Q: 3 + 4 * 2 = ?\\nA:``), so the model writes its own rationale. For such a
template (or any that does not end with ``{target}``) the default stop is the separator and the
default answer pattern :data:`.cot.ANSWER_IS` (the words after "the answer is"). Self-consistency:
with ``samples`` k > 1, k continuations are sampled at ``temperature`` and the majority answer is
scored (ties go to the answer sampled first).

Prompts longer than the model's window lose their oldest examples first (counted, and reported in
one warning per evaluation). Accuracy comes with a seeded bootstrap 95 % interval over queries.

Built-in tasks (``builtin:NAME``): the synthetic ``copy``, ``reverse``, ``successor``, ``lookup``
(:mod:`pretrainer.data.icl_synthetic`; generate by default, four choices per row for ``choice``),
``stdlib``: complete a real line of the running Python's standard library with its last word,
among four (the others are last words of other lines), and ``arith-cot`` / ``arith-direct``:
two-operation arithmetic with worked rationales in the shots, or the same questions answered
directly (:mod:`pretrainer.data.arith_cot`).
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import DataError, storage, write_atomic
from . import BUILTIN_TASKS, SCORINGS
from .cot import ANSWER_IS, compile_answer, extract_answer, majority_vote
from .scoring import (
    encode_context,
    encode_pair,
    generate_texts,
    loglikelihoods,
    window,
)

TEMPLATE_KEYS = ("name", "instruction", "template", "separator", "scoring", "choices",
                 "max_new_tokens", "stop", "answer", "data", "pool")
BUILTIN_ROWS = 200  # queries (and as many pool rows) of a built-in task
N_BOOT = 1000


@dataclass
class Task:
    name: str
    rows: list[dict]  # queries: input, target, optional choices
    pool: list[dict]  # solved examples shown as shots
    instruction: str = ""
    template: str = "{input} => {target}"
    separator: str = "\n"
    scoring: str = "generate"
    choices: list[str] | None = None  # candidates shared by every row (else each row's own)
    max_new_tokens: int = 32
    source: str = ""
    stop: list[str] | None = None  # generate: stop strings (default: see stops())
    answer: str | None = None  # generate: answer regex (default: see answer_pattern())

    def row_choices(self, row: dict) -> list[str]:
        return row.get("choices") or self.choices or []

    @property
    def chain_of_thought(self) -> bool:
        """Whether the answer part holds more than the target: a ``{rationale}`` or text after it."""
        return "{rationale}" in self.template or not self.template.endswith("{target}")

    def stops(self) -> list[str]:
        """Where generation stops: the task's stop strings, else the separator for a chain-of-thought
        template (its answers span lines), else a newline."""
        return list(self.stop) if self.stop else [self.separator] if self.chain_of_thought else ["\n"]

    def answer_pattern(self) -> str | None:
        """The answer regex: the task's, else "the answer is ..." for a chain-of-thought template,
        else None (the whole generation is the answer)."""
        return self.answer if self.answer is not None else ANSWER_IS if self.chain_of_thought else None


# ----------------------------------------------------------------------------------------------
# Prompts


def _fill(template: str, row: dict) -> str:
    # plain replacement, not str.format: inputs and templates may hold braces (code)
    return (template.replace("{input}", row["input"]).replace("{rationale}", row.get("rationale", ""))
            .replace("{target}", row["target"]))


def answer_start(template: str) -> int:
    """Where the answer part of a template begins: at ``{rationale}`` or ``{target}``, the first."""
    return min(template.find(p) for p in ("{rationale}", "{target}") if p in template)


def query_and_gap(task: Task, row: dict) -> tuple[str, str]:
    """The query as written in the prompt (the template filled up to where the answer begins,
    ``{target}`` or ``{rationale}``, without trailing whitespace) and that whitespace, which belongs
    to the continuation (as in ``cheese =>`` + `` fromage``): byte-level BPE attaches a space to the
    word after it."""
    head = task.template[:answer_start(task.template)].replace("{input}", row["input"])
    query = head.rstrip()
    return query, head[len(query):]


def format_query(task: Task, row: dict) -> str:
    return query_and_gap(task, row)[0]


def continuation(task: Task, row: dict, text: str) -> str:
    """What the model is to produce after the query of ``row``: the gap, then ``text``."""
    return query_and_gap(task, row)[1] + text


def render_prompt(task: Task, examples: Sequence[dict], row: dict) -> str:
    """Instruction line, the solved examples, then the query (GPT-3's layout)."""
    parts = [_fill(task.template, ex) for ex in examples] + [format_query(task, row)]
    head = task.instruction + "\n" if task.instruction else ""
    return head + task.separator.join(parts)


def draw_examples(task: Task, query_index: int, k: int, seed: int) -> list[dict]:
    """``k`` pool rows for query ``query_index``: the first k of a permutation seeded by
    ``(seed, query_index)``, so the shots of a smaller k are the start of those of a larger one."""
    if k > len(task.pool):
        raise DataError(f"task '{task.name}': {k} shots asked but the pool has only {len(task.pool)} examples")
    if k == 0:
        return []
    perm = np.random.default_rng([seed, query_index]).permutation(len(task.pool))
    return [task.pool[i] for i in perm[:k]]


def fit_context(tok, task: Task, examples: Sequence[dict], row: dict, max_tokens: int) -> tuple[list[int], int, bool]:
    """``(ids, kept, cut)``: the prompt's token ids (``<eos>`` first), how many examples it kept and
    whether anything was cut. The oldest examples are dropped until the ids fit in ``max_tokens``;
    with none left, the ids are cut from the left."""
    ids: list[int] = []
    for drop in range(len(examples) + 1):
        ids = encode_context(tok, render_prompt(task, examples[drop:], row))
        if len(ids) <= max_tokens:
            return ids, len(examples) - drop, drop > 0
    return ids[-max(max_tokens, 1):], 0, True


# ----------------------------------------------------------------------------------------------
# Metrics


def bootstrap_interval(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                       level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    a = (1 - level) / 2
    return [float(np.quantile(means, a)), float(np.quantile(means, 1 - a))]


def token_f1(prediction: str, target: str) -> float:
    """F1 of the whitespace tokens (lowercased) of a prediction against the target."""
    p, t = prediction.lower().split(), target.lower().split()
    if not p or not t:
        return float(p == t)
    common = sum((Counter(p) & Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model, tok, task: Task, shots: Sequence[int], *, seed: int = 0, batch_size: int = 16,
             limit: int | None = None, warn: Callable[[str], None] | None = None,
             progress: Callable[[str], None] | None = None, samples: int = 1,
             temperature: float = 0.0) -> dict:
    """Accuracy of ``model`` on ``task`` for every number of shots: ``{"shots": {"k": {...}}}``
    with ``accuracy`` and its ``interval`` (plus ``accuracy_sum`` for choice, ``f1`` and
    ``answered`` for generate), ``n`` queries, ``truncated`` prompts and ``mean_shots_used``, and
    the first query's prompt. Generate: with ``samples`` k > 1 (self-consistency) or a
    ``temperature`` > 0, continuations are sampled (seeded by ``seed`` and k) and the answer is the
    majority of k; ``accuracy_single`` is then the mean accuracy of the single samples."""
    check_sampling(samples, temperature)
    warn = warn or (lambda s: print(s, file=sys.stderr))
    queries = task.rows[:limit] if limit else task.rows
    if not queries:
        raise DataError(f"task '{task.name}': no query rows")
    W = window(model)
    per_shots, truncated = {}, {}
    started = time.perf_counter()
    for n, k in enumerate(shots, 1):
        examples = [draw_examples(task, i, k, seed) for i in range(len(queries))]
        if task.scoring == "choice":
            res = _evaluate_choice(model, tok, task, queries, examples, W, batch_size, seed)
        else:
            res = _evaluate_generate(model, tok, task, queries, examples, W, batch_size, seed, k,
                                     samples, temperature)
        if res["truncated"]:
            truncated[k] = res
        per_shots[str(k)] = res
        if progress is not None:  # a line per shot count: the whole evaluation can take minutes
            spent = time.perf_counter() - started
            progress(f"{k} shots: accuracy {res['accuracy']:.3f} over {res['n']} queries ({n}/{len(shots)} shot "
                     f"counts, {spent:.0f} s, eta {spent / n * (len(shots) - n):.0f} s)")
    if truncated:
        detail = "; ".join(f"{k} shots: {r['truncated']} of {r['n']} prompts, {r['mean_shots_used']:.1f} "
                           f"examples kept on average" for k, r in truncated.items())
        warn(f"warning: task '{task.name}': prompts longer than the model's {W}-token window lost "
             f"their oldest examples ({detail})")
    return {"shots": per_shots}


def _contexts(tok, task, queries, examples, max_tokens):
    out, used, cut = [], [], 0
    for row, ex in zip(queries, examples):
        ids, kept, was_cut = fit_context(tok, task, ex, row, max_tokens)
        out.append(ids)
        used.append(kept)
        cut += was_cut
    return out, used, cut


def _summary(correct, seed, used, cut, tok_prompt) -> dict:
    return {"accuracy": float(np.mean(correct)), "interval": bootstrap_interval(correct, seed=seed),
            "n": len(correct), "truncated": int(cut), "mean_shots_used": float(np.mean(used)),
            "prompt": tok_prompt}


def _evaluate_choice(model, tok, task, queries, examples, W, batch_size, seed) -> dict:
    pairs, owner, conts = [], [], []
    for q, row in enumerate(queries):
        cands = [tok.encode(continuation(task, row, c)) for c in task.row_choices(row)]
        conts.append(cands)
    longest = max(len(c) for cands in conts for c in cands)
    ctxs, used, cut = _contexts(tok, task, queries, examples, W + 1 - longest)
    for q, cands in enumerate(conts):
        for c in cands:
            pairs.append((ctxs[q], c))
            owner.append(q)
    scores = loglikelihoods(model, pairs, batch_size)
    by_query: list[list] = [[] for _ in queries]
    for q, s in zip(owner, scores):
        by_query[q].append(s)
    norm, raw, chance = [], [], []
    for row, ss in zip(queries, by_query):
        gold = task.row_choices(row).index(row["target"])
        norm.append(float(int(np.argmax([s.per_token for s in ss])) == gold))
        raw.append(float(int(np.argmax([s.logprob for s in ss])) == gold))
        chance.append(1 / len(ss))
    out = _summary(norm, seed, used, cut, render_prompt(task, examples[0], queries[0]))
    out.update(accuracy_sum=float(np.mean(raw)), interval_sum=bootstrap_interval(raw, seed=seed),
               chance=float(np.mean(chance)))
    return out


def check_sampling(samples: int, temperature: float) -> None:
    if not (isinstance(samples, int) and samples >= 1):
        raise DataError(f"--samples {samples}: expected a positive number of sampled continuations")
    if not temperature >= 0:
        raise DataError(f"--temperature {temperature}: expected a number >= 0")
    if samples > 1 and temperature == 0:
        raise DataError(f"--samples {samples}: self-consistency needs --temperature > 0 (greedy "
                        f"continuations are all the same)")


def _evaluate_generate(model, tok, task, queries, examples, W, batch_size, seed, k=0, samples=1,
                       temperature=0.0) -> dict:
    ctxs, used, cut = _contexts(tok, task, queries, examples, W + 1 - task.max_new_tokens)
    pattern = task.answer_pattern()
    regex = None if pattern is None else compile_answer(pattern, f"task '{task.name}': answer")
    texts = generate_texts(model, tok, [c for c in ctxs for _ in range(samples)], task.max_new_tokens,
                           stop=task.stops(), batch_size=batch_size, temperature=temperature,
                           seed=seed * 1_000_003 + k)
    per_query = [texts[q * samples:(q + 1) * samples] for q in range(len(queries))]
    drawn = [[extract_answer(t, regex) for t in ts] for ts in per_query]
    voted = [majority_vote(a) for a in drawn]
    answers = [a for a, _ in voted]
    gold = [row["target"].strip() for row in queries]
    em = [float(a == g) for a, g in zip(answers, gold)]
    f1 = [token_f1(a or "", g) for a, g in zip(answers, gold)]
    out = _summary(em, seed, used, cut, render_prompt(task, examples[0], queries[0]))
    out.update(exact_match=out["accuracy"], f1=float(np.mean(f1)), f1_interval=bootstrap_interval(f1, seed=seed),
               answered=float(np.mean([a is not None for a in answers])),
               predictions=[{"target": g, "prediction": a, **({"generation": ts[0]} if regex is not None else {}),
                             **({"votes": v, "samples": list(ds)} if samples > 1 else {})}
                            for a, g, ts, ds, (_, v) in zip(answers[:5], gold, per_query, drawn, voted)])
    if samples > 1:
        out.update(samples=samples, temperature=temperature,
                   accuracy_single=float(np.mean([[a == g for a in ds] for ds, g in zip(drawn, gold)])),
                   vote_share=float(np.mean([v / samples for _, v in voted])))
    return out


def headline(task: Task, samples: int = 1, temperature: float = 0.0) -> str:
    if task.scoring == "choice":
        return "choice: highest log-likelihood per token (length-normalised); accuracy_sum uses the raw sum"
    pattern = task.answer_pattern()
    read = ("" if pattern is None else " (read after 'the answer is')" if pattern == ANSWER_IS
            else f" (read by the regex {pattern!r})")
    until = f"until {' or '.join(map(repr, task.stops()))}"
    if samples > 1:
        return (f"generate: exact match of the majority answer{read} of {samples} continuations sampled at "
                f"temperature {temperature:g} ({until})")
    how = "greedy continuation" if temperature == 0 else f"continuation sampled at temperature {temperature:g}"
    what = f"the {how}" if pattern is None else f"the answer{read} in the {how}"
    return f"generate: exact match of {what} ({until})"


def count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def run_icl(models: Sequence[tuple[str, object, object]], task: Task, shots: Sequence[int], *,
            out: str | Path | None = None, seed: int = 0, batch_size: int = 16,
            limit: int | None = None, warn: Callable[[str], None] | None = None,
            progress: Callable[[str], None] | None = None, samples: int = 1,
            temperature: float = 0.0) -> dict:
    """Evaluate every ``(name, model, tokenizer)`` on ``task`` and, with ``out``, write
    ``<task>.json`` and ``<task>.png`` (accuracy vs shots; with several runs also
    ``<task>-params.png``, accuracy vs parameter count) into that folder."""
    check_sampling(samples, temperature)
    result = {"task": task.name, "source": task.source, "scoring": task.scoring,
              "headline": headline(task, samples, temperature),
              "shots": [int(k) for k in shots], "seed": seed, "n_queries": len(task.rows[:limit] if limit else task.rows),
              "n_pool": len(task.pool), "bootstrap": {"n": N_BOOT, "level": 0.95, "seed": seed}, "runs": []}
    if task.scoring == "generate":
        result["generation"] = {"stop": task.stops(), "answer": task.answer_pattern(), "samples": samples,
                                "temperature": temperature, "max_new_tokens": task.max_new_tokens}
    for name, model, tok in models:
        say = None if progress is None else (lambda line, name=name: progress(f"{name}: {line}"))
        res = evaluate(model, tok, task, shots, seed=seed, batch_size=batch_size, limit=limit, warn=warn,
                       progress=say, samples=samples, temperature=temperature)
        result["runs"].append({"run": name, "params": count_params(model), **res})
    if out is not None:
        result["files"] = write_outputs(result, out)
    return result


def write_outputs(result: dict, out: str | Path) -> dict:
    out = Path(out)
    with storage(out, "create the folder"):
        out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", result["task"].removeprefix("builtin:")).strip("-") or "task"
    files = {"json": str(out / f"{stem}.json"), "png": str(out / f"{stem}.png")}
    curves = [{"label": Path(r["run"]).name or r["run"], "shots": r["shots"]} for r in result["runs"]]
    plot_shots(curves, files["png"], title=f"{result['task']} ({result['scoring']})")
    if len(result["runs"]) > 1:
        files["params_png"] = str(out / f"{stem}-params.png")
        plot_params(result["runs"], files["params_png"], title=f"{result['task']} ({result['scoring']})")
    write_atomic(files["json"], json.dumps({**result, "files": files}, indent=2) + "\n")
    return files


# ----------------------------------------------------------------------------------------------
# Plots


def plot_shots(curves: Sequence[dict], out_png, title: str = "") -> Path:
    """Accuracy (with its interval) vs number of shots, one line per ``{"label", "shots"}`` curve."""
    from ..plotting import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    chance, ticks = None, set()
    for c in curves:
        ks = sorted(c["shots"], key=int)
        x = [int(k) for k in ks]
        y = [c["shots"][k]["accuracy"] for k in ks]
        lo = [y_ - c["shots"][k]["interval"][0] for k, y_ in zip(ks, y)]
        hi = [c["shots"][k]["interval"][1] - y_ for k, y_ in zip(ks, y)]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=c["label"])
        chance = c["shots"][ks[0]].get("chance", chance)
        ticks.update(x)
    if ticks and max(ticks) > 8:  # 0, 1, 2, 4 ... 32 shots: evenly spaced, not piled up at the left
        ax.set_xscale("symlog", linthresh=1, linscale=0.5)
    ax.set_xticks(sorted(ticks), [str(k) for k in sorted(ticks)])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xlabel("shots (solved examples in the prompt)")
    ax.set_ylabel("accuracy (95 % bootstrap interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)
    return save(fig, out_png)


def plot_params(runs: Sequence[dict], out_png, title: str = "") -> Path:
    """Accuracy vs parameter count (log), one line per number of shots."""
    from ..plotting import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    runs = sorted(runs, key=lambda r: r["params"])
    for k in sorted(runs[0]["shots"], key=int):
        ax.plot([r["params"] for r in runs], [r["shots"][k]["accuracy"] for r in runs], marker="o",
                label=f"{k} shots")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return save(fig, out_png)


# ----------------------------------------------------------------------------------------------
# Loading tasks


def load_task(spec: str, template: str | None = None, *, scoring: str | None = None,
              seed: int = 0, n: int = BUILTIN_ROWS) -> Task:
    """A task from ``builtin:NAME``, a JSONL/JSON file of rows, or a task YAML (which may name its
    ``data`` and ``pool`` files); ``template`` is a YAML file whose fields override the task's."""
    if spec.startswith("builtin:"):
        task = builtin_task(spec.removeprefix("builtin:"), n=n, seed=seed)
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"task '{spec}': no such file (expected a .jsonl/.json of rows, a task .yaml, "
                            f"or builtin:{{{','.join(BUILTIN_TASKS)}}})")
        if path.suffix.lower() in (".yaml", ".yml"):
            task = _task_from_fields(_read_template(path), path, rows_file=None)
        else:
            task = _task_from_fields({}, None, rows_file=path)
    if template is not None:
        fields = _read_template(Path(template))
        task = _task_from_fields({**_fields_of(task), **fields}, Path(template), rows_file=None, base=task)
    if scoring is not None:
        task = replace(task, scoring=scoring)
    validate_task(task)
    return task


def _fields_of(task: Task) -> dict:
    return {"name": task.name, "instruction": task.instruction, "template": task.template,
            "separator": task.separator, "scoring": task.scoring, "choices": task.choices,
            "max_new_tokens": task.max_new_tokens, "stop": task.stop, "answer": task.answer}


def _read_template(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise DataError(f"template '{path}': no such file")
    try:
        fields = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if fields is None:
        fields = {}
    if not isinstance(fields, dict):
        raise DataError(f"{path}: expected a mapping of template fields ({', '.join(TEMPLATE_KEYS)})")
    for key in fields:
        if key not in TEMPLATE_KEYS:
            raise DataError(f"{path}: unknown field '{key}' (expected: {', '.join(TEMPLATE_KEYS)})")
    for key in ("name", "instruction", "template", "separator", "scoring", "data", "pool"):
        if key in fields and not isinstance(fields[key], str):
            raise DataError(f"{path}: field '{key}' is {type(fields[key]).__name__}, expected a string")
    if "choices" in fields and not (isinstance(fields["choices"], list) and all(isinstance(c, (str, int)) for c in fields["choices"])):
        raise DataError(f"{path}: field 'choices' must be a list of strings")
    if "choices" in fields:
        fields["choices"] = [str(c) for c in fields["choices"]]
    if "max_new_tokens" in fields and not (isinstance(fields["max_new_tokens"], int) and fields["max_new_tokens"] > 0):
        raise DataError(f"{path}: field 'max_new_tokens' must be a positive integer")
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    if "stop" in fields and not (isinstance(fields["stop"], list) and fields["stop"]
                                 and all(isinstance(x, str) and x for x in fields["stop"])):
        raise DataError(f"{path}: field 'stop' must be a non-empty string or a list of them")
    if "answer" in fields:
        if not isinstance(fields["answer"], str):
            raise DataError(f"{path}: field 'answer' is {type(fields['answer']).__name__}, expected a regex string")
        compile_answer(fields["answer"], f"{path}: field 'answer'")
    return fields


def _task_from_fields(fields: dict, where: Path | None, rows_file: Path | None, base: Task | None = None) -> Task:
    rel = (lambda p: (where.parent / p) if where is not None and not Path(p).is_absolute() else Path(p))
    if base is not None and "data" not in fields:
        rows, pool, source = base.rows, base.pool, base.source
    else:
        data = rows_file or (rel(fields["data"]) if "data" in fields else None)
        if data is None:
            raise DataError(f"{where}: no 'data' field naming the task's rows (a .jsonl file)")
        all_rows = read_rows(data)
        rows = [r for r in all_rows if r.get("split") not in ("pool", "train")]
        pool = [r for r in all_rows if r.get("split") in ("pool", "train")]
        source = str(data)
    if "pool" in fields:
        pool = read_rows(rel(fields["pool"]))
    name = fields.get("name") or (base.name if base else Path(source).stem)
    return Task(name=name, rows=rows, pool=pool, source=source,
                instruction=fields.get("instruction", ""),
                template=fields.get("template", "{input} => {target}"),
                separator=fields.get("separator", "\n"),
                scoring=fields.get("scoring") or ("choice" if fields.get("choices") or any(
                    "choices" in r for r in rows[:1]) else "generate"),
                choices=fields.get("choices"),
                max_new_tokens=fields.get("max_new_tokens", 32),
                stop=fields.get("stop"), answer=fields.get("answer"))


def read_rows(path: Path) -> list[dict]:
    """Rows of a ``.jsonl`` file (one object a line) or a ``.json`` array, checked field by field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task rows '{path}': no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    items: list[tuple[str, object]] = []
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = [(f"{path} item {i}", r) for i, r in enumerate(json.loads(text))]
        except ValueError as e:
            raise DataError(f"{path}: invalid JSON ({str(e).splitlines()[0]})") from None
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"{path} line {lineno}", json.loads(line)))
                except ValueError as e:
                    raise DataError(f"{path} line {lineno}: invalid JSON ({str(e).splitlines()[0]})") from None
    if not items:
        raise DataError(f"{path}: no rows")
    return [_check_row(r, where) for where, r in items]


def _check_row(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with fields 'input' and 'target', got {type(row).__name__}")
    for key in ("input", "target"):
        if key not in row:
            raise DataError(f"{where}: no field '{key}' (fields: {', '.join(map(str, row)) or 'none'})")
        if isinstance(row[key], (int, float)) and not isinstance(row[key], bool):
            row[key] = str(row[key])
        if not isinstance(row[key], str):
            raise DataError(f"{where}: field '{key}' is {type(row[key]).__name__}, expected a string")
    if "choices" in row:
        c = row["choices"]
        if not (isinstance(c, list) and len(c) >= 2 and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in c)):
            raise DataError(f"{where}: field 'choices' must be a list of at least two strings")
        row["choices"] = [str(x) for x in c]
    if "rationale" in row and not isinstance(row["rationale"], str):
        raise DataError(f"{where}: field 'rationale' is {type(row['rationale']).__name__}, expected a string")
    if "split" in row and not isinstance(row["split"], str):
        raise DataError(f"{where}: field 'split' must be a string (pool, train or test)")
    return row


def validate_task(task: Task) -> None:
    where = task.source or task.name
    if task.scoring not in SCORINGS:
        raise DataError(f"task '{task.name}': scoring '{task.scoring}', expected one of {', '.join(SCORINGS)}")
    t = task.template
    if "{input}" not in t or "{target}" not in t or t.index("{input}") > answer_start(t):
        raise DataError(f"task '{task.name}': template {t!r} must contain {{input}} and end with {{target}} "
                        f"(chain of thought: {{input}}, then {{rationale}} and {{target}})")
    if task.scoring == "choice" and task.chain_of_thought:
        raise DataError(f"task '{task.name}': template {t!r}: scoring 'choice' needs a template that ends with "
                        f"{{target}} and has no {{rationale}} (chain of thought needs scoring 'generate')")
    if "{rationale}" in t and t.index("{rationale}") > t.index("{target}"):
        raise DataError(f"task '{task.name}': template {t!r}: {{rationale}} must come before {{target}}")
    if not task.rows:
        raise DataError(f"{where}: no query rows (every row is in the pool)")
    if task.scoring == "choice":
        for i, row in enumerate(task.rows):
            cands = task.row_choices(row)
            if len(cands) < 2:
                raise DataError(f"{where}: query {i}: scoring 'choice' needs 'choices' (in the row or the template)")
            if row["target"] not in cands:
                raise DataError(f"{where}: query {i}: target {row['target']!r} is not one of its choices {cands}")
            if len(set(cands)) != len(cands):
                raise DataError(f"{where}: query {i}: choices {cands} repeat a candidate")


# ----------------------------------------------------------------------------------------------
# Built-in tasks


def builtin_task(name: str, n: int = BUILTIN_ROWS, seed: int = 0) -> Task:
    from ..data import icl_synthetic as syn

    if name in syn.TASKS:
        return Task(name=f"builtin:{name}", rows=syn.task_rows(name, n, "test", seed),
                    pool=syn.task_rows(name, n, "pool", seed), template=syn.TEMPLATE,
                    separator=syn.SEPARATOR, scoring="generate", max_new_tokens=8, source=f"builtin:{name}")
    if name in ("arith-cot", "arith-direct"):
        from ..data import arith_cot

        cot = name == "arith-cot"
        return Task(name=f"builtin:{name}", rows=arith_cot.task_rows(n, "test", seed, rationale=cot),
                    pool=arith_cot.task_rows(n, "pool", seed, rationale=cot), template=arith_cot.TEMPLATE,
                    separator=arith_cot.SEPARATOR, scoring="generate", stop=[arith_cot.SEPARATOR],
                    max_new_tokens=arith_cot.MAX_NEW_TOKENS, source=f"builtin:{name}")
    if name == "stdlib":
        rows = stdlib_rows(2 * n, seed)
        return Task(name="builtin:stdlib", rows=rows[:n], pool=rows[n:], template="{input}{target}",
                    separator="\n", scoring="choice", source="builtin:stdlib")
    raise DataError(f"task 'builtin:{name}': unknown (built-in tasks: "
                    + ", ".join(f"builtin:{t}" for t in BUILTIN_TASKS) + ")")


_LAST_WORD = re.compile(r"(\S.*?[ .(=\[,])([A-Za-z_]\w{2,})")


def stdlib_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct lines of the standard library that end in a word of 3+ characters (after a
    space, dot, bracket, comma or ``=``): input = the line without its indentation and last word,
    target = that word, choices = it and the last words of three other lines."""
    from ..data.corpus import stdlib_files

    rng = random.Random(f"icl-stdlib:{seed}")
    files = stdlib_files()
    rng.shuffle(files)
    rows, seen = [], set()
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        found = [m for line in lines if 12 <= len(line.strip()) <= 60
                 and (m := _LAST_WORD.fullmatch(line.strip())) and m.group(0) not in seen]
        for m in rng.sample(found, min(2, len(found))):
            seen.add(m.group(0))
            rows.append({"input": m.group(1), "target": m.group(2)})
        if len(rows) >= n:
            break
    if len(rows) < n:
        raise DataError(f"builtin:stdlib: found only {len(rows)} usable lines in the standard library, wanted {n}")
    targets = sorted({r["target"] for r in rows})
    for row in rows:
        others = [t for t in rng.sample(targets, 8) if t != row["target"]][:3]
        choices = [row["target"], *others]
        rng.shuffle(choices)
        row["choices"] = choices
    return rows[:n]


def parse_shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in str(text).split(",") if s.strip() != ""]
    except ValueError:
        raise DataError(f"--shots '{text}': expected comma-separated numbers such as 0,1,5") from None
    if not shots or any(k < 0 for k in shots):
        raise DataError(f"--shots '{text}': expected comma-separated numbers >= 0 such as 0,1,5")
    return sorted(set(shots))


__all__ = [
    "Task",
    "bootstrap_interval",
    "builtin_task",
    "draw_examples",
    "encode_pair",
    "evaluate",
    "fit_context",
    "load_task",
    "parse_shots",
    "plot_params",
    "plot_shots",
    "render_prompt",
    "run_icl",
    "token_f1",
]
