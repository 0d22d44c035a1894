"""Built-in labeled tasks made from the embedded corpus (the running interpreter's standard
library), so that fine-tuning runs offline on every machine. Both are deterministic: the same
Python version gives the same examples in the same order.

- ``builtin:stdlib-package`` (classification, 10 labels): which top-level package a function comes
  from, among ``asyncio email http idlelib importlib multiprocessing tkinter unittest urllib xml``.
  The text is the function's source (methods included, nested functions inside their parent),
  dedented, with its docstring removed. At most 300 training and 75 evaluation examples per
  package (fewer for the small packages).
- ``builtin:stdlib-summarize`` (text2text, code summarisation): ``summarize: `` + a function's
  source without its docstring -> the docstring's first sentence (3 to 40 words), from the
  packages above: about 1,300 training and 370 evaluation functions on Python 3.11.
- ``builtin:stdlib-docstring`` (text-pair classification, ``matched``/``shuffled``): a docstring
  (text) and a function's source without it (text pair); half the pairs are the function's own
  docstring, half another function's, drawn from the same split; every function of the packages
  above that has a docstring (about 1,400 training and 370 evaluation pairs on Python 3.11, at
  most 2,000 and 500).

- ``builtin:stdlib-instruct`` (sft, instruction tuning of a decoder): Alpaca rows (``instruction``,
  ``input`` = a function's first lines without the docstring, ``output``) of nine instruction
  kinds over the functions of the packages above (:data:`INSTRUCTION_KINDS`). Training rows come
  from the five training kinds only (2,000 rows, 400 a kind); the evaluation split has every kind
  (about 55 rows a kind), and the four held-out kinds (``held_out: true``) were never trained on:
  zero-shot evaluation of instruction following, as FLAN holds out task clusters (Wei et al.
  2022). Each held-out kind has a trained relative (the module / the package, yes-no answers,
  parameters and name / the signature), not a copy.

Train and eval are split **by file** (about a fifth of each package's functions, in whole files,
go to eval), so no file contributes to both. ``builtin:NAME:N`` caps training at N examples per
package (``stdlib-package``) or N pairs (``stdlib-docstring``), and eval at a quarter of that.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sysconfig
import textwrap
from pathlib import Path

from ..data.corpus import stdlib_files
from ..errors import DataError

PACKAGES = ("asyncio", "email", "http", "idlelib", "importlib", "multiprocessing", "tkinter",
            "unittest", "urllib", "xml")
#: builtin task name -> (fine-tuning task, default training cap)
BUILTIN_TASKS = {"stdlib-package": ("classification", 300), "stdlib-docstring": ("classification", 2000),
                 "stdlib-summarize": ("text2text", 3000), "stdlib-instruct": ("sft", 2000)}
SUMMARIZE_PREFIX = "summarize: "
SPLITS = ("train", "eval")
EVAL_SHARE = 0.2
_TEST_DIRS = {"test", "tests", "idle_test"}


def _key(*parts) -> str:
    """A stable pseudo-random sort key (the same on every machine and Python version)."""
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def stdlib_functions() -> tuple[dict, ...]:
    """Every function and method of the :data:`PACKAGES` (test suites left out) as
    ``{"package", "file", "line", "code", "doc", "method"}``; ``code`` has no docstring, duplicates
    dropped; ``method``: defined in a class."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, seen = [], set()
    for path in stdlib_files():
        parts = path.relative_to(root).parts
        if len(parts) < 2 or parts[0] not in PACKAGES:
            continue
        if any(p in _TEST_DIRS or p.startswith("test_") for p in parts[:-1]) or parts[-1].startswith("test_"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        rel = "/".join(parts)
        for node, method in _functions(tree):
            item = _function_text(node, lines)
            if item is None or item[0] in seen:
                continue
            seen.add(item[0])
            out.append({"package": parts[0], "file": rel, "line": node.lineno, "code": item[0], "doc": item[1],
                        "method": method})
    return tuple(out)


def _functions(tree: ast.Module):
    """``(node, is a method)``: module-level functions and the methods of module-level classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, False
        elif isinstance(node, ast.ClassDef):
            yield from ((n, True) for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _function_text(node, lines: list[str]) -> tuple[str, str | None] | None:
    """``(source without docstring, docstring)``, or None for a function too small to classify."""
    body = node.body
    doc = ast.get_docstring(node)
    keep = list(range(node.lineno - 1, node.end_lineno))
    if doc is not None:
        first = body[0]
        if first.lineno == node.lineno or len(body) < 2:
            return None  # a one-line def, or nothing left without the docstring
        drop = set(range(first.lineno - 1, first.end_lineno))
        keep = [i for i in keep if i not in drop]
    code = textwrap.dedent("\n".join(lines[i] for i in keep))
    if sum(1 for line in code.splitlines() if line.strip()) < 3:
        return None
    return code, doc


def _split_by_file(items: list[dict]) -> dict[str, list[dict]]:
    """About :data:`EVAL_SHARE` of the items, in whole files, to eval; the rest to train."""
    by_file: dict[str, list[dict]] = {}
    for it in items:
        by_file.setdefault(it["file"], []).append(it)
    target = EVAL_SHARE * len(items)
    split = {"train": [], "eval": []}
    taken = 0
    for file in sorted(by_file, key=lambda f: _key("file", f)):
        n = len(by_file[file])
        if taken < target and taken + n <= 1.5 * target:
            split["eval"] += by_file[file]
            taken += n
        else:
            split["train"] += by_file[file]
    return split


def held_out_files(source: str = "builtin:stdlib-package") -> list[str]:
    """The standard-library files (relative paths) whose functions make up a built-in task's eval
    split; a pretraining corpus without them shares no text with the evaluation examples."""
    name, _ = _parse(source)
    items = stdlib_functions()
    if name == "stdlib-docstring":
        groups = [[f for f in items if f["doc"] and f["doc"].strip()]]
    elif name == "stdlib-summarize":
        groups = [_summarizable()]
    elif name == "stdlib-instruct":
        groups = [list(items)]
    else:
        groups = [[f for f in items if f["package"] == p] for p in PACKAGES]
    return sorted({f["file"] for g in groups for f in _split_by_file(g)["eval"]})


def corpus_without_eval(folder: str | Path, source: str) -> int:
    """Fill ``folder`` with links to every standard-library file except the ones holding
    ``source``'s evaluation functions (:func:`held_out_files`): a pretraining corpus that never sees
    an evaluation example, not even unlabeled. Returns the number of files linked."""
    import os

    root = Path(sysconfig.get_paths()["stdlib"])
    held = set(held_out_files(source))
    n = 0
    for path in stdlib_files():
        rel = path.relative_to(root).as_posix()
        if rel in held:
            continue
        link = Path(folder) / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(path, link)
        n += 1
    return n


def _parse(source: str) -> tuple[str, int | None]:
    name, _, count = source.removeprefix("builtin:").partition(":")
    if name not in BUILTIN_TASKS:
        raise DataError(f"'{source}': unknown built-in task (expected one of "
                        f"{', '.join('builtin:' + n for n in BUILTIN_TASKS)}, optionally with ':N')")
    if count and not (count.isdigit() and int(count) > 0):
        raise DataError(f"'{source}': expected builtin:{name}:N with N a positive number")
    return name, int(count) if count else None


def builtin_name(source: str) -> str:
    return _parse(source)[0]


def builtin_rows(source: str, split: str) -> tuple[str, list[tuple[str, dict]]]:
    """``(fine-tuning task name, [(where, row)])`` for a built-in task's ``split`` (train or eval)."""
    name, cap = _parse(source)
    if split not in SPLITS:
        raise DataError(f"'{source}': no split '{split}' (expected train or eval)")
    task, default_cap = BUILTIN_TASKS[name]
    cap = cap or default_cap
    limit = cap if split == "train" else max(1, cap // 4)
    rows = {"stdlib-package": _package_rows, "stdlib-docstring": _docstring_rows,
            "stdlib-summarize": _summarize_rows, "stdlib-instruct": _instruct_rows}[name](split, limit)
    return task, [(f"builtin:{name} {split} {where}", row) for where, row in rows]


def _package_rows(split: str, per_class: int) -> list[tuple[str, dict]]:
    rows = []
    for package in PACKAGES:
        items = [f for f in stdlib_functions() if f["package"] == package]
        chosen = sorted(_split_by_file(items)[split], key=lambda f: _key(f["file"], f["line"]))[:per_class]
        rows += [(f"{f['file']}:{f['line']}", {"text": f["code"], "label": package}) for f in chosen]
    rows.sort(key=lambda r: _key("order", r[0]))
    return rows


def _docstring_rows(split: str, limit: int) -> list[tuple[str, dict]]:
    items = [f for f in stdlib_functions() if f["doc"] and f["doc"].strip()]
    pool = sorted(_split_by_file(items)[split], key=lambda f: _key(f["file"], f["line"]))[:limit]
    n = len(pool)
    rows = []
    for i, f in enumerate(pool):
        if i % 2 == 0:
            doc, label = f["doc"], "matched"
        else:  # another function's docstring, from a fixed pseudo-random partner in the same split
            j = (i + 1 + int(_key("partner", i), 16) % max(1, n - 1)) % n
            while pool[j]["doc"] == f["doc"]:
                j = (j + 1) % n
            doc, label = pool[j]["doc"], "shuffled"
        rows.append((f"{f['file']}:{f['line']}", {"text": doc, "text_pair": f["code"], "label": label}))
    return rows


def first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring's first paragraph (lines joined), or None when it is not
    3 to 40 words of prose."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    cut = paragraph.find(". ")
    sentence = paragraph[:cut + 1] if cut >= 0 else paragraph
    words = sentence.split()
    if not 3 <= len(words) <= 40 or not sentence[:1].isalpha():
        return None
    return sentence


@functools.lru_cache(maxsize=1)
def _summarizable() -> list[dict]:
    return [f for f in stdlib_functions() if f["doc"] and first_sentence(f["doc"])]


def _summarize_rows(split: str, limit: int) -> list[tuple[str, dict]]:
    pool = sorted(_split_by_file(_summarizable())[split], key=lambda f: _key(f["file"], f["line"]))[:limit]
    return [(f"{f['file']}:{f['line']}", {"input": SUMMARIZE_PREFIX + f["code"],
                                          "target": first_sentence(f["doc"])}) for f in pool]


# ----------------------------------------------------------------------------------------------
# builtin:stdlib-instruct

#: kind -> (instruction, held out of training). Answers are computed from each function's syntax
#: tree (:func:`_facts`), except the summary (the docstring's first sentence) and the module.
INSTRUCTION_KINDS = {
    "name": ("What is the name of this function?", False),
    "parameters": ("List the parameters of this function, separated by commas (none if it takes none).", False),
    "package": ("Which standard-library package is this function from?", False),
    "has_default": ("Does any parameter of this function have a default value? Answer yes or no.", False),
    "summarize": ("Summarize what this function does in one sentence.", False),
    "signature": ("Write the signature of this function: its name, then its parameters in parentheses.", True),
    "module": ("Name the module this function is defined in, as you would import it.", True),
    "method": ("Is this function a method of a class? Answer yes or no.", True),
    "first_parameter": ("What is the first parameter of this function?", True),
}
INSTRUCT_LINES = 10  # the input is a function's first lines (its docstring removed)


def _facts(f: dict) -> dict | None:
    """A function's name, parameters (``*args`` and ``**kw`` starred; no annotations or
    defaults) and whether one has a default; None when its text does not parse on its own."""
    try:
        node = ast.parse(f["code"]).body[0]
    except (SyntaxError, IndexError, ValueError):
        return None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    a = node.args
    params = [p.arg for p in a.posonlyargs + a.args]
    params += ["*" + a.vararg.arg] if a.vararg else []
    params += [p.arg for p in a.kwonlyargs]
    params += ["**" + a.kwarg.arg] if a.kwarg else []
    has_default = bool(a.defaults) or any(d is not None for d in a.kw_defaults)
    return {"name": node.name, "params": params, "has_default": has_default}


def _module_name(file: str) -> str:
    parts = file.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _answer(kind: str, f: dict, facts: dict) -> str | None:
    """The expected output of ``kind`` for a function, or None when the kind does not apply."""
    params = facts["params"]
    if kind == "name":
        return facts["name"]
    if kind == "parameters":
        return ", ".join(params) if params else "none"
    if kind == "package":
        return f["package"]
    if kind == "has_default":
        return "yes" if facts["has_default"] else "no"
    if kind == "summarize":
        return first_sentence(f["doc"]) if f["doc"] else None
    if kind == "signature":
        return f"{facts['name']}({', '.join(params)})"
    if kind == "module":
        return _module_name(f["file"])
    if kind == "method":
        return "yes" if f["method"] else "no"
    if kind == "first_parameter":
        return params[0] if params else None
    raise KeyError(kind)


@functools.lru_cache(maxsize=4)
def _instruct_pool(split: str) -> tuple:
    """``(function, facts)`` of the split's functions whose text parses on its own."""
    out = []
    for f in _split_by_file(list(stdlib_functions()))[split]:
        facts = _facts(f)
        if facts is not None:
            out.append((f, facts))
    return tuple(out)


def _instruct_rows(split: str, limit: int) -> list[tuple[str, dict]]:
    kinds = [k for k, (_, held) in INSTRUCTION_KINDS.items() if split == "eval" or not held]
    per_kind = max(1, limit // len(kinds))
    rows = []
    for kind in kinds:
        instruction, held = INSTRUCTION_KINDS[kind]
        pool = sorted(_instruct_pool(split), key=lambda p: _key(kind, p[0]["file"], p[0]["line"]))
        chosen = [(f, a) for f, facts in pool if (a := _answer(kind, f, facts)) is not None]
        if kind in ("has_default", "method", "package"):  # as many of each answer (taken in turn)
            by_answer: dict[str, list] = {}
            for item in chosen:
                by_answer.setdefault(item[1], []).append(item)
            groups = [by_answer[a] for a in sorted(by_answer)]
            chosen = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
        for f, answer in chosen[:per_kind]:
            code = "\n".join(f["code"].splitlines()[:INSTRUCT_LINES])
            rows.append((f"{f['file']}:{f['line']} {kind}",
                         {"instruction": instruction, "input": code, "output": answer, "task": kind,
                          "held_out": held}))
    rows.sort(key=lambda r: _key("order", r[0]))
    return rows
