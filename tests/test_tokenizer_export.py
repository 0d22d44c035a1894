"""An exported model's tokenizer gives, through ``transformers.AutoTokenizer``, the ids pretrainer
itself feeds the model: the same special tokens around one text and a pair, token types and padding,
for an encoder (fine-tuning's layout), a decoder (the prompts of ``generate`` and ``icl``) and an
encoder-decoder (the inputs and targets of ``text2text`` and ``generate``). Each expectation comes
from the function pretrainer's own path calls, not from a copy of its layout here."""

import json
import random

import pytest
import torch

from pretrainer.api import generate_samples
from pretrainer.eval.scoring import encode_context, encode_pair
from pretrainer.finetune.heads import InputFormat
from pretrainer.finetune.tasks import ClassificationTask
from pretrainer.finetune.text2text import Text2TextTask
from pretrainer.interop.hf import export_hf, import_run
from pretrainer.model import make_model, model_config
from pretrainer.tokenization import Tok, load_tokenizer, tokenizer_hash

transformers = pytest.importorskip("transformers")

WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing in old green trees "
         "near quiet rivers and every morning people walk to town to buy fresh bread").split()
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Seven birds sing, near quiet rivers."]
PAIRS = [("Is the fox quick?", "It jumps over the dog."), ("People walk to town.", "Fresh bread!")]
WINDOW = 48

# (preset, tokenizer kind): the three architectures, segment embeddings (BERT: 2, RoBERTa: 1,
# DistilBERT: none), and the kinds pretrainer trains
CASES = [("bert-tiny", "wordpiece"), ("roberta-tiny", "bpe"), ("distilbert-mini", "wordpiece"),
         ("gpt-nano", "bpe"), ("llama-tiny", "unigram"), ("t5-tiny", "unigram"), ("bart-tiny", "bpe")]


def corpus() -> list[str]:
    """About 7 KB: seeded sentences of :data:`WORDS` and, a few times, the texts of the tests."""
    rng = random.Random(0)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))).capitalize() + rng.choice(".?!,")
             for _ in range(160)]
    return lines + [" ".join(TEXTS + [t for pair in PAIRS for t in pair])] * 5


@pytest.fixture(scope="module")
def toks() -> dict[str, Tok]:
    return {kind: Tok.train(corpus(), kind, 400) for kind in ("wordpiece", "bpe", "unigram")}


@pytest.fixture(scope="module")
def exported(toks, tmp_path_factory):
    """``{preset: (cfg, our tokenizer, model, exported folder)}``."""
    out = {}
    for preset, kind in CASES:
        tok = toks[kind]
        root = tmp_path_factory.mktemp(preset)
        tok.save(root / "tok")
        torch.manual_seed(0)
        model = make_model(model_config(preset, vocab_size=tok.vocab_size, n_layer=1, max_seq_len=WINDOW)).eval()
        out[preset] = (model.cfg, tok, model, export_hf(model, root / "hf", tokenizer_dir=root / "tok"))
    return out


