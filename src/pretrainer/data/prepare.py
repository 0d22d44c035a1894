"""Tokenise a corpus into flat, memory-mappable token shards plus a manifest.

Layout of a prepared data folder::

    out/
      manifest.json        what is here (format below), written last
      tokenizer/           tokenizer.json + Hugging Face config files
      train_00000.bin      raw little-endian token ids (uint16, or uint32 when the vocabulary
      train_00001.bin      needs it), at most ``shard_tokens`` ids per file
      val_00000.bin

The token stream of a split is the concatenation of its shards in order. Every document is
followed by the tokenizer's end-of-text token, the document separator: ``doc0 <eos> doc1 <eos> ...``
(``<eos>`` is our tokenizers' spelling; GPT-2's is ``<|endoftext|>``, Llama's ``</s>``: tokenizers
are read by role, see :mod:`pretrainer.tokenization`). Special tokens written literally in the
corpus (``"<eos>"`` in a source file) are encoded as plain text, so the only special ids in a shard
are those separators.

``manifest.json``::

    {"format": "pretrainer-shards", "version": 1, "dtype": "uint16", "vocab_size": V,
     "tokenizer": {"path": "tokenizer", "hash": "...", "kind": "bpe"},
     "special_ids": {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "cls": 4, "sep": 5, "mask": 6},
     (the id of each role's token, null where the tokenizer has none: Tok.roles)
     "splits": {"train": {"shards": [{"file": "train_00000.bin", "tokens": n}, ...],
                          "tokens": N, "documents": D},
                "val": {...}},
     "sources": ["builtin:stdlib"], "split": "document", "val_fraction": 0.1, "seed": 1337,
     "created": "2025-01-01T00:00:00+00:00"}

Two ways to choose validation data:

- ``split="document"``: document number ``i`` goes to val when a hash of ``(seed, i)`` falls below
  ``val_fraction``; reproducible, streaming, and no document is cut in two. When that leaves one
  split empty (a corpus of one or a few documents) it falls back to ``"tail"`` with a warning.
- ``split="tail"``: the whole token stream is cut at ``int((N - 1) * (1 - val_fraction))``, where
  ``N - 1`` counts every token but the final ``<eos>``: train is everything before the cut and val
  the rest, final ``<eos>`` included. For a single document this is exactly nanoGPT's split of the
  text (``data[:int(n * 0.9)]`` / ``data[int(n * 0.9):]``), plus the ``<eos>`` ending val. A
  document cut in two counts as a val document.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from pretrainer.data.corpus import dataset_label, is_dataset, iter_documents

if TYPE_CHECKING:  # only for the annotation: datasets is optional
    import datasets
from pretrainer.errors import DataError, PretrainerError, os_error_of, storage, storage_error
from pretrainer.tokenization import Tok, load_tokenizer

FORMAT, VERSION = "pretrainer-shards", 1
SPLITS = ("train", "val")
TRAINABLE_KINDS = ("bpe", "wordpiece", "unigram")

_BATCH_CHARS = 4_000_000  # text read, split and written per batch of documents
# text per call of the tokenizer: enough pieces to keep the cores busy, while the call's result (each
# token with its string, offsets and masks: ~100 bytes a token, 100 MB a million) stays small
_ENCODE_CHARS = 262_144
_PIECE_CHARS = 16_384  # long documents are encoded in pieces of about this size (see _pieces)
_COPY_TOKENS = 1 << 24  # tokens moved at a time by the tail split
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")  # a newline between two non-space characters


def prepare(
    corpus: "str | Sequence[str] | datasets.Dataset | datasets.IterableDataset",
    tokenizer: str,
    out: str | Path,
    *,
    val_fraction: float = 0.1,
    split: str = "document",
    seed: int = 1337,
    shard_tokens: int = 2**26,
    text_field: str = "text",
    doc_separator: str | None = None,
    sentinels: int = 0,
    eos_token: str | None = None,
    pad_token: str | None = None,
    mask_token: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    tokenizer_sample_mb: float | None = None,
) -> dict:
    """Tokenise ``corpus`` (one spec or several, see :mod:`pretrainer.data.corpus`; a Hugging Face
    ``datasets.Dataset``/``IterableDataset`` too, its ``text_field`` column) into ``out``.

    ``tokenizer`` is a tokenizer file or folder, ``"char"``, or ``"bpe:N"`` / ``"wordpiece:N"`` /
    ``"unigram:N"`` to train one of vocabulary size N on the corpus first (on a uniform sample of
    about ``tokenizer_sample_mb`` MB of its documents: :data:`pretrainer.tokenization.DEFAULT_SAMPLE_MB`) (``sentinels`` T5
    sentinel tokens are added to a trained one). The tokenizer is saved in ``out/tokenizer``.
    Its special tokens are read by role (:func:`pretrainer.tokenization.find_roles`); ``eos_token``,
    ``pad_token`` and ``mask_token`` name the token that plays that role instead (``--eos-token``
    ...), and are saved with it. An end-of-text token is required: it separates the documents.

    ``out`` is built in a hidden temporary folder next to it and renamed into place at the end, so
    an interrupted run never leaves a folder that looks complete. An existing ``out`` is replaced
    when it is a previous output of ``prepare`` (or empty, or ``overwrite=True``); any other
    non-empty folder is refused. Returns the manifest.
    """
    sources = [corpus] if isinstance(corpus, str) or is_dataset(corpus) else list(corpus)
    if not sources:
        raise DataError("corpus: expected at least one corpus spec")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction}: expected a number in [0, 1)")
    if split not in ("document", "tail"):
        raise DataError(f"split '{split}': expected 'document' or 'tail'")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens {shard_tokens}: expected a positive number of tokens")
    out = Path(out)
    _check_out(out, sources, overwrite)
    log = _Progress(progress)

    def documents() -> Iterator[str]:
        for src in sources:
            for _, text in iter_documents(src, text_field, doc_separator):
                yield text

    tok = _get_tokenizer(tokenizer, documents, sentinels, log, tokenizer_sample_mb)
    tok.with_roles({"eos": eos_token, "pad": pad_token, "mask": mask_token})
    eos_id = tok.need("eos", "to separate documents")
    dtype = np.dtype("<u2") if tok.vocab_size <= 2**16 else np.dtype("<u4")

    with storage(out, "write the data folder"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-prepare-", dir=out.parent))
    try:
        tok.save(tmp / "tokenizer")
        tokenizer_info = {"path": "tokenizer", "hash": tok.hash, "kind": tok.kind}
        tok.tok.encode_special_tokens = True  # "<eos>" written in the corpus is text, not a separator
        cut_long = _splittable(tok)
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        log.start()
        for batch in _batches(documents()):
            docs = _encode(tok, batch, cut_long, dtype)
            to_val = [split == "document" and _hash_fraction(seed, i) < val_fraction for i, _ in docs]
            for name, want in (("train", False), ("val", True)):
                picked = [ids for (_, ids), v in zip(docs, to_val) if v == want]
                if picked:
                    writers[name].write(np.concatenate(picked), documents=len(picked))
            log.update(documents=len(batch), tokens=sum(len(ids) for _, ids in docs),
                       nbytes=sum(len(text.encode("utf-8")) for _, text in batch))
        for w in writers.values():
            w.close()
        log.done()

        if val_fraction > 0 and split == "document" and min(w.tokens for w in writers.values()) == 0:
            log.warn(f"split 'document' left a split empty ({writers['train'].documents} train / "
                     f"{writers['val'].documents} val documents); falling back to split 'tail'")
            if writers["train"].tokens == 0:  # every document went to val: make that the stream
                writers = {"train": writers["val"].renamed("train"), "val": writers["train"].renamed("val")}
            split = "tail"
        if split == "tail" and val_fraction > 0:
            _split_tail(writers, val_fraction, eos_id)
        if writers["train"].tokens == 0:
            raise DataError(f"corpus '{', '.join(dataset_label(s) if is_dataset(s) else s for s in sources)}': too small to split "
                            f"({writers['val'].tokens} tokens, val_fraction {val_fraction})")

        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "tokenizer": tokenizer_info,
            "special_ids": tok.roles,
            "splits": {s: w.summary() for s, w in writers.items()},
            "sources": [dataset_label(s) if is_dataset(s) else s for s in sources],
            "split": split,
            "val_fraction": val_fraction,
            "seed": seed,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        _move_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = os_error_of(e) if isinstance(e, Exception) and not isinstance(e, PretrainerError) else None
        if err is not None:  # a full disk: one line naming out
            raise storage_error(err, out, "write the data folder") from e
        raise
    log.summary(manifest)
    _trim_heap()
    return manifest


def _trim_heap() -> None:
    """Hand the heap memory that encoding freed back to the system (glibc's ``malloc_trim``), so
    that a training run started in the same process (``pretrainer pretrain --corpus``) does not
    carry it: on tiny Shakespeare (1.1 MB, char) 32 MB of the process's 263 MB. Elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def load_manifest(data_dir: str | Path) -> dict:
    """Read and check ``data_dir/manifest.json``: the format, and that every shard file exists with
    exactly ``tokens * itemsize`` bytes. Raises :class:`DataError` otherwise."""
    data_dir = Path(data_dir)
    path = data_dir / "manifest.json"
    if not data_dir.is_dir():
        raise DataError(f"data folder '{data_dir}': no such folder")
    if not path.is_file():
        raise DataError(f"data folder '{data_dir}': no manifest.json (prepare the data first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a pretrainer data folder (expected \"format\": \"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path}: version {manifest.get('version')!r}, expected {VERSION}")
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for name in SPLITS:
            for shard in manifest["splits"][name]["shards"]:
                file = data_dir / shard["file"]
                if not file.is_file():
                    raise DataError(f"{path}: shard '{shard['file']}' is missing")
                if file.stat().st_size != shard["tokens"] * itemsize:
                    raise DataError(f"{file}: {file.stat().st_size} bytes, expected {shard['tokens']} tokens "
                                    f"x {itemsize} bytes = {shard['tokens'] * itemsize}")
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed manifest (missing or wrong field {e})") from None
    return manifest


# --- tokenizer -------------------------------------------------------------------------------------

def _get_tokenizer(spec: str, documents, sentinels: int, log: "_Progress", sample_mb: float | None = None) -> Tok:
    """Load the tokenizer ``spec`` names, or train the one it describes on ``documents()``."""
    kind, _, size = spec.partition(":")
    if spec == "char":
        vocab_size = 0
    elif kind in TRAINABLE_KINDS and size.isdigit():
        vocab_size = int(size)
    elif kind in TRAINABLE_KINDS:
        raise DataError(f"tokenizer '{spec}': expected {kind}:N with N the vocabulary size, e.g. {kind}:8192")
    else:
        return load_tokenizer(spec)
    log.note(f"training a {spec} tokenizer on the corpus")
    started = time.perf_counter()
    tok = Tok.train(documents(), kind, vocab_size, sentinels, sample_mb=sample_mb,
                    progress=log.note if log.enabled else None)
    log.note(f"trained {tok.kind} tokenizer, vocab {tok.vocab_size}, in {time.perf_counter() - started:.1f} s")
    return tok


# --- encoding -------------------------------------------------------------------------------------

def _batches(documents: Iterable[str]) -> Iterator[list[tuple[int, str]]]:
    """Group ``(index, text)`` of consecutive documents into batches of about ``_BATCH_CHARS``."""
    batch, size = [], 0
    for i, text in enumerate(documents):
        batch.append((i, text))
        size += len(text)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tok: Tok, batch: list[tuple[int, str]], cut_long: bool, dtype: np.dtype) -> list[tuple[int, np.ndarray]]:
    """Ids of every document of the batch, each followed by the end-of-text token.

    Parallelism: one ``encode_batch_fast`` call per ``_ENCODE_CHARS`` of pieces lets `tokenizers`
    spread them over all cores with its own threads; its result is held for one call only (one call
    per 4 MB batch held a character tokenizer's 4 million token objects at once). On the 2-vCPU
    development VM (builtin:stdlib, 12 MB, bpe:8192; wall seconds, noisy shared host) one call per
    batch took 6.6-7.5 s, a 2-process multiprocessing.Pool 6.7-9.6 s (it also pays for starting
    workers and pickling ids back) and one thread 7.0-11.5 s; so no Pool.
    """
    eos, start = tok.role_id("eos"), tok.document_prefix  # Llama's "<s> doc </s>"; ours "doc <eos>"
    ids: list[list[np.ndarray]] = [[np.array(start, dtype=dtype)] for _ in batch]
    group: list[tuple[int, str]] = []  # (document, piece), encoded together
    size = 0

    def encode() -> None:
        encodings = tok.tok.encode_batch_fast([piece for _, piece in group], add_special_tokens=False)
        for (j, _), encoding in zip(group, encodings):
            ids[j].append(np.array(encoding.ids, dtype=dtype))
        group.clear()

    for j, (_, text) in enumerate(batch):
        for piece in _pieces(text) if cut_long else [text]:
            group.append((j, piece))
            size += len(piece)
            if size >= _ENCODE_CHARS:
                encode()
                size = 0
    if group:
        encode()
    return [(i, np.concatenate([*parts, np.array([eos], dtype=dtype)])) for (i, _), parts in zip(batch, ids)]


