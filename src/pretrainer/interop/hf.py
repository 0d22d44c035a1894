"""Hugging Face interop: export a model as a ``transformers`` folder and import one back.

These families have an exact Hugging Face counterpart:

- GPT-2 (``GPT2LMHeadModel``): learned positions, pre-norm LayerNorm, a plain GELU/ReLU MLP and
  biases everywhere. GPT-2 stores its projections as ``Conv1D`` weights [in, out]; ours are
  ``nn.Linear`` weights [out, in], so those matrices are transposed.
- GPT-Neo (``GPTNeoForCausalLM``): GPT-2's layout with GPT-3's alternating global and local
  (banded) attention layers (``attention_layers``, ``attention_window``), unscaled attention
  scores and no biases on the query, key and value projections, which are ``nn.Linear`` matrices
  ``q_proj``, ``k_proj`` and ``v_proj`` (joined into our fused [q; k; v] on import). With learned
  positions, ``attn_scale=false`` is what tells it from GPT-2 (whose scores are always scaled).
- Llama (``LlamaForCausalLM``; Mistral configs import too): rotary positions, pre-norm RMSNorm and a
  gated MLP (SwiGLU, or GeGLU as ``hidden_act="gelu"``), with grouped-query attention through
  ``num_key_value_heads`` and heads of ``head_dim`` (our ``d_head``). Our rotary layout is Llama's
  (``rotate_half``), so query and key rows need no permutation; our fused [q; k; v] and [gate; up]
  matrices are split into Llama's separate projections and joined back on import.
- Qwen2 (``Qwen2ForCausalLM``): Llama with biases on the query, key and value projections only (our
  ``bias=false, qkv_bias=true``). Sliding-window layers (``use_sliding_window``) are exact for every
  sequence inside the window, so the import caps ``max_seq_len`` at it (as for Mistral).
- Gemma (``GemmaForCausalLM``): Llama's layout with the token embeddings times sqrt(hidden_size)
  (our ``embed_scale``), a GeGLU MLP with the tanh GELU (``hidden_act`` gelu or gelu_pytorch_tanh),
  heads of ``head_dim``, tied embeddings, no biases, and RMSNorms that scale by ``1 + weight``: ours
  scale by ``weight``, so the name table adds one on import and takes it off on export.
- GPT-NeoX (``GPTNeoXForCausalLM``; Pythia): rotary positions on the first ``rotary_pct`` of each
  head's dimensions (our ``rope_fraction``), pre-norm LayerNorm, a plain GELU MLP, biases everywhere,
  and the parallel block with a norm per branch (``use_parallel_residual``; the serial block when
  false). GPT-NeoX's fused ``query_key_value`` holds q, k and v of each head in turn (rows
  [heads, 3, head_dim]); ours holds all queries, then all keys, then all values, so the rows are
  reordered each way. The output matrix is ``embed_out`` (``lm_head`` in newer files: both import).
- BERT (``BertForMaskedLM``; ``BertModel`` weights for the backbone): an encoder with learned
  positions, segment embeddings, a LayerNorm on the embeddings, post-norm blocks and BERT's MLM
  head. Our fused [q; k; v] matrix is split into BERT's query, key and value. Our pooler is
  exported as ``bert.pooler`` (``BertForMaskedLM`` ignores it, ``BertModel`` loads it); a folder
  without one imports as a model without a pooler. With ``model.nsp_head`` the model is
  ``BertForPreTraining`` (what bert-base-uncased ships): BERT's MLM head plus the next-sentence
  head ``cls.seq_relationship`` on the pooled state; a folder holding that head imports with it.
- ALBERT (``AlbertForMaskedLM``; ``AlbertModel`` loads the backbone with its pooler): BERT's layout
  with factorised embeddings (``d_embed``: ``embedding_size``, projected up by
  ``embedding_hidden_mapping_in``) and one layer shared by all (``share_layers=all``: one hidden
  group of one inner layer, ``albert_layer_groups.0.albert_layers.0``); the MLM head maps back to
  ``d_embed``. Its pooler is ``albert.pooler`` (a plain Linear). With ``model.nsp_head`` it is
  ``AlbertForPreTraining``: the sentence-order head ``sop_classifier.classifier`` on the pooled state
  (what ``mlm+sop`` trains).
- ELECTRA (``ElectraForPreTraining``; ``ElectraModel`` for the backbone): BERT's layout under
  ``electra.`` with factorised embeddings (``embedding_size``: our ``d_embed``, projected up by
  ``embeddings_project``), no pooler, and the discriminator's replaced-token detection head
  (``model.rtd_head``). An encoder with factorised embeddings and an MLM head is an ELECTRA
  generator (``ElectraForMaskedLM``, whose head's activation is always GELU). A bare
  ``ElectraModel`` folder imports as a discriminator whose detection head is drawn afresh
  (N(0, initializer_range), seed 0; fine-tuning does not use it).
- DistilBERT (``DistilBertForMaskedLM``; ``DistilBertModel`` weights for the backbone): BERT's
  layout without segment embeddings and without a pooler (an encoder with ``type_vocab_size=0``),
  its LayerNorms at eps 1e-12. Our fused [q; k; v] is split into ``q_lin``, ``k_lin``, ``v_lin``.
  A config with ``sinusoidal_pos_embds=true`` (a frozen table) is refused.
- RoBERTa (``RobertaForMaskedLM``; ``RobertaModel`` weights for the backbone): BERT's layout under
  ``roberta.`` with the MLM head as ``lm_head`` (whose activation is always GELU) and positions
  that start after the padding id: token i reads row ``pad_token_id + 1 + i``. Ours reads row
  ``position_offset + i``, so an encoder with ``position_offset`` > 0 is RoBERTa; it imports with
  ``position_offset = pad_token_id + 1`` and every row of the table, and exports with the rows
  shifted to the tokenizer's padding id (rows no input reaches dropped, or zero rows added in
  front). Hugging Face counts positions over the non-padding tokens only; ours count every token,
  which is the same for right-padded inputs.
- T5 (``T5ForConditionalGeneration``, v1.0 and v1.1) and mT5 (``MT5ForConditionalGeneration``, v1.1's
  architecture): relative position bias in the first layer of each stack, RMSNorm pre-norm, no
  biases, ReLU or gated-GELU MLPs (``is_gated_act`` and ``dense_act_fn`` when the file has them,
  which transformers reads over ``feed_forward_proj``). The head is read as transformers 5 reads it:
  every T5 is built tied and is untied when the checkpoint holds an ``lm_head.weight`` that differs
  from ``shared.weight``; T5 multiplies the decoder output by d_model**-0.5 before the head when
  ``scale_decoder_outputs`` (absent, in files written before it existed: when ``tie_word_embeddings``
  is not false), mT5 never. A tied, rescaled head exports as v1.0 (both fields true, no
  ``lm_head.weight``); any other head as ``lm_head.weight`` with both false (a tied, unscaled head as
  a copy of the embedding, which transformers 5 ties back and 4.x reads as an equal untied head).
  An untied head that would be rescaled is refused (pretrainer rescales tied heads only).
- BART (``BartForConditionalGeneration``): learned positions (Hugging Face keeps two unused rows
  in front of each table: exported as zeros, dropped on import), post-norm, a norm on the
  embeddings, token embeddings scaled by sqrt(d_model) with ``scale_embedding`` (our
  ``embed_scale``), and a ``final_logits_bias`` that we export as zeros and import only when it is zero.

A bare backbone (``BertModel``, ``RobertaModel``, ``AlbertModel``, ``DistilBertModel``, ``ElectraModel``)
imports as the family's whole model with the missing head drawn afresh (N(0, initializer_range)
matrices, zero biases, unit norm gains, from seed 0, so the same at every import; the import says
so): fine-tuning, embeddings and the pooler use the backbone only, and the head's logits mean
nothing until pretraining trains it.

Nothing is dropped or guessed, in either direction. The import maps every tensor of the checkpoint
through the family's name table (a second copy of a tensor, such as a tied output matrix or a
stack's copy of the shared embedding, must equal it; buffers that hold no weights are skipped) and
refuses any other, and it reads every field of ``config.json``: each is honoured, checked to have
the one value our model computes with, or known to leave the outputs alone (labels, token ids,
generation defaults, dropouts); any other field is refused by name. The export refuses a model
tensor that the table has no name for.

A configuration without a counterpart (post-norm decoders, sinusoidal or no positions, ...) is refused with
a one-line :class:`~pretrainer.errors.PretrainerError` naming the option. ``transformers`` is not
needed here: folders are written and read with ``json`` and ``safetensors`` only (and
``torch.load(weights_only=True)`` for ``pytorch_model.bin`` checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ModelConfig, MoEConfig
from ..errors import PretrainerError, check_out_folder, writing_folder
from ..model import make_model
from ..model.layers import GATED
from ..train.checkpoint import is_tied_copy

#: Special-token ids of every pretrainer tokenizer (see ``pretrainer.tokenization``).
DEFAULT_SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# our ``model.mlp`` <-> GPT-2's ``activation_function`` / Llama's ``hidden_act``
_GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_GPT2_ACT_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_LLAMA_ACT = {"swiglu": "silu", "geglu": "gelu"}
_LLAMA_ACT_IN = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
_LLAMA_TYPES = ("llama", "mistral")
_GEMMA_ACT = {"geglu_tanh": "gelu_pytorch_tanh", "swiglu": "silu"}
# transformers 5 reads Gemma's hidden_act "gelu" as the tanh approximation (the official files' value)
_GEMMA_ACT_IN = {"gelu_pytorch_tanh": "geglu_tanh", "gelu": "geglu_tanh", "gelu_new": "geglu_tanh",
                 "silu": "swiglu", "swish": "swiglu"}
_NEOX_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_NEOX_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_BERT_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_BERT_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_DISTILBERT_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_DISTILBERT_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

# tensors of old checkpoints that are not weights: GPT-2's, GPT-Neo's and GPT-NeoX's causal-mask
# buffers, rotary tables, BERT's position ids
_IGNORED = re.compile(r"(^|\.)(attn|attention)\.(attention\.)?(bias|masked_bias)$|rotary_emb\.inv_freq$|"
                      r"embeddings\.position_ids$|"
                      # tensors the Hugging Face models also skip: a relative bias no T5 cross-attention
                      # reads, fairseq's version buffers in BART
                      r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$|"
                      r"^model\.(encoder|decoder)\.version$")
#: The output matrix of each family (the names a checkpoint may store it under) and the token
#: embedding a tied head repeats. A tied checkpoint may hold the copy; when it differs from the
#: embedding, transformers 5 leaves the two untied, and so does the import (for the families in
#: ``_UNTIED_OK``; the others are refused).
_OUTPUT = {"gpt2": (("lm_head.weight",), "transformer.wte.weight"),
           "gpt_neo": (("lm_head.weight",), "transformer.wte.weight"),
           "llama": (("lm_head.weight",), "model.embed_tokens.weight"),
           "mixtral": (("lm_head.weight",), "model.embed_tokens.weight"),
           "qwen2": (("lm_head.weight",), "model.embed_tokens.weight"),
           "gemma": (("lm_head.weight",), "model.embed_tokens.weight"),
           "gpt_neox": (("embed_out.weight", "lm_head.weight"), "gpt_neox.embed_in.weight"),
           "bert": (("cls.predictions.decoder.weight",), "bert.embeddings.word_embeddings.weight"),
           "electra": (("generator_lm_head.weight",), "electra.embeddings.word_embeddings.weight"),
           "albert": (("predictions.decoder.weight",), "albert.embeddings.word_embeddings.weight"),
           "distilbert": (("vocab_projector.weight",), "distilbert.embeddings.word_embeddings.weight"),
           "roberta": (("lm_head.decoder.weight",), "roberta.embeddings.word_embeddings.weight"),
           "t5": (("lm_head.weight",), "shared.weight"), "bart": (("lm_head.weight",), "model.shared.weight")}
_UNTIED_OK = ("gpt2", "gpt_neo", "llama", "mixtral", "qwen2", "gemma", "gpt_neox", "t5")
#: Tensors that are always another one (each stack's copy of the shared embedding; the output
#: bias a head repeats): a checkpoint may hold them, equal to their source, or leave them out.
_COPIES = {"t5": {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"},
           "bart": {"model.encoder.embed_tokens.weight": "model.shared.weight",
                    "model.decoder.embed_tokens.weight": "model.shared.weight"},
           "bert": {"cls.predictions.decoder.bias": "cls.predictions.bias"},
           "roberta": {"lm_head.decoder.bias": "lm_head.bias"},
           "albert": {"predictions.decoder.bias": "predictions.bias"}}
_BART_POS_OFFSET = 2  # BartLearnedPositionalEmbedding: positions start at row 2


class _Tensor(NamedTuple):
    """One of our tensors and the Hugging Face tensors it is made of (stacked along dim 0)."""

    ours: str
    hf: tuple[str, ...]
    rows: tuple[int, ...] = ()  # row count of each HF piece when there is more than one
    conv1d: bool = False  # GPT-2 Conv1D weight: stored transposed
    lead_rows: int = 0  # HF rows in front of ours that no input reaches (BART's position offset)
    per_head: int = 0  # heads of a fused qkv whose HF rows are [heads, 3, head_dim] (GPT-NeoX)
    drop_rows: int = 0  # our rows in front that no input reaches and HF has no room for (RoBERTa's positions)
    offset: float = 0.0  # ours = HF + offset (Gemma's RMSNorm scales by 1 + weight, ours by weight)


def _qkv_rows(t: torch.Tensor, heads: int, to_hf: bool) -> torch.Tensor:
    """A fused qkv weight or bias with its rows reordered between our [3, heads, head_dim] (all
    queries, all keys, all values) and GPT-NeoX's [heads, 3, head_dim] (q, k, v of each head)."""
    shape = (3, heads, -1) if to_hf else (heads, 3, -1)
    return t.reshape(*shape, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


# ----------------------------------------------------------------------------------------------
# Which family, and the tensor names of each


def hf_family(cfg: ModelConfig) -> str:
    """The Hugging Face family ``cfg`` converts to exactly (:func:`_family`), after the options
    only some families have: ``embed_scale`` (Gemma; BART's ``scale_embedding``)."""
    family = _family(cfg)
    if cfg.embed_scale and family not in ("gemma", "bart"):
        raise _no_equivalent("embed_scale", True, f"{family} does not scale its token embeddings; of the "
                                                  f"Hugging Face families Gemma and BART (scale_embedding) do")
    return family


def _family(cfg: ModelConfig) -> str:
    """``"gpt2"``, ``"gpt_neo"``, ``"llama"``, ``"qwen2"``, ``"gemma"``, ``"mixtral"``, ``"gpt_neox"``,
    ``"bert"``, ``"roberta"``, ``"albert"``, ``"electra"``, ``"distilbert"``, ``"t5"`` or ``"bart"``: the
    Hugging Face model a configuration converts to exactly.

    A decoder with learned positions is GPT-Neo when its attention scores are unscaled
    (``attn_scale=false``), else GPT-2: GPT-Neo never scales them and GPT-2 always does, so the two
    never overlap. Local layers and unbiased query/key/value projections then belong to GPT-Neo only.

    Raises a one-line PretrainerError naming the first option that has no Hugging Face equivalent.
    """
    if cfg.arch == "encoder" and cfg.share_layers != "none":
        return _albert_family(cfg)  # one block for every layer, with or without d_embed: ALBERT
    if cfg.moe.n_experts and not (cfg.arch == "decoder" and cfg.position == "rope" and cfg.norm == "rmsnorm"):
        raise _no_equivalent("moe.n_experts", cfg.moe.n_experts,
                             "experts convert as Mixtral only: a rope, rmsnorm decoder")
    if cfg.position_offset and cfg.arch != "encoder":
        raise _no_equivalent("position_offset", cfg.position_offset,
                             "of the Hugging Face families only RoBERTa (an encoder) offsets its positions")
    if cfg.arch == "encoder" and (cfg.rtd_head or cfg.embed_dim != cfg.d_model):
        return _electra_family(cfg)
    if cfg.arch == "encoder" and cfg.type_vocab_size == 0:
        return _distilbert_family(cfg)
    if cfg.embed_dim != cfg.d_model:
        raise _no_equivalent("d_embed", cfg.d_embed, "factorised embeddings convert as ALBERT or ELECTRA, "
                                                     "not yet supported")
    if cfg.arch == "encoder":
        return _bert_family(cfg)
    if cfg.arch == "encoder-decoder":
        return _seq2seq_family(cfg)
    if cfg.embed_norm:
        raise _no_equivalent("embed_norm", cfg.embed_norm, "GPT-2, Llama and GPT-NeoX have no embedding norm")
    if cfg.tie_embeddings and cfg.scale_tied_output:
        raise _no_equivalent("scale_tied_output", True, "only T5 scales the hidden states before its tied head")
    if not cfg.prenorm:
        raise _no_equivalent("prenorm", cfg.prenorm, "GPT-2, Llama and GPT-NeoX are pre-norm")
    if cfg.position == "learned":
        if cfg.parallel_block:
            raise _no_equivalent("parallel_block", True, "GPT-2 has serial blocks")
        if cfg.norm != "layernorm":
            raise _no_equivalent("norm", cfg.norm, "GPT-2 (learned positions) uses layernorm")
        if cfg.mlp not in _GPT2_ACT:
            raise _no_equivalent("mlp", cfg.mlp, f"GPT-2 (learned positions) takes {', '.join(_GPT2_ACT)}")
        if not cfg.bias:
            raise _no_equivalent("bias", cfg.bias, "GPT-2 (learned positions) always has biases")
        if cfg.kv_heads != cfg.n_head:
            raise _no_equivalent("n_kv_heads", cfg.n_kv_heads,
                                 "GPT-2 (learned positions) has no grouped-query attention")
        if cfg.head_dim * cfg.n_head != cfg.d_model:
            raise _no_equivalent("d_head", cfg.d_head, "GPT-2's heads split d_model")
        if not cfg.attn_scale:
            if cfg.has_qkv_bias:
                raise _no_equivalent("qkv_bias", cfg.qkv_bias, "GPT-Neo (learned positions, attn_scale=false) "
                                                               "has no query/key/value biases")
            return "gpt_neo"
        if not cfg.has_qkv_bias:
            raise _no_equivalent("qkv_bias", cfg.qkv_bias, "GPT-2 has query/key/value biases; GPT-Neo, "
                                                           "which has none, also has attn_scale=false")
        _global_only(cfg, "GPT-2 has no local layers; GPT-Neo, which has, also has attn_scale=false")
        return "gpt2"
    if cfg.position == "rope":
        if cfg.norm == "layernorm":
            return _neox_family(cfg)
        if cfg.parallel_block:
            raise _no_equivalent("parallel_block", True, "Llama (rope, rmsnorm) has serial blocks")
        if cfg.rope_fraction != 1.0:
            raise _no_equivalent("rope_fraction", cfg.rope_fraction, "Llama (rope, rmsnorm) rotates whole heads")
        if not cfg.attn_scale:
            raise _no_equivalent("attn_scale", cfg.attn_scale, "Llama scales its attention scores")
        _global_only(cfg, "Llama has no local layers")
        if cfg.embed_scale:
            return _gemma_family(cfg)
        if cfg.mlp not in _LLAMA_ACT:
            raise _no_equivalent("mlp", cfg.mlp, f"Llama (rope) takes {', '.join(_LLAMA_ACT)}")
        if cfg.moe.n_experts:
            return _mixtral_family(cfg)
        if cfg.has_qkv_bias and not cfg.bias:
            return "qwen2"  # biases on the query, key and value projections only
        if cfg.has_qkv_bias != cfg.bias:
            raise _no_equivalent("qkv_bias", cfg.qkv_bias, "Llama's attention_bias covers q, k, v and o alike, "
                                                           "Qwen2's q, k and v only")
        return "llama"
    raise _no_equivalent("position", cfg.position, "GPT-2 and GPT-Neo take learned positions, Llama and GPT-NeoX rope")


def _neox_family(cfg: ModelConfig) -> str:
    """GPT-NeoX: rope with layernorm (Llama has rmsnorm), a plain MLP and biases everywhere."""
    if cfg.parallel_block and cfg.parallel_norms != 2:
        raise _no_equivalent("parallel_norms", cfg.parallel_norms,
                             "GPT-NeoX (rope, layernorm) has a norm per branch")
    _require(cfg, "GPT-NeoX (rope, layernorm)", dict(bias=True, attn_scale=True, attention_layers="global"),
             _NEOX_ACT)
    if not cfg.has_qkv_bias:
        raise _no_equivalent("qkv_bias", cfg.qkv_bias, "GPT-NeoX has biases on its query, key and value")
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        raise _no_equivalent("d_head", cfg.d_head, "GPT-NeoX's heads split hidden_size")
    return "gpt_neox"


def _gemma_family(cfg: ModelConfig) -> str:
    """Gemma: Llama's layout with the token embeddings scaled by sqrt(d_model) (``embed_scale``),
    no biases in its MLP and (here) none in its attention, a GeGLU (tanh) or SwiGLU MLP. Its norms
    scale by ``1 + weight``: the name table converts the weights."""
    if cfg.mlp not in _GEMMA_ACT:
        raise _no_equivalent("mlp", cfg.mlp, f"Gemma (embed_scale) takes {', '.join(_GEMMA_ACT)} (its "
                                             f"hidden_act gelu means the tanh approximation)")
    if cfg.bias or cfg.has_qkv_bias:
        raise _no_equivalent("bias", True, "Gemma has no MLP biases, and its attention_bias covers q, k, v "
                                           "and o alike")
    if cfg.moe.n_experts:
        raise _no_equivalent("moe.n_experts", cfg.moe.n_experts, "Gemma has dense MLPs")
    return "gemma"


def _mixtral_family(cfg: ModelConfig) -> str:
    """Mixtral: experts in every layer, two or more per token (its router renormalises the chosen
    experts' probabilities, which for one expert would be a weight of 1, not Switch's p), no biases."""
    m = cfg.moe
    if m.every != 1:
        raise _no_equivalent("moe.every", m.every, "Mixtral has experts in every layer")
    if m.top_k < 2:
        raise _no_equivalent("moe.top_k", m.top_k, "Mixtral weighs one expert by 1, Switch's top-1 by its probability")
    if cfg.bias or cfg.has_qkv_bias:
        raise _no_equivalent("bias" if cfg.bias else "qkv_bias", True, "Mixtral has no biases")
    if cfg.mlp != "swiglu":
        raise _no_equivalent("mlp", cfg.mlp, "Mixtral's experts are SwiGLU")
    return "mixtral"


def _global_only(cfg: ModelConfig, why: str) -> None:
    if any(cfg.layer_kind(i) == "local" for i in range(cfg.n_layer)):
        raise _no_equivalent("attention_layers", cfg.attention_layers, why)


def _require(cfg: ModelConfig, family: str, wanted: dict, mlps: dict) -> None:
    """Refuse the first field that differs from ``wanted``, an MLP not in ``mlps``, or grouped-query
    attention: what an encoder or encoder-decoder family must have to convert exactly."""
    for field, value in wanted.items():
        if getattr(cfg, field) != value:
            raise _no_equivalent(field, getattr(cfg, field), f"{family} has {field}={value}")
    if cfg.has_qkv_bias != cfg.bias:
        raise _no_equivalent("qkv_bias", cfg.qkv_bias, f"{family}'s query/key/value biases are its other biases")
    if cfg.mlp not in mlps:
        raise _no_equivalent("mlp", cfg.mlp, f"{family} takes {', '.join(mlps)}")
    if cfg.kv_heads != cfg.n_head:
        raise _no_equivalent("n_kv_heads", cfg.n_kv_heads, f"{family} has no grouped-query attention")


def _bert_family(cfg: ModelConfig) -> str:
    _require(cfg, "BERT", dict(prenorm=False, position="learned", norm="layernorm", bias=True,
                               embed_norm=True, mlm_head=True, tie_embeddings=True, attn_scale=True),
             _BERT_ACT)
    if cfg.type_vocab_size < 1:
        raise _no_equivalent("type_vocab_size", cfg.type_vocab_size, "BERT has segment embeddings")
    if cfg.position_offset:
        return _roberta_family(cfg)
    return "bert"


def _albert_family(cfg: ModelConfig) -> str:
    """ALBERT: BERT's post-norm encoder, its embeddings projected up from ``embedding_size`` (always:
    ``embedding_hidden_mapping_in`` exists even when the widths are equal) and one shared layer."""
    if cfg.share_layers != "all":
        raise _no_equivalent("share_layers", cfg.share_layers, "ALBERT shares whole layers (all) or none (BERT)")
    if cfg.embed_dim == cfg.d_model:
        raise _no_equivalent("d_embed", cfg.d_embed, "ALBERT always projects its embeddings up to the "
                                                     "hidden size; set d_embed below d_model")
    _require(cfg, "ALBERT", dict(prenorm=False, position="learned", position_offset=0, norm="layernorm", bias=True,
                                 embed_norm=True, mlm_head=True, tie_embeddings=True, attn_scale=True,
                                 parallel_block=False), _BERT_ACT)
    if cfg.type_vocab_size < 1:
        raise _no_equivalent("type_vocab_size", cfg.type_vocab_size, "ALBERT has segment embeddings")
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        raise _no_equivalent("d_head", cfg.d_head, "ALBERT's heads split hidden_size")
    return "albert"


def _electra_family(cfg: ModelConfig) -> str:
    """ELECTRA: BERT's layout, no pooler; the discriminator (``rtd_head``) or a generator (the MLM
    head, whose transform ``ElectraGeneratorPredictions`` always activates with GELU)."""
    _require(cfg, "ELECTRA", dict(prenorm=False, position="learned", position_offset=0, norm="layernorm", bias=True,
                                  embed_norm=True, tie_embeddings=True, attn_scale=True, pooler=False),
             _BERT_ACT)
    if cfg.type_vocab_size < 1:
        raise _no_equivalent("type_vocab_size", cfg.type_vocab_size, "ELECTRA has segment embeddings")
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        raise _no_equivalent("d_head", cfg.d_head, "ELECTRA's heads split hidden_size")
    if not cfg.rtd_head:
        if not cfg.mlm_head:
            raise _no_equivalent("mlm_head", False, "ELECTRA's generator has the MLM transform")
        if cfg.mlp != "gelu":
            raise _no_equivalent("mlp", cfg.mlp, "the MLM head of ELECTRA's generator activates with gelu")
    return "electra"


def _distilbert_family(cfg: ModelConfig) -> str:
    """DistilBERT: BERT's encoder without segment embeddings or a pooler, eps 1e-12 everywhere."""
    _require(cfg, "DistilBERT", dict(prenorm=False, position="learned", position_offset=0, norm="layernorm", bias=True,
                                     embed_norm=True, mlm_head=True, tie_embeddings=True, attn_scale=True,
                                     pooler=False, norm_eps=1e-12), _DISTILBERT_ACT)
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        raise _no_equivalent("d_head", cfg.d_head, "DistilBERT's heads split dim")
    return "distilbert"


def _roberta_family(cfg: ModelConfig) -> str:
    """RoBERTa: BERT with offset positions (an encoder whose position_offset is 0 is BERT)."""
    if cfg.mlp != "gelu":
        raise _no_equivalent("mlp", cfg.mlp, "RoBERTa's MLM head applies GELU whatever its hidden_act, "
                                             "and ours the blocks' activation")
    if cfg.nsp_head:
        raise _no_equivalent("nsp_head", True, "RoBERTa has no next-sentence head; BERT "
                                               "(position_offset=0) has")
    return "roberta"


# our model.mlp <-> T5's feed_forward_proj, and the (is_gated_act, dense_act_fn) that transformers
# derives from it ("gated-gelu" is the tanh approximation, T5 v1.1's) or reads from config.json
_T5_MLP = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "geglu_tanh": "gated-gelu",
           "swiglu": "gated-silu"}
