"""Sizes, compute and memory of a model configuration, without allocating its weights.

The model is built on PyTorch's ``meta`` device (shapes only), so ``llama2-7b`` is counted in well
under a second on a laptop. Definitions:

- ``params``: every distinct parameter (tied embeddings counted once). For an encoder, the
  backbone with its pooler, as ``transformers.BertModel`` counts it (BERT-base: 109,482,240);
  the pretraining MLM head's own parameters (transform dense + norm, output bias, and the output
  matrix if untied) are reported apart as ``params_mlm_head`` (an ELECTRA discriminator's
  replaced-token detection head, ``rtd_head``, as ``params_rtd_head``), and the next-sentence head's
  (``model.nsp_head``, BERT's ``cls.seq_relationship``) as ``params_nsp_head``.
- ``params_non_embedding``: Kaplan et al. (2020) N: without the token, position and segment
  embeddings and without an untied output (unembedding) matrix.
- A mixture of experts (``model.moe``) also has ``params_active``: what one token uses, the
  ``top_k`` chosen experts of each MoE layer and not the others (Mixtral 8x7B: 12.9B of 46.7B).
  Its ``params_non_embedding`` (the scaling lab's N) and both FLOP counts are of the active
  parameters; ``params_non_embedding_total`` counts every expert. Memory counts every expert.
- ``flops_per_token_kaplan``: training FLOPs per token as Kaplan et al. write it,
  6 N + 6 n_layer n_ctx d_model (forward 2N + 2 n_layer n_ctx d, backward twice the forward);
  a local layer (``model.attention_layers``) counts its window instead of n_ctx, in both counts.
- Cross-layer sharing (``model.share_layers``, ALBERT): ``params`` counts a shared weight once, as
  ``AlbertModel`` does; ``params_reused`` is what the layers apply beyond that (a shared block's
  weights in every layer after the first), which both FLOP counts include: sharing saves memory,
  not compute.
- ``flops_per_token``: what the hardware actually does, used for MFU (PaLM, Chowdhery et al. 2022,
  appendix B): 6 x (every matmul parameter, the output head included) + 12 n_layer d_model n_ctx.
- memory: weights in fp32 and bf16; mixed-precision AdamW training state at 16 bytes per
  parameter (fp32 weights, gradients and two moments); activations per sequence from Korthikanti
  et al. (2022): 34 s h bytes per layer in 16-bit without recomputation, their sbh(34 + 5as/h)
  less the attention-score term, which fused attention (scaled_dot_product_attention) never stores.
"""

from __future__ import annotations

from ..config import ModelConfig
from .layers import moe_layers


def model_info(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    from . import make_model

    import torch

    if cfg.arch == "vit":  # patches, not tokens: pretrainer.model.vit
        from .vit import vit_info

        return vit_info(cfg, seq_len)
    if cfg.vocab_size is None:
        raise ValueError("vocab_size is unknown for this preset until data is chosen")
    with torch.device("meta"):
        model = make_model(cfg)
    emb = model.tok_emb.weight.numel()
    pos = sum(m.weight.numel() for s in model.stacks for m in (s.pos_emb, s.type_emb) if m is not None)
    if cfg.arch == "encoder":
        tied = {id(model.tok_emb.weight)}
        pretraining_head = model.mlm if model.mlm is not None else model.rtd
        mlm_head = sum(p.numel() for p in pretraining_head.parameters() if id(p) not in tied)
        nsp_head = sum(p.numel() for p in model.nsp.parameters()) if model.nsp is not None else 0
        total = sum(p.numel() for p in model.parameters()) - mlm_head - nsp_head
        head = 0
    else:
        mlm_head = nsp_head = 0
        total = sum(p.numel() for p in model.parameters())
        head = 0 if cfg.tie_embeddings else model.lm_head.weight.numel()
    non_emb = total - emb - pos - head
    # a mixture of experts: a token runs top_k of each MoE layer's experts; the rest are idle for it
    idle = sum((m.n_experts - m.top_k) * sum(p.numel() for p in m.experts[0].parameters())
               for m in moe_layers(model))
    active = total - idle
    non_emb_active = non_emb - idle
    # cross-layer sharing (model.share_layers, ALBERT): weights stored once are applied in every
    # layer that shares them, so compute counts them once per layer (each block in full)
    reused = sum(p.numel() for s in model.stacks for b in s.blocks for p in b.parameters()) - sum(
        p.numel() for s in model.stacks for p in s.blocks.parameters())
    applied = non_emb_active + reused
    T = seq_len or cfg.max_seq_len
    L, d, V = cfg.n_layer, cfg.d_model, cfg.vocab_size
    if cfg.arch == "encoder-decoder":  # attention FLOPs: both stacks' self-attention, plus cross
        L = cfg.n_layer + 2 * cfg.decoder_layers
    # keys a query attends to, summed over the layers: T, or the window in a local layer
    attended = sum(min(T, cfg.attention_window) if cfg.layer_kind(i) == "local" else T for i in range(L))
    # the output layer: vocabulary x embedding width (none for ELECTRA's discriminator)
    matmul_params = applied + mlm_head + (0 if cfg.rtd_head else V * cfg.embed_dim)
    stored = total + mlm_head + nsp_head  # what training holds in memory
    act_per_layer = 34 * T * d  # bytes, batch 1
    return {
        "preset": cfg.preset,
        "params": total,
        **({"params_active": active, "params_non_embedding_total": non_emb} if idle else {}),
        "params_non_embedding": non_emb_active,
        "params_embedding": emb + pos + head,
        **({f"params_{'rtd' if cfg.rtd_head else 'mlm'}_head": mlm_head} if cfg.arch == "encoder" else {}),
        **({"params_nsp_head": nsp_head} if nsp_head else {}),
        "n_layer": cfg.n_layer, **({"n_decoder_layer": cfg.decoder_layers}
                                   if cfg.arch == "encoder-decoder" else {}),
        "d_model": d, "n_head": cfg.n_head, "n_kv_heads": cfg.kv_heads,
        "d_ff": cfg.ff_dim, "vocab_size": V, "max_seq_len": cfg.max_seq_len, "seq_len": T,
        **({"n_experts": cfg.moe.n_experts, "experts_per_token": cfg.moe.top_k} if idle else {}),
        **({"share_layers": cfg.share_layers, "params_reused": reused} if reused else {}),
        "flops_per_token_kaplan": 6 * applied + 6 * attended * d,
        "flops_per_token": 6 * matmul_params + 12 * attended * d,
        "memory_bytes": {
            "weights_fp32": 4 * stored,
            "weights_bf16": 2 * stored,
            "training_state_adamw": 16 * stored,
            "activations_per_sequence_bf16": int(L * act_per_layer),
        },
    }


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for div, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"
