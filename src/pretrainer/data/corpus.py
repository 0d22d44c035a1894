"""Corpus sources: turn a corpus spec into a stream of ``(source_name, document_text)``.

A corpus spec is one of:

- a text file (any extension not listed below): the whole file is one document, or, with
  ``doc_separator`` (for example ``"\\n\\n"``), each piece between separators is one document
  (streamed, so the file may be larger than memory);
- ``*.jsonl`` / ``*.json``: one JSON object per line with the text in ``text_field`` (a ``.json``
  file that starts with ``[`` is read as one array of such objects);
- ``*.csv``: a header row and the text in column ``text_field``;
- ``*.parquet``: the text in column ``text_field`` (needs ``pyarrow``);
- a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``DatasetDict``'s ``train``
  split), or its ``*.arrow`` files, the text in column ``text_field`` (needs ``datasets``); a
  ``datasets.Dataset`` or ``IterableDataset`` object passed to :func:`pretrainer.data.prepare.prepare`;
- a folder: every non-hidden file below it, recursively, in sorted path order; files that are not
  UTF-8 text (NUL bytes or invalid UTF-8) are skipped;
- a glob pattern such as ``data/*.txt`` or ``data/**/*.md``, in sorted order;
- ``builtin:stdlib``: every ``.py`` file of the running interpreter's standard library (without
  ``site-packages``; about 30 MB with its test suites), one document per file, sorted by path;
- ``builtin:synthetic``: the seeded synthetic corpus of :mod:`pretrainer.data.synthetic`;
- ``builtin:icl-synthetic``: k-shot examples of the synthetic in-context-learning tasks
  (:mod:`pretrainer.data.icl_synthetic`), to pretrain a model that shows accuracy rising with shots;
- ``builtin:arith-cot``: multi-step arithmetic, worked step by step or answered directly
  (:mod:`pretrainer.data.arith_cot`), to pretrain a model for chain-of-thought prompting.

``builtin:NAME:N`` keeps only the first N documents (``builtin:stdlib:50``, ``builtin:synthetic:100``).

Text is decoded as UTF-8 exactly as stored (no newline translation; a leading BOM is dropped).
Documents that are empty or only whitespace are skipped.
"""

from __future__ import annotations

import codecs
import csv
import glob
import itertools
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from pretrainer.data.synthetic import DEFAULT_DOCUMENTS, synthetic_documents
from pretrainer.errors import DataError

BUILTINS = ("stdlib", "synthetic", "icl-synthetic", "arith-cot")
_CHUNK = 1 << 20  # bytes read at a time from a text file
# third-party packages are not the standard library; its test suites are (real code, about half
# of the 30 MB), so they stay in
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class _Binary(Exception):
    """Raised by the text reader when a file is not UTF-8 text, at byte ``offset``; ``partial``:
    documents of the file were already yielded, so the file can no longer just be skipped."""

    def __init__(self, offset: int, partial: bool):
        self.offset, self.partial = offset, partial


