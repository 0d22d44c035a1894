"""Tokenizers are read by role (end-of-text, padding, cls ...), not by literal name: Hugging Face
GPT-2, Llama and BERT tokenizer folders, built here from scratch and saved by `transformers`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from pretrainer.cli import generate_samples, main
from pretrainer.errors import DataError
from pretrainer.finetune.heads import InputFormat
from pretrainer.tokenization import ROLES, Tok, load_tokenizer

transformers = pytest.importorskip("transformers")

DOCS = ["the quick brown fox jumps over the lazy dog",
        "hello world, this is a small corpus",
        "pack my box with five dozen liquor jugs",
        "a literal <|endoftext|> and </s> in the text stay text"]
TRAIN_TEXTS = DOCS * 5


def _bpe(special_tokens=()) -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TRAIN_TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return t


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer folders saved by ``save_pretrained``: GPT-2 (``<|endoftext|>`` last, as id 50256 is
    in GPT-2), Llama (``<unk> <s> </s>`` at 0-2), BERT ([PAD] [UNK] [CLS] [SEP] [MASK]) and one whose
    only other special token has a spelling nobody knows (``<|doc|>``)."""
    root = tmp_path_factory.mktemp("hf_tokenizers")
    gpt2 = _bpe()
    gpt2.add_special_tokens(["<|endoftext|>"])
    transformers.GPT2TokenizerFast(tokenizer_object=gpt2, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>").save_pretrained(root / "gpt2")

    llama = Tokenizer(models.BPE(unk_token="<unk>"))
    llama.pre_tokenizer = pre_tokenizers.Metaspace()
    llama.decoder = decoders.Metaspace()
    llama.train_from_iterator(TRAIN_TEXTS, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    transformers.PreTrainedTokenizerFast(tokenizer_object=llama, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(root / "llama")

    bert = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    bert.normalizer = normalizers.BertNormalizer()
    bert.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bert.decoder = decoders.WordPiece()
    bert.train_from_iterator(TRAIN_TEXTS, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    transformers.BertTokenizerFast(tokenizer_object=bert, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                   cls_token="[CLS]", mask_token="[MASK]").save_pretrained(root / "bert")

    no_end = _bpe(["[UNK]", "<|doc|>"])
    transformers.PreTrainedTokenizerFast(tokenizer_object=no_end, unk_token="[UNK]").save_pretrained(root / "no_end")
    return {name: root / name for name in ("gpt2", "llama", "bert", "no_end")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(DOCS))
    return path


def _prepare(corpus: Path, tokenizer: Path, out: Path, *extra: str) -> int:
    return main(["prepare", "--corpus", str(corpus), "--tokenizer", str(tokenizer), "--out", str(out),
                 "--doc-separator", "\n\n", "--val-fraction", "0", "--json", *extra])


def _stream(out: Path) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    return np.concatenate([np.fromfile(out / s["file"], dtype=manifest["dtype"])
                           for s in manifest["splits"]["train"]["shards"]])


def _expected_stream(hf, docs, eos_id) -> list[int]:
    """What transformers' own tokenizer gives: each document's ids, then the end-of-text id."""
    ids = []
    for doc in docs:
        ids += hf(doc, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [eos_id]
    return ids


@pytest.mark.parametrize("name, eos", [("gpt2", "<|endoftext|>"), ("llama", "</s>")])
def test_prepare_separates_documents_with_the_tokenizers_end_token(hf_dirs, corpus, tmp_path, capsys, name, eos):
    hf = transformers.AutoTokenizer.from_pretrained(hf_dirs[name])
    eos_id = hf.convert_tokens_to_ids(eos)
    assert hf.eos_token_id == eos_id

    out = tmp_path / "data"
    assert _prepare(corpus, hf_dirs[name], out) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["special_ids"]["eos"] == eos_id
    assert manifest["special_ids"]["bos"] == hf.bos_token_id
    assert manifest["special_ids"]["unk"] == hf.unk_token_id
    assert manifest["special_ids"]["pad"] is None  # neither GPT-2 nor Llama has one
    stream = _stream(out)
    assert int((stream == eos_id).sum()) == len(DOCS) == manifest["splits"]["train"]["documents"]
    assert stream.tolist() == _expected_stream(hf, DOCS, eos_id)

    # the data folder's tokenizer keeps the roles, for transformers and for pretrainer
    saved = transformers.AutoTokenizer.from_pretrained(out / "tokenizer")
    assert (saved.eos_token, saved.bos_token) == (hf.eos_token, hf.bos_token)
    assert load_tokenizer(out).roles == manifest["special_ids"]


def test_gpt2_endoftext_fills_bos_eos_and_unk(hf_dirs):
    tok = load_tokenizer(hf_dirs["gpt2"])
    end = tok.token_to_id("<|endoftext|>")
    assert end == tok.vocab_size - 1
    assert (tok.role_id("bos"), tok.role_id("eos"), tok.role_id("unk")) == (end, end, end)
    assert tok.role_id("pad") is None and tok.pad_id == end  # pads with end-of-text
    assert tok.role_token("eos") == "<|endoftext|>"
    # a bare tokenizer.json (no special-token map) is matched by known spellings: the same roles
    assert load_tokenizer(hf_dirs["gpt2"] / "tokenizer.json").roles == tok.roles
    fmt = InputFormat.for_backbone("decoder", tok)
    assert (fmt.start_id, fmt.sep_id, fmt.end_id, fmt.pad_id) == (end, end, end, end)


def test_bert_folder_gives_cls_sep_mask_pad(hf_dirs, corpus, tmp_path, capsys):
    hf = transformers.AutoTokenizer.from_pretrained(hf_dirs["bert"])
    tok = load_tokenizer(hf_dirs["bert"])
    assert {r: tok.role_id(r) for r in ("cls", "sep", "mask", "pad", "unk")} == {
        "cls": hf.cls_token_id, "sep": hf.sep_token_id, "mask": hf.mask_token_id,
        "pad": hf.pad_token_id, "unk": hf.unk_token_id}
    assert tok.role_token("cls") == "[CLS]" and tok.role_token("mask") == "[MASK]"
    assert tok.role_id("bos") is None
    assert tok.role_id("eos") == hf.sep_token_id  # [SEP] ends a BERT text
    assert load_tokenizer(hf_dirs["bert"] / "tokenizer.json").roles == tok.roles  # bare: by spelling
    enc = InputFormat.for_backbone("encoder", tok, type_vocab_size=2)
    assert enc.build([10, 11], [12])[0] == [hf.cls_token_id, 10, 11, hf.sep_token_id, 12, hf.sep_token_id]
    assert enc.pad_id == hf.pad_token_id

    out = tmp_path / "data"
    assert _prepare(corpus, hf_dirs["bert"], out) == 0, capsys.readouterr().err
    ids = json.loads((out / "manifest.json").read_text())["special_ids"]
    assert (ids["cls"], ids["sep"], ids["mask"], ids["pad"], ids["eos"]) == (
        hf.cls_token_id, hf.sep_token_id, hf.mask_token_id, hf.pad_token_id, hf.sep_token_id)


def test_our_tokenizers_keep_their_reserved_roles():
    tok = Tok.train(TRAIN_TEXTS, "bpe", 300)
    assert tok.roles == {role: i for i, role in enumerate(ROLES)}


def test_no_end_token_is_refused_naming_eos_token_which_then_works(hf_dirs, corpus, tmp_path, capsys):
    out = tmp_path / "data"
    assert _prepare(corpus, hf_dirs["no_end"], out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert "--eos-token" in err and str(hf_dirs["no_end"]) in err and "end-of-text" in err
    assert not out.exists()

    assert _prepare(corpus, hf_dirs["no_end"], out, "--eos-token", "NOT-A-TOKEN") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--eos-token 'NOT-A-TOKEN'" in err, err

    assert _prepare(corpus, hf_dirs["no_end"], out, "--eos-token", "<|doc|>") == 0, capsys.readouterr().err
    doc = load_tokenizer(hf_dirs["no_end"]).token_to_id("<|doc|>")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["special_ids"]["eos"] == doc
    assert int((_stream(out) == doc).sum()) == len(DOCS)
    assert load_tokenizer(out).role_id("eos") == doc  # saved with the data's tokenizer
    assert transformers.AutoTokenizer.from_pretrained(out / "tokenizer").eos_token == "<|doc|>"


def test_a_special_token_map_naming_a_missing_token_is_one_line(hf_dirs, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((hf_dirs["gpt2"] / "tokenizer.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    with pytest.raises(DataError, match=r"eos_token '</s>'.*not a token"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    assert load_tokenizer(folder).role_token("eos") == "<|endoftext|>"


@pytest.fixture(scope="module")
def gpt2_run(hf_dirs, corpus, tmp_path_factory) -> Path:
    """A gpt-nano run on GPT-2-layout data whose weights always predict ``<|endoftext|>``: the final
    norm's output is a constant vector, and only the end token's (tied) embedding points along it."""
    from pretrainer.config import load_config, save_config
    from pretrainer.model import make_model
    from pretrainer.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("gpt2_run")
    data, run = root / "data", root / "run"
    assert _prepare(corpus, hf_dirs["gpt2"], data) == 0
    tok = load_tokenizer(data)
    cfg = load_config(None, ["model=gpt-nano", f"data={data}", f"out={run}"])
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = make_model(cfg.model)
    with torch.no_grad():
        v = torch.ones(cfg.model.d_model)
        model.norm_f.weight.zero_()
        model.norm_f.bias.copy_(v)
        model.tok_emb.weight[tok.role_id("eos")] = 10 * v
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    save_checkpoint(run, model, None, {"step": 0})
    tok.save(run / "tokenizer")
    return run


def test_generate_on_a_gpt2_layout_run_stops_at_its_end_token(gpt2_run, capsys):
    from pretrainer import load

    assert main(["generate", str(gpt2_run), "--prompt", "hello", "--temperature", "0",
                 "--max-new-tokens", "8", "--json"]) == 0, capsys.readouterr().err
    (sample,) = json.loads(capsys.readouterr().out)
    assert sample["text"] == "hello"  # no "<|endoftext|>" text: generation stopped at it

    model, tok = load(gpt2_run), load_tokenizer(gpt2_run / "tokenizer")
    end = tok.token_to_id("<|endoftext|>")
    ids = [end] + tok.encode("hello")  # a prompt starts a new document
    y = model.generate(torch.tensor([ids]), 8, temperature=0.0, eos_id=tok.role_id("eos"))
    assert y[0, len(ids):].tolist() == [end]  # one token, the end one, and no more
    assert generate_samples(model, tok, ["hi"], 8, 0.0, None, None, 0) == ["hi"]


def test_export_writes_the_tokenizers_role_ids(gpt2_run, tmp_path):
    from pretrainer import load
    from pretrainer.interop.hf import export_hf

    out = export_hf(load(gpt2_run), tmp_path / "hf", tokenizer_dir=gpt2_run / "tokenizer")
    config = json.loads((out / "config.json").read_text())
    end = load_tokenizer(gpt2_run / "tokenizer").token_to_id("<|endoftext|>")
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (end, end, None)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == end
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token_id == end