_T5_DENSE_ACT = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "geglu_tanh": "gelu_new", "swiglu": "silu"}
_T5_ACT_IN = {(False, "relu"): "relu", (False, "gelu"): "gelu", (False, "gelu_new"): "gelu_tanh",
              (False, "gelu_pytorch_tanh"): "gelu_tanh", (True, "gelu_new"): "geglu_tanh",
              (True, "gelu_pytorch_tanh"): "geglu_tanh", (True, "gelu"): "geglu", (True, "silu"): "swiglu"}
_BART_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def _seq2seq_family(cfg: ModelConfig) -> str:
    if cfg.position == "relative":
        family, mlps = "t5", _T5_MLP
        # a tied head with or without T5's d_model**-0.5 rescale, or an untied one (never rescaled)
        wanted = dict(norm="rmsnorm", prenorm=True, bias=False, embed_norm=False, attn_scale=False)
    elif cfg.position == "learned":
        family, mlps = "bart", _BART_ACT
        wanted = dict(norm="layernorm", prenorm=False, bias=True, embed_norm=True, attn_scale=True,
                      tie_embeddings=True, scale_tied_output=False)
    else:
        raise _no_equivalent("position", cfg.position, "T5 takes relative positions, BART learned")
    _require(cfg, family.upper(), wanted, mlps)
    if family == "bart" and cfg.head_dim * cfg.n_head != cfg.d_model:
        raise _no_equivalent("d_head", cfg.d_head, "BART's heads split d_model")
    return family


