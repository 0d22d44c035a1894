"""Train, save and load tokenizers (Hugging Face `tokenizers`).

Four kinds, all sharing the same special tokens at the same ids so that every objective can rely on
them: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, ``<cls>``=4, ``<sep>``=5, ``<mask>``=6,
optionally followed by T5-style sentinels ``<extra_id_0>``, ``<extra_id_1>``, ...

- ``bpe``: byte-level BPE (GPT-2 style); any string encodes without ``<unk>`` and decodes back exactly.
- ``wordpiece``: BERT-style WordPiece (cased), ``##`` continuation prefix.
- ``unigram``: SentencePiece-style Unigram with the ``▁`` metaspace.
- ``char``: one token per distinct character of the training text; decodes back exactly; characters
  never seen in training become ``<unk>``. The vocabulary size is whatever the text needs.

Encoding never adds special tokens by itself: the data pipeline puts ``<eos>`` between documents and
each objective adds what it needs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from pretrainer.errors import DataError

PAD, BOS, EOS, UNK, CLS, SEP, MASK = "<pad>", "<bos>", "<eos>", "<unk>", "<cls>", "<sep>", "<mask>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, CLS, SEP, MASK]  # ids 0..6 in every tokenizer we train
KINDS = ("bpe", "wordpiece", "unigram", "char")

# short names of the special tokens (transformers' "pad_token", ... and the manifest's "special_ids")
SPECIAL_NAMES = {"pad": PAD, "bos": BOS, "eos": EOS, "unk": UNK, "cls": CLS, "sep": SEP, "mask": MASK}


def sentinel_tokens(n: int) -> list[str]:
    """T5-style sentinel tokens ``<extra_id_0>`` .. ``<extra_id_{n-1}>``."""
    return [f"<extra_id_{i}>" for i in range(n)]


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, sentinels: int = 0) -> Tokenizer:
    """Train a tokenizer of the given kind on an iterable of texts (streamed, read once).

    ``vocab_size`` counts the special tokens and sentinels; it is ignored for ``char``.
    """
    specials = SPECIAL_TOKENS + sentinel_tokens(sentinels)
    if kind == "char":
        return _train_char(texts, specials)
    if kind not in KINDS:
        raise DataError(f"tokenizer kind '{kind}': expected one of {', '.join(KINDS)}")
    if vocab_size <= len(specials):
        raise DataError(f"tokenizer vocab_size {vocab_size}: expected more than the {len(specials)} special tokens")

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials, continuing_subword_prefix="##", show_progress=False)
    else:  # unigram
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token=UNK, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    _check_special_ids(tok, specials, "trained tokenizer")
    return tok


def _train_char(texts: Iterable[str], specials: list[str]) -> Tokenizer:
    """A character tokenizer: a BPE model with no merges over every distinct character seen.

    With no pre-tokenizer and no merges, BPE splits the input into single characters, maps unseen
    ones to ``<unk>``, and the ``Fuse`` decoder glues the pieces back without adding spaces.
    """
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(chars - set(vocab)):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return tok


def _check_special_ids(tok: Tokenizer, specials: list[str], where: str) -> None:
    for i, s in enumerate(specials):
        if tok.token_to_id(s) != i:
            raise DataError(f"{where}: special token '{s}' has id {tok.token_to_id(s)}, expected {i}")


def tokenizer_kind(tok: Tokenizer) -> str:
    """Which of :data:`KINDS` a tokenizer is (recognised from its decoder), else its model type."""
    spec = json.loads(tok.to_str())
    decoder = (spec.get("decoder") or {}).get("type")
    by_decoder = {"ByteLevel": "bpe", "Fuse": "char", "WordPiece": "wordpiece", "Metaspace": "unigram"}
    return by_decoder.get(decoder, str(spec["model"]["type"]).lower())


def tokenizer_hash(tok: Tokenizer | "Tok") -> str:
    """First 16 hex digits of the sha256 of the tokenizer's canonical JSON (sorted keys, no spaces)."""
    tok = tok.tok if isinstance(tok, Tok) else tok
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def save_tokenizer(tok: Tokenizer | "Tok", out_dir: str | Path) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``out_dir``.

    The folder loads with ``transformers.AutoTokenizer.from_pretrained(out_dir)`` with the pad, bos,
    eos, unk, cls, sep and mask tokens set (and sentinels as additional special tokens).
    """
    tok = tok.tok if isinstance(tok, Tok) else tok
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    specials = {f"{name}_token": s for name, s in SPECIAL_NAMES.items() if s in vocab}
    sentinels = sorted((t for t in vocab if t.startswith("<extra_id_")), key=vocab.__getitem__)
    if sentinels:
        specials["additional_special_tokens"] = sentinels
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,  # decode must give back the text exactly
        "model_max_length": 1_000_000_000,  # the model's context, not the tokenizer, sets the limit
        **specials,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def load_tokenizer(path: str | Path) -> "Tok":
    """Load a tokenizer from ``tokenizer.json``, a folder holding one, or a prepared data folder
    (which keeps its tokenizer in ``tokenizer/``)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "tokenizer.json", path / "tokenizer" / "tokenizer.json"]
        file = next((c for c in candidates if c.is_file()), None)
        if file is None:
            raise DataError(f"tokenizer '{path}': folder has no tokenizer.json")
    elif path.is_file():
        file = path
    else:
        raise DataError(f"tokenizer '{path}': no such file or folder")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception with a multi-line message
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"tokenizer '{file}': not a valid tokenizers JSON file ({first_line})") from None
    return Tok(tok)


class Tok:
    """A thin wrapper over a ``tokenizers.Tokenizer`` (at ``.tok``) with plain ``encode``/``decode``
    and the special-token ids as attributes (``None`` when the tokenizer lacks that token)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.kind = tokenizer_kind(tok)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            tok.token_to_id(s) for s in SPECIAL_TOKENS)
        vocab = tok.get_vocab(with_added_tokens=True)
        self.sentinel_ids = sorted(i for t, i in vocab.items() if t.startswith("<extra_id_"))

    @classmethod
    def train(cls, texts: Iterable[str], kind: str, vocab_size: int, sentinels: int = 0) -> "Tok":
        return cls(train_tokenizer(texts, kind, vocab_size, sentinels))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<mask>``) map to their ids."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    @property
    def special_ids(self) -> dict[str, int | None]:
        """``{"pad": 0, "bos": 1, ...}``"""
        return {name: self.tok.token_to_id(s) for name, s in SPECIAL_NAMES.items()}

    @property
    def hash(self) -> str:
        return tokenizer_hash(self.tok)

    def save(self, out_dir: str | Path) -> Path:
        return save_tokenizer(self.tok, out_dir)

    def __repr__(self) -> str:
        return f"Tok(kind={self.kind!r}, vocab_size={self.vocab_size})"
