"""Typed configuration: dataclasses, model presets, YAML files and ``a.b=value`` overrides.

A run is described by one :class:`RunConfig`::

    model:  a preset name (``gpt2-small``) or a model section (see :class:`ModelConfig`)
    data:   a folder made by ``pretrainer prepare`` (token shards, or images with ``--images``)
    out:    the run folder
    objective: clm (decoder-only causal LM) | mlm (encoder-only masked LM) | mlm+nsp, mlm+sop
               (masked LM plus BERT's next-sentence or ALBERT's sentence-order prediction) | electra
               (ELECTRA's replaced-token detection) | distill (knowledge distillation) | span (T5 span
               corruption) | denoise (BART noising) | prefix_lm (a prefix LM) | mae (masked
               autoencoder on image patches) | classify (images to labels) | gato (text, image
               patches and control values in one stream, Gato-style), each for the
               architectures it declares (pretrainer.train.objectives)
    init_from: a run, checkpoint or Hugging Face folder whose weights the run starts from
    masking: what mlm (and mlm+nsp, mlm+sop, electra) selects: token (BERT) | word (whole words) | span (SpanBERT)
    mask_prob: the share of the tokens mlm (and mlm+nsp, mlm+sop) selects (electra: electra.mask_prob)
    noise:  how span / denoise corrupt (see :class:`NoiseConfig`)
    electra: the generator's size and the loss weight of objective=electra (see :class:`ElectraConfig`)
    mae:    objective=mae only: the mask ratio and the decoder's size (see :class:`MAEConfig`)
    gato:   objective=gato only: the tasks mixed and the image patches' size (see :class:`GatoConfig`)
    distill: objective=distill only: the teacher and the loss weights (see :class:`DistillConfig`)
    train:  optimisation and bookkeeping (see :class:`TrainConfig`)

Values come, in order, from the defaults, a YAML file, then command-line overrides such as
``model=llama-tiny model.n_layer=2 train.lr=1e-3``. Unknown keys and bad values raise
:class:`~pretrainer.errors.ConfigError` with a one-line message that names the key and, for a
misspelt key, the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

# ----------------------------------------------------------------------------------------------
# Model


@dataclass
class MoEConfig:
    """A mixture-of-experts MLP (``model.moe``): each token goes to ``top_k`` of ``n_experts``
    MLPs chosen by a learned router (Shazeer et al. 2017; Switch: Fedus et al. 2021, top-1;
    Mixtral: Jiang et al. 2024, top-2). ``n_experts: 0`` is a dense model."""

    n_experts: int = 0  # 0 = dense MLPs; Switch-Base-8 and Mixtral 8x7B have 8
    top_k: int = 1  # experts per token: 1 = Switch, 2 = Mixtral (their weights renormalised to sum to 1)
    capacity_factor: float = 1.25  # training: an expert takes at most this x its even share; 0 = no limit
    aux_loss_weight: float = 0.01  # Switch's load-balancing loss n_experts * sum_i f_i P_i (Fedus et al.: 0.01)
    z_loss_weight: float = 0.0  # router z-loss, mean logsumexp(router logits)^2 (ST-MoE: 0.001)
    every: int = 1  # MoE layers: 1, 1 + every, 1 + 2 every ... as Switch places them; 1 = all (Mixtral)
    d_ff: int | None = None  # each expert's hidden size (None = the model's d_ff)

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` of a stack has experts (counting from 0 in each stack)."""
        return self.n_experts > 0 and i % self.every == 1 % self.every


