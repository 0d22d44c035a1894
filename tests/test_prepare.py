import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import pretrainer.data.corpus as corpus_mod
import pretrainer.data.prepare as prepare_mod
from pretrainer.data.corpus import iter_documents
from pretrainer.data.prepare import _hash_fraction, load_manifest, prepare
from pretrainer.data.synthetic import synthetic_documents
from pretrainer.errors import DataError
from pretrainer.tokenization import EOS, Tok, load_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


def one_line_error(fn, *names) -> str:
    """Run ``fn``, expecting a one-line DataError that mentions every one of ``names``."""
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg
    return msg


def docs_of(src, **kw) -> list[str]:
    return [text for _, text in iter_documents(src, **kw)]


def read_split(data_dir: Path, split: str) -> np.ndarray:
    m = load_manifest(data_dir)
    parts = [np.fromfile(data_dir / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=m["dtype"])


def split_on_eos(tok: Tok, ids: np.ndarray) -> list[str]:
    """Decode a token stream back into documents (each one ends with <eos>)."""
    assert len(ids) == 0 or ids[-1] == tok.eos_id
    cuts = np.flatnonzero(ids == tok.eos_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(ids[a:b]) for a, b in zip(starts, cuts)]


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.txt").write_text("second document\nwith two lines\n")
    (root / "a.md").write_text("# first document\n")
    (root / "sub" / "c.py").write_text("print('third')\n")
    (root / "empty.txt").write_text("  \n")
    (root / ".secret.txt").write_text("hidden file")
    (root / ".hidden" / "x.txt").write_text("hidden folder")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return root


# --- corpus ---------------------------------------------------------------------------------------

def test_folder_is_sorted_recursive_and_skips_hidden_binary_and_empty(folder, capsys):
    docs = list(iter_documents(str(folder)))
    assert [Path(name).relative_to(folder).as_posix() for name, _ in docs] == ["a.md", "b.txt", "sub/c.py"]
    assert docs[1][1] == "second document\nwith two lines\n"
    assert "skipped 2 file(s)" in capsys.readouterr().err


def test_glob(folder):
    assert docs_of(str(folder / "*.txt")) == ["second document\nwith two lines\n"]
    assert len(docs_of(str(folder / "**" / "*.py"))) == 1


def test_doc_separator_streams_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "_CHUNK", 7)  # separators straddle chunk boundaries
    docs = [f"document {i}\nline é{i}" for i in range(20)]
    path = tmp_path / "many.txt"
    path.write_text("\ufeff" + "\n\n".join(docs) + "\n\n\n\n")
    assert docs_of(str(path), doc_separator="\n\n") == docs
    assert docs_of(str(path)) == ["\n\n".join(docs) + "\n\n\n\n"]