def _splittable(tok: Tok) -> bool:
    """Whether a document cut at :data:`_SAFE_CUT` points encodes to exactly the ids of the whole.

    True for our char tokenizer (characters are independent), byte-level BPE without a prefix
    space (GPT-2's pre-tokenizer never joins a newline to the word after it, nor a newline after
    a non-space to what precedes it) and BERT-style WordPiece (words end at whitespace). Unigram's
    metaspace marks the start of the input, so a piece would begin differently; it is never cut.
    """
    spec = json.loads(tok.tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if tok.kind == "char":
        return not pre and not spec.get("normalizer")
    if tok.kind == "bpe":
        return pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True)
    if tok.kind == "wordpiece":
        return pre.get("type") == "BertPreTokenizer"
    return False


def _pieces(text: str) -> list[str]:
    """Cut a long text into pieces of at least ``_PIECE_CHARS`` at newlines between non-spaces,
    so that its pieces can be encoded in parallel (and BPE's word cache stays effective)."""
    pieces, start = [], 0
    while len(text) - start > 2 * _PIECE_CHARS:
        cut = _SAFE_CUT.search(text, start + _PIECE_CHARS)
        if cut is None:
            break
        pieces.append(text[start:cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def _hash_fraction(seed: int, index: int) -> float:
    """A deterministic number in [0, 1) for document ``index``: the document split's coin."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


# --- shards ---------------------------------------------------------------------------------------

class _ShardWriter:
    """Append token ids to ``{split}_00000.bin``, ``{split}_00001.bin``, ... of at most
    ``shard_tokens`` ids each; files are only created when there are tokens to put in them."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []  # {"file": name, "tokens": n}, the last one possibly still open
        self.tokens = 0
        self.documents = 0
        self._file = None

    def write(self, ids: np.ndarray, documents: int = 0) -> None:
        self.documents += documents
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            n = min(len(ids), self.shard_tokens - self.shards[-1]["tokens"])
            self._file.write(ids[:n].astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += n
            self.tokens += n
            ids = ids[n:]

    def _next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def renamed(self, split: str) -> "_ShardWriter":
        """Rename this (closed) writer's files to another split's names; returns the writer."""
        for shard in self.shards:
            name = f"{split}_{shard['file'].split('_', 1)[1]}"
            os.replace(self.folder / shard["file"], self.folder / name)
            shard["file"] = name
        self.split = split
        return self

    def summary(self) -> dict:
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents}


def _split_tail(writers: dict[str, _ShardWriter], val_fraction: float, eos_id: int) -> None:
    """Move the last ``val_fraction`` of the train stream into an (empty) val writer: shards after
    the cut are copied to val and deleted, the shard holding the cut is truncated."""
    train, val = writers["train"], writers["val"]
    assert val.tokens == 0, "tail split expects the whole stream in train"
    cut = int((train.tokens - 1) * (1 - val_fraction))
    start = 0
    kept = []
    for shard in train.shards:
        path = train.folder / shard["file"]
        end = start + shard["tokens"]
        if end <= cut:
            kept.append(shard)
        else:
            local = max(cut - start, 0)
            data = np.memmap(path, dtype=train.dtype, mode="r")
            for i in range(local, len(data), _COPY_TOKENS):
                part = np.array(data[i:i + _COPY_TOKENS])
                val.write(part, documents=int((part == eos_id).sum()))
            del data
            if local > 0:
                os.truncate(path, local * train.dtype.itemsize)
                kept.append({"file": shard["file"], "tokens": local})
            else:
                path.unlink()
        start = end
    val.close()
    train.shards = kept
    train.tokens = cut
    train.documents -= val.documents


# --- output folder --------------------------------------------------------------------------------

def _check_out(out: Path, sources: list[str], overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, holds or lies in a corpus folder, or is a non-empty folder
    that ``prepare`` did not make (unless ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"out '{out}': exists and is not a folder")
    resolved = out.resolve()
    for src in sources:
        if not isinstance(src, str):  # a datasets object: no folder to overlap
            continue
        src_path = Path(src).resolve()
        if not src.startswith("builtin:") and Path(src).exists() and (
                resolved == src_path or src_path in resolved.parents or resolved in src_path.parents):
            raise DataError(f"out '{out}': overlaps the corpus '{src}'; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        try:
            is_ours = json.loads((out / "manifest.json").read_text()).get("format") in (FORMAT, "pretrainer-images")
        except (OSError, ValueError, AttributeError):
            is_ours = False
        if not is_ours:
            raise DataError(f"out '{out}': folder is not empty and is not a prepared data folder "
                            "(choose another folder, or overwrite it)")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out``, replacing a previous ``out``."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "data")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# --- progress -------------------------------------------------------------------------------------

class _Progress:
    """Progress lines on stderr, at most one every ``every`` seconds; silent when disabled."""

    def __init__(self, enabled: bool, every: float = 2.0):
        self.enabled, self.every = enabled, every
        self.documents = self.tokens = self.nbytes = 0
        self.started = self.last = None

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"prepare: {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"prepare: warning: {message}", file=sys.stderr, flush=True)

    def start(self) -> None:
        self.started = self.last = time.perf_counter()

    def update(self, documents: int, tokens: int, nbytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.nbytes += nbytes
        if time.perf_counter() - self.last >= self.every:
            self._line()
            self.last = time.perf_counter()

    def done(self) -> None:
        self._line()

    def _line(self) -> None:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.note(f"{self.documents:,} documents, {self.tokens:,} tokens, "
                  f"{self.nbytes / 1e6 / elapsed:.1f} MB/s, {elapsed:.1f} s")

    def summary(self, manifest: dict) -> None:
        train, val = manifest["splits"]["train"], manifest["splits"]["val"]
        self.note(f"train {train['tokens']:,} tokens ({train['documents']:,} documents, {len(train['shards'])} shards), "
                  f"val {val['tokens']:,} tokens ({val['documents']:,} documents); {manifest['dtype']}, "
                  f"vocab {manifest['vocab_size']}")
