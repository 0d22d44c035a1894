import json

import pytest

from pretrainer.errors import DataError
from pretrainer.tokenization import (
    EOS, KINDS, MASK, SPECIAL_TOKENS, Tok, load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n" * 3,
    "def f(x):\n    return x + 1  # add one\n\n\nclass A:\n    pass\n",
    "Unicode: naïve café, 日本語のテキスト, emoji 🎉, math ∑ x².\n",
    "Tabs\tand  double  spaces, trailing spaces   \n\n",
]
TRICKY = "  Leading spaces\n\n\ttab, 'quotes' \"and\" ünïcødé 日本語 🎉\r\nwindows line  \n  trailing "


@pytest.fixture(scope="module")
def toks() -> dict[str, Tok]:
    return {kind: Tok.train(CORPUS, kind, 400, sentinels=3) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_have_ids_0_to_6_then_sentinels(toks, kind):
    tok = toks[kind]
    assert [tok.id_to_token(i) for i in range(7)] == SPECIAL_TOKENS
    assert [tok.id_to_token(i) for i in range(7, 10)] == ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == tuple(range(7))
    assert tok.sentinel_ids == [7, 8, 9]
    assert tok.kind == kind


@pytest.mark.parametrize("kind", KINDS)
def test_encode_adds_no_special_tokens(toks, kind):
    ids = toks[kind].encode("The fox")
    assert ids and not set(ids) & set(range(10))


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_round_trip(kind):
    tok = Tok.train(CORPUS + [TRICKY], kind, 400)
    for text in CORPUS + [TRICKY]:
        assert tok.decode(tok.encode(text)) == text


def test_bpe_encodes_any_bytes_without_unk(toks):
    text = "never seen: Ωμέγα ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x7f"
    ids = toks["bpe"].encode(text)
    assert toks["bpe"].unk_id not in ids
    assert toks["bpe"].decode(ids) == text


def test_char_tokenizer_is_one_token_per_character_and_unknowns_are_unk():
    tok = Tok.train(["hello world\n"], "char", vocab_size=0)
    assert tok.vocab_size == 7 + len(set("hello world\n"))
    assert len(tok.encode("hello")) == 5
    assert tok.encode("hz") == [tok.encode("h")[0], tok.unk_id]


def test_unigram_and_wordpiece_round_trip_words_and_keep_case(toks):
    assert toks["unigram"].decode(toks["unigram"].encode("The quick brown fox")) == "The quick brown fox"
    assert toks["wordpiece"].decode(toks["wordpiece"].encode("The quick brown fox")) == "The quick brown fox"


def test_special_tokens_in_text_are_recognised(toks):
    tok = toks["bpe"]
    assert tok.mask_id in tok.encode(f"I {MASK} this")
    assert tok.decode(tok.encode(f"a{EOS}b")) == f"a{EOS}b"


@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_in_transformers(toks, kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = toks[kind]
    save_tokenizer(tok, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    for cls in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        hf = cls.from_pretrained(str(tmp_path))
        assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id,
                hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == tuple(range(7))
        text = "The quick brown fox, naïve café"
        assert hf(text)["input_ids"] == tok.encode(text)
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
        assert hf.convert_tokens_to_ids("<extra_id_2>") == 9


def test_load_tokenizer_from_folder_file_or_data_folder(toks, tmp_path):
    tok = toks["bpe"]
    save_tokenizer(tok, tmp_path / "data" / "tokenizer")
    for path in (tmp_path / "data" / "tokenizer", tmp_path / "data" / "tokenizer" / "tokenizer.json", tmp_path / "data"):
        loaded = load_tokenizer(path)
        assert loaded.hash == tok.hash
        assert loaded.encode(TRICKY) == tok.encode(TRICKY)


def test_hash_is_deterministic_and_content_sensitive():
    a = train_tokenizer(CORPUS, "bpe", 300)
    b = train_tokenizer(CORPUS, "bpe", 300)
    c = train_tokenizer(CORPUS, "bpe", 301)
    assert tokenizer_hash(a) == tokenizer_hash(b) != tokenizer_hash(c)
    assert len(tokenizer_hash(a)) == 16 and int(tokenizer_hash(a), 16) >= 0


def _one_line_error(fn, *names) -> str:
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg
    return msg


def test_load_errors_are_one_line_and_name_the_path(tmp_path):
    _one_line_error(lambda: load_tokenizer(tmp_path / "nope"), "nope", "no such file")
    _one_line_error(lambda: load_tokenizer(tmp_path), str(tmp_path), "tokenizer.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    _one_line_error(lambda: load_tokenizer(bad), str(bad), "not a valid")


def test_bad_kind_and_size():
    _one_line_error(lambda: train_tokenizer(CORPUS, "sentencepiece", 100), "sentencepiece", "bpe")
    _one_line_error(lambda: train_tokenizer(CORPUS, "bpe", 5), "vocab_size 5")


def test_the_training_sample_is_uniform_over_the_stream_and_holds_the_budget():
    from pretrainer.tokenization import sample_texts

    docs = [f"{i:04d}" + "x" * 96 for i in range(2000)]  # 100 bytes each
    kept, read = sample_texts(iter(docs), max_bytes=10_000, seed=1)
    assert read == {"documents": 2000, "bytes": 200_000, "sampled_documents": 100, "sampled_bytes": 10_000}
    positions = sorted(int(d[:4]) for d in kept)
    # uniform over the whole stream, not its head: about as many from each half
    assert 30 <= sum(p < 1000 for p in positions) <= 70 and positions[-1] > 1500
    assert sample_texts(iter(docs), None)[0] == docs  # no budget: everything, in order
    assert sample_texts(iter(docs), max_bytes=10_000, seed=1)[0] == kept  # seeded


def test_tokenizer_training_samples_and_says_what_it_read(tmp_path, capsys):
    from pretrainer.cli import main

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " + "lorem ipsum dolor " * 30}) + "\n"
                              for i in range(400)))
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--kind", "unigram", "--vocab-size", "200",
                 "--sample-mb", "0.05", "--out", str(tmp_path / "tok")]) == 0
    err = capsys.readouterr().err
    k = next(n for n in range(1, 401) if sum(len(f"document {i} " + "lorem ipsum dolor " * 30) for i in range(n)) >= 50_000)
    assert f"tokenizer: read 400 documents (0.2 MB); training unigram on a sample of {k} documents (0.1 MB)" in err
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--kind", "bpe", "--vocab-size", "300",
                 "--out", str(tmp_path / "tok2")]) == 0
    assert "training bpe on all of it" in capsys.readouterr().err