def iter_documents(src: str, text_field: str = "text", doc_separator: str | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(source_name, document_text)`` for every document of the corpus ``src`` (see module doc).

    Raises :class:`DataError` for a missing path, a glob that matches nothing, a binary file given
    directly, a record without ``text_field``, or a corpus with no documents at all.
    """
    if doc_separator == "":
        raise DataError("doc_separator: expected a non-empty string or None")
    if is_dataset(src):
        docs = _from_dataset(src, text_field, dataset_label(src))
        src = dataset_label(src)
    elif src.startswith("builtin:"):
        docs = _builtin(src)
    else:
        docs = _from_paths(src, text_field, doc_separator)
    n = 0
    for n, doc in enumerate(docs, 1):
        yield doc
    if n == 0:
        raise DataError(f"corpus '{src}': no text found (0 documents)")


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets


def is_dataset(obj) -> bool:
    """Whether ``obj`` is a ``datasets.Dataset`` or ``IterableDataset`` (without importing datasets)."""
    return type(obj).__module__.startswith("datasets.") and type(obj).__name__ in ("Dataset", "IterableDataset")


def dataset_label(ds) -> str:
    """How a dataset object is named in messages and in the manifest's ``sources``."""
    size = f"{len(ds):,} rows" if type(ds).__name__ == "Dataset" else "streamed"
    finger = getattr(ds, "_fingerprint", None)
    return f"datasets.{type(ds).__name__}({size}{', fingerprint ' + finger if finger else ''})"


def is_dataset_folder(path: Path) -> bool:
    """A folder that ``datasets``' ``save_to_disk`` wrote (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()))


def load_dataset_folder(path: Path, split: str = "train"):
    """The Dataset of a ``save_to_disk`` folder (a DatasetDict's ``split``)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a Hugging Face datasets folder; reading it needs datasets "
                        f"(pip install 'pretrainer[datasets]')") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises FileNotFoundError, ValueError, ArrowInvalid ...
        raise DataError(f"{path}: not a readable datasets folder ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: a DatasetDict without a '{split}' split (splits: {', '.join(ds)}); "
                            f"name the split's folder ({path / next(iter(ds), 'SPLIT')})")
        ds = ds[split]
    return ds


def _from_dataset(ds, text_field: str, where: str) -> Iterator[tuple[str, str]]:
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise DataError(f"{where}: no column '{text_field}' (columns: {', '.join(columns)}); "
                        f"name the text column with --text-field")
    rows = ds.iter(batch_size=1024) if hasattr(ds, "iter") and type(ds).__name__ == "Dataset" else None
    if rows is not None:
        for batch in rows:
            for text in batch[text_field]:
                if isinstance(text, str) and text.strip():
                    yield where, text
        return
    for i, row in enumerate(ds):  # an IterableDataset: row by row
        text = row.get(text_field)
        if text is None and columns is None:
            raise DataError(f"{where} row {i}: no column '{text_field}' (columns: {', '.join(row)})")
        if isinstance(text, str) and text.strip():
            yield where, text


def _builtin(src: str) -> Iterator[tuple[str, str]]:
    name, _, count = src.removeprefix("builtin:").partition(":")
    if name not in BUILTINS:
        raise DataError(f"corpus '{src}': unknown builtin corpus '{name}' (expected one of: "
                        + ", ".join(f"builtin:{b}" for b in BUILTINS) + ")")
    if count and not (count.isdigit() and int(count) > 0):
        raise DataError(f"corpus '{src}': expected builtin:{name} or builtin:{name}:N with N a positive number of documents")
    limit = int(count) if count else None
    if name == "synthetic":
        n = limit or DEFAULT_DOCUMENTS
        return ((f"synthetic:{i}", doc) for i, doc in enumerate(synthetic_documents(n)))
    if name == "icl-synthetic":
        from pretrainer.data.icl_synthetic import DEFAULT_DOCUMENTS as ICL_DOCUMENTS, icl_documents

        return ((f"icl-synthetic:{i}", doc) for i, doc in enumerate(icl_documents(limit or ICL_DOCUMENTS)))
    if name == "arith-cot":
        from pretrainer.data.arith_cot import DEFAULT_DOCUMENTS as ARITH_DOCUMENTS, documents

        return ((f"arith-cot:{i}", doc) for i, doc in enumerate(documents(limit or ARITH_DOCUMENTS)))
    return itertools.islice(_stdlib_documents(), limit)


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_documents() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        try:
            for _, doc in _read_text(path, None):
                yield f"stdlib/{path.relative_to(root).as_posix()}", doc
        except _Binary:
            continue  # a stdlib file that is not UTF-8: nothing to learn from, skip it


def _from_paths(src: str, text_field: str, doc_separator: str | None) -> Iterator[tuple[str, str]]:
    path = Path(src)
    if path.is_file():
        yield from _read_file(path, text_field, doc_separator, strict=True)
        return
    if is_dataset_folder(path):
        yield from _from_dataset(load_dataset_folder(path), text_field, str(path))
        return
    if path.is_dir():
        files = _walk(path)
    elif any(c in src for c in "*?["):
        files = []
        for match in sorted(glob.glob(src, recursive=True)):
            files += _walk(Path(match)) if os.path.isdir(match) else [Path(match)]
        if not files:
            raise DataError(f"corpus '{src}': glob pattern matched no files")
    else:
        raise DataError(f"corpus '{src}': no such file or folder")
    skipped = 0
    for file in files:
        try:
            yield from _read_file(file, text_field, doc_separator, strict=False)
        except _Binary:
            skipped += 1
    if skipped:
        print(f"corpus '{src}': skipped {skipped} file(s) that are not UTF-8 text", file=sys.stderr)


def _walk(folder: Path) -> list[Path]:
    """Non-hidden files below ``folder``, sorted by relative path."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _read_file(path: Path, text_field: str, doc_separator: str | None, strict: bool) -> Iterator[tuple[str, str]]:
    """Documents of one file, dispatched on its extension. ``strict``: the file was named directly,
    so binary content is an error rather than a reason to skip it."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _read_json(path, text_field)
    elif suffix == ".csv":
        rows = _read_csv(path, text_field)
    elif suffix == ".parquet":
        rows = _read_parquet(path, text_field)
    elif suffix == ".arrow":
        rows = (text for _, text in _from_dataset(_arrow_file(path), text_field, str(path)))
    else:
        try:
            yield from _read_text(path, doc_separator)
        except _Binary as e:
            if strict or e.partial:
                raise DataError(f"corpus '{path}': not a text file (binary content at byte {e.offset})") from None
            raise
        return
    for text in rows:
        if text.strip():
            yield str(path), text


def _read_text(path: Path, separator: str | None) -> Iterator[tuple[str, str]]:
    """Decode ``path`` as UTF-8 in chunks; yield the whole text, or its pieces between ``separator``.
    Raises ``_Binary`` on a NUL byte or invalid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    buf, parts, offset, emitted = "", [], 0, False
    search_from = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            final = not chunk
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise _Binary(offset + nul, emitted)
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(chunk, final=final)
            except UnicodeDecodeError as e:
                raise _Binary(offset - pending + e.start, emitted) from None
            if offset == 0 and text.startswith("\ufeff"):
                text = text[1:]
            offset += len(chunk)
            if separator is None:
                parts.append(text)
            else:
                buf += text
                start = 0
                while (j := buf.find(separator, search_from)) != -1:
                    if buf[start:j].strip():
                        emitted = True
                        yield str(path), buf[start:j]
                    start = search_from = j + len(separator)
                buf = buf[start:]
                search_from = max(0, len(buf) - len(separator) + 1)
            if final:
                break
    whole = "".join(parts) if separator is None else buf
    if whole.strip():
        yield str(path), whole


def _check_row(row: object, where: str, text_field: str) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with field '{text_field}', got {type(row).__name__}")
    if text_field not in row:
        raise DataError(f"{where}: no field '{text_field}' (fields: {', '.join(map(str, row)) or 'none'})")
    value = row[text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{text_field}' is {type(value).__name__}, expected a string")
    return value


def _read_json(path: Path, text_field: str) -> Iterator[str]:
    """JSON lines (one object per line); a ``.json`` file starting with ``[`` is one array."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        try:
            rows = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: invalid JSON ({str(e).splitlines()[0]})") from None
        for i, row in enumerate(rows):
            yield _check_row(row, f"{path} item {i}", text_field)
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{path} line {lineno}: invalid JSON ({str(e).splitlines()[0]})") from None
            yield _check_row(row, f"{path} line {lineno}", text_field)


def _read_csv(path: Path, text_field: str) -> Iterator[str]:
    csv.field_size_limit(2**31 - 1)  # documents are often longer than the 128 KiB default
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or text_field not in reader.fieldnames:
            columns = ", ".join(reader.fieldnames or []) or "none"
            raise DataError(f"{path}: no column '{text_field}' (columns: {columns})")
        try:
            for row in reader:
                yield row[text_field] or ""
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start} of a read block)") from None


def _arrow_file(path: Path):
    """A ``datasets`` Arrow file (one shard of a ``save_to_disk`` folder), memory-mapped."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading Arrow files needs datasets (pip install 'pretrainer[datasets]')") from None
    try:
        return datasets.Dataset.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid and friends
        raise DataError(f"{path}: not a readable Arrow file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'pretrainer[parquet]')") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path}: no column '{text_field}' (columns: {', '.join(schema.names)})")
    column_type = str(schema.field(text_field).type)
    if column_type not in ("string", "large_string", "string_view"):
        raise DataError(f"{path}: column '{text_field}' holds {column_type}, expected strings")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        yield from (value for value in batch.column(0).to_pylist() if value is not None)