def hf_tok(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


class _Recorder:
    """A stand-in model for ``generate_samples``: records the ids it is given and generates nothing."""

    def __init__(self, cfg, eos):
        self.cfg, self.eos, self.inputs = cfg, eos, []

    def generate(self, x, *_, **__):
        self.inputs.append(x[0].tolist())
        return x if self.cfg.arch == "decoder" else torch.tensor([[self.eos]])


def prompt_ids(cfg, tok, text):
    """The ids ``pretrainer generate`` feeds the model for ``text``."""
    model = _Recorder(cfg, tok.eos_id)
    generate_samples(model, tok, [text], 4, 0.0, None, None, 0)
    return model.inputs[0]


@pytest.mark.parametrize("preset", [p for p, _ in CASES if model_config(p).arch == "encoder"])
def test_encoder_single_texts_and_pairs_are_laid_out_as_in_fine_tuning(exported, preset):
    cfg, tok, _, folder = exported[preset]
    hf = hf_tok(folder)
    fmt = InputFormat.for_backbone(cfg.arch, tok, cfg.type_vocab_size)  # as the fine-tuning runner
    types = cfg.type_vocab_size > 0  # a model with no segment embeddings (DistilBERT) is given none
    for pair in (False, True):
        task = ClassificationTask("text", "text_pair" if pair else None, "label")
        rows = [{"text": a, "text_pair": b} for a, b in PAIRS] if pair else [{"text": t} for t in TEXTS]
        ours = task.collate(task.encode(rows, tok, fmt, WINDOW), fmt.pad_id)
        args = ([a for a, _ in PAIRS], [b for _, b in PAIRS]) if pair else (TEXTS,)
        theirs = hf(*args, padding=True, return_tensors="pt")
        assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
        assert theirs["attention_mask"].tolist() == ours["attention_mask"].tolist()
        assert not ours["attention_mask"].all()  # the rows have different lengths: padding is compared too
        assert ("token_type_ids" in theirs) == types
        if types:
            assert theirs["token_type_ids"].tolist() == ours["token_type_ids"].tolist()
    a, b = PAIRS[0]
    ids = hf(a, b)["input_ids"]
    assert ids[0] == tok.cls_id and ids.count(tok.sep_id) == 2 and ids[-1] == tok.sep_id
    if cfg.type_vocab_size >= 2:
        assert set(hf(a, b)["token_type_ids"]) == {0, 1}


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-tiny"])
def test_decoder_prompts_start_as_in_generate_and_icl(exported, preset):
    cfg, tok, _, folder = exported[preset]
    hf = hf_tok(folder)
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ids == encode_context(tok, text) == prompt_ids(cfg, tok, text)
        assert ids[0] == tok.eos_id  # the separator every document followed in training
    for context, continuation in PAIRS:
        ctx, cont = encode_pair(tok, context, continuation)  # icl / lm-eval scoring
        assert hf(context, continuation)["input_ids"] == ctx + cont
    batch = hf(TEXTS, padding=True)
    assert "token_type_ids" not in batch  # GPT-2 would add them to its inputs as token embeddings
    for text, ids, mask in zip(TEXTS, batch["input_ids"], batch["attention_mask"]):
        n = sum(mask)
        assert mask == [0] * (len(mask) - n) + [1] * n  # left padding, for batched generation
        assert ids[len(ids) - n:] == encode_context(tok, text)
        assert set(ids[:len(ids) - n]) <= {tok.pad_id}


@pytest.mark.parametrize("preset", ["t5-tiny", "bart-tiny"])
def test_encoder_decoder_inputs_and_targets_end_as_in_text2text(exported, preset):
    cfg, tok, _, folder = exported[preset]
    hf = hf_tok(folder)
    task = Text2TextTask("input", "target")
    fmt = InputFormat.for_backbone(cfg.arch, tok, cfg.type_vocab_size)
    rows = [{"text": a, "label": b} for a, b in PAIRS]
    ours = task.collate(task.encode(rows, tok, fmt, WINDOW), fmt.pad_id)
    theirs = hf([a for a, _ in PAIRS], text_target=[b for _, b in PAIRS], padding=True, return_tensors="pt")
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    assert theirs["attention_mask"].tolist() == ours["attention_mask"].tolist()
    mask = ours["labels"] != -100
    assert theirs["labels"][mask].tolist() == ours["labels"][mask].tolist()
    assert (theirs["labels"][~mask] == tok.pad_id).all()
    assert "token_type_ids" not in theirs
    for text in TEXTS:
        assert hf(text)["input_ids"] == prompt_ids(cfg, tok, text)
    a, b = PAIRS[0]  # no pretrainer path reads a pair here: T5's layout, each text closed by <eos>
    assert hf(a, b)["input_ids"] == tok.encode(a) + [tok.eos_id] + tok.encode(b) + [tok.eos_id]


@pytest.mark.parametrize("preset", [p for p, _ in CASES])
def test_config_window_roles_and_decoding(exported, preset):
    cfg, tok, _, folder = exported[preset]
    hf = hf_tok(folder)
    assert hf.model_max_length == WINDOW
    assert hf.padding_side == ("left" if cfg.arch == "decoder" else "right")
    for role in ("pad", "bos", "eos", "unk", "cls", "sep", "mask"):
        want = tok.role_id(role)
        if role == "bos" and cfg.arch == "decoder":  # a decoder's text starts with what a prompt does
            want = encode_context(tok, "")[0]
        assert getattr(hf, f"{role}_token_id") == want
    if cfg.arch == "decoder":  # so transformers' add_bos_token (lm-eval's option) gives pretrainer's prompt
        assert hf("a b", add_special_tokens=False)["input_ids"] == tok.encode("a b")
        assert [hf.bos_token_id] + tok.encode("a b") == encode_context(tok, "a b")
        with_bos = transformers.AutoTokenizer.from_pretrained(folder, add_bos_token=True)
        assert with_bos("a b")["input_ids"] == encode_context(tok, "a b")
    saved = json.loads((folder / "special_tokens_map.json").read_text())
    assert saved["eos_token"] == tok.role_token("eos")
    long = " ".join(TEXTS * 4)
    cut = hf(long, truncation=True)["input_ids"]
    assert len(cut) == WINDOW and len(hf(long)["input_ids"]) > WINDOW  # specials counted in the window
    for text in TEXTS + [a for a, _ in PAIRS]:
        ids = hf(text)["input_ids"]
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("preset", ["bert-tiny", "gpt-nano"])
def test_transformers_model_reads_the_tokenizer_output_as_ours_reads_pretrainers(exported, preset):
    """``model(**tokenizer(...))`` in ``transformers`` gives our logits: for BERT the pair's token
    types count; for GPT-2 none may be passed (they would be added as token embeddings)."""
    cfg, tok, model, folder = exported[preset]
    auto = transformers.AutoModelForMaskedLM if cfg.arch == "encoder" else transformers.AutoModelForCausalLM
    hf_model = auto.from_pretrained(folder).eval()
    if cfg.arch == "encoder":
        a, b = PAIRS[0]
        enc = hf_tok(folder)(a, b, return_tensors="pt")
        ids, types = InputFormat.for_backbone(cfg.arch, tok, cfg.type_vocab_size).build(tok.encode(a), tok.encode(b))
        ours = model(torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits
    else:
        enc = hf_tok(folder)(TEXTS[0], return_tensors="pt")
        ours = model(torch.tensor([encode_context(tok, TEXTS[0])])).logits
    with torch.no_grad():
        theirs = hf_model(**enc).logits
    torch.testing.assert_close(theirs, ours.detach(), atol=1e-5, rtol=1e-5)


def test_export_then_import_keeps_the_tokenizer_for_pretrainer(exported, tmp_path):
    """The layout is for ``transformers`` only: an imported run encodes as before, and data prepared
    with the tokenizer it was trained with still matches it."""
    cfg, tok, _, folder = exported["bert-tiny"]
    run = import_run(folder, tmp_path / "run")
    back = load_tokenizer(run / "tokenizer")
    assert back.roles == tok.roles
    assert back.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    assert back.hash == tok.hash and back.has_hash(tok.hash)
    assert tokenizer_hash(back, post_processor=True) != tokenizer_hash(tok, post_processor=True)
    # ours have no post-processor: their hash is what manifests recorded before it was left out
    assert tok.hash == tokenizer_hash(tok, post_processor=True)
    # a manifest written before then, for a tokenizer with one of its own, still matches it
    assert back.has_hash(tokenizer_hash(back, post_processor=True)) and not back.has_hash("0" * 16)


def test_a_hugging_face_tokenizers_own_post_processor_is_replaced_and_its_offsets_kept(toks, tmp_path):
    """A tokenizer imported from Hugging Face (RoBERTa's adds ``<s> … </s>`` and trims byte-level
    offsets; GPT-2's only trims): the exported one adds the model's layout, and keeps the trimming."""
    from tokenizers import processors

    tok = Tok.train(corpus(), "bpe", 400)
    for old, kept in ((processors.RobertaProcessing(("<eos>", 2), ("<bos>", 1)), "ByteLevel"),
                      (processors.ByteLevel(trim_offsets=True), "ByteLevel"),
                      (processors.BertProcessing(("<eos>", 2), ("<bos>", 1)), None)):
        tok.tok.post_processor = old
        tok.save(tmp_path / "tok")
        model = make_model(model_config("gpt-nano", vocab_size=tok.vocab_size, n_layer=1, max_seq_len=WINDOW))
        out = export_hf(model, tmp_path / type(old).__name__, tokenizer_dir=tmp_path / "tok")
        post = json.loads((out / "tokenizer.json").read_text())["post_processor"]
        types = [p["type"] for p in post["processors"]] if post["type"] == "Sequence" else [post["type"]]
        assert types == ([kept] if kept else []) + ["TemplateProcessing"]
        assert hf_tok(out)(TEXTS[0])["input_ids"] == encode_context(tok, TEXTS[0])


def llama_style_folder(tok: Tok, root):
    """A Hugging Face tokenizer folder laid out as Llama's: ``<s>`` before every text (its
    post-processor), ``</s>`` ends documents; saved by ``transformers`` itself."""
    from tokenizers import Tokenizer, processors

    inner = Tokenizer.from_str(tok.tok.to_str())
    inner.add_special_tokens(["<s>", "</s>"])
    bos = inner.token_to_id("<s>")
    inner.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                         special_tokens=[("<s>", bos)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(root)
    return fast


def test_a_tokenizer_that_starts_texts_with_bos_starts_documents_and_prompts_with_it(toks, tmp_path):
    """An imported Llama-style tokenizer: prompts read "<s> text" (what transformers' tokenizer gives,
    what Llama saw in pretraining), not "</s> text", and prepared documents are "<s> doc </s>"."""
    from pretrainer.data.prepare import prepare
    from pretrainer.data.tokens import TokenSplit

    fast = llama_style_folder(toks["bpe"], tmp_path / "llama")
    tok = load_tokenizer(tmp_path / "llama")
    bos, eos = tok.role_id("bos"), tok.role_id("eos")
    assert tok.document_prefix == [bos] and bos != eos
    assert encode_context(tok, TEXTS[0]) == fast(TEXTS[0])["input_ids"]
    cfg = model_config("llama-tiny", vocab_size=tok.vocab_size, n_layer=1, max_seq_len=WINDOW)
    assert prompt_ids(cfg, tok, TEXTS[0]) == fast(TEXTS[0])["input_ids"]

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    prepare(str(tmp_path / "docs.jsonl"), str(tmp_path / "llama"), tmp_path / "data", val_fraction=0, progress=False)
    split = TokenSplit(tmp_path / "data", "train")
    stream = split.read(0, len(split)).tolist()
    want = [i for t in TEXTS for i in [bos] + tok.encode(t) + [eos]]
    assert stream == want

    # our own tokenizers (and GPT-2's) have no such post-processor: documents end with <eos> only
    own = toks["bpe"]
    assert own.document_prefix == [] and encode_context(own, "a")[0] == own.eos_id