def _no_equivalent(field: str, value, why: str) -> PretrainerError:
    return PretrainerError(f"model.{field}={value!r} has no Hugging Face equivalent ({why})")


def _gpt2_tensors(cfg: ModelConfig) -> list[_Tensor]:
    names = [_Tensor("tok_emb.weight", ("transformer.wte.weight",)),
             _Tensor("pos_emb.weight", ("transformer.wpe.weight",))]
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        for our_mod, hf_mod, linear in (("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                                        ("attn.proj", "attn.c_proj", True), ("norm2", "ln_2", False),
                                        ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)):
            names.append(_Tensor(f"{ours}{our_mod}.weight", (f"{hf}{hf_mod}.weight",), conv1d=linear))
            names.append(_Tensor(f"{ours}{our_mod}.bias", (f"{hf}{hf_mod}.bias",)))
    names += [_Tensor("norm_f.weight", ("transformer.ln_f.weight",)),
              _Tensor("norm_f.bias", ("transformer.ln_f.bias",))]
    if not cfg.tie_embeddings:
        names.append(_Tensor("lm_head.weight", ("lm_head.weight",)))
    return names


def _gpt_neo_tensors(cfg: ModelConfig) -> list[_Tensor]:
    d = cfg.d_model
    names = [_Tensor("tok_emb.weight", ("transformer.wte.weight",)),
             _Tensor("pos_emb.weight", ("transformer.wpe.weight",))]
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        att = f"{hf}attn.attention."
        names.append(_Tensor(f"{ours}attn.qkv.weight", tuple(f"{att}{p}_proj.weight" for p in "qkv"),
                             rows=(d, d, d)))
        for our_mod, hf_mod in (("attn.proj", "attn.attention.out_proj"), ("norm1", "ln_1"),
                                ("norm2", "ln_2"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            names += [_Tensor(f"{ours}{our_mod}.{kind}", (f"{hf}{hf_mod}.{kind}",)) for kind in ("weight", "bias")]
    names += [_Tensor("norm_f.weight", ("transformer.ln_f.weight",)),
              _Tensor("norm_f.bias", ("transformer.ln_f.bias",))]
    if not cfg.tie_embeddings:
        names.append(_Tensor("lm_head.weight", ("lm_head.weight",)))
    return names


def _llama_tensors(cfg: ModelConfig) -> list[_Tensor]:
    """Llama and Mistral; Qwen2 (biases on q, k and v only); Gemma (its norms scale by 1 + weight:
    ours hold the weight plus one); Mixtral (``model.moe``) has a router and experts where Llama
    has its MLP."""
    q, kv, ff = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ff_dim
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    qkv_kinds = ("weight", "bias") if cfg.has_qkv_bias else ("weight",)
    norm_offset = 1.0 if cfg.embed_scale else 0.0  # Gemma
    names = [_Tensor("tok_emb.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        names.append(_Tensor(f"{ours}norm1.weight", (f"{hf}input_layernorm.weight",), offset=norm_offset))
        names.append(_Tensor(f"{ours}norm2.weight", (f"{hf}post_attention_layernorm.weight",), offset=norm_offset))
        names += [_Tensor(f"{ours}attn.qkv.{kind}", tuple(f"{hf}self_attn.{p}_proj.{kind}" for p in "qkv"),
                          rows=(q, kv, kv)) for kind in qkv_kinds]
        names += [_Tensor(f"{ours}attn.proj.{kind}", (f"{hf}self_attn.o_proj.{kind}",)) for kind in kinds]
        if cfg.moe.n_experts:  # Mixtral: w1 is the gate, w3 the up projection, w2 the down
            moe, ff = f"{hf}block_sparse_moe.", cfg.moe.d_ff or ff
            names.append(_Tensor(f"{ours}mlp.router.weight", (f"{moe}gate.weight",)))
            for e in range(cfg.moe.n_experts):
                names += [
                    _Tensor(f"{ours}mlp.experts.{e}.up.weight",
                            (f"{moe}experts.{e}.w1.weight", f"{moe}experts.{e}.w3.weight"), rows=(ff, ff)),
                    _Tensor(f"{ours}mlp.experts.{e}.down.weight", (f"{moe}experts.{e}.w2.weight",)),
                ]
            continue
        for kind in kinds:
            names += [
                _Tensor(f"{ours}mlp.up.{kind}", (f"{hf}mlp.gate_proj.{kind}", f"{hf}mlp.up_proj.{kind}"),
                        rows=(ff, ff)),
                _Tensor(f"{ours}mlp.down.{kind}", (f"{hf}mlp.down_proj.{kind}",)),
            ]
    names.append(_Tensor("norm_f.weight", ("model.norm.weight",), offset=norm_offset))
    if not cfg.tie_embeddings:
        names.append(_Tensor("lm_head.weight", ("lm_head.weight",)))
    return names


def _neox_tensors(cfg: ModelConfig) -> list[_Tensor]:
    names = [_Tensor("tok_emb.weight", ("gpt_neox.embed_in.weight",))]
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for our_mod, hf_mod in (("norm1", "input_layernorm"), ("attn.qkv", "attention.query_key_value"),
                                ("attn.proj", "attention.dense"), ("norm2", "post_attention_layernorm"),
                                ("mlp.up", "mlp.dense_h_to_4h"), ("mlp.down", "mlp.dense_4h_to_h")):
            heads = cfg.n_head if our_mod == "attn.qkv" else 0
            names += [_Tensor(f"{ours}{our_mod}.{kind}", (f"{hf}{hf_mod}.{kind}",), per_head=heads)
                      for kind in ("weight", "bias")]
    names += [_Tensor("norm_f.weight", ("gpt_neox.final_layer_norm.weight",)),
              _Tensor("norm_f.bias", ("gpt_neox.final_layer_norm.bias",))]
    if not cfg.tie_embeddings:
        names.append(_Tensor("lm_head.weight", ("embed_out.weight",)))
    return names


def _weight_and_bias(ours: str, hf: str) -> list[_Tensor]:
    """A layer's ``weight`` and ``bias`` under our name and the Hugging Face one."""
    return [_Tensor(f"{ours}.{kind}", (f"{hf}.{kind}",)) for kind in ("weight", "bias")]


def _bert_tensors(cfg: ModelConfig) -> list[_Tensor]:
    d = cfg.d_model

    emb = "bert.embeddings."
    names = [_Tensor("tok_emb.weight", (f"{emb}word_embeddings.weight",)),
             _Tensor("pos_emb.weight", (f"{emb}position_embeddings.weight",)),
             _Tensor("type_emb.weight", (f"{emb}token_type_embeddings.weight",)),
             *_weight_and_bias("embed_norm", f"{emb}LayerNorm")]
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            names.append(_Tensor(f"{ours}attn.qkv.{kind}",
                                 tuple(f"{hf}attention.self.{p}.{kind}" for p in ("query", "key", "value")),
                                 rows=(d, d, d)))
        for our_mod, hf_mod in (("attn.proj", "attention.output.dense"),
                                ("norm1", "attention.output.LayerNorm"),
                                ("mlp.up", "intermediate.dense"), ("mlp.down", "output.dense"),
                                ("norm2", "output.LayerNorm")):
            names += _weight_and_bias(ours + our_mod, hf + hf_mod)
    if cfg.pooler:
        names += _weight_and_bias("pooler", "bert.pooler.dense")
    names += [*_weight_and_bias("mlm.dense", "cls.predictions.transform.dense"),
              *_weight_and_bias("mlm.norm", "cls.predictions.transform.LayerNorm"),
              _Tensor("mlm.out.bias", ("cls.predictions.bias",))]
    if cfg.nsp_head:  # BertForPreTraining's next-sentence head
        names += _weight_and_bias("nsp", "cls.seq_relationship")
    return names


_ROBERTA_NAMES = (("bert.", "roberta."), ("cls.predictions.transform.dense", "lm_head.dense"),
                  ("cls.predictions.transform.LayerNorm", "lm_head.layer_norm"),
                  ("cls.predictions.bias", "lm_head.bias"))


def _roberta_tensors(cfg: ModelConfig, pad_id: int | None = None) -> list[_Tensor]:
    """BERT's tensors under RoBERTa's names. Hugging Face reads position row ``pad_id + 1 + i``
    for token i, ours row ``position_offset + i``: the table is shifted by the difference (our
    leading rows dropped, or zero rows put in front). Without ``pad_id`` (importing), the padding
    id is ``position_offset - 1`` and nothing moves."""
    shift = cfg.position_offset - (cfg.position_offset - 1 if pad_id is None else pad_id) - 1
    names = []
    for t in _bert_tensors(cfg):
        hf = list(t.hf)
        for old, new in _ROBERTA_NAMES:
            hf = [name.replace(old, new, 1) if name.startswith(old) else name for name in hf]
        t = t._replace(hf=tuple(hf))
        if t.ours == "pos_emb.weight":
            t = t._replace(lead_rows=max(0, -shift), drop_rows=max(0, shift))
        names.append(t)
    return names


def _albert_tensors(cfg: ModelConfig) -> list[_Tensor]:
    """ALBERT's names: the embeddings as BERT's, ``embedding_hidden_mapping_in`` (our ``embed_proj``),
    and the one shared layer, which our ``blocks.0`` holds (the other blocks are the same module)."""
    d = cfg.d_model

    emb, layer = "albert.embeddings.", "albert.encoder.albert_layer_groups.0.albert_layers.0."
    names = [_Tensor("tok_emb.weight", (f"{emb}word_embeddings.weight",)),
             _Tensor("pos_emb.weight", (f"{emb}position_embeddings.weight",)),
             _Tensor("type_emb.weight", (f"{emb}token_type_embeddings.weight",)),
             *_weight_and_bias("embed_norm", f"{emb}LayerNorm"),
             *_weight_and_bias("embed_proj", "albert.encoder.embedding_hidden_mapping_in")]
    for kind in ("weight", "bias"):
        names.append(_Tensor(f"blocks.0.attn.qkv.{kind}",
                             tuple(f"{layer}attention.{p}.{kind}" for p in ("query", "key", "value")),
                             rows=(d, d, d)))
    for ours, hf in (("attn.proj", "attention.dense"), ("norm1", "attention.LayerNorm"), ("mlp.up", "ffn"),
                     ("mlp.down", "ffn_output"), ("norm2", "full_layer_layer_norm")):
        names += _weight_and_bias(f"blocks.0.{ours}", layer + hf)
    if cfg.pooler:
        names += _weight_and_bias("pooler", "albert.pooler")
    if cfg.nsp_head:  # AlbertForPreTraining's sentence-order head on the pooled state
        names += _weight_and_bias("nsp", "sop_classifier.classifier")
    return names + [*_weight_and_bias("mlm.dense", "predictions.dense"),
                    *_weight_and_bias("mlm.norm", "predictions.LayerNorm"),
                    _Tensor("mlm.out.bias", ("predictions.bias",))]


def _distilbert_tensors(cfg: ModelConfig) -> list[_Tensor]:
    d = cfg.d_model

    emb = "distilbert.embeddings."
    names = [_Tensor("tok_emb.weight", (f"{emb}word_embeddings.weight",)),
             _Tensor("pos_emb.weight", (f"{emb}position_embeddings.weight",)),
             *_weight_and_bias("embed_norm", f"{emb}LayerNorm")]
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"distilbert.transformer.layer.{i}."
        for kind in ("weight", "bias"):
            names.append(_Tensor(f"{ours}attn.qkv.{kind}",
                                 tuple(f"{hf}attention.{p}_lin.{kind}" for p in "qkv"), rows=(d, d, d)))
        for our_mod, hf_mod in (("attn.proj", "attention.out_lin"), ("norm1", "sa_layer_norm"),
                                ("mlp.up", "ffn.lin1"), ("mlp.down", "ffn.lin2"),
                                ("norm2", "output_layer_norm")):
            names += _weight_and_bias(ours + our_mod, hf + hf_mod)
    names += [*_weight_and_bias("mlm.dense", "vocab_transform"),
              *_weight_and_bias("mlm.norm", "vocab_layer_norm"),
              _Tensor("mlm.out.bias", ("vocab_projector.bias",))]
    return names


def _t5_tensors(cfg: ModelConfig) -> list[_Tensor]:
    inner, ff = cfg.n_head * cfg.head_dim, cfg.ff_dim
    names = [_Tensor("encoder.tok_emb.weight", ("shared.weight",))]
    for stack, layers in (("encoder", cfg.n_layer), ("decoder", cfg.decoder_layers)):
        names.append(_Tensor(f"{stack}.rel_bias.bias.weight",
                             (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)))
        for i in range(layers):
            ours, hf = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            att = f"{hf}0.SelfAttention."
            names += [_Tensor(f"{ours}norm1.weight", (f"{hf}0.layer_norm.weight",)),
                      _Tensor(f"{ours}attn.qkv.weight", tuple(f"{att}{p}.weight" for p in "qkv"),
                              rows=(inner, inner, inner)),
                      _Tensor(f"{ours}attn.proj.weight", (f"{att}o.weight",))]
            ff_layer = 1
            if stack == "decoder":
                ff_layer, x = 2, f"{hf}1.EncDecAttention."
                names += [_Tensor(f"{ours}norm_x.weight", (f"{hf}1.layer_norm.weight",)),
                          _Tensor(f"{ours}xattn.q.weight", (f"{x}q.weight",)),
                          _Tensor(f"{ours}xattn.kv.weight", (f"{x}k.weight", f"{x}v.weight"),
                                  rows=(inner, inner)),
                          _Tensor(f"{ours}xattn.proj.weight", (f"{x}o.weight",))]
            mlp = f"{hf}{ff_layer}.DenseReluDense."
            up = ((f"{mlp}wi_0.weight", f"{mlp}wi_1.weight") if cfg.mlp in GATED
                  else (f"{mlp}wi.weight",))
            names += [_Tensor(f"{ours}norm2.weight", (f"{hf}{ff_layer}.layer_norm.weight",)),
                      _Tensor(f"{ours}mlp.up.weight", up, rows=(ff, ff) if len(up) == 2 else ()),
                      _Tensor(f"{ours}mlp.down.weight", (f"{mlp}wo.weight",))]
        names.append(_Tensor(f"{stack}.norm_f.weight", (f"{stack}.final_layer_norm.weight",)))
    if not cfg.tie_embeddings:
        names.append(_Tensor("lm_head.weight", ("lm_head.weight",)))
    return names


def _bart_tensors(cfg: ModelConfig) -> list[_Tensor]:
    d = cfg.d_model

    def both(ours: str, hf: str, rows: tuple[int, ...] = ()) -> list[_Tensor]:
        parts = (hf,) if isinstance(hf, str) else hf
        return [_Tensor(f"{ours}.{kind}", tuple(f"{p}.{kind}" for p in parts), rows=rows)
                for kind in ("weight", "bias")]

    names = [_Tensor("encoder.tok_emb.weight", ("model.shared.weight",))]
    for stack, layers in (("encoder", cfg.n_layer), ("decoder", cfg.decoder_layers)):
        top = f"model.{stack}."
        names.append(_Tensor(f"{stack}.pos_emb.weight", (f"{top}embed_positions.weight",),
                             lead_rows=_BART_POS_OFFSET))
        names += both(f"{stack}.embed_norm", f"{top}layernorm_embedding")
        for i in range(layers):
            ours, hf = f"{stack}.blocks.{i}.", f"{top}layers.{i}."
            names += both(f"{ours}attn.qkv", tuple(f"{hf}self_attn.{p}_proj" for p in "qkv"), (d, d, d))
            names += both(f"{ours}attn.proj", f"{hf}self_attn.out_proj")
            names += both(f"{ours}norm1", f"{hf}self_attn_layer_norm")
            if stack == "decoder":
                names += both(f"{ours}xattn.q", f"{hf}encoder_attn.q_proj")
                names += both(f"{ours}xattn.kv", (f"{hf}encoder_attn.k_proj", f"{hf}encoder_attn.v_proj"),
                              (d, d))
                names += both(f"{ours}xattn.proj", f"{hf}encoder_attn.out_proj")
                names += both(f"{ours}norm_x", f"{hf}encoder_attn_layer_norm")
            names += both(f"{ours}mlp.up", f"{hf}fc1") + both(f"{ours}mlp.down", f"{hf}fc2")
            names += both(f"{ours}norm2", f"{hf}final_layer_norm")
    return names


def _electra_tensors(cfg: ModelConfig) -> list[_Tensor]:
    """BERT's embeddings and blocks under ``electra.`` (no pooler), the projection of factorised
    embeddings, and the discriminator's or the generator's head."""
    names = [t._replace(hf=tuple("electra." + n.removeprefix("bert.") for n in t.hf))
             for t in _bert_tensors(cfg) if not t.ours.startswith(("mlm.", "pooler."))]

    if cfg.embed_dim != cfg.d_model:
        names += _weight_and_bias("embed_proj", "electra.embeddings_project")
    if cfg.rtd_head:
        return names + _weight_and_bias("rtd.dense", "discriminator_predictions.dense") + \
            _weight_and_bias("rtd.out", "discriminator_predictions.dense_prediction")
    return names + _weight_and_bias("mlm.dense", "generator_predictions.dense") + \
        _weight_and_bias("mlm.norm", "generator_predictions.LayerNorm") + \
        [_Tensor("mlm.out.bias", ("generator_lm_head.bias",))]


def _tensors(cfg: ModelConfig, family: str, pad_id: int | None = None) -> list[_Tensor]:
    """Our tensors and the Hugging Face ones of ``family``; ``pad_id``: the exported tokenizer's
    padding id, which places RoBERTa's positions."""
    if family == "roberta":
        return _roberta_tensors(cfg, pad_id)
    return {"gpt2": _gpt2_tensors, "gpt_neo": _gpt_neo_tensors, "llama": _llama_tensors, "qwen2": _llama_tensors,
            "gemma": _llama_tensors, "mixtral": _llama_tensors, "gpt_neox": _neox_tensors, "bert": _bert_tensors, "albert": _albert_tensors,
            "distilbert": _distilbert_tensors, "t5": _t5_tensors, "bart": _bart_tensors,
            "electra": _electra_tensors}[family](cfg)


# ----------------------------------------------------------------------------------------------
# Export


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, pad_token_id: int | None = None) -> dict:
    """The ``config.json`` of the Hugging Face model equivalent to ``cfg``; ``pad_token_id``: the
    exported tokenizer's (default 0), from which RoBERTa counts its positions."""
    family = hf_family(cfg)
    common = dict(vocab_size=cfg.vocab_size, initializer_range=cfg.init_std,
                  tie_word_embeddings=cfg.tie_embeddings, dtype=str(dtype).removeprefix("torch."),
                  use_cache=True, **DEFAULT_SPECIAL_IDS)
    if family == "roberta":
        pad = DEFAULT_SPECIAL_IDS["pad_token_id"] if pad_token_id is None else pad_token_id
        return dict(
            model_type="roberta", architectures=["RobertaForMaskedLM"],
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, hidden_size=cfg.d_model,
            intermediate_size=cfg.ff_dim, hidden_act="gelu",
            max_position_embeddings=cfg.max_seq_len + pad + 1, type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, position_embedding_type="absolute",
            **{k: v for k, v in common.items() if k not in ("use_cache", "pad_token_id")}, pad_token_id=pad,
        )
    if family == "bert":
        return dict(
            model_type="bert", architectures=["BertForPreTraining" if cfg.nsp_head else "BertForMaskedLM"],
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, hidden_size=cfg.d_model,
            intermediate_size=cfg.ff_dim, hidden_act=_BERT_ACT[cfg.mlp],
            max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, position_embedding_type="absolute",
            **{k: v for k, v in common.items() if k != "use_cache"},
        )
    if family == "albert":
        return dict(
            model_type="albert", architectures=["AlbertForPreTraining" if cfg.nsp_head else "AlbertForMaskedLM"],
            embedding_size=cfg.embed_dim,
            num_hidden_layers=cfg.n_layer, num_hidden_groups=1, inner_group_num=1,
            num_attention_heads=cfg.n_head, hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim,
            hidden_act=_BERT_ACT[cfg.mlp], max_position_embeddings=cfg.max_seq_len,
            type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
            position_embedding_type="absolute", **{k: v for k, v in common.items() if k != "use_cache"},
        )
    if family == "electra":
        return dict(
            model_type="electra",
            architectures=["ElectraForPreTraining" if cfg.rtd_head else "ElectraForMaskedLM"],
            embedding_size=cfg.embed_dim, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
            hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim, hidden_act=_BERT_ACT[cfg.mlp],
            max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, position_embedding_type="absolute",
            **{k: v for k, v in common.items() if k != "use_cache"},
        )
    if family == "distilbert":
        return dict(
            model_type="distilbert", architectures=["DistilBertForMaskedLM"],
            n_layers=cfg.n_layer, n_heads=cfg.n_head, dim=cfg.d_model, hidden_dim=cfg.ff_dim,
            activation=_DISTILBERT_ACT[cfg.mlp], max_position_embeddings=cfg.max_seq_len,
            sinusoidal_pos_embds=False, dropout=cfg.dropout, attention_dropout=cfg.dropout,
            **{k: v for k, v in common.items() if k != "use_cache"},
        )
    if family == "t5":
        # T5 v1.0's tied head rescales (tie_word_embeddings and scale_decoder_outputs true); any other
        # head is written as its own lm_head.weight with both false (a tied unscaled head: a copy of
        # the embedding, which transformers 5 ties back and 4.x reads as an equal untied head)
        scaled = cfg.tie_embeddings and cfg.scale_tied_output
        return dict(
            model_type="t5", architectures=["T5ForConditionalGeneration"], is_encoder_decoder=True,
            d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.ff_dim, num_layers=cfg.n_layer,
            num_decoder_layers=cfg.decoder_layers, num_heads=cfg.n_head,
            relative_attention_num_buckets=cfg.rel_buckets,
            relative_attention_max_distance=cfg.rel_max_distance, dropout_rate=cfg.dropout,
            layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=_T5_MLP[cfg.mlp],
            dense_act_fn=_T5_DENSE_ACT[cfg.mlp], is_gated_act=cfg.mlp in GATED, initializer_factor=1.0,
            decoder_start_token_id=DEFAULT_SPECIAL_IDS["pad_token_id"],
            **{**common, "tie_word_embeddings": scaled}, scale_decoder_outputs=scaled,
        )
    if family == "bart":
        return dict(
            model_type="bart", architectures=["BartForConditionalGeneration"], is_encoder_decoder=True,
            d_model=cfg.d_model, encoder_layers=cfg.n_layer, decoder_layers=cfg.decoder_layers,
            encoder_attention_heads=cfg.n_head, decoder_attention_heads=cfg.n_head,
            encoder_ffn_dim=cfg.ff_dim, decoder_ffn_dim=cfg.ff_dim,
            activation_function=_BART_ACT[cfg.mlp], max_position_embeddings=cfg.max_seq_len,
            scale_embedding=cfg.embed_scale, dropout=cfg.dropout, attention_dropout=cfg.dropout,
            activation_dropout=cfg.dropout, init_std=cfg.init_std,
            decoder_start_token_id=DEFAULT_SPECIAL_IDS["pad_token_id"],
            forced_eos_token_id=DEFAULT_SPECIAL_IDS["eos_token_id"], **common,
        )
    if family == "gpt2":
        return dict(
            model_type="gpt2", architectures=["GPT2LMHeadModel"],
            n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.d_model,
            n_inner=cfg.d_ff,  # None: 4 * n_embd, in GPT-2 as in ours
            n_positions=cfg.max_seq_len, activation_function=_GPT2_ACT[cfg.mlp],
            layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, scale_attn_weights=True, **common,
        )
    if family == "gpt_neox":
        return dict(
            model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"],
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, hidden_size=cfg.d_model,
            intermediate_size=cfg.ff_dim, hidden_act=_NEOX_ACT[cfg.mlp],
            max_position_embeddings=cfg.max_seq_len, layer_norm_eps=cfg.norm_eps,
            use_parallel_residual=cfg.parallel_block, attention_bias=True,
            # rotary_pct and rotary_emb_base for transformers 4.x, rope_parameters for 5.x
            rotary_pct=cfg.rope_fraction, rotary_emb_base=cfg.rope_theta,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                             "partial_rotary_factor": cfg.rope_fraction},
            hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout, **common,
        )
    if family == "gpt_neo":
        kinds = [k.strip() for k in cfg.attention_layers.split(",")]
        if cfg.n_layer % len(kinds):  # the pattern does not fit a whole number of times: spell it out
            kinds = [cfg.layer_kind(i) for i in range(cfg.n_layer)]
        return dict(
            model_type="gpt_neo", architectures=["GPTNeoForCausalLM"],
            num_layers=cfg.n_layer, num_heads=cfg.n_head, hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,  # None: 4 * hidden_size, in GPT-Neo as in ours
            max_position_embeddings=cfg.max_seq_len, attention_types=[[kinds, cfg.n_layer // len(kinds)]],
            window_size=cfg.attention_window or 256, activation_function=_GPT2_ACT[cfg.mlp],
            layer_norm_epsilon=cfg.norm_eps, resid_dropout=cfg.dropout, embed_dropout=cfg.dropout,
            attention_dropout=cfg.dropout, **common,
        )
    llama = dict(
        model_type="llama", architectures=["LlamaForCausalLM"],
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads, hidden_size=cfg.d_model, head_dim=cfg.head_dim,
        intermediate_size=cfg.ff_dim, hidden_act=_LLAMA_ACT.get(cfg.mlp),
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        # rope_theta for transformers 4.x, rope_parameters for 5.x
        rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=cfg.dropout, **common,
    )
    if family == "qwen2":  # biases on q, k and v always, nowhere else; no sliding window
        del llama["attention_bias"], llama["mlp_bias"]
        llama.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
                     sliding_window=None, max_window_layers=cfg.n_layer, layer_types=["full_attention"] * cfg.n_layer)
    if family == "gemma":  # embeddings times sqrt(hidden_size), norms by 1 + weight (the table's offset)
        del llama["mlp_bias"]
        llama.update(model_type="gemma", architectures=["GemmaForCausalLM"], hidden_act=_GEMMA_ACT[cfg.mlp],
                     hidden_activation=_GEMMA_ACT[cfg.mlp])
    if family == "mixtral":  # Mixtral has no bias switches; its experts replace the MLP
        del llama["attention_bias"], llama["mlp_bias"]
        llama.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
                     intermediate_size=cfg.moe.d_ff or cfg.ff_dim, num_local_experts=cfg.moe.n_experts,
                     num_experts_per_tok=cfg.moe.top_k, router_aux_loss_coef=cfg.moe.aux_loss_weight,
                     router_jitter_noise=0.0, sliding_window=None, output_router_logits=False)
    return llama


def to_hf_state_dict(model: torch.nn.Module, pad_token_id: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json dict, weights under Hugging Face names)`` for ``model``.

    The tensors are contiguous copies that share no memory, ready for ``safetensors``. A tied
    output matrix is left out, as Hugging Face checkpoints do (it is the token embedding).
    ``pad_token_id``: the padding id of the tokenizer exported with it (default 0; RoBERTa's
    positions are counted from it).
    """
    cfg = model.cfg
    family = hf_family(cfg)
    pad = DEFAULT_SPECIAL_IDS["pad_token_id"] if pad_token_id is None else pad_token_id
    ours = model.state_dict()
    table = _tensors(cfg, family, pad)
    named = {t.ours for t in table}
    unnamed = [k for k in ours if k not in named and not is_tied_copy(model, k)]
    if unnamed:  # a weight the table does not carry would be dropped from the export: refuse
        raise PretrainerError(f"model tensor '{unnamed[0]}' ({len(unnamed)} in all) has no Hugging Face "
                              f"name in the {family} table; refusing an export without it")
    weights = {}
    for t in table:
        tensor = ours[t.ours].detach()[t.drop_rows:]
        if t.offset:
            tensor = tensor - t.offset
        pieces = tensor.split(t.rows) if t.rows else [tensor]
        for name, piece in zip(t.hf, pieces):
            piece = piece.t() if t.conv1d else piece
            piece = _qkv_rows(piece, t.per_head, to_hf=True) if t.per_head else piece
            if t.lead_rows:
                piece = torch.cat([piece.new_zeros(t.lead_rows, *piece.shape[1:]), piece])
            weights[name] = piece.clone(memory_format=torch.contiguous_format)
    if family == "bart":
        weights["final_logits_bias"] = torch.zeros(1, cfg.vocab_size, dtype=model.tok_emb.weight.dtype)
    if family == "t5" and cfg.tie_embeddings and not cfg.scale_tied_output:  # see hf_config
        weights["lm_head.weight"] = weights["shared.weight"].clone()
    return hf_config(cfg, model.tok_emb.weight.dtype, pad), weights


def export_hf(model: torch.nn.Module, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write ``model`` as a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads
    (``AutoModelForMaskedLM`` for an encoder).

    The folder holds ``config.json``, ``model.safetensors`` and, for a decoder,
    ``generation_config.json``, plus
    the tokenizer of ``tokenizer_dir`` when given (a folder written by pretrainer's
    ``save_tokenizer``, or any Hugging Face tokenizer folder), written so that ``AutoTokenizer``
    gives the ids pretrainer feeds the model (:mod:`pretrainer.interop.hf_tokenizer`: special tokens
    around each input, the model's window as ``model_max_length``); the pad/bos/eos ids are then those
    of its tokens by role (:func:`pretrainer.tokenization.load_tokenizer`; null where it has none,
    as GPT-2 has no pad). Each file is written to a temporary name and renamed.
    """
    if model.cfg.arch == "vit":  # images: ViTModel / ViTForImageClassification (interop.vit)
        from .vit import export_vit

        return export_vit(model, out_dir, getattr(model, "class_names", None))
    family = hf_family(model.cfg)  # refuses unconvertible configs before reading or writing anything
    tok_files, ids = {}, {}
    if tokenizer_dir is not None:
        from .hf_tokenizer import export_files  # the tokenizer with the model's input layout

        tok_files, ids = export_files(tokenizer_dir, model.cfg)
        if family == "roberta" and ids["pad_token_id"] is None:
            raise PretrainerError(f"{Path(tokenizer_dir) / 'tokenizer.json'}: no padding token, from which a "
                                  f"RoBERTa counts its positions; prepare the data with --pad-token TEXT")
    config, weights = to_hf_state_dict(model, ids.get("pad_token_id"))
    config.update({k: v for k, v in ids.items() if k in config})
    out = Path(out_dir)
    generation = {k: config[k] for k in (*DEFAULT_SPECIAL_IDS, "decoder_start_token_id") if k in config}
    with writing_folder(out, "export"):  # a full disk: one line naming out, nothing half-written
        out.mkdir(parents=True, exist_ok=True)
        _write(out / "model.safetensors", lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
        _write(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
        if model.cfg.arch != "encoder":
            _write(out / "generation_config.json",
                   lambda p: p.write_text(json.dumps(generation, indent=2) + "\n"))
        for name, text in tok_files.items():
            _write(out / name, lambda p: p.write_text(text, encoding="utf-8"))
    return out


def _write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Import


# Fields of a config.json that do not change what a model computes from its inputs in eval mode:
# bookkeeping, labels, special-token ids, generation defaults, output switches, initialisation and
# performance switches (chunking, checkpointing, attention kernels, tensor-parallel plans).
# Dropouts are training-only too (_INERT_PATTERN). Every other field must be read by the family's
# reader below (honoured, or checked to have the value our model computes with), else the import
# refuses it: a field it does not know might change the logits.
_INERT = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "_commit_hash", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "tokenizer_class", "prefix",
    "task_specific_params", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "use_return_dict", "output_past", "use_bfloat16", "xla_device", "chunk_size_feed_forward",
    "gradient_checkpointing", "use_cache", "pretraining_tp", "base_model_tp_plan", "base_model_pp_plan",
    "initializer_range", "initializer_factor", "init_std", "keys_to_ignore_at_inference",
    "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "unk_token_id", "mask_token_id",
    "cls_token_id", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id",
    "max_length", "min_length", "max_new_tokens", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "tf_legacy_loss", "router_z_loss_coef", "output_router_logits",
    # GPT-2's and ELECTRA's sequence-summary heads (double-heads and classification models only)
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "summary_last_dropout",
})
_INERT_PATTERN = re.compile(r"(dropout|_pdrop|dropout_prob|dropout_rate|layerdrop)$")


class _Fields:
    """Reads the fields of a Hugging Face ``config.json`` with one-line errors naming the file, and
    remembers which it read, so that :meth:`check_all_read` can refuse the others."""

    def __init__(self, hf_config: dict, where: str):
        self.raw, self.where = hf_config, where
        self.read: set[str] = set()

    def get(self, key: str, default=...):
        """The field's value; ``default`` when it is absent or null (required when no default)."""
        self.read.add(key)
        if self.raw.get(key) is not None:
            return self.raw[key]
        if default is ...:
            raise PretrainerError(f"{self.where}: missing field '{key}' "
                                  f"(model_type {self.raw.get('model_type')!r})")
        return default

    def expect(self, key: str, default, wanted) -> None:
        """Refuse a value other than ``wanted``: an option that our model does not have."""
        value = self.get(key, default)
        if value != wanted:
            raise PretrainerError(f"{self.where}: {key}={value!r} has no pretrainer equivalent "
                                  f"(expected {wanted!r})")

    def choice(self, key: str, default, table: dict):
        """``table[value]``: the field's value translated to ours."""
        value = self.get(key, default)
        if value not in table:
            raise PretrainerError(f"{self.where}: {key}={value!r} has no pretrainer equivalent "
                                  f"(expected one of {', '.join(table)})")
        return table[value]

    def ignore(self, *keys: str) -> None:
        """Fields of this family known not to change the model's outputs."""
        self.read.update(keys)

    def rope(self) -> tuple[float | None, float | None]:
        """``(rope_theta, partial_rotary_factor)`` from ``rope_parameters`` (transformers 5) or the
        top-level fields of 4.x (None where neither has it), refusing any rope type but the default
        (no position scaling: linear, dynamic, yarn, llama3 ...) and values that disagree."""
        self.expect("rope_scaling", None, None)
        rope = self.get("rope_parameters", {})
        if not isinstance(rope, dict):
            raise PretrainerError(f"{self.where}: rope_parameters={rope!r}: expected a mapping")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise PretrainerError(f"{self.where}: rope_parameters.rope_type={kind!r} has no pretrainer "
                                  f"equivalent (expected 'default')")
        extra = sorted(set(rope) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
        if extra:
            raise PretrainerError(f"{self.where}: rope_parameters.{extra[0]} has no pretrainer equivalent "
                                  f"(the default rope takes rope_theta and partial_rotary_factor)")
        return tuple(self.same(name, rope.get(name), self.get(name, None))
                     for name in ("rope_theta", "partial_rotary_factor"))

    def same(self, name: str, *values):
        """The one value of a field that several places (or transformers versions) give, None
        where none does; refused when two disagree."""
        given = [v for v in values if v is not None]
        if any(v != given[0] for v in given):
            raise PretrainerError(f"{self.where}: {name} is given as {' and '.join(map(repr, given))} "
                                  f"(rope_parameters and the top-level field disagree)")
        return given[0] if given else None

    def check_all_read(self) -> None:
        """Refuse a field that no reader took and that is not known to leave the outputs alone."""
        for key in self.raw:
            if key not in self.read and key not in _INERT and not _INERT_PATTERN.search(key):
                raise PretrainerError(f"{self.where}: field '{key}' is not one pretrainer maps for model_type "
                                      f"{self.raw.get('model_type')!r}, and it may change the outputs; "
                                      f"refusing to import (remove it if it does not)")


_CONFIG_READERS = {}  # model_type -> reader, filled in below


def config_from_hf(hf_config: dict, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a Hugging Face ``config.json`` dict (``model_type`` gpt2, gpt_neo,
    llama, mistral, qwen2, gemma, mixtral, gpt_neox, bert, roberta, albert, electra, distilbert, t5,
    mt5 or bart).

    ``where`` names the file in error messages. Dropout follows the checkpoint (GPT-2's
    ``resid_pdrop``, Llama's ``attention_dropout``). Every field must be one the family's reader
    honours or checks, or one known not to change the outputs (:data:`_INERT`); any other is
    refused with its name.
    """
    f = _Fields(hf_config, where)
    model_type = hf_config.get("model_type")
    if model_type not in _CONFIG_READERS:
        raise PretrainerError(f"{where}: model_type={model_type!r}: expected one of {', '.join(_CONFIG_READERS)}")
    cfg = _CONFIG_READERS[model_type](f)
    f.check_all_read()
    cfg.validate()
    return cfg


def _plain(f: _Fields, encoder_decoder: bool = False, encoder: bool = False) -> None:
    """The structural fields every family shares: no cross-attention added to a decoder or an
    encoder, no pruned heads, no weights tied between encoder and decoder; an encoder is no decoder
    (a decoder's or encoder-decoder's ``is_decoder`` changes nothing in the whole model)."""
    f.expect("is_encoder_decoder", encoder_decoder, encoder_decoder)
    f.expect("add_cross_attention", False, False)
    f.expect("tie_encoder_decoder", False, False)
    f.expect("cross_attention_hidden_size", None, None)
    if f.get("pruned_heads", {}):
        raise PretrainerError(f"{f.where}: pruned_heads={f.raw['pruned_heads']!r} has no pretrainer equivalent "
                              f"(every layer has all its heads)")
    if encoder:
        f.expect("is_decoder", False, False)
    else:
        f.ignore("is_decoder")


def _gpt2_config(f: _Fields) -> ModelConfig:
    _plain(f)
    f.expect("scale_attn_weights", True, True)
    f.expect("scale_attn_by_inverse_layer_idx", False, False)
    # n_ctx: old files' size of the causal-mask buffer; reorder_and_upcast_attn: float16 numerics only
    f.ignore("n_ctx", "reorder_and_upcast_attn")
    return ModelConfig(
        n_layer=f.get("n_layer"), n_head=f.get("n_head"), d_model=f.get("n_embd"),
        d_ff=f.get("n_inner", None), vocab_size=f.get("vocab_size"), max_seq_len=f.get("n_positions"),
        norm="layernorm", norm_eps=f.get("layer_norm_epsilon", 1e-5), position="learned",
        mlp=f.choice("activation_function", "gelu_new", _GPT2_ACT_IN), bias=True,
        tie_embeddings=f.get("tie_word_embeddings", True), dropout=f.get("resid_pdrop", 0.1),
        init_std=f.get("initializer_range", 0.02), scaled_residual_init=True,
    )


def _gpt_neo_config(f: _Fields) -> ModelConfig:
    """GPT-Neo: ``attention_types`` such as ``[[["global", "local"], 12]]`` (a list of kinds
    repeated n times) become our repeated ``attention_layers`` pattern."""
    _plain(f)
    n_layer = f.get("num_layers")
    types = f.get("attention_types", [[["global", "local"], 12]])  # GPTNeoConfig's default
    try:
        kinds = [kind for group, times in types for _ in range(times) for kind in group]
    except (TypeError, ValueError):
        raise PretrainerError(f"{f.where}: attention_types={types!r}: expected a list of "
                              f"[[kinds...], times] pairs") from None
    for kind in kinds:
        if kind not in ("global", "local"):
            raise PretrainerError(f"{f.where}: attention_types holds {kind!r}, which has no pretrainer "
                                  f"equivalent (expected global or local)")
    if len(kinds) != n_layer:
        raise PretrainerError(f"{f.where}: attention_types gives {len(kinds)} layers, num_layers={n_layer}")
    if f.get("attention_layers", kinds) != kinds:  # written beside attention_types; transformers reads it
        raise PretrainerError(f"{f.where}: attention_layers does not spell out attention_types")
    window = f.get("window_size", 256)
    period = next(p for p in range(1, n_layer + 1)  # the shortest pattern that repeats into kinds
                  if all(kinds[i] == kinds[i % p] for i in range(n_layer)))
    local = "local" in kinds
    return ModelConfig(
        n_layer=n_layer, n_head=f.get("num_heads"), d_model=f.get("hidden_size"),
        d_ff=f.get("intermediate_size", None), vocab_size=f.get("vocab_size"),
        max_seq_len=f.get("max_position_embeddings"), norm="layernorm",
        norm_eps=f.get("layer_norm_epsilon", 1e-5), position="learned",
        mlp=f.choice("activation_function", "gelu_new", _GPT2_ACT_IN), bias=True, qkv_bias=False,
        attn_scale=False, attention_layers=",".join(kinds[:period]),
        attention_window=window if local else None,
        tie_embeddings=f.get("tie_word_embeddings", True), dropout=f.get("resid_dropout", 0.0),
        init_std=f.get("initializer_range", 0.02), scaled_residual_init=True,
    )


def _bert_config(f: _Fields) -> ModelConfig:
    _plain(f, encoder=True)
    f.expect("position_embedding_type", "absolute", "absolute")
    f.expect("tie_word_embeddings", True, True)
    return ModelConfig(
        arch="encoder", n_layer=f.get("num_hidden_layers"), n_head=f.get("num_attention_heads"),
        d_model=f.get("hidden_size"), d_ff=f.get("intermediate_size"), vocab_size=f.get("vocab_size"),
        max_seq_len=f.get("max_position_embeddings", 512), type_vocab_size=f.get("type_vocab_size", 2),
        norm="layernorm", norm_eps=f.get("layer_norm_eps", 1e-12), prenorm=False, position="learned",
        mlp=f.choice("hidden_act", "gelu", _BERT_ACT_IN), bias=True, tie_embeddings=True,
        embed_norm=True, pooler=True, mlm_head=True, dropout=f.get("hidden_dropout_prob", 0.1),
        init_std=f.get("initializer_range", 0.02), scaled_residual_init=False,
    )


def _albert_config(f: _Fields) -> ModelConfig:
    """ALBERT with one shared layer: one hidden group of one inner layer (several groups, or several
    layers in a group, would be weights shared in a pattern our ``share_layers`` does not have)."""
    _plain(f, encoder=True)
    f.expect("num_hidden_groups", 1, 1)
    f.expect("inner_group_num", 1, 1)
    f.expect("position_embedding_type", "absolute", "absolute")
    f.expect("tie_word_embeddings", True, True)
    d_model, d_embed = f.get("hidden_size"), f.get("embedding_size", 128)
    if d_embed == d_model:
        raise PretrainerError(f"{f.where}: embedding_size={d_embed} equals hidden_size: pretrainer's d_embed "
                              f"has no projection at equal widths (ALBERT's embedding_hidden_mapping_in)")
    return ModelConfig(
        arch="encoder", n_layer=f.get("num_hidden_layers"), n_head=f.get("num_attention_heads"),
        d_model=d_model, d_embed=d_embed, share_layers="all", d_ff=f.get("intermediate_size"),
        vocab_size=f.get("vocab_size"), max_seq_len=f.get("max_position_embeddings", 512),
        type_vocab_size=f.get("type_vocab_size", 2), norm="layernorm", norm_eps=f.get("layer_norm_eps", 1e-12),
        prenorm=False, position="learned", mlp=f.choice("hidden_act", "gelu_new", _BERT_ACT_IN), bias=True,
        tie_embeddings=True, embed_norm=True, pooler=True, mlm_head=True,
        dropout=f.get("hidden_dropout_prob", 0.0), init_std=f.get("initializer_range", 0.02),
        scaled_residual_init=False,
    )


def _electra_config(f: _Fields) -> ModelConfig:
    """ELECTRA: a discriminator (``ElectraForPreTraining``, ``ElectraModel``) or, when the folder
    says ``ElectraForMaskedLM``, a generator (the MLM head; its transform is always GELU)."""
    _plain(f, encoder=True)
    f.expect("position_embedding_type", "absolute", "absolute")
    f.expect("tie_word_embeddings", True, True)
    generator = "ElectraForMaskedLM" in (f.get("architectures", []) or [])
    if generator:
        f.expect("hidden_act", "gelu", "gelu")  # ElectraGeneratorPredictions: gelu whatever hidden_act
    d_model, embed = f.get("hidden_size"), f.get("embedding_size", 128)  # ElectraConfig's default
    return ModelConfig(
        arch="encoder", n_layer=f.get("num_hidden_layers"), n_head=f.get("num_attention_heads"),
        d_model=d_model, d_ff=f.get("intermediate_size"), d_embed=None if embed == d_model else embed,
        vocab_size=f.get("vocab_size"), max_seq_len=f.get("max_position_embeddings", 512),
        type_vocab_size=f.get("type_vocab_size", 2), norm="layernorm", norm_eps=f.get("layer_norm_eps", 1e-12),
        prenorm=False, position="learned", mlp=f.choice("hidden_act", "gelu", _BERT_ACT_IN), bias=True,
        tie_embeddings=True, embed_norm=True, pooler=False, mlm_head=True, rtd_head=not generator,
        dropout=f.get("hidden_dropout_prob", 0.1), init_std=f.get("initializer_range", 0.02),
        scaled_residual_init=False,
    )


def _distilbert_config(f: _Fields) -> ModelConfig:
    """DistilBERT: its LayerNorms are eps 1e-12 (not a config field); no segments, no pooler."""
    _plain(f, encoder=True)
    f.expect("sinusoidal_pos_embds", False, False)  # a frozen sinusoidal table: ours would train it
    f.expect("tie_word_embeddings", True, True)
    return ModelConfig(
        arch="encoder", n_layer=f.get("n_layers"), n_head=f.get("n_heads"), d_model=f.get("dim"),
        d_ff=f.get("hidden_dim"), vocab_size=f.get("vocab_size"),
        max_seq_len=f.get("max_position_embeddings", 512), type_vocab_size=0, norm="layernorm",
        norm_eps=1e-12, prenorm=False, position="learned", mlp=f.choice("activation", "gelu", _DISTILBERT_ACT_IN),
        bias=True, tie_embeddings=True, embed_norm=True, pooler=False, mlm_head=True,
        dropout=f.get("dropout", 0.1), init_std=f.get("initializer_range", 0.02), scaled_residual_init=False,
    )


def _roberta_config(f: _Fields) -> ModelConfig:
    """BERT's fields; positions start after ``pad_token_id`` (roberta-base: 1, so 514 rows hold
    512 positions), and the MLM head's GELU is the blocks' activation."""
    pad = f.get("pad_token_id")
    if not isinstance(pad, int) or pad < 0:
        raise PretrainerError(f"{f.where}: pad_token_id={pad!r}: expected an id >= 0 (RoBERTa's "
                              f"positions start after it)")
    f.expect("hidden_act", "gelu", "gelu")
    rows = f.get("max_position_embeddings", 514)
    if rows <= pad + 1:
        raise PretrainerError(f"{f.where}: max_position_embeddings={rows} leaves no position after "
                              f"pad_token_id={pad} (positions start at pad_token_id + 1)")
    cfg = _bert_config(f)
    return dataclasses.replace(cfg, position_offset=pad + 1, max_seq_len=rows - pad - 1)


def _t5_config(f: _Fields, mt5: bool = False) -> ModelConfig:
    """T5 (v1.0 and v1.1) and mT5 (v1.1's architecture under its own model_type).

    The head follows transformers 5, which builds every T5 and mT5 with its output tied to the
    embedding and unties it when the checkpoint holds an ``lm_head.weight`` of its own
    (:func:`config_for_weights`). T5 rescales the decoder output by d_model**-0.5 before the head
    when ``scale_decoder_outputs`` (absent: when ``tie_word_embeddings`` is not false, the rule of
    files written before the field existed); mT5 never rescales. The MLP is ``is_gated_act`` and
    ``dense_act_fn`` when the file has them (transformers reads them over ``feed_forward_proj``)."""
    _plain(f, encoder_decoder=True)
    f.ignore("n_positions")  # old files: unused (relative positions have no table)
    proj = f.get("feed_forward_proj", "gated-gelu" if mt5 else "relu")
    parts = proj.split("-") if isinstance(proj, str) else []
    if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise PretrainerError(f"{f.where}: feed_forward_proj={proj!r}: expected ACT or gated-ACT")
    gated = f.get("is_gated_act", len(parts) == 2)
    act = f.get("dense_act_fn", "gelu_new" if proj == "gated-gelu" else parts[-1])
    mlp = _T5_ACT_IN.get((gated, act))
    if mlp is None:
        raise PretrainerError(f"{f.where}: feed_forward_proj={proj!r} (is_gated_act={gated!r}, dense_act_fn="
                              f"{act!r}) has no pretrainer equivalent (expected relu, gelu, gelu_new, "
                              f"gated-gelu or gated-silu)")
    tied = f.get("tie_word_embeddings", not mt5)
    if mt5:
        f.expect("scale_decoder_outputs", False, False)  # MT5ForConditionalGeneration never rescales
        scale = False
    else:
        scale = bool(f.get("scale_decoder_outputs", tied is not False))
    d_model, n_head, d_kv = f.get("d_model"), f.get("num_heads"), f.get("d_kv")
    return ModelConfig(
        arch="encoder-decoder", n_layer=f.get("num_layers"),
        n_decoder_layer=f.get("num_decoder_layers", f.get("num_layers")), n_head=n_head,
        d_model=d_model, d_head=None if d_kv * n_head == d_model else d_kv, d_ff=f.get("d_ff"),
        vocab_size=f.get("vocab_size"), max_seq_len=512, norm="rmsnorm",
        norm_eps=f.get("layer_norm_epsilon", 1e-6), prenorm=True, position="relative",
        rel_buckets=f.get("relative_attention_num_buckets", 32),
        rel_max_distance=f.get("relative_attention_max_distance", 128), attn_scale=False, mlp=mlp,
        bias=False, tie_embeddings=True, scale_tied_output=scale, dropout=f.get("dropout_rate", 0.1),
        scaled_residual_init=False,
    )


def _bart_config(f: _Fields) -> ModelConfig:
    _plain(f, encoder_decoder=True)
    f.expect("tie_word_embeddings", True, True)
    f.expect("decoder_attention_heads", f.get("encoder_attention_heads"), f.get("encoder_attention_heads"))
    f.expect("decoder_ffn_dim", f.get("encoder_ffn_dim"), f.get("encoder_ffn_dim"))
    # fields of early transformers BART configs, with the values today's BartModel computes with
    for key, value in (("add_bias_logits", False), ("add_final_layer_norm", False), ("normalize_before", False),
                       ("normalize_embedding", True), ("static_position_embeddings", False),
                       ("extra_pos_embeddings", 2)):
        f.expect(key, value, value)
    f.expect("num_hidden_layers", f.get("encoder_layers"), f.get("encoder_layers"))
    f.ignore("force_bos_token_to_be_generated")  # generation only
    return ModelConfig(
        arch="encoder-decoder", n_layer=f.get("encoder_layers"),
        n_decoder_layer=f.get("decoder_layers", f.get("encoder_layers")),
        n_head=f.get("encoder_attention_heads"), d_model=f.get("d_model"), d_ff=f.get("encoder_ffn_dim"),
        vocab_size=f.get("vocab_size"), max_seq_len=f.get("max_position_embeddings", 1024),
        norm="layernorm", norm_eps=1e-5, prenorm=False, position="learned",
        mlp=f.choice("activation_function", "gelu", {v: k for k, v in _BART_ACT.items()}), bias=True,
        tie_embeddings=True, embed_norm=True, embed_scale=bool(f.get("scale_embedding", False)),
        dropout=f.get("dropout", 0.1), init_std=f.get("init_std", 0.02), scaled_residual_init=False,
    )


def _neox_config(f: _Fields) -> ModelConfig:
    """GPT-NeoX: rope on the first ``partial_rotary_factor`` of each head (transformers 5's
    ``rope_parameters``; 4.x: ``rotary_pct`` and ``rotary_emb_base``, which must agree when both are
    written)."""
    _plain(f)
    theta, fraction = f.rope()
    theta = f.same("rope_theta", theta, f.get("rotary_emb_base", None))
    fraction = f.same("partial_rotary_factor", fraction, f.get("rotary_pct", None))
    f.expect("attention_bias", True, True)  # our one bias switch: GPT-NeoX's MLP and norms always have them
    d_model, n_head = f.get("hidden_size"), f.get("num_attention_heads")
    f.expect("head_dim", d_model // n_head, d_model // n_head)
    return ModelConfig(
        n_layer=f.get("num_hidden_layers"), n_head=n_head, d_model=d_model,
        d_ff=f.get("intermediate_size"), vocab_size=f.get("vocab_size"),
        max_seq_len=f.get("max_position_embeddings", 2048), norm="layernorm",
        norm_eps=f.get("layer_norm_eps", 1e-5), position="rope",
        rope_theta=float(theta if theta is not None else 10000.0),
        rope_fraction=float(fraction if fraction is not None else 0.25),
        parallel_block=bool(f.get("use_parallel_residual", True)),
        mlp=f.choice("hidden_act", "gelu", _NEOX_ACT_IN), bias=True,
        tie_embeddings=f.get("tie_word_embeddings", False), dropout=f.get("hidden_dropout", 0.0),
        init_std=f.get("initializer_range", 0.02), scaled_residual_init=False,
    )


def _rope_decoder(f: _Fields, mlp: str, bias: bool, **options) -> ModelConfig:
    """The fields Llama, Mistral, Qwen2 and Gemma share: a rope, RMSNorm, gated-MLP decoder with
    grouped-query attention and heads of ``head_dim`` (by default hidden_size / heads)."""
    _plain(f)
    theta, fraction = f.rope()
    if fraction not in (None, 1.0):
        raise PretrainerError(f"{f.where}: partial_rotary_factor={fraction!r} has no pretrainer equivalent in "
                              f"{f.raw.get('model_type')} (whole heads rotate)")
    d_model, n_head = f.get("hidden_size"), f.get("num_attention_heads")
    head_dim = f.get("head_dim", d_model // n_head)
    tied = options.pop("tied", False)
    return ModelConfig(
        n_layer=f.get("num_hidden_layers"), n_head=n_head, n_kv_heads=f.get("num_key_value_heads", n_head),
        d_model=d_model, d_head=None if head_dim * n_head == d_model else head_dim,
        d_ff=f.get("intermediate_size"), vocab_size=f.get("vocab_size"),
        max_seq_len=options.pop("max_seq_len", f.get("max_position_embeddings", 2048)), norm="rmsnorm",
        norm_eps=f.get("rms_norm_eps", 1e-6), position="rope", rope_theta=float(theta or 10000.0), mlp=mlp,
        bias=bias, tie_embeddings=f.get("tie_word_embeddings", tied), dropout=f.get("attention_dropout", 0.0),
        init_std=f.get("initializer_range", 0.02), scaled_residual_init=False, **options,
    )


def _llama_config(f: _Fields) -> ModelConfig:
    bias = f.get("attention_bias", False)
    f.expect("mlp_bias", False, bias)  # one bias switch covers attention and MLP
    max_seq_len = f.get("max_position_embeddings", 2048)
    # Mistral's sliding window is exact for every sequence that fits inside it
    max_seq_len = min(max_seq_len, f.get("sliding_window", max_seq_len))
    return _rope_decoder(f, f.choice("hidden_act", "silu", _LLAMA_ACT_IN), bias, max_seq_len=max_seq_len)


def _qwen2_config(f: _Fields) -> ModelConfig:
    """Qwen2: Llama with biases on the query, key and value projections (always) and none elsewhere.
    Layers of ``sliding_attention`` (``use_sliding_window``, the layers from ``max_window_layers`` on)
    are exact for every sequence inside the window, which caps max_seq_len."""
    n_layer, max_seq_len = f.get("num_hidden_layers"), f.get("max_position_embeddings", 32768)
    window = f.get("sliding_window", None) if f.get("use_sliding_window", False) else None
    f.ignore("sliding_window")  # (unused without use_sliding_window)
    first = f.get("max_window_layers", 28)
    kinds = f.get("layer_types", None) or ["sliding_attention" if window is not None and i >= first
                                           else "full_attention" for i in range(n_layer)]
    for kind in kinds:
        if kind not in ("full_attention", "sliding_attention"):
            raise PretrainerError(f"{f.where}: layer_types holds {kind!r}, which has no pretrainer equivalent")
    if window is not None and "sliding_attention" in kinds:
        max_seq_len = min(max_seq_len, window)
    return _rope_decoder(f, f.choice("hidden_act", "silu", _LLAMA_ACT_IN), False, qkv_bias=True,
                         max_seq_len=max_seq_len)


def _gemma_config(f: _Fields) -> ModelConfig:
    """Gemma: the token embeddings times sqrt(hidden_size), norms that scale by 1 + weight (the name
    table converts them), a GeGLU MLP (its ``hidden_act`` gelu is the tanh approximation, as
    transformers 5 reads it; 4.x read ``hidden_activation``, which must then agree) and heads of
    ``head_dim``."""
    f.expect("attention_bias", False, False)  # Gemma's covers o too, our qkv_bias q, k and v only
    f.expect("use_bidirectional_attention", False, False)
    mlp = f.choice("hidden_act", "gelu_pytorch_tanh", _GEMMA_ACT_IN)
    if f.get("hidden_activation", None) is not None and f.choice("hidden_activation", None, _GEMMA_ACT_IN) != mlp:
        raise PretrainerError(f"{f.where}: hidden_activation={f.raw['hidden_activation']!r} and hidden_act="
                              f"{f.raw.get('hidden_act')!r} disagree (transformers 4.x read the first, 5.x the second)")
    return _rope_decoder(f, mlp, False, embed_scale=True, tied=True)


def _mixtral_config(f: _Fields) -> ModelConfig:
    """A Mistral whose MLPs are experts: every token routed to ``num_experts_per_tok`` of
    ``num_local_experts``, none dropped (capacity_factor 0)."""
    f.expect("router_jitter_noise", 0.0, 0.0)  # pretrainer's router has no input noise
    cfg = _llama_config(f)
    n, k = f.get("num_local_experts"), f.get("num_experts_per_tok")
    if not 2 <= k <= n:
        raise PretrainerError(f"{f.where}: num_experts_per_tok={k}: expected 2 .. num_local_experts={n} "
                              f"(Mixtral renormalises the chosen experts' weights; one expert would weigh 1)")
    cfg.moe = MoEConfig(n_experts=n, top_k=k, capacity_factor=0.0,
                        aux_loss_weight=float(f.get("router_aux_loss_coef", 0.001)))
    return cfg


_CONFIG_READERS.update({
    "gpt2": _gpt2_config, "gpt_neo": _gpt_neo_config, "llama": _llama_config, "mistral": _llama_config,
    "qwen2": _qwen2_config, "gemma": _gemma_config, "mixtral": _mixtral_config, "gpt_neox": _neox_config,
    "bert": _bert_config, "roberta": _roberta_config, "albert": _albert_config, "electra": _electra_config,
    "distilbert": _distilbert_config, "t5": _t5_config, "mt5": lambda f: _t5_config(f, mt5=True),
    "bart": _bart_config,
})


_PREFIX = {"gpt2": "transformer.", "gpt_neo": "transformer.", "llama": "model.", "mixtral": "model.",
           "qwen2": "model.", "gemma": "model.", "gpt_neox": "gpt_neox.", "bert": "bert.", "roberta": "roberta.",
           "albert": "albert.", "electra": "electra.", "distilbert": "distilbert.", "t5": "", "bart": "model."}
#: The Hugging Face model whose checkpoint has the backbone only, for families with an MLM head.
_BARE = {"bert": "BertModel", "roberta": "RobertaModel", "albert": "AlbertModel", "distilbert": "DistilBertModel",
         "electra": "ElectraModel"}


def _full_names(weights: dict, family: str) -> dict:
    """``weights`` with the names a whole model of ``family`` gives them: the base model's prefix
    put back (checkpoints of a bare GPT2Model, LlamaModel, BertModel ...), GPT-NeoX's newer
    ``lm_head`` read as ``embed_out``, and a copy (:data:`_COPIES`) stored without its source read
    as the source (transformers 5 ties them either way round)."""
    prefix = _PREFIX[family]
    heads = ("lm_head.", "embed_out.", "cls.", "final_logits_bias", "discriminator_predictions.",
             "generator_predictions.", "generator_lm_head.", "vocab_", "sop_classifier.")
    if not any(k.startswith(prefix) for k in weights):
        weights = {k if k.startswith(heads) else prefix + k: v for k, v in weights.items()}
    if family == "gpt_neox" and "lm_head.weight" in weights and "embed_out.weight" not in weights:
        weights = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in weights.items()}
    for copy, source in _COPIES.get(family, {}).items():
        if copy in weights and source not in weights:
            weights = {(source if k == copy else k): v for k, v in weights.items()}
    return weights


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b.to(a.dtype))


def config_for_weights(cfg: ModelConfig, names, where: str = "weights", read=None) -> ModelConfig:
    """``cfg`` (from ``config.json``) as the checkpoint's tensor ``names`` (full names) complete it:
    BERT or RoBERTa weights without a pooler give a model without one (``BertForMaskedLM``), BERT
    weights with ``cls.seq_relationship`` one with the next-sentence head (``BertForPreTraining``).

    ``read(name)``: the tensor of that name, to compare a tied output matrix with the embedding. A
    config that ties them while the checkpoint holds an output matrix of its own (T5 files written by
    transformers 5, whose T5 configs always say tied) gives an untied model, as transformers 5 loads
    it; in families whose output is always the embedding it is refused."""
    family = hf_family(cfg)
    if family in ("bert", "roberta") and cfg.pooler and f"{_PREFIX[family]}pooler.dense.weight" not in names:
        cfg = dataclasses.replace(cfg, pooler=False)
    if family == "albert" and cfg.pooler and "albert.pooler.weight" not in names:  # AlbertForMaskedLM has none
        cfg = dataclasses.replace(cfg, pooler=False)
    if family == "albert" and "sop_classifier.classifier.weight" in names:  # AlbertForPreTraining
        if not cfg.pooler:
            raise PretrainerError(f"{where}: sop_classifier without albert.pooler (the sentence-order head "
                                  f"reads the pooled <cls> state)")
        cfg = dataclasses.replace(cfg, nsp_head=True)
    if family == "electra":  # the head present decides: discriminator or generator
        if any(k.startswith("generator_predictions.") for k in names):
            cfg = dataclasses.replace(cfg, rtd_head=False)
            hf_family(cfg)  # a generator's own requirements (gelu)
        elif any(k.startswith("discriminator_predictions.") for k in names):
            cfg = dataclasses.replace(cfg, rtd_head=True)
    if family == "bert" and "cls.seq_relationship.weight" in names:  # BertForPreTraining
        if not cfg.pooler:
            raise PretrainerError(f"{where}: cls.seq_relationship without bert.pooler (the next-sentence "
                                  f"head reads the pooled <cls> state)")
        cfg = dataclasses.replace(cfg, nsp_head=True)
    outputs, embedding = _OUTPUT[family]
    for name in outputs:
        if not (cfg.tie_embeddings and read is not None and name in names and embedding in names):
            continue
        if _same(read(name), read(embedding)):
            continue
        if family not in _UNTIED_OK:
            raise PretrainerError(f"{where}: '{name}' differs from '{embedding}': an output layer of its own, "
                                  f"which pretrainer's {family} does not have (its output is the token embedding)")
        if cfg.scale_tied_output:
            raise PretrainerError(f"{where}: '{name}' differs from '{embedding}' (an untied head) while "
                                  f"scale_decoder_outputs is true; pretrainer rescales tied T5 heads only")
        cfg = dataclasses.replace(cfg, tie_embeddings=False)
    return cfg


def _folder_names(folder: Path):
    """``(names, where, read)``: the tensor names of the checkpoint in ``folder``, the file to cite,
    and ``read(name)``, which loads one tensor (a safetensors file's alone)."""
    from safetensors import safe_open

    def opened(path: Path):
        try:
            return safe_open(str(path), "pt")
        except (SafetensorError, OSError) as e:
            raise PretrainerError(f"{path}: not a readable checkpoint ({e})") from None

    if (folder / "model.safetensors").is_file():
        where = str(folder / "model.safetensors")
        with opened(folder / "model.safetensors") as f:
            names = list(f.keys())

        def read(name):
            with opened(folder / "model.safetensors") as f:
                return f.get_tensor(name)
        return names, where, read
    if (folder / "model.safetensors.index.json").is_file():
        where = str(folder / "model.safetensors.index.json")
        weight_map = _read_json(folder / "model.safetensors.index.json").get("weight_map")
        if not isinstance(weight_map, dict):
            raise PretrainerError(f"{where}: missing field 'weight_map'")

        def read(name):
            with opened(folder / weight_map[name]) as f:
                return f.get_tensor(name)
        return list(weight_map), where, read
    weights, where = _read_weights(folder)
    return list(weights), where, weights.__getitem__


def hf_folder_config(hf_dir: str | Path) -> ModelConfig:
    """The ModelConfig :func:`import_hf` gives a Hugging Face folder: its ``config.json`` completed
    by the names of its tensors (:func:`config_for_weights`), reading from a safetensors file only
    the tensors that tell a tied head from an untied one."""
    from .vit import is_vit_config, vit_folder_config

    folder = Path(hf_dir)
    raw = _read_json(folder / "config.json")
    if is_vit_config(raw):  # ViT / ViTMAE: interop.vit
        return vit_folder_config(folder, raw, *_read_weights(folder))
    cfg = config_from_hf(raw, where=str(folder / "config.json"))
    names, where, read = _folder_names(folder)
    full = _full_names({name: name for name in names}, hf_family(cfg))  # full name -> stored name
    return config_for_weights(cfg, full, where, lambda name: read(full[name]))


def from_hf_state_dict(cfg: ModelConfig, weights: dict[str, torch.Tensor],
                       where: str = "weights", say=None) -> torch.nn.Module:
    """Our model, in eval mode, holding the Hugging Face ``weights`` (any dtype; stored as float32).

    Keys may lack the ``transformer.``/``model.``/``bert.`` prefix (checkpoints of the bare
    GPT2Model, LlamaModel or BertModel); causal-mask buffers of old GPT-2 checkpoints, rotary tables
    and BERT's position ids are ignored. BERT weights without ``bert.pooler`` give a model without
    a pooler, and with ``cls.seq_relationship`` one with the next-sentence head
    (:func:`config_for_weights`). A checkpoint of a bare backbone (``BertModel``, ``RobertaModel``,
    ``AlbertModel``, ``DistilBertModel``; ``ElectraModel``) gets its MLM head (ELECTRA: its
    detection head) drawn afresh, the same at every import, and ``say(line)`` is told so.

    Every tensor of the checkpoint must be one the family's name table maps, a copy equal to the
    tensor it repeats, or a buffer that holds no weights; a missing, unexpected or misshapen
    tensor raises a PretrainerError naming it.
    """
    family = hf_family(cfg)
    weights = _full_names(weights, family)
    cfg = config_for_weights(cfg, weights, where, weights.__getitem__)
    for copy, source in _COPIES.get(family, {}).items():
        if copy in weights and not _same(weights[copy], weights[source]):
            raise PretrainerError(f"{where}: '{copy}' differs from '{source}', which it repeats in "
                                  f"{family} (pretrainer holds one tensor for both)")
    model = make_model(cfg)
    expected = model.state_dict()
    table = _tensors(cfg, family)
    fresh = _fresh_head(cfg, family, table, weights, expected)
    if fresh:
        weights = {**weights, **fresh}
        if say is not None:
            head = "replaced-token detection head" if family == "electra" else "MLM head"
            say(f"{where}: a bare {_BARE[family]} checkpoint: its {head} is drawn afresh (N(0, {cfg.init_std}), "
                f"seed 0); fine-tuning does not read it, and its logits mean nothing until pretraining trains it")
    ours, used = {}, set()
    for t in table:
        for name in t.hf:
            if name not in weights:
                raise PretrainerError(f"{where}: missing tensor '{name}'")
        pieces = [weights[name].t() if t.conv1d else weights[name] for name in t.hf]
        tensor = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        tensor = tensor[t.lead_rows:]
        if t.offset:
            tensor = tensor.float() + t.offset
        if t.per_head and tensor.shape == expected[t.ours].shape:
            tensor = _qkv_rows(tensor, t.per_head, to_hf=False)
        if tensor.shape != expected[t.ours].shape:
            shapes = " + ".join(f"{n} {list(weights[n].shape)}" for n in t.hf)
            raise PretrainerError(f"{where}: {shapes} does not fit {list(expected[t.ours].shape)} "
                                  f"expected from config.json")
        ours[t.ours] = tensor
        used.update(t.hf)
    # copies of a tensor the table maps: each stack's embedding, a tied output matrix (checked equal)
    ignored = set(_COPIES.get(family, ())) | (set(_OUTPUT[family][0]) if cfg.tie_embeddings else set())
    if family == "bart" and "final_logits_bias" in weights:
        if bool(weights["final_logits_bias"].any()):
            raise PretrainerError(f"{where}: final_logits_bias is not zero; pretrainer's BART has "
                                  f"no output bias")
        ignored.add("final_logits_bias")
    unexpected = [k for k in weights if k not in used and k not in ignored and not _IGNORED.search(k)]
    if unexpected:
        raise PretrainerError(f"{where}: unexpected tensor '{unexpected[0]}' "
                              f"({len(unexpected)} in all) for a {family} model")
    # a tied or shared tensor's other names (the output matrix, later layers that share the first's)
    first = {}
    for key, t in model.state_dict(keep_vars=True).items():
        first.setdefault(id(t), key)
    for key, t in model.state_dict(keep_vars=True).items():
        if key not in ours and is_tied_copy(model, key):
            ours[key] = ours[first[id(t)]]
    model.load_state_dict(ours)
    return model.eval()


def _fresh_head(cfg: ModelConfig, family: str, table: list, weights: dict,
                expected: dict) -> dict[str, torch.Tensor]:
    """The head a bare backbone's checkpoint lacks (:data:`_BARE`), drawn from seed 0 (the same at
    every import): N(0, init_std) matrices, zero biases, unit norm gains. Empty when the checkpoint
    holds any tensor of that head (a part missing is then an error)."""
    kind = "rtd." if cfg.rtd_head else "mlm."
    head = [t for t in table if t.ours.startswith(kind)]
    if family not in _BARE or not head or any(n in weights for t in head for n in t.hf):
        return {}
    gen = torch.Generator().manual_seed(0)
    out = {}
    for t in head:
        (name,), shape = t.hf, expected[t.ours].shape
        if t.ours.endswith(".bias"):
            out[name] = torch.zeros(shape)
        elif t.ours.startswith("mlm.norm."):
            out[name] = torch.ones(shape)
        else:
            out[name] = torch.randn(shape, generator=gen) * cfg.init_std
    return out


def import_hf(hf_dir: str | Path, say=None) -> torch.nn.Module:
    """Our model from a Hugging Face folder: ``config.json`` and ``model.safetensors``, a sharded
    ``model.safetensors.index.json``, or ``pytorch_model.bin`` (read with ``weights_only=True``).

    Returns the model in eval mode with float32 weights; ``say(line)`` hears what the import drew
    afresh (:func:`from_hf_state_dict`).
    """
    folder = Path(hf_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PretrainerError(f"{config_path}: missing; expected a Hugging Face model folder")
    raw = _read_json(config_path)
    if raw.get("model_type") in ("vit", "vit_mae"):  # images: interop.vit
        from .vit import import_vit

        return import_vit(folder, raw, *_read_weights(folder))
    cfg = config_from_hf(raw, where=str(config_path))
    weights, where = _read_weights(folder)
    return from_hf_state_dict(cfg, weights, where=where, say=say)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainerError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise PretrainerError(f"{path}: expected a JSON object")
    return data


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of the checkpoint in ``folder`` and the file name to cite in errors."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return _read_file(folder / single), str(folder / single)
        if (folder / index).is_file():
            weight_map = _read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise PretrainerError(f"{folder / index}: missing field 'weight_map'")
            weights = {}
            for shard in sorted(set(weight_map.values())):
                weights.update(_read_file(folder / shard))
            return weights, str(folder / index)
    raise PretrainerError(f"{folder}: no model.safetensors, model.safetensors.index.json or "
                          f"pytorch_model.bin")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PretrainerError(f"{path}: missing (named by the checkpoint index)") from None
    except pickle.UnpicklingError:
        raise PretrainerError(f"{path}: holds pickled objects other than tensors; refusing to load "
                              f"it (convert it to model.safetensors)") from None
    except (SafetensorError, RuntimeError, OSError, EOFError) as e:
        first = str(e).strip().splitlines()[:1] or [type(e).__name__]
        raise PretrainerError(f"{path}: not a readable checkpoint ({first[0]})") from None
    if not isinstance(tensors, dict):
        raise PretrainerError(f"{path}: expected a state dict (names to tensors)")
    return tensors


def import_run(hf_dir: str | Path, out: str | Path, say=None) -> Path:
    """Make a run folder from a Hugging Face model folder: ``config.yaml``, one checkpoint with the
    weights (``checkpoints/step_00000000``) and the tokenizer when the folder has one, so that
    ``pretrainer generate``/``evaluate``/``export`` and :func:`pretrainer.load` work on it.
    ``say(line)`` hears what the import drew afresh (a bare backbone's head), which the
    checkpoint's ``state.json`` also keeps (``import_notes``)."""
    from ..config import RunConfig, save_config
    from ..train.objectives import default_objective
    from ..train.checkpoint import list_checkpoints, save_checkpoint

    out = Path(out)
    check_out_folder(out, "run", ("config.yaml", "checkpoints", "metrics.jsonl", ".lock"))  # never a data folder
    if list_checkpoints(out):
        raise PretrainerError(f"out={out}: already holds a run; choose another folder")
    notes = []
    model = import_hf(hf_dir, say=lambda line: (notes.append(line), say and say(line)))
    cfg = RunConfig(model=model.cfg, data=None, out=str(out), objective=default_objective(model.cfg.arch))
    with writing_folder(out, "import into"):  # a full disk: one line naming out, nothing half-written
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out, model, None, {"step": 0, "samples": 0, "tokens": 0,
                                           "imported_from": str(Path(hf_dir).resolve()),
                                           **({"import_notes": notes} if notes else {})})
        if (Path(hf_dir) / "tokenizer.json").is_file():
            (out / "tokenizer").mkdir(exist_ok=True)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (Path(hf_dir) / name).is_file():
                    shutil.copy2(Path(hf_dir) / name, out / "tokenizer" / name)
        save_config(cfg, out / "config.yaml")  # last: its presence marks a complete run folder
    return out
