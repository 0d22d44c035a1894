"""Reading labeled task files: CSV/TSV/JSONL rows, CoNLL tag files and SQuAD-style JSON.

Every reader returns a list of ``(where, row)`` pairs: ``where`` names the file and line (or
item) so that a later check can say exactly which row is wrong, ``row`` is a dict of the row's
fields as read. Anything malformed raises :class:`~pretrainer.errors.DataError` with one line that
names the file, the line or field, and what was expected.

- ``.csv``: comma-separated with a header row (standard quoting).
- ``.tsv``: tab-separated with a header row and no quoting, as the GLUE files are laid out
  (``sentence<TAB>label``).
- ``.jsonl`` / ``.ndjson`` / ``.json``: one JSON object per line; a ``.json`` file that starts
  with ``[`` is one array of objects (and one with ``{"data": ...}`` is SQuAD, see :func:`read_squad`).
- CoNLL (any other extension, for tagging): one token per line with its tag in the last
  whitespace-separated column, a blank line between sentences, ``-DOCSTART-`` lines skipped.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import DataError

Rows = list[tuple[str, dict]]

TABLE_SUFFIXES = (".csv", ".tsv")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    return p


def read_rows(path: str | Path) -> Rows:
    """Rows of a CSV, TSV or JSON-lines file (by extension)."""
    p = _existing(path)
    suffix = p.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        rows = _read_table(p, "\t" if suffix == ".tsv" else ",")
    elif suffix in JSON_SUFFIXES:
        rows = _read_json_rows(p)
    else:
        raise DataError(f"{p}: unknown file type '{suffix or 'none'}'; expected .csv, .tsv, .jsonl or .json")
    if not rows:
        raise DataError(f"{p}: no examples (empty file)")
    return rows


def _read_table(path: Path, delimiter: str) -> Rows:
    csv.field_size_limit(2**31 - 1)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows: Rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DataError(f"{path}: no examples (empty file)")
            header = [h.strip() for h in header]
            for record in reader:
                line = reader.line_num
                if not record or not any(field.strip() for field in record):
                    continue
                if len(record) != len(header):
                    raise DataError(f"{path} line {line}: {len(record)} fields, expected {len(header)} "
                                    f"as in the header ({', '.join(header)})")
                rows.append((f"{path} line {line}", dict(zip(header, record))))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} of a read block)") from None
    except csv.Error as e:
        raise DataError(f"{path}: not readable as {'TSV' if delimiter == chr(9) else 'CSV'} ({e})") from None
    if not rows:
        raise DataError(f"{path}: no examples (a header row only)")
    return rows


def _json_error(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _load_whole_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except ValueError as e:
        raise DataError(f"{path}: invalid JSON ({_json_error(e)})") from None


def _starts_with(path: Path, char: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] == char.encode()


def _read_json_rows(path: Path) -> Rows:
    if path.suffix.lower() == ".json" and _starts_with(path, "["):
        data = _load_whole_json(path)
        rows = []
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise DataError(f"{path} item {i}: expected a JSON object, got {type(item).__name__}")
            rows.append((f"{path} item {i}", item))
        return rows
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{path} line {lineno}: invalid JSON ({_json_error(e)})") from None
            if not isinstance(item, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(item).__name__}")
            rows.append((f"{path} line {lineno}", item))
    return rows


def read_conll(path: str | Path) -> Rows:
    """Sentences of a CoNLL file as rows ``{"tokens": [...], "tags": [...]}``; ``where`` is the
    sentence's first line. A line with a token only (prediction input) gets the tag ``None`` and
    its sentence ``untagged_line``, the first such line."""
    p = _existing(path)
    rows: Rows = []
    tokens, tags, first, untagged = [], [], 0, None

    def flush():
        nonlocal untagged
        if tokens:
            row = {"tokens": list(tokens), "tags": list(tags)}
            if untagged is not None:
                row["untagged_line"] = untagged
            rows.append((f"{p} line {first}", row))
        tokens.clear()
        tags.clear()
        untagged = None

    try:
        with open(p, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    flush()
                    continue
                if parts[0] == "-DOCSTART-":
                    flush()
                    continue
                if not tokens:
                    first = lineno
                if len(parts) < 2 and untagged is None:
                    untagged = lineno  # fine for prediction input; training needs the tag
                tokens.append(parts[0])
                tags.append(parts[-1] if len(parts) > 1 else None)
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start} of a read block)") from None
    flush()
    if not rows:
        raise DataError(f"{p}: no examples (empty file)")
    return rows


def read_squad(path: str | Path) -> Rows:
    """Questions of a SQuAD-style file as rows ``{"id", "question", "context", "answers"}`` with
    ``answers`` a list of ``{"text", "answer_start"}`` (possibly empty, for prediction input).

    Accepted: SQuAD JSON (``{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}``), or JSON
    lines / an array of flat objects with ``question``, ``context`` and optionally ``answers``
    (a list of ``{"text", "answer_start"}``, or the columnar ``{"text": [...], "answer_start": [...]}``).
    """
    p = _existing(path)
    if p.suffix.lower() == ".json" and _starts_with(p, "{"):
        data = _load_whole_json(p)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise DataError(f"{p}: expected SQuAD JSON with a top-level 'data' list")
        rows: Rows = []
        for a, article in enumerate(data["data"]):
            for b, para in enumerate(_list(article, "paragraphs", f"{p} data[{a}]")):
                where_para = f"{p} data[{a}].paragraphs[{b}]"
                context = _string(para, "context", where_para)
                for c, qa in enumerate(_list(para, "qas", where_para)):
                    where = f"{where_para}.qas[{c}]"
                    if not isinstance(qa, dict):
                        raise DataError(f"{where}: expected a JSON object")
                    rows.append((where, {"id": str(qa.get("id", f"{a}-{b}-{c}")), "context": context,
                                         "question": _string(qa, "question", where),
                                         "answers": qa.get("answers", [])}))
    else:
        rows = []
        for i, (where, row) in enumerate(read_rows(p)):
            rows.append((where, {"id": str(row.get("id", i)), "context": _string(row, "context", where),
                                 "question": _string(row, "question", where),
                                 "answers": row.get("answers", [])}))
    if not rows:
        raise DataError(f"{p}: no questions (empty file)")
    for where, row in rows:
        row["answers"] = _answers(row["answers"], row["context"], where)
    return rows


def _list(obj, key: str, where: str) -> list:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, list):
        raise DataError(f"{where}: no list field '{key}'")
    return value


def _string(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise DataError(f"{where}: no field '{key}' (fields: {', '.join(map(str, obj)) or 'none'})")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' is {type(value).__name__}, expected a string")
    return value


def _answers(raw, context: str, where: str) -> list[dict]:
    """Normalise answers to ``[{"text", "answer_start"}]`` and check each lies in the context."""
    if isinstance(raw, dict):  # columnar: {"text": [...], "answer_start": [...]}
        texts, starts = raw.get("text"), raw.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(f"{where}: field 'answers' expected lists 'text' and 'answer_start' of equal length")
        raw = [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]
    if not isinstance(raw, list):
        raise DataError(f"{where}: field 'answers' is {type(raw).__name__}, expected a list of "
                        f"{{'text', 'answer_start'}}")
    out = []
    for k, ans in enumerate(raw):
        if not isinstance(ans, dict) or not isinstance(ans.get("text"), str) \
                or not isinstance(ans.get("answer_start"), int) or isinstance(ans.get("answer_start"), bool):
            raise DataError(f"{where}: answers[{k}] expected {{'text': string, 'answer_start': integer}}")
        text, start = ans["text"], ans["answer_start"]
        if context[start:start + len(text)] != text:
            raise DataError(f"{where}: answers[{k}] '{text[:40]}' is not at character {start} of the context")
        out.append({"text": text, "answer_start": start})
    return out