def test_text_is_read_exactly(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes("a\r\nb\r\n  ünï\r\n".encode())
    assert docs_of(str(path)) == ["a\r\nb\r\n  ünï\r\n"]


def test_jsonl_json_array_and_csv(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n')
    (tmp_path / "d.json").write_text(json.dumps([{"body": "x"}, {"body": "y"}]))
    (tmp_path / "d.csv").write_text('id,text\n1,"hello, world"\n2,"multi\nline"\n')
    assert docs_of(str(tmp_path / "d.jsonl")) == ["one", "two"]
    assert docs_of(str(tmp_path / "d.json"), text_field="body") == ["x", "y"]
    assert docs_of(str(tmp_path / "d.csv")) == ["hello, world", "multi\nline"]


def test_builtin_stdlib_limit():
    docs = list(iter_documents("builtin:stdlib:5"))
    assert len(docs) == 5
    assert all(name.startswith("stdlib/") and name.endswith(".py") for name, _ in docs)
    assert sum(len(text) for _, text in docs) > 1000
    assert not any("/test/" in name or "/tests/" in name for name, _ in docs)


def test_builtin_synthetic_is_deterministic():
    a, b = docs_of("builtin:synthetic:50"), docs_of("builtin:synthetic:50")
    assert a == b == list(synthetic_documents(50))
    assert len(set(a)) == 50 and all(text.endswith("\n") for text in a)
    assert len(docs_of("builtin:synthetic")) == 2000
    assert list(synthetic_documents(5, seed=1)) != list(synthetic_documents(5, seed=2))
    sums = re.findall(r"^(\d+) ([+-]) (\d+) = (\d+)$", "".join(a), flags=re.M)
    assert len(sums) > 20
    assert all(int(x) + (1 if op == "+" else -1) * int(y) == int(z) for x, op, y, z in sums)


def test_corpus_errors_are_one_line_and_name_the_source(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text(" \n\n ")
    (tmp_path / "x.bin").write_bytes(b"abc\x00def")
    (tmp_path / "data.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"body": "c", "id": 3}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    (tmp_path / "d.csv").write_text("id,body\n1,x\n")
    cases = [
        (tmp_path / "missing", ["missing", "no such file or folder"]),
        (tmp_path / "empty", ["empty", "no text found (0 documents)"]),
        (tmp_path / "blank.txt", ["blank.txt", "0 documents"]),
        (tmp_path / "x.bin", ["x.bin", "not a text file (binary content at byte 3)"]),
        (tmp_path / "data.jsonl", ["data.jsonl line 3", "no field 'text'", "body, id"]),
        (tmp_path / "bad.jsonl", ["bad.jsonl line 2", "invalid JSON"]),
        (tmp_path / "num.jsonl", ["num.jsonl line 1", "expected a string"]),
        (tmp_path / "d.csv", ["d.csv", "no column 'text'", "id, body"]),
        (tmp_path / "*.nothing", ["*.nothing", "matched no files"]),
        ("builtin:nope", ["builtin:nope", "builtin:stdlib"]),
        ("builtin:synthetic:zero", ["builtin:synthetic:zero", "builtin:synthetic:N"]),
    ]
    for src, names in cases:
        with pytest.raises(DataError) as e:
            list(iter_documents(str(src)))
        msg = str(e.value)
        assert "\n" not in msg and all(n in msg for n in names), msg


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"d.parquet: reading Parquet needs pyarrow"):
        docs_of(str(tmp_path / "d.parquet"))


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["a", None, "b"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert docs_of(str(tmp_path / "d.parquet")) == ["a", "b"]
    with pytest.raises(DataError, match="d.parquet: column 'n' holds int64"):
        docs_of(str(tmp_path / "d.parquet"), text_field="n")


# --- prepare --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "syn"
    return out, prepare("builtin:synthetic:300", "bpe:300", out, progress=False)


def test_manifest_and_shards_agree(synthetic):
    out, manifest = synthetic
    assert manifest == load_manifest(out)
    assert manifest["format"] == "pretrainer-shards" and manifest["version"] == 1
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 300
    assert manifest["special_ids"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "cls": 4, "sep": 5, "mask": 6}
    assert manifest["tokenizer"]["kind"] == "bpe"
    assert manifest["tokenizer"]["hash"] == load_tokenizer(out / "tokenizer").hash
    assert manifest["sources"] == ["builtin:synthetic:300"] and manifest["split"] == "document"
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"]) > 0
        for shard in info["shards"]:
            assert (out / shard["file"]).stat().st_size == 2 * shard["tokens"]
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 300
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer", "train_00000.bin", "val_00000.bin"]


def test_tokens_decode_back_to_documents_split_by_hash(synthetic):
    out, manifest = synthetic
    tok = load_tokenizer(out)
    docs = list(synthetic_documents(300))
    val = [d for i, d in enumerate(docs) if _hash_fraction(manifest["seed"], i) < manifest["val_fraction"]]
    train = [d for i, d in enumerate(docs) if _hash_fraction(manifest["seed"], i) >= manifest["val_fraction"]]
    assert 10 < len(val) < 60
    assert split_on_eos(tok, read_split(out, "train")) == train
    assert split_on_eos(tok, read_split(out, "val")) == val
    assert manifest["splits"]["val"]["documents"] == len(val)


def test_prepare_is_reproducible_and_seed_changes_the_split(synthetic, tmp_path):
    out, manifest = synthetic
    tok_dir = out / "tokenizer"
    again = prepare("builtin:synthetic:300", str(tok_dir), tmp_path / "a", progress=False)
    assert again["splits"] == manifest["splits"]
    assert (tmp_path / "a" / "train_00000.bin").read_bytes() == (out / "train_00000.bin").read_bytes()
    other = prepare("builtin:synthetic:300", str(tok_dir), tmp_path / "b", seed=7, progress=False)
    assert other["splits"]["val"]["tokens"] != manifest["splits"]["val"]["tokens"]


def test_small_shards_keep_the_stream(synthetic, tmp_path):
    out, manifest = synthetic
    small = prepare("builtin:synthetic:300", str(out / "tokenizer"), tmp_path / "s", shard_tokens=1000, progress=False)
    shards = small["splits"]["train"]["shards"]
    assert len(shards) > 3
    assert all(s["tokens"] == 1000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 1000
    assert [s["file"] for s in shards[:2]] == ["train_00000.bin", "train_00001.bin"]
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "s", split), read_split(out, split))


def test_tail_split_is_exact_on_a_char_corpus(tmp_path):
    text = "".join(f"line {i}: ünïcode\n" for i in range(500))
    (tmp_path / "t.txt").write_text(text)
    for shard_tokens in (2**26, 777):  # the cut falls inside a shard, later shards move to val
        out = tmp_path / f"out{shard_tokens}"
        m = prepare(str(tmp_path / "t.txt"), "char", out, split="tail", shard_tokens=shard_tokens, progress=False)
        tok = load_tokenizer(out)
        n = len(text)
        train, val = read_split(out, "train"), read_split(out, "val")
        assert tok.decode(train) == text[: int(n * 0.9)]
        assert tok.decode(val[:-1]) == text[int(n * 0.9):] and val[-1] == tok.eos_id
        assert m["split"] == "tail" and m["splits"]["val"]["documents"] == 1
        assert load_manifest(out) == m


def test_tail_split_of_several_documents_keeps_the_stream(tmp_path):
    out = tmp_path / "o"
    m = prepare("builtin:synthetic:100", "char", out, split="tail", val_fraction=0.25, progress=False)
    stream = np.concatenate([read_split(out, "train"), read_split(out, "val")])
    assert len(read_split(out, "train")) == int((len(stream) - 1) * 0.75)
    assert split_on_eos(load_tokenizer(out), stream) == list(synthetic_documents(100))
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 100


def test_document_split_falls_back_to_tail_when_every_document_lands_in_val(tmp_path, capsys):
    assert all(_hash_fraction(1337, i) < 0.95 for i in range(4))
    out = tmp_path / "o"
    m = prepare("builtin:synthetic:4", "char", out, val_fraction=0.95, progress=False)
    assert m["split"] == "tail" and "falling back" in capsys.readouterr().err
    assert [s["file"] for s in m["splits"]["train"]["shards"]] == ["train_00000.bin"]
    assert [s["file"] for s in m["splits"]["val"]["shards"]] == ["val_00000.bin"]
    stream = np.concatenate([read_split(out, "train"), read_split(out, "val")])
    assert len(read_split(out, "train")) == int((len(stream) - 1) * (1 - 0.95))
    assert split_on_eos(load_tokenizer(out), stream) == list(synthetic_documents(4))


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="tinyshakespeare.txt not available")
def test_tiny_shakespeare_tail_split_matches_nanogpt(tmp_path, capsys):
    m = prepare(str(SHAKESPEARE), "char", tmp_path / "ts", split="tail", progress=False)
    data = SHAKESPEARE.read_text(encoding="utf-8")
    n = len(data)
    assert m["vocab_size"] == 7 + len(set(data)) == 72
    tok = load_tokenizer(tmp_path / "ts")
    assert tok.decode(read_split(tmp_path / "ts", "train")) == data[: int(n * 0.9)]
    assert tok.decode(read_split(tmp_path / "ts", "val")[:-1]) == data[int(n * 0.9):]
    # the default document split cannot split one document: it falls back to tail, with a warning
    m2 = prepare(str(SHAKESPEARE), str(tmp_path / "ts" / "tokenizer"), tmp_path / "ts2", progress=False)
    assert m2["split"] == "tail" and m2["splits"] == m["splits"]
    assert "falling back to split 'tail'" in capsys.readouterr().err


def test_val_fraction_zero_and_literal_special_tokens(tmp_path):
    (tmp_path / "c.txt").write_text(f"a literal {EOS} and <mask> stay text\n")
    m = prepare(str(tmp_path / "c.txt"), "char", tmp_path / "o", val_fraction=0.0, progress=False)
    assert m["splits"]["val"] == {"shards": [], "tokens": 0, "documents": 0}
    ids = read_split(tmp_path / "o", "train")
    assert list(ids).count(2) == 1 and ids[-1] == 2  # only the separator is <eos>
    assert not set(ids.tolist()) & {0, 1, 3, 4, 5, 6}


@pytest.mark.parametrize("kind", ["bpe", "char", "wordpiece"])
def test_long_documents_cut_in_pieces_encode_exactly(kind, monkeypatch):
    monkeypatch.setattr(prepare_mod, "_PIECE_CHARS", 300)
    docs = docs_of("builtin:stdlib:12")
    tok = Tok.train(docs, kind, 1000)
    tok.tok.encode_special_tokens = True
    assert prepare_mod._splittable(tok)
    encoded = prepare_mod._encode(tok, list(enumerate(docs)), True, np.dtype("<u2"))
    assert sum(len(prepare_mod._pieces(d)) for d in docs) > 2 * len(docs)
    for (_, ids), doc in zip(encoded, docs):
        assert ids.tolist() == tok.encode(doc) + [tok.eos_id]


def test_encoding_in_many_tokenizer_calls_gives_the_same_ids(monkeypatch):
    """The pieces of a batch go to the tokenizer a few hundred thousand characters at a time (its
    result holds ~100 bytes a token): documents whose pieces land in different calls, and calls
    that hold the ends of several documents, give each document exactly its own ids."""
    monkeypatch.setattr(prepare_mod, "_PIECE_CHARS", 300)
    docs = docs_of("builtin:stdlib:12")
    tok = Tok.train(docs, "bpe", 1000)
    tok.tok.encode_special_tokens = True
    calls = []
    real = tok.tok.encode_batch_fast

    class Spy:  # the Rust tokenizer's methods cannot be patched on the object itself
        def __getattr__(self, name):
            return getattr(real.__self__, name)

        def encode_batch_fast(self, pieces, **kw):
            calls.append(sum(map(len, pieces)))
            return real(pieces, **kw)

    tok.tok = Spy()
    batch = list(enumerate(docs))
    whole = prepare_mod._encode(tok, batch, True, np.dtype("<u2"))
    assert len(calls) == 1  # everything in one call at the default size
    monkeypatch.setattr(prepare_mod, "_ENCODE_CHARS", 1000)
    calls.clear()
    grouped = prepare_mod._encode(tok, batch, True, np.dtype("<u2"))
    assert len(calls) > len(docs) and max(calls) < 1000 + 2 * 300 + max(map(len, docs))
    assert [i for i, _ in grouped] == [i for i, _ in whole]
    for (_, a), (_, b), doc in zip(grouped, whole, docs):
        assert a.dtype == b.dtype and a.tolist() == b.tolist() == tok.encode(doc) + [tok.eos_id]


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
    text = "".join(chr(c) for c in range(0x10000, 0x10000 + 66_000))  # more distinct chars than uint16 ids
    (tmp_path / "wide.txt").write_text(text)
    m = prepare(str(tmp_path / "wide.txt"), "char", tmp_path / "o", split="tail", progress=False)
    assert m["dtype"] == "uint32" and m["vocab_size"] == 66_007
    ids = np.concatenate([read_split(tmp_path / "o", s) for s in ("train", "val")])
    assert ids.max() == 66_006 and load_tokenizer(tmp_path / "o").decode(ids[:-1]) == text


def test_output_folder_rules(tmp_path, synthetic, capsys):
    tok_dir = str(synthetic[0] / "tokenizer")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    one_line_error(lambda: prepare("builtin:synthetic:20", tok_dir, busy, progress=False), "busy", "not empty")
    prepare("builtin:synthetic:20", tok_dir, busy, overwrite=True, progress=False)
    assert not (busy / "notes.txt").exists()
    # a previous output is replaced, progress goes to stderr
    m = prepare("builtin:synthetic:30", tok_dir, busy, progress=True)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 30
    assert "prepare:" in capsys.readouterr().err
    # a failure leaves no output folder and no temporary folder behind
    one_line_error(lambda: prepare(str(tmp_path / "missing"), "char", tmp_path / "out", progress=False), "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    # the output may not overlap the corpus
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("text")
    one_line_error(lambda: prepare(str(tmp_path / "c"), "char", tmp_path / "c" / "out", progress=False), "overlaps")


def test_prepare_argument_errors(tmp_path):
    run = lambda **kw: prepare("builtin:synthetic:5", kw.pop("tokenizer", "char"), tmp_path / "o",  # noqa: E731
                               progress=False, **kw)
    one_line_error(lambda: run(tokenizer="bpe"), "bpe:N")
    one_line_error(lambda: run(tokenizer=str(tmp_path / "nope")), "nope")
    one_line_error(lambda: run(val_fraction=1.0), "val_fraction")
    one_line_error(lambda: run(split="random"), "split 'random'")


def test_load_manifest_errors(synthetic, tmp_path):
    out, _ = synthetic
    one_line_error(lambda: load_manifest(tmp_path / "nope"), "nope", "no such folder")
    one_line_error(lambda: load_manifest(tmp_path), "no manifest.json")
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    one_line_error(lambda: load_manifest(tmp_path), "manifest.json", "not a pretrainer data folder")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_text((out / "manifest.json").read_text())
    (copy / "train_00000.bin").write_bytes((out / "train_00000.bin").read_bytes()[:-2])
    one_line_error(lambda: load_manifest(copy), "train_00000.bin", "expected")
    (copy / "train_00000.bin").write_bytes((out / "train_00000.bin").read_bytes())
    one_line_error(lambda: load_manifest(copy), "val_00000.bin", "missing")
