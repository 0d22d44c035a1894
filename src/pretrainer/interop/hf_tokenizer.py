"""The tokenizer files of an exported Hugging Face model folder.

They are written so that ``transformers.AutoTokenizer.from_pretrained(folder)(text)`` gives the ids
pretrainer itself feeds the model. Pretrainer encodes text with no special tokens and lays them
out per architecture; the exported ``tokenizer.json`` carries that layout as its post-processor:

- encoder: ``<cls> A <sep>`` and ``<cls> A <sep> B <sep>``, token types 0 for ``<cls> A <sep>`` and 1
  for ``B <sep>`` (0 throughout when the model has no segment embeddings), as fine-tuning lays out
  one text and a pair (:class:`pretrainer.finetune.heads.InputFormat`) and MLM / NSP pretraining saw
  them;
- decoder: ``<eos> A``: a prompt starts a new document, after the end-of-text separator the model
  saw between documents in training, as ``generate`` and ``icl`` feed it
  (:func:`pretrainer.eval.scoring.encode_context`); a pair ``<eos> A B`` is a context and its
  continuation (:func:`~pretrainer.eval.scoring.encode_pair`);
- encoder-decoder: ``A <eos>``, the encoder input of span corruption, denoising, ``text2text`` and
  ``generate``; ``tok(text_target=B)`` gives the decoder's target ``B <eos>``; a pair is
  ``A <eos> B <eos>`` (T5's; pretrainer has no pair input for these models).

``tokenizer_config.json`` (:func:`export_tokenizer_config`) carries a decoder's chat template
(:mod:`pretrainer.chat`; ``apply_chat_template`` adds no special tokens of its own), names the tokens by role, sets
``model_max_length`` to the model's window, pads decoders on the left (batched generation) and the
others on the right, and returns ``token_type_ids`` only to an encoder with segment embeddings (GPT-2
would add them to its input as token embeddings; T5, BART, Llama and DistilBERT take none).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, processors

from ..config import ModelConfig
from ..errors import DataError, PretrainerError
from ..tokenization import Tok, load_tokenizer, special_tokens_map, tokenizer_config

#: Special-token ids given to ``config.json`` from the tokenizer's roles.
ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
#: Post-processors that only add special tokens: replaced by the model's layout. Others (GPT-2's
#: ``ByteLevel`` offset trimming) are kept and run before it; RoBERTa's keeps its trimming.
_REPLACED = ("TemplateProcessing", "BertProcessing")


def input_layout(tok: Tok, cfg: ModelConfig) -> tuple[list, list]:
    """``(single, pair)``: the pieces of one input and of a pair, in order: a special token's id or
    the text ``"A"`` / ``"B"``, each with its token type."""
    if cfg.arch == "encoder":
        from ..finetune.heads import InputFormat

        fmt = InputFormat.for_backbone(cfg.arch, tok, cfg.type_vocab_size)
        b = 1 if fmt.type_ids else 0
        return ([(fmt.start_id, 0), ("A", 0), (fmt.end_id, 0)],
                [(fmt.start_id, 0), ("A", 0), (fmt.sep_id, 0), ("B", b), (fmt.end_id, b)])
    if cfg.arch == "decoder":
        from ..eval.scoring import prefix_ids

        single = [(i, 0) for i in prefix_ids(tok)] + [("A", 0)]
        return single, single + [("B", 0)]
    eos = tok.need("eos", "to end an encoder-decoder's inputs")
    return [("A", 0), (eos, 0)], [("A", 0), (eos, 0), ("B", 0), (eos, 0)]


def with_layout(tok: Tok, cfg: ModelConfig) -> Tokenizer:
    """A copy of ``tok``'s tokenizer whose post-processor adds the special tokens of
    :func:`input_layout` (when it adds special tokens, as ``AutoTokenizer`` does by default)."""
    single, pair = input_layout(tok, cfg)

    def template(pieces):
        return [f"${p}:{t}" if isinstance(p, str) else f"{tok.id_to_token(p)}:{t}" for p, t in pieces]

    specials = sorted({(tok.id_to_token(p), p) for p, _ in single + pair if not isinstance(p, str)})
    out = Tokenizer.from_str(tok.tok.to_str())
    out.post_processor = processors.TemplateProcessing(single=template(single), pair=template(pair),
                                                       special_tokens=specials)
    old = json.loads(tok.tok.to_str()).get("post_processor")
    members = old.get("processors", []) if old and old["type"] == "Sequence" else [old] if old else []
    kept = [_offsets_only(p) for p in members if p["type"] not in _REPLACED]
    if kept:
        spec = json.loads(out.to_str())
        spec["post_processor"] = {"type": "Sequence", "processors": [*kept, spec["post_processor"]]}
        out = Tokenizer.from_str(json.dumps(spec))
    return out


def _offsets_only(p: dict) -> dict:
    """RoBERTa's processor adds ``<s> ... </s>`` and trims the offsets of byte-level tokens; its
    trimming is kept as the ``ByteLevel`` processor that does only that."""
    if p["type"] != "RobertaProcessing":
        return p
    return {"type": "ByteLevel", "add_prefix_space": p.get("add_prefix_space", True),
            "trim_offsets": p.get("trim_offsets", True), "use_regex": True}


def export_tokenizer_config(tok: Tok, cfg: ModelConfig) -> dict:
    """The ``tokenizer_config.json`` of an exported model: the tokens by role, the model's window
    as ``model_max_length``, the padding side and the inputs the model takes. Fields of the source
    folder's own config are not carried over (an ``add_bos_token`` or a class of its own would make
    ``transformers`` rebuild the layout), except its chat template; a decoder without one gets the
    template ``pretrainer chat`` uses for it (:func:`pretrainer.chat.default_chat_template`), so
    ``apply_chat_template`` gives the ids pretrainer feeds the model."""
    takes_types = cfg.arch == "encoder" and cfg.type_vocab_size > 0
    fields = {
        "model_max_length": int(cfg.max_seq_len),
        "padding_side": "left" if cfg.arch == "decoder" else "right",
        "truncation_side": "right",
        "model_input_names": ["input_ids", *(["token_type_ids"] if takes_types else []), "attention_mask"],
    }
    if "chat_template" in tok.config:
        fields["chat_template"] = tok.config["chat_template"]
    elif cfg.arch == "decoder":  # the one pretrainer chat / generate --chat use for this tokenizer
        from ..chat import default_chat_template

        fields["chat_template"] = default_chat_template(tok)
    return tokenizer_config(tok, fields)


def export_files(folder: str | Path, cfg: ModelConfig) -> tuple[dict[str, str], dict]:
    """``({file name: text}, ids)``: the tokenizer files to write beside a model of ``cfg`` for
    the tokenizer in ``folder`` (a folder written by :func:`pretrainer.tokenization.save_tokenizer`
    or any Hugging Face tokenizer folder), and the ids of its pad, bos and eos tokens by role for
    ``config.json`` (``None`` for a role it lacks; ``forced_eos_token_id`` too when it has an eos).
    The tokenizer's vocabulary must fit the model's."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise PretrainerError(f"{path}: missing; expected a tokenizer folder (tokenizer.json)")
    tok = load_tokenizer(folder)
    if tok.vocab_size > cfg.vocab_size:
        raise PretrainerError(f"{path}: {tok.vocab_size} tokens do not fit the model's vocab_size={cfg.vocab_size}")
    from ..eval.scoring import prefix_ids

    if cfg.arch == "decoder":  # a text starts with what our prompts start with ("<eos>" for ours, as
        start = prefix_ids(tok)  # GPT-2's <|endoftext|>), so that add_bos_token and generation from
        if start and start[0] != tok.role_id("bos"):  # nothing (bos_token_id) agree with pretrainer
            tok.with_roles({"bos": tok.id_to_token(start[0])})
    ids = {key: tok.role_id(key.removesuffix("_token_id")) for key in ID_FIELDS}
    if tok.role_id("eos") is not None:
        ids["forced_eos_token_id"] = tok.role_id("eos")  # BART's; dropped for the other families
    try:
        backend = with_layout(tok, cfg)
    except DataError as e:  # no cls/sep for an encoder: pretrainer could not lay its inputs out either
        print(f"warning: {e}; the exported tokenizer adds no special tokens", file=sys.stderr, flush=True)
        backend = tok.tok
    config = export_tokenizer_config(tok, cfg)
    files = {"tokenizer.json": backend.to_str(pretty=True),
             "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
             "special_tokens_map.json": json.dumps(special_tokens_map(tok), indent=2, ensure_ascii=False) + "\n"}
    return files, ids
