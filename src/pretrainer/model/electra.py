"""ELECTRA's pretraining pair (Clark et al. 2020): the discriminator and its generator.

The discriminator is the model a run produces: an encoder with the replaced-token detection head
(``model.rtd_head``; presets ``electra-small``, ``electra-tiny``). The generator is a smaller
masked LM (:func:`generator_config`: fractions of the discriminator's width, FFN, heads and depth)
that shares the discriminator's token, position and segment embeddings and their norm, as the paper
does (section 3.2, "weight sharing"); its MLM output is tied to the shared token embedding, with a
bias of its own, and it has its own projection from the embedding width to its hidden size.

:class:`ElectraPretraining` holds the two as one module: what the ``electra`` objective trains and
what a run's checkpoints hold (``discriminator.*`` and ``generator.*``; a shared tensor is stored
once, under the discriminator's name). Fine-tuning, export and generation take the discriminator
(:func:`pretrainer.load` of an ELECTRA run returns it); the generator exports as
``ElectraForMaskedLM`` (``pretrainer export RUN OUT --generator``).
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from ..config import ElectraConfig, ModelConfig
from ..errors import ConfigError
from .encoder import EncoderLM

#: The embedding modules the generator takes from the discriminator.
SHARED = ("tok_emb", "pos_emb", "type_emb", "embed_norm")


def generator_config(disc: ModelConfig, e: ElectraConfig) -> ModelConfig:
    """The generator of a discriminator: ``electra.generator_*`` fractions of its width, FFN, heads
    and layers (rounded, at least 1), the same embeddings (so ``d_embed`` = the discriminator's
    embedding width), the MLM head, no pooler. ELECTRA-Small (256 wide, 4 heads, FFN 1024, 12
    layers) gets the paper's 64 wide, 1 head, FFN 256, 12 layers."""
    width = max(1, round(disc.d_model * e.generator_hidden))
    heads = max(1, round(disc.n_head * e.generator_heads))
    if width % heads:
        raise ConfigError(f"electra.generator_heads={e.generator_heads}: {heads} heads do not divide the "
                          f"generator's width {width} (electra.generator_hidden x model.d_model)")
    gen = dataclasses.replace(
        disc, d_model=width, n_head=heads, n_kv_heads=None, d_head=None,
        d_ff=max(1, round(disc.ff_dim * e.generator_ffn)), n_layer=max(1, round(disc.n_layer * e.generator_layers)),
        d_embed=disc.embed_dim, rtd_head=False, mlm_head=True, pooler=False, preset=None)
    gen.validate("electra generator")
    return gen


class ElectraPretraining(nn.Module):
    """The ``discriminator`` (the model given) and a new ``generator`` of ``generator_cfg`` sharing
    its embeddings. No forward of its own: the ``electra`` objective runs the two in turn."""

    def __init__(self, discriminator: EncoderLM, generator_cfg: ModelConfig):
        super().__init__()
        self.discriminator = discriminator
        self.generator = EncoderLM(generator_cfg)
        for name in SHARED:
            setattr(self.generator, name, getattr(discriminator, name))
        if generator_cfg.tie_embeddings:
            self.generator.mlm.out.weight = discriminator.tok_emb.weight
        first: dict[int, str] = {}  # every other name of a shared tensor is a copy (not stored)
        self.shared_copies = tuple(k for k, v in self.state_dict(keep_vars=True).items()
                                   if first.setdefault(id(v), k) != k)

    @property
    def stacks(self) -> list:
        """Both models' stacks of blocks (activation checkpointing, compilation and FSDP wrap them)."""
        return self.discriminator.stacks + self.generator.stacks

    @property
    def pooler(self):
        """The discriminator's pooler: a parameter that no pretraining loss reaches (DDP asks)."""
        return self.discriminator.pooler

    def init_weights(self, materialise=None) -> None:
        """Draw every weight afresh: the discriminator's, then the generator's (which draws the
        shared embeddings again)."""
        self.discriminator.init_weights(materialise)
        self.generator.init_weights(materialise)
