"""Train, save and load tokenizers (Hugging Face `tokenizers`).

Four kinds, all sharing the same special tokens at the same ids so that every objective can rely on
them: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, ``<cls>``=4, ``<sep>``=5, ``<mask>``=6,
optionally followed by T5-style sentinels ``<extra_id_0>``, ``<extra_id_1>``, ...

- ``bpe``: byte-level BPE (GPT-2 style); any string encodes without ``<unk>`` and decodes back exactly.
- ``wordpiece``: BERT-style WordPiece (cased), ``##`` continuation prefix.
- ``unigram``: SentencePiece-style Unigram with the ``▁`` metaspace.
- ``char``: one token per distinct character of the training text; decodes back exactly; characters
  never seen in training become ``<unk>``. The vocabulary size is whatever the text needs.

Encoding never adds special tokens by itself: the data pipeline puts the end-of-text token between
documents and each objective adds what it needs.

Any other tokenizer (GPT-2's, Llama's, BERT's) is read by role, not by literal name: :class:`Tok`
knows which of its tokens ends a text (``eos``), begins one (``bos``), pads (``pad``), stands for
unknown text (``unk``), is masked (``mask``) and opens / separates inputs (``cls``, ``sep``).
Every caller asks :meth:`Tok.role_id` (or :meth:`Tok.need`, which fails with a one-line error
naming the option that supplies the token); see :func:`find_roles` for how the roles are found.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from pretrainer.errors import DataError, writing_folder

PAD, BOS, EOS, UNK, CLS, SEP, MASK = "<pad>", "<bos>", "<eos>", "<unk>", "<cls>", "<sep>", "<mask>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, CLS, SEP, MASK]  # ids 0..6 in every tokenizer we train
KINDS = ("bpe", "wordpiece", "unigram", "char")

# short names of the special tokens (transformers' "pad_token", ... and the manifest's "special_ids")
SPECIAL_NAMES = {"pad": PAD, "bos": BOS, "eos": EOS, "unk": UNK, "cls": CLS, "sep": SEP, "mask": MASK}

#: The roles a special token can play, in the order of the manifest's ``special_ids``.
ROLES = tuple(SPECIAL_NAMES)
ROLE_WORDS = {"pad": "padding", "bos": "beginning-of-text", "eos": "end-of-text", "unk": "unknown",
              "cls": "classification (cls)", "sep": "separator (sep)", "mask": "mask"}

#: Spellings recognised among the added special tokens of a bare ``tokenizer.json`` (one with no
#: Hugging Face special-token map), best first: ours, then Llama / T5 / RoBERTa, GPT-2, BERT.
#: GPT-2's ``<|endoftext|>`` begins, ends and stands for unknown text, as in GPT-2 itself; BERT's
#: ``[SEP]`` ends a text when nothing else does (it closes every BERT input).
KNOWN_SPELLINGS = {
    "pad": (PAD, "[PAD]", "<|pad|>", "<|padding|>"),
    "bos": (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>"),
    "eos": (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>", "[SEP]"),
    "unk": (UNK, "[UNK]", "<|endoftext|>"),
    "cls": (CLS, "[CLS]", "<s>"),
    "sep": (SEP, "[SEP]", "</s>"),
    "mask": (MASK, "[MASK]"),
}
HF_MAP_FILES = ("tokenizer_config.json", "special_tokens_map.json")
#: Roles the command line can name a token for (``--eos-token TEXT``; ``load_tokenizer(overrides=)``
#: takes every role).
OPTION_ROLES = ("eos", "pad", "mask")


def sentinel_tokens(n: int) -> list[str]:
    """T5-style sentinel tokens ``<extra_id_0>`` .. ``<extra_id_{n-1}>``."""
    return [f"<extra_id_{i}>" for i in range(n)]


#: How much text the learned kinds train on by default: a uniform sample of the corpus's documents
#: of about this many bytes (as SentencePiece's ``input_sentence_size`` caps its input). Unigram
#: training costs far more per byte than BPE's or WordPiece's counting of pairs; its budget keeps
#: it to a couple of minutes on two cores. ``char`` always reads everything (a character it never
#: saw would be unknown).
DEFAULT_SAMPLE_MB = {"bpe": 64.0, "wordpiece": 64.0, "unigram": 5.0}


def sample_texts(texts: Iterable[str], max_bytes: int | None, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> tuple[list[str], dict]:
    """A uniform random sample of the documents of ``texts`` holding about ``max_bytes`` of UTF-8
    (reservoir sampling: the stream is read once and any length is fine; ``None`` keeps all), and
    counts of what was read and kept. ``progress`` receives a line every few seconds."""
    import random
    import time

    rng = random.Random(seed)
    kept: list[str] = []
    kept_bytes = seen = seen_bytes = 0
    k = None  # reservoir size, fixed once the budget is first reached
    last = time.monotonic()
    for text in texts:
        size = len(text.encode("utf-8"))
        seen += 1
        seen_bytes += size
        if k is None:
            kept.append(text)
            kept_bytes += size
            if max_bytes is not None and kept_bytes >= max_bytes:
                k = len(kept)
        else:
            j = rng.randrange(seen)
            if j < k:
                kept_bytes += size - len(kept[j].encode("utf-8"))
                kept[j] = text
        if progress is not None and time.monotonic() - last > 5:
            last = time.monotonic()
            progress(f"read {seen:,} documents, {seen_bytes / 1e6:,.1f} MB")
    return kept, {"documents": seen, "bytes": seen_bytes, "sampled_documents": len(kept), "sampled_bytes": kept_bytes}


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, sentinels: int = 0,
                    sample_mb: float | None = None, progress: Callable[[str], None] | None = None) -> Tokenizer:
    """Train a tokenizer of the given kind on an iterable of texts (streamed, read once).

    ``vocab_size`` counts the special tokens and sentinels; it is ignored for ``char``. The learned
    kinds train on a uniform sample of the documents of about ``sample_mb`` MB (default:
    :data:`DEFAULT_SAMPLE_MB`; 0 = everything). ``progress`` receives lines while reading and,
    every 10 seconds, while training.
    """
    specials = SPECIAL_TOKENS + sentinel_tokens(sentinels)
    if kind == "char":
        return _train_char(texts, specials)
    if kind not in KINDS:
        raise DataError(f"tokenizer kind '{kind}': expected one of {', '.join(KINDS)}")
    if vocab_size <= len(specials):
        raise DataError(f"tokenizer vocab_size {vocab_size}: expected more than the {len(specials)} special tokens")
    if sample_mb is not None and not sample_mb >= 0:
        raise DataError(f"tokenizer sample {sample_mb} MB: expected a size >= 0 (0 = the whole corpus)")
    mb = DEFAULT_SAMPLE_MB[kind] if sample_mb is None else sample_mb
    texts, read = sample_texts(texts, int(mb * 1e6) if mb else None, progress=progress)
    if progress is not None:
        share = (f"a sample of {read['sampled_documents']:,} documents ({read['sampled_bytes'] / 1e6:,.1f} MB)"
                 if read["sampled_documents"] < read["documents"] else "all of it")
        progress(f"read {read['documents']:,} documents ({read['bytes'] / 1e6:,.1f} MB); training {kind} "
                 f"on {share}")

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
    with _heartbeat(progress, f"training {kind}"):
        tok.train_from_iterator(texts, trainer=trainer)
    _check_special_ids(tok, specials, "trained tokenizer")
    return tok


@contextmanager
def _heartbeat(progress: Callable[[str], None] | None, what: str, every: float = 10.0):
    """Call ``progress`` every ``every`` seconds while the block runs (training runs in Rust, which
    leaves the interpreter free for this thread)."""
    import threading
    import time

    if progress is None:
        yield
        return
    done = threading.Event()
    started = time.monotonic()

    def beat():
        while not done.wait(every):
            progress(f"{what}: {time.monotonic() - started:,.0f} s")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


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


def tokenizer_hash(tok: Tokenizer | "Tok", post_processor: bool = False) -> str:
    """First 16 hex digits of the sha256 of the tokenizer's canonical JSON (sorted keys, no spaces).

    The post-processor (the special tokens ``AutoTokenizer(text)`` adds around a text) counts only
    with ``post_processor=True``: pretrainer never applies it, so a tokenizer exported with the
    model's input layout (:mod:`pretrainer.interop.hf_tokenizer`) has the hash of the one it was
    trained as. Ours have none, so their hash is the same either way."""
    tok = tok.tok if isinstance(tok, Tok) else tok
    spec = json.loads(tok.to_str())
    if not post_processor:
        spec["post_processor"] = None
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def save_tokenizer(tok: Tokenizer | "Tok", out_dir: str | Path) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``out_dir``.

    The folder loads with ``transformers.AutoTokenizer.from_pretrained(out_dir)`` with the tokens of
    every role the tokenizer has (pad, bos, eos, unk, cls, sep, mask; overrides included) set, and
    sentinels as additional special tokens. A tokenizer loaded from a Hugging Face folder keeps the
    other fields of its ``tokenizer_config.json`` (its class, casing, ...).
    """
    tok = tok if isinstance(tok, Tok) else Tok(tok)
    out_dir = Path(out_dir)
    with writing_folder(out_dir, "write the tokenizer"):  # a full disk: one line, nothing half-written
        out_dir.mkdir(parents=True, exist_ok=True)
        tok.tok.save(str(out_dir / "tokenizer.json"))
        kept = {k: v for k, v in tok.config.items() if not (k.endswith("_token") and k[:-6] in ROLES)}
        config = tokenizer_config(tok, kept)
        for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_tokens_map(tok))):
            (out_dir / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def special_tokens_map(tok: "Tok") -> dict:
    """``{"pad_token": "<pad>", ...}`` for every role ``tok`` has a token for, and its sentinels as
    ``additional_special_tokens`` (``special_tokens_map.json``)."""
    specials = {f"{role}_token": tok.role_token(role) for role in ROLES if tok.role_id(role) is not None}
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    sentinels = sorted((t for t in vocab if t.startswith("<extra_id_")), key=vocab.__getitem__)
    if sentinels:
        specials["additional_special_tokens"] = sentinels
    return specials


def tokenizer_config(tok: "Tok", fields: dict | None = None) -> dict:
    """The ``tokenizer_config.json`` of ``tok``: the generic fast class reading ``tokenizer.json``
    as it is, decoding with no clean-up (the text comes back exactly), ``fields`` over those, and
    the tokens by role (:func:`special_tokens_map`) over everything. With no ``fields`` the length
    limit is unset (1e9): the model's context, not the tokenizer, sets it; an exported model's
    tokenizer gives its window (:func:`pretrainer.interop.hf_tokenizer.export_tokenizer_config`)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,  # decode must give back the text exactly
        "model_max_length": 1_000_000_000,
        **(fields or {}),
        **special_tokens_map(tok),
    }


def load_tokenizer(path: str | Path, overrides: dict[str, str | None] | None = None) -> "Tok":
    """Load a tokenizer from ``tokenizer.json``, a folder holding one, or a prepared data folder
    (which keeps its tokenizer in ``tokenizer/``), with its special tokens read by role (see
    :func:`find_roles`). ``overrides`` maps a role to the token that plays it (``{"eos": "</s>"}``,
    the ``--eos-token`` option), replacing what the tokenizer's own files say."""
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
    config = {}
    for name in reversed(HF_MAP_FILES):  # tokenizer_config.json wins over special_tokens_map.json
        if (file.parent / name).is_file():
            config.update(_read_json(file.parent / name))
    return Tok(tok, find_roles(tok, config, str(file.parent)), source=str(path),
               config=config).with_roles(overrides)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def find_roles(tok: Tokenizer, config: dict | None = None, where: str = "tokenizer") -> dict[str, int | None]:
    """``{role: id or None}`` for every role of :data:`ROLES`.

    - A Hugging Face folder names its special tokens in ``tokenizer_config.json`` /
      ``special_tokens_map.json`` (``"eos_token": "</s>"``, or ``{"content": "</s>", ...}``); that
      map is ``config``, and when it names any role it is the whole truth: GPT-2's gives bos = eos =
      unk = ``<|endoftext|>`` and no pad, Llama's bos ``<s>``, eos ``</s>``, unk ``<unk>``, BERT's
      cls, sep, mask, pad and unk. The one addition: a map with a ``sep_token`` and no ``eos_token``
      (BERT) ends texts with its sep token.
    - Otherwise (a bare ``tokenizer.json``, and every tokenizer pretrainer trains, whose reserved
      ``<pad> <bos> <eos> ...`` are found this way) the added special tokens are matched against
      :data:`KNOWN_SPELLINGS`.
    """
    named = {}
    for role in ROLES:
        value = (config or {}).get(f"{role}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if value is None:
            continue
        if not isinstance(value, str) or tok.token_to_id(value) is None:
            raise DataError(f"tokenizer '{where}': {role}_token {value!r} (tokenizer_config.json / "
                            f"special_tokens_map.json) is not a token of its tokenizer.json "
                            f"(expected one of its tokens, or null)")
        named[role] = tok.token_to_id(value)
    if named:
        roles = {role: named.get(role) for role in ROLES}
        if roles["eos"] is None:
            roles["eos"] = roles["sep"]
        return roles
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return {role: next((specials[s] for s in KNOWN_SPELLINGS[role] if s in specials), None) for role in ROLES}


def padding_id(roles: dict[str, int | None]) -> int | None:
    """The id to pad with, given ``{role: id}`` (a :attr:`Tok.roles` or a manifest's
    ``special_ids``): the pad token, else the end-of-text token (GPT-2 and Llama have no pad)."""
    return roles.get("pad") if roles.get("pad") is not None else roles.get("eos")


def _template_start(post: dict | None) -> str | None:
    """The special token a ``TemplateProcessing`` post-processor (alone or in a ``Sequence``) puts
    first in a single text, or ``None``."""
    for proc in (post or {}).get("processors", [post]) if post else []:
        if proc and proc.get("type") == "TemplateProcessing" and proc.get("single"):
            first = proc["single"][0]
            return first["SpecialToken"]["id"] if "SpecialToken" in first else None
    return None


class Tok:
    """A thin wrapper over a ``tokenizers.Tokenizer`` (at ``.tok``) with plain ``encode``/``decode``
    and its special tokens by role.

    The role API every caller uses: :attr:`roles` (``{"pad": id, "bos": id, "eos": id, "unk": id,
    "cls": id, "sep": id, "mask": id}``, ``None`` where the tokenizer has no such token),
    :meth:`role_id` (one role), :meth:`role_token` (its text) and :meth:`need` (the id, or a
    one-line error naming the ``--ROLE-token`` option that supplies it). :meth:`with_roles` sets
    roles by token text (the ``--eos-token`` options); :func:`save_tokenizer` writes them into
    ``tokenizer_config.json``, so they travel with the tokenizer.

    The attributes ``pad_id``, ``bos_id``, ``eos_id``, ``unk_id``, ``cls_id``, ``sep_id`` and
    ``mask_id`` are shorthands for ``role_id``, except ``pad_id``, which is for padding only: a
    tokenizer without a pad token (GPT-2, Llama) pads with its end-of-text token there, as padded
    positions are masked out and never read (``role_id("pad")`` says whether a pad token exists).
    """

    def __init__(self, tok: Tokenizer, roles: dict[str, int | None] | None = None,
                 source: str | None = None, config: dict | None = None):
        self.tok = tok
        self.kind = tokenizer_kind(tok)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.source = source  # where it was loaded from, for messages
        self.config = dict(config or {})  # the folder's Hugging Face tokenizer config, kept on save
        found = find_roles(tok) if roles is None else roles
        self.roles = {role: found.get(role) for role in ROLES}
        vocab = tok.get_vocab(with_added_tokens=True)
        self.sentinel_ids = sorted(i for t, i in vocab.items() if t.startswith("<extra_id_"))

    @classmethod
    def train(cls, texts: Iterable[str], kind: str, vocab_size: int, sentinels: int = 0, **kw) -> "Tok":
        return cls(train_tokenizer(texts, kind, vocab_size, sentinels, **kw))

    # --- roles -------------------------------------------------------------------------------

    def role_id(self, role: str) -> int | None:
        """The id of the token playing ``role`` (one of :data:`ROLES`), or ``None``."""
        if role not in self.roles:
            raise KeyError(f"unknown token role {role!r}; expected one of {', '.join(ROLES)}")
        return self.roles[role]

    def role_token(self, role: str) -> str | None:
        """The text of the token playing ``role``, or ``None``."""
        i = self.role_id(role)
        return None if i is None else self.tok.id_to_token(i)

    def need(self, role: str, purpose: str) -> int:
        """The id of ``role``'s token; a :class:`DataError` naming ``--ROLE-token`` when there is none
        (``purpose`` says what it is needed for: "to separate documents")."""
        i = self.role_id(role)
        if i is None:
            fix = (f"; name one of its tokens with --{role}-token TEXT" if role in OPTION_ROLES else
                   f" (its tokenizer_config.json names no {role}_token)")
            raise DataError(f"tokenizer '{self.source or self.kind}': no {ROLE_WORDS[role]} token, "
                            f"needed {purpose}{fix}")
        return i

    def with_roles(self, overrides: dict[str, str | None] | None) -> "Tok":
        """This tokenizer with the roles in ``overrides`` (``{"eos": "</s>"}``) played by those
        tokens, which must be in the vocabulary; ``None`` values are ignored. Returns ``self``."""
        for role, text in (overrides or {}).items():
            if text is None:
                continue
            if role not in ROLES:
                raise DataError(f"token role '{role}': expected one of {', '.join(ROLES)}")
            i = self.tok.token_to_id(text)
            if i is None:
                raise DataError(f"--{role}-token {text!r}: not a token of tokenizer "
                                f"'{self.source or self.kind}' (expected one of its tokens, e.g. a special token)")
            self.roles[role] = i
        return self

    @property
    def special_ids(self) -> dict[str, int | None]:
        """``{"pad": 0, "bos": 1, ...}``: :attr:`roles` (the manifest's ``special_ids``)."""
        return dict(self.roles)

    @property
    def pad_id(self) -> int | None:
        """The id to pad with: the pad token, else the end-of-text token (see :func:`padding_id`)."""
        return padding_id(self.roles)

    bos_id = property(lambda self: self.roles["bos"], doc="``role_id('bos')``")
    eos_id = property(lambda self: self.roles["eos"], doc="``role_id('eos')``")
    unk_id = property(lambda self: self.roles["unk"], doc="``role_id('unk')``")
    cls_id = property(lambda self: self.roles["cls"], doc="``role_id('cls')``")
    sep_id = property(lambda self: self.roles["sep"], doc="``role_id('sep')``")
    mask_id = property(lambda self: self.roles["mask"], doc="``role_id('mask')``")

    @property
    def document_prefix(self) -> list[int]:
        """What a document starts with in a token stream: ``[bos]`` for a tokenizer whose own
        post-processor puts its beginning-of-text token before every text (Llama's ``<s> $A``),
        else nothing, and then documents are told apart by the ``<eos>`` that ends each (our own
        tokenizers, GPT-2's). Data preparation and every prompt (``generate``, ``icl``) follow it,
        so a model imported from Hugging Face reads text laid out as it was pretrained."""
        if not hasattr(self, "_document_prefix"):
            bos = self.roles.get("bos")
            first = _template_start(json.loads(self.tok.to_str()).get("post_processor"))
            starts = bos is not None and bos != self.roles.get("eos") and first == self.tok.id_to_token(bos)
            self._document_prefix = [bos] if starts else []  # (bos = eos: GPT-2's separator, not a start)
        return list(self._document_prefix)

    # --- text --------------------------------------------------------------------------------

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
    def hash(self) -> str:
        """:func:`tokenizer_hash`: what a data folder's manifest records."""
        return tokenizer_hash(self.tok)

    def has_hash(self, recorded: str) -> bool:
        """Whether a manifest's ``recorded`` hash is this tokenizer's: :attr:`hash`, or the hash
        with the post-processor counted, which manifests written before it was left out hold."""
        return recorded in (self.hash, tokenizer_hash(self.tok, post_processor=True))

    def save(self, out_dir: str | Path) -> Path:
        return save_tokenizer(self, out_dir)

    def __repr__(self) -> str:
        return f"Tok(kind={self.kind!r}, vocab_size={self.vocab_size})"