@dataclass
class ModelConfig:
    """Architecture options of the one transformer core; a family is a preset of these."""

    arch: str = "decoder"  # decoder (GPT/Llama) | encoder (BERT) | encoder-decoder (T5/BART)
    n_layer: int = 4  # encoder-decoder: the encoder's layers
    n_decoder_layer: int | None = None  # encoder-decoder: the decoder's layers (None = n_layer)
    n_head: int = 4  # attention heads
    n_kv_heads: int | None = None  # None = n_head (MHA); 1 = MQA; in between = GQA
    d_model: int = 256  # width of the residual stream
    d_ff: int | None = None  # None = 4 * d_model
    d_head: int | None = None  # None = d_model // n_head (T5 v1.1 small: 6 heads of 64 in 512)
    d_embed: int | None = None  # encoder: factorised embeddings of this width, projected up to d_model (ALBERT, ELECTRA-small); None = d_model
    share_layers: str = "none"  # encoder: cross-layer sharing (ALBERT): none | all (one block) | attention | ffn
    vocab_size: int | None = None  # None = taken from the data folder's tokenizer when training
    max_seq_len: int = 256  # longest input (positions, caches)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5  # epsilon of every norm
    prenorm: bool = True  # pre-norm (GPT-2, Llama) or post-norm (original Transformer, GPT-1, BERT)
    position: str = "learned"  # learned | rope | sinusoidal | relative (T5 bias) | none
    rope_theta: float = 10000.0  # rope: the base of the rotation frequencies
    rope_fraction: float = 1.0  # rope: the share of each head's dims rotated, the first ones (GPT-NeoX/Pythia 0.25)
    rel_buckets: int = 32  # relative: T5's log-spaced distance buckets, one bias per head and bucket
    rel_max_distance: int = 128  # relative: distances beyond this share the last bucket
    attn_scale: bool = True  # scores divided by sqrt(head_dim); T5 folds that into its init (false)
    attention_layers: str = "global"  # the layers' attention, a pattern repeated: "global,local" (GPT-3, GPT-Neo)
    attention_window: int | None = None  # local layers: each position sees the last W (itself included)
    parallel_block: bool = False  # pre-norm: x + attn(norm(x)) + mlp(norm(x)) (GPT-J, GPT-NeoX, PaLM)
    parallel_norms: int = 2  # parallel block: 2 = a norm per branch (GPT-NeoX), 1 = one shared (GPT-J, PaLM)
    mlp: str = "gelu"  # gelu (erf) | gelu_tanh (GPT-2) | relu | swiglu | geglu | geglu_tanh (T5 v1.1)
    bias: bool = True  # biases in linear layers and norms
    qkv_bias: bool | None = None  # biases of the query, key and value projections (None = as bias; GPT-Neo: false)
    tie_embeddings: bool = True  # the output layer is the token embedding
    scale_tied_output: bool = False  # T5 (v1.0): hidden states times d_model**-0.5 before a tied head
    dropout: float = 0.0  # dropout on embeddings, attention and residual branches
    init_std: float = 0.02  # standard deviation of the initial weights
    scaled_residual_init: bool = True  # GPT-2: residual projections scaled by 1/sqrt(2 n_layer)
    init_scheme: str = "normal"  # normal: N(0, init_std) | t5: N(0, 1/fan_in) matrices, N(0, 1) embeddings
    embed_norm: bool = False  # a norm on the summed embeddings (BERT)
    embed_scale: bool = False  # token embeddings times sqrt(d_model) before positions are added (Vaswani et al. 2017; Gemma, BART's scale_embedding)
    type_vocab_size: int = 0  # segment (token-type) embeddings; encoder only (BERT: 2)
    pooler: bool = False  # encoder: dense + tanh on the first (<cls>) token's state (BERT)
    mlm_head: bool = True  # encoder: dense + activation + norm before the tied output (BERT)
    rtd_head: bool = False  # encoder: ELECTRA's discriminator head (dense + activation + one logit per token: replaced?) instead of the MLM head
    nsp_head: bool = False  # encoder: 2-way classifier on the pooled <cls> state (BERT's next-sentence head; mlm+nsp, mlm+sop)
    position_offset: int = 0  # learned: position i reads table row i + offset (RoBERTa: 2; the table has max_seq_len + offset rows)
    image_size: int | None = None  # vit: side of the (square) input images in pixels; None = from the data
    patch_size: int = 16  # vit: side of a patch; an image is (image_size / patch_size)^2 patches + <cls>
    channels: int | None = None  # vit: colour channels of the input (3 = RGB, 1 = grey); None = from the data
    n_classes: int = 0  # vit: a linear classifier on the final <cls> state with this many outputs; 0 = none
    moe: MoEConfig = field(default_factory=MoEConfig)  # mixture-of-experts MLPs (n_experts > 0)
    preset: str | None = None  # the preset this section started from (informational)

    def __post_init__(self):
        # from a preset, a saved config or a YAML mapping; a copy (dataclasses.replace shares it)
        self.moe = MoEConfig(**self.moe) if isinstance(self.moe, dict) else dataclasses.replace(self.moe)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_head

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def embed_dim(self) -> int:
        """Width of the token, position and segment embeddings (``d_embed``, else ``d_model``)."""
        return self.d_embed or self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_head

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that rope rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.rope_fraction)

    @property
    def has_qkv_bias(self) -> bool:
        """Whether the query, key and value projections have biases (``qkv_bias``, else ``bias``)."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layer or self.n_layer

    @property
    def n_patches(self) -> int:
        """vit: patches per image, ``(image_size // patch_size) ** 2`` (the positions are these + <cls>)."""
        return (self.image_size // self.patch_size) ** 2 if self.image_size else 0

    def layer_kind(self, i: int) -> str:
        """``global`` or ``local``: layer ``i``'s attention (``attention_layers`` repeated)."""
        pattern = [p.strip() for p in self.attention_layers.split(",")]
        return pattern[i % len(pattern)]

    def validate(self, where: str = "model") -> None:
        _choice(where, "arch", self.arch, list(ARCH_NAMES))
        _choice(where, "norm", self.norm, ["layernorm", "rmsnorm"])
        _choice(where, "position", self.position, ["learned", "rope", "sinusoidal", "relative", "none"])
        _choice(where, "init_scheme", self.init_scheme, ["normal", "t5"])
        _choice(where, "mlp", self.mlp, ["gelu", "gelu_tanh", "relu", "swiglu", "geglu", "geglu_tanh"])
        for name in ("n_layer", "n_head", "d_model", "max_seq_len", "rel_buckets", "rel_max_distance"):
            _positive(where, name, getattr(self, name))
        for name in ("n_kv_heads", "d_ff", "vocab_size", "n_decoder_layer", "d_head", "d_embed"):
            if getattr(self, name) is not None:
                _positive(where, name, getattr(self, name))
        if self.d_head is None and self.d_model % self.n_head:
            raise ConfigError(
                f"{where}.d_model={self.d_model} must be divisible by {where}.n_head={self.n_head}"
            )
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"{where}.n_head={self.n_head} must be a multiple of {where}.n_kv_heads={self.kv_heads}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"{where}: rope needs an even head dimension, got {self.head_dim}")
        if not 0.0 < self.rope_fraction <= 1.0:
            raise ConfigError(f"{where}.rope_fraction={self.rope_fraction}: expected a value in (0, 1]")
        if self.rope_fraction != 1.0:
            if self.position != "rope":
                raise ConfigError(f"{where}.rope_fraction={self.rope_fraction} applies to position=rope only")
            if self.rotary_dim < 2 or self.rotary_dim % 2:
                raise ConfigError(f"{where}.rope_fraction={self.rope_fraction}: rotates {self.rotary_dim} of "
                                  f"{self.head_dim} dims of a head; expected an even number, at least 2")
        if self.parallel_norms not in (1, 2):
            raise ConfigError(f"{where}.parallel_norms={self.parallel_norms!r}: expected 1 (one shared norm) "
                              f"or 2 (a norm per branch)")
        if self.parallel_block:
            if not self.prenorm:
                raise ConfigError(f"{where}.parallel_block=true needs prenorm=true (both branches read "
                                  f"the normed block input)")
            if self.arch == "encoder-decoder":
                raise ConfigError(f"{where}.parallel_block applies to arch=decoder or encoder, not "
                                  f"encoder-decoder (no parallel form with cross-attention)")
        elif self.parallel_norms != 2:
            raise ConfigError(f"{where}.parallel_norms={self.parallel_norms} applies to parallel_block=true only")
        for name, ok, expected in (
                ("dropout", lambda v: 0 <= v < 1, "a value in [0, 1)"),
                ("init_std", lambda v: 0 < v <= 1, "a standard deviation in (0, 1] (GPT-2, Llama: 0.02)"),
                ("norm_eps", lambda v: v > 0, "a positive, finite value (1e-5, 1e-6)"),
                ("rope_theta", lambda v: v > 0, "a positive, finite base (10000)")):
            _finite(where, name, getattr(self, name), ok, expected)
        if self.type_vocab_size < 0:
            raise ConfigError(f"{where}.type_vocab_size={self.type_vocab_size}: expected a value >= 0")
        if self.arch not in ("encoder", "vit") and (self.type_vocab_size or self.pooler):
            name = "type_vocab_size" if self.type_vocab_size else "pooler"
            raise ConfigError(f"{where}.{name}={getattr(self, name)!r} applies to arch=encoder only")
        if self.embed_dim != self.d_model:
            if self.arch != "encoder":
                raise ConfigError(f"{where}.d_embed={self.d_embed} (factorised embeddings) applies to arch=encoder "
                                  f"only (ALBERT, ELECTRA); leave it unset")
            if not self.mlm_head and not self.rtd_head:
                raise ConfigError(f"{where}.d_embed={self.d_embed} needs {where}.mlm_head=true (its dense layer "
                                  f"maps d_model back to d_embed for the tied output)")
        if self.rtd_head and self.arch != "encoder":
            raise ConfigError(f"{where}.rtd_head=true (ELECTRA's replaced-token detection head) applies to "
                              f"arch=encoder only")
        if self.nsp_head and not (self.arch == "encoder" and self.pooler):
            raise ConfigError(f"{where}.nsp_head=true needs arch=encoder with {where}.pooler=true "
                              f"(the head reads the pooled <cls> state)")
        if not isinstance(self.position_offset, int) or self.position_offset < 0:
            raise ConfigError(f"{where}.position_offset={self.position_offset!r}: expected an integer >= 0")
        if self.position_offset and self.position != "learned":
            raise ConfigError(f"{where}.position_offset={self.position_offset} applies to position=learned only")
        if self.n_decoder_layer is not None and self.arch != "encoder-decoder":
            raise ConfigError(f"{where}.n_decoder_layer applies to arch=encoder-decoder only")
        self.validate_sharing(where)
        self.validate_image(where)
        kinds = [p.strip() for p in self.attention_layers.split(",")]
        for kind in kinds:
            _choice(where, "attention_layers", kind, ["global", "local"])
        if "local" in kinds:
            if self.attention_window is None or self.attention_window < 1:
                raise ConfigError(f"{where}.attention_layers={self.attention_layers!r} has local layers: "
                                  f"expected {where}.attention_window, a positive number of positions")
            if self.arch != "decoder":
                raise ConfigError(f"{where}.attention_layers: local (banded causal) attention applies to "
                                  f"arch=decoder only, got {self.arch}")
        if self.qkv_bias not in (None, True, False):
            raise ConfigError(f"{where}.qkv_bias={self.qkv_bias!r}: expected true, false or null (as {where}.bias)")
        if self.position == "relative" and self.rel_buckets < 4:
            raise ConfigError(f"{where}.rel_buckets={self.rel_buckets}: expected at least 4")
        self.validate_moe(f"{where}.moe")

    def validate_image(self, where: str) -> None:
        """The ViT fields: set for ``arch=vit`` only; patches that tile the image exactly."""
        if self.arch != "vit":
            for name, unset in (("image_size", None), ("channels", None), ("n_classes", 0)):
                if getattr(self, name) != unset:
                    raise ConfigError(f"{where}.{name}={getattr(self, name)!r} applies to arch=vit only")
            return
        _positive(where, "patch_size", self.patch_size)
        for name in ("image_size", "channels"):
            if getattr(self, name) is not None:
                _positive(where, name, getattr(self, name))
        if not isinstance(self.n_classes, int) or self.n_classes < 0:
            raise ConfigError(f"{where}.n_classes={self.n_classes!r}: expected 0 (no classifier) or a positive integer")
        if self.image_size is not None and self.image_size % self.patch_size:
            raise ConfigError(f"{where}.image_size={self.image_size} is not a multiple of {where}.patch_size="
                              f"{self.patch_size}: the patches must tile the image")
        if self.position != "learned" or self.position_offset:
            raise ConfigError(f"{where}.position={self.position!r}: a ViT has learned positions (one per patch "
                              f"and <cls>); expected position=learned, position_offset=0")
        if self.type_vocab_size or self.nsp_head or self.rtd_head:
            name = next(n for n in ("type_vocab_size", "nsp_head", "rtd_head") if getattr(self, n))
            raise ConfigError(f"{where}.{name}={getattr(self, name)!r} applies to text encoders, not arch=vit")

    def validate_sharing(self, where: str) -> None:
        """``share_layers``: ALBERT's cross-layer sharing, for encoders (a decoder's generation cache
        is kept per layer, by the attention module's index), and not of mixture-of-experts MLPs."""
        _choice(where, "share_layers", self.share_layers, list(SHARE_LAYERS))
        if self.share_layers == "none":
            return
        if self.arch != "encoder":
            raise ConfigError(f"{where}.share_layers={self.share_layers} (cross-layer sharing, ALBERT) applies "
                              f"to arch=encoder only; leave it none")
        if self.moe.n_experts and self.share_layers != "attention":
            raise ConfigError(f"{where}.share_layers={self.share_layers} shares the MLPs, which model.moe makes "
                              f"experts in some layers only; use share_layers=attention or moe.n_experts=0")

    def validate_moe(self, where: str) -> None:
        m = self.moe
        if m.n_experts == 0:
            return
        if m.n_experts < 0:
            raise ConfigError(f"{where}.n_experts={m.n_experts}: expected 0 (dense) or a positive integer")
        for name in ("top_k", "every"):
            _positive(where, name, getattr(m, name))
        if m.d_ff is not None:
            _positive(where, "d_ff", m.d_ff)
        if m.top_k > m.n_experts:
            raise ConfigError(f"{where}.top_k={m.top_k}: expected at most n_experts={m.n_experts}")
        for name in ("capacity_factor", "aux_loss_weight", "z_loss_weight"):
            value = getattr(m, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{where}.{name}={value}: expected a finite number >= 0")
        if m.every > 1 and self.n_layer < 2:
            raise ConfigError(f"{where}.every={m.every}: the first MoE layer is layer 1, but "
                              f"n_layer={self.n_layer}; set every=1")


#: ``model.share_layers``: what every layer takes from the first (ALBERT, Lan et al. 2020, Table 4).
SHARE_LAYERS = {"none": "every layer its own weights", "all": "one block (attention, MLP and norms) for every layer",
                "attention": "the first layer's self-attention in every layer (norms and MLPs per layer)",
                "ffn": "the first layer's MLP in every layer (norms and attention per layer)"}


#: The model architectures and what each is.
ARCH_NAMES = {"decoder": "decoder-only (GPT, Llama)", "encoder": "encoder-only (BERT)",
              "encoder-decoder": "encoder-decoder (T5, BART)",
              "vit": "encoder-only over image patches (ViT; MAE pretraining)"}


_GPT2 = dict(
    position="learned", norm="layernorm", prenorm=True, mlp="gelu_tanh", bias=True,
    tie_embeddings=True, vocab_size=50257, max_seq_len=1024,
)
_LLAMA = dict(
    position="rope", norm="rmsnorm", prenorm=True, mlp="swiglu", bias=False,
    tie_embeddings=False, scaled_residual_init=False,
)
# PaLM (Chowdhery et al. 2022, section 2): the parallel block with one shared norm, multi-query
# attention, SwiGLU with d_ff = 4 d_model, RoPE, no biases in the dense kernels or the layer norms,
# shared input/output embeddings. (PaLM's initialisation, N(0, 1) embeddings with the logits scaled
# by d_model**-0.5, is not reproduced: these presets start like Llama, N(0, init_std).)
_PALM = dict(
    position="rope", norm="layernorm", prenorm=True, parallel_block=True, parallel_norms=1,
    n_kv_heads=1, mlp="swiglu", bias=False, tie_embeddings=True, scaled_residual_init=False,
)
_BERT = dict(
    arch="encoder", position="learned", norm="layernorm", norm_eps=1e-12, prenorm=False, mlp="gelu",
    bias=True, tie_embeddings=True, vocab_size=30522, max_seq_len=512, embed_norm=True,
    type_vocab_size=2, pooler=True, mlm_head=True, scaled_residual_init=False,
)
_ELECTRA = dict(_BERT, pooler=False, rtd_head=True)

# ALBERT (Lan et al. 2020): BERT with factorised embeddings (E = 128) and one block shared by every
# layer; v2 has no dropout and GELU's tanh form (HF's gelu_new), and a 30,000-piece SentencePiece vocabulary.
_ALBERT = dict(_BERT, vocab_size=30000, d_embed=128, share_layers="all", mlp="gelu_tanh")
# DistilBERT (Sanh et al. 2019): BERT's layout without segment embeddings and without a pooler.
_DISTILBERT = dict(_BERT, type_vocab_size=0, pooler=False)

# RoBERTa (Liu et al. 2019): BERT's architecture with one token-type row, LayerNorm eps 1e-5 and
# positions that start at row 2 (fairseq keeps rows 0 and 1 for the padding index: 514 rows for
# 512 usable positions); trained with byte-level BPE (50,265 tokens), dynamic masking, no NSP.
_ROBERTA = dict(_BERT, norm_eps=1e-5, type_vocab_size=1, position_offset=2, vocab_size=50265)

_T5 = dict(
    arch="encoder-decoder", position="relative", norm="rmsnorm", norm_eps=1e-6, prenorm=True,
    mlp="relu", bias=False, tie_embeddings=True, scale_tied_output=True, attn_scale=False,
    vocab_size=32128, max_seq_len=512, scaled_residual_init=False, init_scheme="t5",
)
_T5_V1_1 = dict(_T5, mlp="geglu_tanh", tie_embeddings=False, scale_tied_output=False)
# ViT (Dosovitskiy et al. 2021): a pre-norm encoder over image patches, with learned positions, a
# <cls> token, exact GELU, LayerNorm eps 1e-12 and biases everywhere (Hugging Face ViTModel).
_VIT = dict(
    arch="vit", position="learned", norm="layernorm", norm_eps=1e-12, prenorm=True, mlp="gelu", bias=True,
    tie_embeddings=False, scaled_residual_init=False, mlm_head=False,
)
_BART = dict(
    arch="encoder-decoder", position="learned", norm="layernorm", norm_eps=1e-5, prenorm=False,
    mlp="gelu", bias=True, tie_embeddings=True, embed_norm=True, vocab_size=50265,
    max_seq_len=1024, scaled_residual_init=False,
)

#: Presets as data: each is a set of ModelConfig fields. Published sizes are checked in the tests.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU sizes (minGPT's names). vocab_size=None: take it from the data folder.
    "gpt-nano": dict(_GPT2, vocab_size=None, n_layer=3, n_head=3, d_model=48, max_seq_len=256),
    "gpt-micro": dict(_GPT2, vocab_size=None, n_layer=4, n_head=4, d_model=128, max_seq_len=256),
    "gpt-mini": dict(_GPT2, vocab_size=None, n_layer=6, n_head=6, d_model=192, max_seq_len=256),
    # GPT-1 (Radford et al. 2018): post-norm, 512 context, 40,478-token BPE.
    "gpt": dict(_GPT2, n_layer=12, n_head=12, d_model=768, vocab_size=40478, max_seq_len=512,
                prenorm=False, mlp="gelu"),
    # GPT-2 (Radford et al. 2019).
    "gpt2-small": dict(_GPT2, n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, d_model=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, d_model=1600),
    # Llama family (Touvron et al. 2023; Meta 2024). Small ones for CPU.
    "llama-tiny": dict(_LLAMA, n_layer=4, n_head=4, n_kv_heads=2, d_model=256, d_ff=688,
                       max_seq_len=256, norm_eps=1e-5),
    "llama-mini": dict(_LLAMA, n_layer=8, n_head=8, n_kv_heads=4, d_model=512, d_ff=1376,
                       max_seq_len=512, norm_eps=1e-5),
    "llama2-7b": dict(_LLAMA, n_layer=32, n_head=32, d_model=4096, d_ff=11008, vocab_size=32000,
                      max_seq_len=4096, norm_eps=1e-5),
    "llama2-13b": dict(_LLAMA, n_layer=40, n_head=40, d_model=5120, d_ff=13824, vocab_size=32000,
                       max_seq_len=4096, norm_eps=1e-5),
    "llama3-8b": dict(_LLAMA, n_layer=32, n_head=32, n_kv_heads=8, d_model=4096, d_ff=14336,
                      vocab_size=128256, max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5),
    # PaLM (Chowdhery et al. 2022): a CPU size, and the 8B model of Table 1 (256k SentencePiece vocabulary).
    "palm-tiny": dict(_PALM, vocab_size=None, n_layer=4, n_head=4, d_model=256, d_ff=1024, max_seq_len=256),
    "palm-8b": dict(_PALM, n_layer=32, n_head=16, d_model=4096, d_ff=16384, vocab_size=256000,
                    max_seq_len=2048),
    # GPT-Neo 125M (Black et al. 2021): GPT-3's alternating global and local (256-position) layers,
    # unscaled attention scores, no biases on the query/key/value projections; 2,048 context.
    "gpt-neo-125m": dict(_GPT2, n_layer=12, n_head=12, d_model=768, max_seq_len=2048, attn_scale=False,
                         qkv_bias=False, attention_layers="global,local", attention_window=256),
    # BERT (Devlin et al. 2019) and the compact BERTs of Turc et al. (2019): 30,522 WordPieces.
    "bert-tiny": dict(_BERT, n_layer=2, n_head=2, d_model=128),
    "bert-mini": dict(_BERT, n_layer=4, n_head=4, d_model=256),
    "bert-small": dict(_BERT, n_layer=4, n_head=8, d_model=512),
    "bert-medium": dict(_BERT, n_layer=8, n_head=8, d_model=512),
    "bert-base": dict(_BERT, n_layer=12, n_head=12, d_model=768),
    "bert-large": dict(_BERT, n_layer=24, n_head=16, d_model=1024),
    # ALBERT: albert-base-v2 is 11,683,584 parameters as AlbertModel counts them (pooler included);
    # albert-tiny is a CPU size whose vocabulary comes from the data.
    "albert-tiny": dict(_ALBERT, vocab_size=None, n_layer=4, n_head=2, d_model=128, d_embed=64),
    "albert-base-v2": dict(_ALBERT, n_layer=12, n_head=12, d_model=768, d_ff=3072),
    # ELECTRA (Clark et al. 2020): the discriminator, a BERT with factorised embeddings, no pooler and
    # the replaced-token detection head (objective=electra trains it with its generator).
    # electra-small is ElectraModel's google/electra-small-discriminator (13,483,008 parameters);
    # electra-tiny a CPU size that takes its vocabulary from the data.
    "electra-tiny": dict(_ELECTRA, vocab_size=None, n_layer=4, n_head=2, d_model=128, d_ff=512, d_embed=64,
                         max_seq_len=256),
    "electra-small": dict(_ELECTRA, n_layer=12, n_head=4, d_model=256, d_ff=1024, d_embed=128),
    # DistilBERT (Sanh et al. 2019): BERT-base with half the layers (66,362,880 parameters as
    # DistilBertModel); distilbert-mini, a CPU size, is bert-mini with half the layers, its
    # vocabulary from the data (the student `pretrainer distill` makes of a bert-mini run).
    "distilbert-base": dict(_DISTILBERT, n_layer=6, n_head=12, d_model=768),
    "distilbert-mini": dict(_DISTILBERT, vocab_size=None, n_layer=2, n_head=4, d_model=256),
    # RoBERTa: roberta-base counts 124,645,632 parameters as RobertaModel (pooler included);
    # roberta-tiny is a CPU size (llama-tiny's 4 x 256) with its vocabulary from the data.
    "roberta-tiny": dict(_ROBERTA, vocab_size=None, n_layer=4, n_head=4, d_model=256),
    "roberta-base": dict(_ROBERTA, n_layer=12, n_head=12, d_model=768),
    # T5 (Raffel et al. 2020) with its 32,128-entry vocabulary as Hugging Face pads it; t5-tiny
    # takes its vocabulary (with sentinels) from the data. T5 v1.1: gated-GELU, untied output.
    "t5-tiny": dict(_T5, vocab_size=None, n_layer=4, n_head=4, d_model=256, d_ff=1024,
                    max_seq_len=512),
    "t5-small": dict(_T5, n_layer=6, n_head=8, d_model=512, d_ff=2048),
    "t5-base": dict(_T5, n_layer=12, n_head=12, d_model=768, d_ff=3072),
    "t5-large": dict(_T5, n_layer=24, n_head=16, d_model=1024, d_ff=4096),
    "t5-v1_1-small": dict(_T5_V1_1, n_layer=8, n_head=6, d_head=64, d_model=512, d_ff=1024),
    # BART (Lewis et al. 2020): post-norm, learned positions, a norm on the embeddings.
    "bart-base": dict(_BART, n_layer=6, n_head=12, d_model=768, d_ff=3072),
    # bart-tiny: the same architecture at a CPU size (t5-tiny's 4 x 256, d_ff 1024), vocabulary from the data.
    "bart-tiny": dict(_BART, vocab_size=None, n_layer=4, n_head=4, d_model=256, d_ff=1024, max_seq_len=512),
    # ViT-B/16 (Dosovitskiy et al. 2021, Table 1): 86,389,248 parameters as Hugging Face ViTModel counts
    # them (pooler included; no classifier). vit-tiny: a CPU size whose image size and channels come
    # from the data (8 x 8 digits: 16 patches of 2 x 2).
    "vit-tiny": dict(_VIT, n_layer=4, n_head=4, d_model=64, d_ff=256, patch_size=2, max_seq_len=1024),
    "vit-base-patch16-224": dict(_VIT, n_layer=12, n_head=12, d_model=768, d_ff=3072, image_size=224,
                                 patch_size=16, channels=3, pooler=True, max_seq_len=197),
    # Mixtures of experts. Mixtral 8x7B (Jiang et al. 2024): a Mistral 7B whose MLPs are 8
    # experts, 2 per token, no capacity limit; 46.7B parameters, 12.9B active. mixtral-tiny is
    # llama-tiny with 8 such experts for CPU runs.
    "mixtral-tiny": dict(_LLAMA, n_layer=4, n_head=4, n_kv_heads=2, d_model=256, d_ff=688,
                         max_seq_len=256, norm_eps=1e-5, moe=dict(n_experts=8, top_k=2)),
    "mixtral-8x7b": dict(_LLAMA, n_layer=32, n_head=32, n_kv_heads=8, d_model=4096, d_ff=14336,
                         vocab_size=32000, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-5,
                         moe=dict(n_experts=8, top_k=2, capacity_factor=0.0)),
    # Switch Transformers (Fedus et al. 2021): T5 whose every fourth MLP from layer 1 is 8 top-1
    # experts, as transformers' SwitchTransformersConfig defaults (d_ff 2048; router z-loss and
    # load-balancing loss at 0.001 each).
    "switch-base-8": dict(_T5, n_layer=12, n_head=12, d_model=768, d_ff=2048,
                          moe=dict(n_experts=8, top_k=1, every=4, aux_loss_weight=0.001,
                                   z_loss_weight=0.001)),
}


def model_preset(name: str) -> ModelConfig:
    """The ModelConfig of a preset, or a ConfigError naming the closest preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'{_suggest(name, PRESETS)}; "
                          f"presets: {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name], preset=name)


# ----------------------------------------------------------------------------------------------
# Training and the run


#: ``train.lora.targets`` (and ``finetune --lora-targets``): the modules each name adapts
LORA_TARGETS = {"attention": ("attn.qkv", "attn.proj", "xattn.q", "xattn.kv", "xattn.proj"),
                "mlp": ("mlp.up", "mlp.down")}


@dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) through ``peft``: each adapted linear layer's
    weight W stays frozen and the layer computes ``W x + (alpha / r) B A x`` with A [r, in] and
    B [out, r] trained (B starts at zero); everything else is frozen (``pretrainer.train.lora``)."""

    r: int = 0  # rank of the adapters; 0 = no LoRA (every weight trains); continued pretraining with init_from
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapters' input
    targets: str = "attention"  # attention (self: qkv, proj; cross: q, kv, proj) | mlp (up, down) | both "attention,mlp" | module names such as attn.qkv

    def validate(self, where: str = "train.lora") -> None:
        if not isinstance(self.r, int) or self.r < 0:
            raise ConfigError(f"{where}.r={self.r!r}: expected a rank >= 0 (0 = no LoRA)")
        _finite(where, "alpha", self.alpha, lambda v: v > 0, "a positive, finite scale (the update is alpha / r x B A)")
        _finite(where, "dropout", self.dropout, lambda v: 0 <= v < 1, "a value in [0, 1)")
        self.target_names(where)

    def target_names(self, where: str = "train.lora") -> list[str]:
        """The module names (suffixes such as ``attn.qkv``) that ``targets`` adapts."""
        known = [n for names in LORA_TARGETS.values() for n in names]
        out = []
        for item in str(self.targets).split(","):
            item = item.strip()
            if item not in LORA_TARGETS and item not in known:
                raise ConfigError(f"{where}.targets: '{item}': expected attention, mlp or module names among "
                                  f"{', '.join(known)}{_suggest(item, [*LORA_TARGETS, *known])}")
            out += [n for n in LORA_TARGETS.get(item, (item,)) if n not in out]
        return out


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. ``batch_size`` is sequences per micro-step per process; one
    optimizer step sees ``batch_size * grad_accum * world_size`` sequences of ``seq_len`` tokens."""

    max_steps: int = 1000  # optimizer steps of the run
    batch_size: int = 16  # sequences per micro-batch and process
    seq_len: int = 128  # tokens per sequence (window)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from 0 to lr
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1  # on matrices and embeddings (>= 2-D); never on biases or norm gains
    lr_scale: str = "none"  # none | rms: each tensor's rate times its RMS at the start (for T5's init)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's epsilon
    grad_clip: float = 1.0  # 0 = off
    # divergence guards: a step whose loss or gradient norm is not finite is skipped (no update)
    max_skipped_steps: int = 5  # this many skipped steps in a row stop the run; 0 = never stop
    spike_factor: float = 10.0  # a loss over this x the median of the last 100 steps' (at least 1) stops it; 0 = off
    on_spike: str = "stop"  # stop | rollback: reload the last checkpoint and go on with the data after the spike
    seed: int = 1337  # seeds the weights, the data order and the masks
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA that supports it, else fp32) | float32 | bfloat16 | float16
    compile: str = "auto"  # auto (on for CUDA) | true | false
    fast_paths: str = "auto"  # hand-written backwards + fused CPU kernels: auto (float32 on a CPU) | true | false
    parallel: str = "auto"  # with several processes: ddp (replicas) | fsdp (FSDP2 sharding); auto = ddp
    activation_checkpointing: str = "none"  # none | full (recompute every block) | selective (recompute elementwise ops)
    eval_every: int = 200  # 0 = only at the end
    eval_batches: int = 20  # validation: this many global batches of windows
    log_every: int = 10  # steps between progress lines and metrics.jsonl lines
    checkpoint_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept
    plot: bool = True  # write RUN/loss.png
    loggers: str = "jsonl"  # metrics.jsonl always; add tensorboard and/or wandb: "jsonl,tensorboard"
    prefetch: int = 0  # micro-batches built ahead on a background thread while the model computes (a GPU run); 0 = off
    max_minutes: float = 0.0  # wall-clock budget of this invocation: stop (checkpoint, final eval) when spent; 0 = none
    threads: int = 0  # torch's intra-op CPU threads for the run; 0 = torch's default
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # train low-rank adapters only (r > 0; with init_from)

    def __post_init__(self):
        self.lora = LoRAConfig(**self.lora) if isinstance(self.lora, dict) else dataclasses.replace(self.lora)

    def validate(self) -> None:
        self.lora.validate()
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_batches",
                     "log_every", "keep_checkpoints"):
            _positive("train", name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "max_skipped_steps", "prefetch", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)}: expected a value >= 0")
        for name, ok, expected in (
                ("lr", lambda v: v > 0, "a positive, finite learning rate"),
                ("min_lr_ratio", lambda v: 0 <= v <= 1, "a value in [0, 1]"),
                ("weight_decay", lambda v: v >= 0, "a finite value >= 0"),
                ("beta1", lambda v: 0 <= v < 1, "a value in [0, 1)"),
                ("beta2", lambda v: 0 <= v < 1, "a value in [0, 1)"),
                ("eps", lambda v: v > 0, "a positive, finite value (AdamW's default: 1e-8)"),
                ("grad_clip", lambda v: v >= 0, "a finite gradient norm >= 0 (0 = off)"),
                ("spike_factor", lambda v: v == 0 or v > 1, "0 (off) or a finite factor > 1"),
                ("max_minutes", lambda v: v >= 0, "a finite number of minutes >= 0 (0 = no budget)")):
            _finite("train", name, getattr(self, name), ok, expected)
        _choice("train", "on_spike", self.on_spike, ["stop", "rollback"])
        _choice("train", "schedule", self.schedule, ["cosine", "linear", "constant"])
        _choice("train", "lr_scale", self.lr_scale, ["none", "rms"])
        _choice("train", "dtype", self.dtype, ["auto", "float32", "bfloat16", "float16"])
        _choice("train", "compile", str(self.compile).lower(), ["auto", "true", "false"])
        _choice("train", "fast_paths", str(self.fast_paths).lower(), ["auto", "true", "false"])
        _choice("train", "parallel", self.parallel, ["auto", "ddp", "fsdp"])
        _choice("train", "activation_checkpointing", self.activation_checkpointing,
                ["none", "full", "selective"])
        for name in str(self.loggers).split(","):
            _choice("train", "loggers", name.strip(), ["jsonl", "tensorboard", "wandb"])
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device='{self.device}': expected auto, cpu, cuda, cuda:N or mps")


#: What masked-LM selection picks (15 % of the tokens in every case).
MASKING = ["token", "word", "span"]


@dataclass
class NoiseConfig:
    """How the encoder-decoder objectives corrupt their input. ``span`` (T5, Raffel et al. 2020):
    ``noise_density`` of the tokens in spans of mean length ``mean_span_length``, each span one
    sentinel. ``denoise`` (BART, Lewis et al. 2020), combinable: text infilling of ``mask_ratio``
    of the tokens in Poisson(``poisson_lambda``) spans, ``token_mask_ratio`` single-token masking,
    ``delete_ratio`` deletion, sentence permutation (sentences end at a newline or a full stop) and
    document rotation. The defaults are each paper's choice."""

    noise_density: float = 0.15  # span: share of the tokens corrupted
    mean_span_length: float = 3.0  # span: mean length of a corrupted span
    mask_ratio: float = 0.3  # denoise: share of the tokens infilled (one <mask> per span)
    poisson_lambda: float = 3.0  # denoise: mean span length of the infilling
    token_mask_ratio: float = 0.0  # denoise: share of single tokens masked
    delete_ratio: float = 0.0  # denoise: share of tokens deleted
    permute_sentences: bool = True  # denoise: shuffle the sentences
    rotate: bool = False  # denoise: rotate the document to start at a random token
    def validate(self) -> None:
        for name in ("noise_density", "mask_ratio", "token_mask_ratio", "delete_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"noise.{name}={getattr(self, name)}: expected a value in [0, 1)")
        _finite("noise", "mean_span_length", self.mean_span_length, lambda v: v >= 1, "a finite value >= 1")
        _finite("noise", "poisson_lambda", self.poisson_lambda, lambda v: v > 0, "a positive, finite value")


@dataclass
class ElectraConfig:
    """``objective=electra`` (Clark et al. 2020): replaced-token detection. A generator (a small
    masked LM sharing the discriminator's token, position and segment embeddings) fills the
    ``mask_prob`` selected positions (85 % shown as ``<mask>``, 15 % as they are) with samples from
    its softmax at ``temperature``; the discriminator (the model) labels every token as original or
    replaced. Loss = generator MLM + ``disc_weight`` x the discriminator's binary cross-entropy.
    The generator's width, FFN, heads and depth are these fractions of the discriminator's, rounded
    (at least 1); the defaults are the paper's ELECTRA-Small (Table 6: a quarter of hidden, FFN
    and heads; all the layers)."""

    generator_hidden: float = 0.25  # d_model fraction (the paper: 1/4 small and large, 1/3 base)
    generator_ffn: float = 0.25  # d_ff fraction
    generator_heads: float = 0.25  # n_head fraction (its d_model must divide by the result)
    generator_layers: float = 1.0  # n_layer fraction
    disc_weight: float = 50.0  # lambda: weight of the discriminator's loss
    temperature: float = 1.0  # sampling temperature of the generator's softmax
    mask_prob: float = 0.15  # positions selected for the generator (the paper: 0.15 small/base, 0.25 large)

    def validate(self) -> None:
        for name in ("generator_hidden", "generator_ffn", "generator_heads", "generator_layers"):
            _finite("electra", name, getattr(self, name), lambda v: 0 < v <= 1, "a fraction in (0, 1]")
        _finite("electra", "disc_weight", self.disc_weight, lambda v: v > 0, "a positive, finite weight (50)")
        _finite("electra", "temperature", self.temperature, lambda v: v > 0, "a positive, finite temperature")
        _finite("electra", "mask_prob", self.mask_prob, lambda v: 0 < v < 1, "a fraction in (0, 1)")


@dataclass
class DistillConfig:
    """Knowledge distillation, ``objective=distill`` (DistilBERT: Sanh et al. 2019; soft targets:
    Hinton et al. 2015): the student (``model``) learns from a frozen ``teacher`` in eval mode with
    ``ce_weight`` x the soft-target cross-entropy, KL(teacher || student) of the two output
    distributions at ``temperature`` T, times T^2, + ``lm_weight`` x its own MLM (encoder) or
    causal-LM (decoder) loss + ``cos_weight`` x (1 - cosine) between the teacher's and the student's
    final hidden states (when their widths match). The defaults are DistilBERT's."""

    teacher: str | None = None  # a run, checkpoint or Hugging Face folder; same tokenizer as the data
    temperature: float = 2.0  # T of the soft targets
    ce_weight: float = 5.0  # soft targets, on every token (encoder: masked_only for the MLM's ones)
    lm_weight: float = 2.0  # the student's own masked-LM or causal-LM loss
    cos_weight: float = 1.0  # hidden-state cosine loss; off when the widths differ
    masked_only: bool = False  # encoder: soft targets on the MLM-selected positions only (cheaper)

    def validate(self) -> None:
        _finite("distill", "temperature", self.temperature, lambda v: v > 0, "a positive, finite temperature (2)")
        for name in ("ce_weight", "lm_weight", "cos_weight"):
            _finite("distill", name, getattr(self, name), lambda v: v >= 0, "a finite weight >= 0")
        if not (self.ce_weight or self.lm_weight or self.cos_weight):
            raise ConfigError("distill: ce_weight, lm_weight and cos_weight are all 0; expected a loss to train on")


@dataclass
class MAEConfig:
    """``objective=mae`` (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"):
    ``mask_ratio`` of each image's patches are hidden at random, the ViT (the model) encodes the
    visible ones (and <cls>), and a light decoder of its own width, depth and heads, with mask tokens
    and learned positions of its own, predicts the pixels of every patch; the loss is the mean squared
    error on the hidden patches only, against pixels normalised per patch (``norm_pix_loss``). The
    paper's decoder is 512 wide and 8 deep for ViT-L (its Table 1a: 1 block fine-tunes as well);
    the defaults scale it to the encoder: half its width, half its heads, 2 blocks."""

    mask_ratio: float = 0.75  # share of the patches hidden from the encoder (the paper: 0.75)
    decoder_d_model: int | None = None  # the decoder's width (None = half the encoder's d_model)
    decoder_layers: int = 2  # the decoder's blocks
    decoder_heads: int | None = None  # the decoder's attention heads (None = half the encoder's, at least 1)
    norm_pix_loss: bool = True  # targets: each patch's pixels minus their mean over their std (the paper's best)

    def validate(self) -> None:
        _finite("mae", "mask_ratio", self.mask_ratio, lambda v: 0 < v < 1, "a fraction in (0, 1) (He et al.: 0.75)")
        _positive("mae", "decoder_layers", self.decoder_layers)
        for name in ("decoder_d_model", "decoder_heads"):
            if getattr(self, name) is not None:
                _positive("mae", name, getattr(self, name))


@dataclass
class GatoConfig:
    """``objective=gato`` (Reed et al. 2022, "A Generalist Agent"): one decoder over a stream that
    mixes text tokens, image patches and mu-law discretised values (:mod:`pretrainer.data.gato`);
    the rows of a batch go to the ``tasks`` in turn."""

    tasks: str = "caption,text,control"  # the tasks mixed (comma-separated): caption (8x8 digits -> "a digit seven"), text (the data's), control (a pendulum's torque)
    patch_size: int = 4  # pixels per side of an image patch (a divisor of the digits' 8: 4 gives 4 patches per image)

    def validate(self) -> None:
        from .data.gato import parse_tasks

        parse_tasks(self.tasks)
        _positive("gato", "patch_size", self.patch_size)
        if 8 % self.patch_size:
            raise ConfigError(f"gato.patch_size={self.patch_size}: expected a divisor of 8 (the digits are 8 x 8)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=lambda: model_preset("gpt-micro"))
    data: str | None = None  # a prepared data folder
    out: str | None = None  # the run folder
    objective: str = "clm"  # see pretrainer.train.objectives (each names the architectures it trains)
    masking: str = "token"  # mlm and electra: token | word | span
    mask_prob: float = 0.15  # mlm, mlm+nsp, mlm+sop: share of the tokens selected (BERT 0.15; Wettig et al. 2023 find 0.4 better)
    prefix_mask: bool = True  # (input, target) objectives on a decoder: the input part bidirectional
    init_from: str | None = None  # start from these weights: a run, a checkpoint or a Hugging Face folder
    noise: NoiseConfig = field(default_factory=NoiseConfig)  # span / denoise only
    electra: ElectraConfig = field(default_factory=ElectraConfig)  # electra only
    distill: DistillConfig = field(default_factory=DistillConfig)  # objective=distill only
    mae: MAEConfig = field(default_factory=MAEConfig)  # objective=mae only
    gato: GatoConfig = field(default_factory=GatoConfig)  # objective=gato only
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, need_paths: bool = True) -> None:
        self.model.validate()
        self.train.validate()
        self.noise.validate()
        self.electra.validate()
        self.distill.validate()
        self.mae.validate()
        self.gato.validate()
        from .train.objectives import get_objective  # the registry: names and architectures

        get_objective(self)
        _choice("", "masking", self.masking, MASKING)
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"mask_prob={self.mask_prob}: expected a share between 0 and 1 (BERT: 0.15)")
        if need_paths:
            if not self.data:
                raise ConfigError("data: missing; expected a folder made by 'pretrainer prepare' (data=DIR)")
            if not self.out:
                raise ConfigError("out: missing; expected a run folder (out=DIR)")
        if self.model.position == "learned" and self.model.arch != "vit" and self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len} (learned positions)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Fine-tuning and sweep settings: typed sections, each option declared once (its CLI flag is
# derived from the field: pretrainer.cli.add_section_flags)


def option(default: Any, help: str, **meta) -> Any:
    """A config field with its help text (and ``choices``, ``flag`` ...) for the derived CLI flag."""
    return field(default=default, metadata={"help": help, **meta})


SELECT = ("metric", "loss")
POOLING = ("cls", "mean")
#: the model keys ``pretrainer finetune`` may change on a pretrained backbone (its weights keep their shapes)
FINETUNE_MODEL_KEYS = ("dropout", "max_seq_len")


@dataclass
class FinetuneConfig:
    """Settings of ``pretrainer finetune`` (:func:`pretrainer.finetune.finetune`): a ``finetune:``
    section of a YAML file (``-c FILE``), ``--set key=value`` overrides, or the flags of the same
    names (``--batch-size`` for ``batch_size``)."""

    text_column: str | None = option(None, "default: text, sentence or sentence1 (tagging: tokens or words)")
    text_pair_column: str | None = option(None, "second text of a pair (default: text_pair or sentence2 when present)")
    label_column: str | None = option(None, "default: label (tagging: tags, ner_tags or labels)")
    epochs: int = option(3, "passes over the training data")
    batch_size: int = option(32, "examples per optimizer step (shared by the processes under torchrun)")
    grad_accum: int = option(1, "micro-steps each process splits its share of a batch into (less memory, "
                                "the same step)")
    lr: float = option(1e-4, "peak learning rate")
    warmup: float = option(0.1, "fraction of the steps spent warming up")
    weight_decay: float = option(0.01, "AdamW weight decay (matrices and embeddings only)")
    max_len: int = option(128, "tokens per input, special tokens included (capped at the model's context)")
    stride: int | None = option(None, "qa: tokens shared by consecutive context windows (default: a quarter)")
    patience: int | None = option(None, "stop after N epochs without a better score")
    select: str | None = option(None, "the epoch kept: best task metric (accuracy, f1, pearson; the default) "
                                      "or lowest evaluation loss (the default for text2text)", choices=SELECT)
    dropout: float = option(0.1, "dropout while fine-tuning: on the head's input and, unless model.dropout says "
                                 "otherwise, in the backbone (embeddings, attention, residual branches), whatever "
                                 "it was pretrained with (BERT and T5 fine-tune with 0.1)")
    model: dict = field(default_factory=dict, metadata={"help": (
        "backbone settings its weights allow changing, as KEY=VALUE (repeatable; also model.KEY=VALUE after FROM, "
        "or --set model.KEY=VALUE): dropout (default: --dropout) and max_seq_len (rope, relative, sinusoidal "
        "or no positions; a learned position table is fixed); other model keys are refused")})
    pooling: str = option("cls", "what a sequence head (classification, regression) reads: cls (BERT's pooled "
                                 "<cls> state; a decoder's last token) or mean (the mean of the final states "
                                 "over the input's tokens, padding left out, as Sentence-BERT pools)",
                          choices=POOLING)
    group_by_length: bool = option(True, "training batches of similar lengths (each group of 50 batches sorted "
                                         "by length, the batches shuffled; padded to their longest input); "
                                         "--no-group-by-length: a plain shuffle")
    from_scratch: bool = option(False, "random weights (FROM's config and tokenizer)")
    tokenizer: str | None = option(None, "preset + --from-scratch: tokenizer folder (default: train a "
                                         "WordPiece one on the training texts)")
    vocab_size: int = option(8192, "size of that WordPiece tokenizer")
    eos_token: str | None = option(None, "the tokenizer's end-of-text token, when its files name none or the wrong one")
    pad_token: str | None = option(None, "the tokenizer's padding token (default: pad, else end-of-text)")
    seed: int = option(0, "seeds the data order and dropout")
    device: str = option("auto", "auto, cpu, cuda, cuda:N, mps")
    quiet: bool = option(False, "no progress lines")
    log_every: int | None = option(None, "steps between progress lines (default: about 5 per epoch)")
    loggers: str = option("jsonl", "metrics.jsonl always; add tensorboard and/or wandb: jsonl,tensorboard "
                                   "(RUN/tensorboard, RUN/wandb)")
    # text2text (encoder-decoder) only
    input_column: str | None = option(None, "text2text: default input, source or text", group="text2text")
    target_column: str | None = option(None, "text2text: default target, summary or output", group="text2text")
    prefix: str = option("", 'text2text: put before every input, e.g. "summarize: " (a row\'s own "prefix" '
                             'field wins; a "task" field names its task)', group="text2text")
    mixing: str = option("proportional", "text2text, several tasks in one file: each example once per epoch, "
                                         "or T5's temperature-scaled rates", choices=("proportional", "temperature"),
                         group="text2text")
    mixing_temperature: float = option(2.0, "text2text: T5's mixing temperature", group="text2text")
    max_target_len: int = option(64, "text2text: target tokens (training and generation)", group="text2text")
    beams: int = option(1, "text2text: beam search width when evaluating (1 = greedy)", group="text2text")
    no_repeat_ngram: int = option(0, "text2text: when evaluating, never repeat an n-gram of N tokens "
                                     "(0 = off; 3 is common for summaries)", group="text2text")
    # LoRA: train low-rank adapters and the task head; the backbone's weights stay frozen
    lora: bool = option(False, "train LoRA adapters (and the task head) instead of every weight (peft; "
                               "LoRA usually wants a larger --lr, e.g. 1e-3)", group="lora")
    lora_r: int = option(8, "the adapters' rank", group="lora")
    lora_alpha: float = option(16.0, "the update is scaled by alpha / r", group="lora")
    lora_dropout: float = option(0.05, "dropout on the adapters' input", group="lora")
    lora_targets: str = option("attention", "attention (qkv, proj; cross-attention q, kv, proj), mlp (up, "
                                            "down), attention,mlp, or module names such as attn.qkv", group="lora")

    # sft (instruction tuning of a decoder) only
    packing: bool = option(False, "sft: put short examples together in rows of up to --max-len tokens (each "
                                  "attends to itself only)", group="sft")
    max_new_tokens: int = option(64, "sft: the longest answer generated when evaluating", group="sft")
    chat_template: str | None = option(None, "sft: a file with the Jinja chat template (default: the "
                                             "tokenizer's own, else pretrainer's User:/Assistant: one)",
                                       group="sft")

    def lora_config(self) -> LoRAConfig | None:
        """The adapters ``--lora`` asks for (None without it)."""
        if not self.lora:
            return None
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets)

    def validate(self) -> None:
        if not isinstance(self.no_repeat_ngram, int) or self.no_repeat_ngram < 0:
            raise ConfigError(f"--no-repeat-ngram {self.no_repeat_ngram}: expected 0 (off) or a positive integer")
        for name in str(self.loggers).split(","):
            if name.strip() not in ("jsonl", "tensorboard", "wandb"):
                raise ConfigError(f"--loggers {self.loggers}: unknown logger '{name.strip()}'; expected a "
                                  f"comma-separated list of jsonl, tensorboard, wandb")
        for name in ("epochs", "batch_size", "grad_accum", "max_len", "vocab_size", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: expected a positive integer")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr {self.lr}: expected a positive, finite learning rate")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay {self.weight_decay}: expected a finite value >= 0")
        if not (math.isfinite(self.mixing_temperature) and self.mixing_temperature > 0):
            raise ConfigError(f"--mixing-temperature {self.mixing_temperature}: expected a positive, finite value")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup {self.warmup}: expected a fraction of the steps in [0, 1)")
        if self.patience is not None and self.patience <= 0:
            raise ConfigError(f"--patience {self.patience}: expected a positive number of epochs")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout {self.dropout}: expected a value in [0, 1)")
        if self.select not in (None, *SELECT):
            raise ConfigError(f"--select {self.select}: expected one of {', '.join(SELECT)}")
        if self.pooling not in POOLING:
            raise ConfigError(f"--pooling {self.pooling}: expected one of {', '.join(POOLING)}")
        self.validate_model()

    def validate_model(self) -> None:
        """``model``: keys of :class:`ModelConfig` that fine-tuning may change (``FINETUNE_MODEL_KEYS``),
        values type-checked and coerced in place."""
        if not isinstance(self.model, dict):
            raise ConfigError(f"finetune model={self.model!r}: expected a mapping of model keys (model.dropout=0.1)")
        fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
        for key in list(self.model):
            if key not in fields:
                raise ConfigError(f"model.{key}: unknown model key"
                                  f"{_suggest('model.' + str(key), ['model.' + k for k in fields])}")
            if key not in FINETUNE_MODEL_KEYS:
                raise ConfigError(f"model.{key}: fixed by the backbone's weights; fine-tuning can change "
                                  f"{' and '.join('model.' + k for k in FINETUNE_MODEL_KEYS)} only")
            self.model[key] = _coerce(f"model.{key}", self.model[key], fields[key].type, "finetune")
        dataclasses.replace(ModelConfig(), **self.model).validate("model")  # ranges, one line each
        _choice("finetune", "mixing", self.mixing, ["proportional", "temperature"])
        if self.lora:
            if self.from_scratch:
                raise ConfigError("--lora adapts pretrained weights, which stay frozen; drop --from-scratch")
            if not isinstance(self.lora_r, int) or self.lora_r <= 0:
                raise ConfigError(f"--lora-r {self.lora_r}: expected a positive rank")
            self.lora_config().validate("finetune.lora")


@dataclass
class SweepConfig:
    """Settings of ``pretrainer scaling sweep``: the ``sweep:`` section of its base YAML, or the
    flags of the same names (which win)."""

    sizes: str | None = option(None, "WIDTHxDEPTH[xHEADS] list, e.g. 32x2,64x2,96x3,128x4 (heads default: "
                                     "the base model's head width)")
    tokens: str | None = option(None, "token budgets, e.g. 500k,1.2M,3M (grid: every size x every budget)")
    isoflop: str | None = option(None, "compute budgets C = 6ND, e.g. 1e12,3e12: every size at D = C/6N "
                                       "(instead of --tokens)")
    lr_search: str | None = option(None, "candidate learning rates per size, e.g. 1e-3,3e-3,1e-2 (best on the short budget)")
    lr_scaling: str = option("fixed", "fixed: the base train.lr; mup: lr x base_width / width",
                             choices=("fixed", "mup"))
    base_width: int | None = option(None, "width at which mup uses train.lr (default: the base model's)")
    lr_search_tokens: str | None = option(None, "budget of the search runs (default: the sweep's smallest)")
    lr_search_tie: float = option(0.005, "rates within this fraction of the best search loss tie; the smallest is kept")
    corpus: str | None = option(None, "prepare this corpus once into OUT/data (e.g. builtin:stdlib) instead of "
                                      "the config's data")
    tokenizer: str = option("char", "for --corpus: char or KIND:SIZE such as bpe:1024")
    evals: int = option(8, "validation evaluations per run")
    min_steps: int = option(20, "refuse (grid) or drop (IsoFLOP) runs shorter than this")
    converge_tol: float = option(0.03, "warn when the loss falls more than this fraction over the last 20%% of a run")
    plan_compute: str | None = option(None, "compute budget for the plan (default: 10x the largest run's)")
    bootstrap: int = option(200, "bootstrap resamples for the fits")
    targets: str | None = option(None, "losses for the sample-efficiency table (default: from the curves)")
    jobs: int = option(1, "runs trained at once, as child processes (1: in this process)")
    threads: int | None = option(None, "CPU threads per run (default: torch's choice; 1 per job with --jobs)")


def section(cls, raw: dict | None, where: str):
    """A settings section (:class:`FinetuneConfig`, :class:`SweepConfig`) from a mapping, each key
    type-checked, an unknown one named with the closest known one."""
    obj = cls()
    if raw is None:
        return obj
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys")
    for key, value in raw.items():
        set_key(obj, str(key), value, where=where)
    return obj


# ----------------------------------------------------------------------------------------------
# Loading and overrides


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (or a file name under ``configs/``), then overrides.

    A preset's published vocabulary size (BERT's 30,522, GPT-2's 50,257 ...) is not imposed on a
    new run: unless ``model.vocab_size`` is given (in the file or an override), the run takes the
    data's tokenizer's size, so a 4,096-token tokenizer gets a 4,096-row embedding."""
    cfg = RunConfig()
    given = any(item.split("=", 1)[0].strip().lstrip("-") == "model.vocab_size" for item in overrides)
    if path:
        file = _find_config_file(path)
        raw = read_yaml(file)
        given = given or "model.vocab_size" in dict(_flatten(raw))
        cfg = from_dict(raw, where=str(file))
    for item in overrides:
        apply_override(cfg, item)
    if not given and PRESETS.get(cfg.model.preset or "", {}).get("vocab_size") == cfg.model.vocab_size:
        cfg.model.vocab_size = None  # from the data (prepare_run_config)
    return cfg


def from_dict(raw: dict, where: str = "config") -> RunConfig:
    cfg = RunConfig()
    # a preset name comes first so that model.* keys in the same mapping refine it
    model = raw.get("model")
    if isinstance(model, str):
        cfg.model = model_preset(model)
    elif isinstance(model, dict) and "preset" in model and model["preset"]:
        cfg.model = model_preset(model["preset"])
    for key, value in _flatten(raw):
        if key == "model" and isinstance(value, str):
            continue
        set_key(cfg, key, value, where=where)
    return cfg


def apply_override(cfg: RunConfig, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value (e.g. train.lr=3e-4)")
    key, text = item.split("=", 1)
    key = key.strip().lstrip("-")
    value = yaml.safe_load(text) if text.strip() else None
    if key == "model" and isinstance(value, str):
        cfg.model = model_preset(value)
        return
    set_key(cfg, key, value, where="override")


def set_key(cfg: Any, dotted: str, value: Any, where: str = "config") -> None:
    """Set ``cfg.a.b = value`` with type checking; errors name the key and suggest a close one."""
    parts = dotted.split(".")
    obj, path = cfg, []
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            full = ".".join(path + [part])
            options = [".".join(path + [n]) for n in names]
            raise ConfigError(f"{where}: unknown key '{full}'{_suggest(full, options + _all_keys())}")
        path.append(part)
        if i == len(parts) - 1:
            f = next(f for f in dataclasses.fields(obj) if f.name == part)
            if dataclasses.is_dataclass(getattr(obj, part)) and isinstance(value, dict):
                for key, item in value.items():  # a section given whole: key by key
                    set_key(cfg, f"{dotted}.{key}", item, where)
                return
            setattr(obj, part, _coerce(".".join(path), value, f.type, where))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{where}: '{'.'.join(path)}' is a value, not a section")


def _coerce(key: str, value: Any, annotation: Any, where: str) -> Any:
    hint = _resolve_type(annotation)
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None and type(None) in options:
        return None
    for t in options:
        if t is type(None):
            continue
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
        elif t is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(float(value)) if float(value).is_integer() else _bad(key, value, "an integer", where)
                except ValueError:
                    pass
        elif t is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif t is str:
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):  # [a, b]: "a,b"
                return ",".join(value)
            if isinstance(value, bool):  # YAML reads "true" as a bool; keep its text for str fields
                return str(value).lower()
        elif dataclasses.is_dataclass(t):
            if isinstance(value, dict):
                return value  # sections are set key by key by from_dict; never a whole value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    expected = " or ".join(names.get(t, getattr(t, "__name__", str(t))) for t in options)
    return _bad(key, value, expected, where)


def _bad(key, value, expected, where):
    raise ConfigError(f"{where}: {key}={value!r}: expected {expected}")


def _resolve_type(annotation: Any) -> Any:
    if isinstance(annotation, str):  # from __future__ annotations: evaluate in this module
        return eval(annotation, globals())  # noqa: S307 - our own annotations only
    return annotation


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _flatten(raw: dict, prefix: str = ""):
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, full + ".")
        else:
            yield full, value


def _all_keys() -> list[str]:
    keys = []
    for name, sub in (("model", ModelConfig), ("model.moe", MoEConfig), ("train", TrainConfig),
                      ("train.lora", LoRAConfig), ("noise", NoiseConfig),
                      ("electra", ElectraConfig), ("distill", DistillConfig), ("mae", MAEConfig),
                      ("gato", GatoConfig), ("finetune", FinetuneConfig), ("sweep", SweepConfig)):
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(sub)]
    keys += [f.name for f in dataclasses.fields(RunConfig)]
    return keys


def config_keys() -> list[dict]:
    """Every key a run config (``pretrain``'s ``-c FILE`` and ``key=value``) can set, with its
    default and meaning: ``[{"key", "default", "meaning"}]``. The meaning is the field's help text,
    or the comment on its line in this module (the one place each option is described)."""
    import inspect
    import re

    out = []
    for prefix, cls in (("", RunConfig), ("model.", ModelConfig), ("model.moe.", MoEConfig), ("train.", TrainConfig),
                        ("train.lora.", LoRAConfig), ("noise.", NoiseConfig), ("electra.", ElectraConfig),
                        ("distill.", DistillConfig), ("mae.", MAEConfig), ("gato.", GatoConfig)):
        comments = dict(re.findall(r"^    (\w+):[^#\n]*#\s*(.+)$", inspect.getsource(cls), flags=re.M))
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else _resolve_type(f.type)) \
                    or f.name in ("model", "moe", "train", "lora", "noise", "electra", "distill", "mae", "gato"):
                continue  # a section: its keys are listed under its own prefix
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out.append({"key": prefix + f.name, "default": default,
                        "meaning": f.metadata.get("help") or comments.get(f.name, "")})
    return out


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _choice(where: str, name: str, value: Any, options: list[str]) -> None:
    if value not in options:
        key = f"{where}.{name}" if where else name
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(options)}"
                          f"{_suggest(str(value), options)}")


def _finite(where: str, name: str, value: Any, ok, expected: str) -> None:
    """A finite number for which ``ok(value)`` holds (NaN and infinities never do)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
        raise ConfigError(f"{where}.{name}={value!r}: expected {expected}")


def _positive(where: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}.{name}={value!r}: expected a positive integer")


#: YAML presets users start from: ``configs/`` of the repository (beside ``src/``).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _find_config_file(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    for folder in (Path("configs"), CONFIG_DIR):
        for candidate in (folder / path, folder / f"{path}.yaml"):
            if candidate.is_file():
                return candidate
    known = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config '{path}': no such file, and no preset config of that name"
                      f"{_suggest(path, known)}; presets: {', '.join(known) or 'none'}")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from .errors import write_atomic

    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def read_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping; a ConfigError naming the file (and the line) when it cannot
    be read, is not YAML (a file cut short, say) or is not a mapping."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{file}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{file}{at}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping of config keys at the top level")
    return raw


def config_from_file(path: str | Path) -> RunConfig:
    """Read a run folder's resolved ``config.yaml`` back (no preset re-resolution)."""
    raw = read_yaml(path)
    cfg = RunConfig()
    model = raw.pop("model", {}) or {}
    cfg.model = ModelConfig()
    for key, value in _flatten({"model": model, **raw}):
        set_key(cfg, key, value, where=str(path))
    return cfg
