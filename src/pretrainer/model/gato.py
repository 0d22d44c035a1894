"""A decoder over Gato-style streams (Reed et al. 2022, "A Generalist Agent"): text tokens,
discretised values and image patches in one sequence (:mod:`pretrainer.data.gato`).

Gato embeds each position by what it holds: a token (text or a value's bin) through the one token
embedding table, an image patch through a patch embedding (Gato: a ResNet block over the 16 x 16
patch, plus a learned position of the patch in its image). Here the patch embedding is one linear
map of the patch's pixels (ViT's) plus a learned vector per patch position in the image
(:class:`GatoInputs`), and the rest is the plain :class:`~pretrainer.model.decoder.DecoderLM`, which
reads those vectors in place of its token embeddings (``inputs_embeds``). Targets are tokens only;
the model computes no loss (``objective=gato``: :mod:`pretrainer.train.gato_objective`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .decoder import DecoderLM
from .layers import init_each


class GatoInputs(nn.Module):
    """The input vector of every position: the token embedding, except at image patches
    (``patch_index`` >= 0: the patch's index in its image), where it is ``proj(pixels) +
    pos[patch_index]``."""

    def __init__(self, patch_dim: int, n_patches: int, width: int):
        super().__init__()
        self.proj = nn.Linear(patch_dim, width)
        self.pos = nn.Parameter(torch.zeros(n_patches, width))

    def forward(self, tokens: torch.Tensor, patches: torch.Tensor, patch_index: torch.Tensor) -> torch.Tensor:
        """``tokens`` [B, T, E] (the token embeddings), ``patches`` [B, T, P*P*C], ``patch_index`` [B, T]."""
        is_patch = (patch_index >= 0).unsqueeze(-1)
        embedded = self.proj(patches.to(tokens.dtype)) + self.pos[patch_index.clamp(min=0)]
        return torch.where(is_patch, embedded.to(tokens.dtype), tokens)


class GatoModel(nn.Module):
    """The ``decoder`` (the run's product) and its :class:`GatoInputs` (``inputs``): what
    ``objective=gato`` trains and checkpoints (``decoder.*``, ``inputs.*``)."""

    def __init__(self, decoder: DecoderLM, patch_size: int, channels: int = 1, image_size: int = 8):
        super().__init__()
        self.decoder = decoder
        self.inputs = GatoInputs(patch_size * patch_size * channels, (image_size // patch_size) ** 2,
                                 decoder.cfg.embed_dim)
        self.init_inputs()

    @property
    def cfg(self):
        return self.decoder.cfg

    @property
    def stacks(self) -> list:
        return self.decoder.stacks

    def init_inputs(self, materialise=None) -> None:
        """N(0, init_std) for the patch map and positions, a zero bias (as the decoder's matrices);
        one module at a time, each its own parameters (``materialise`` as the decoder's)."""
        init_each(self.inputs, self._init_inputs, materialise)

    def _init_inputs(self, module: nn.Module) -> None:
        std = self.decoder.cfg.init_std
        if isinstance(module, GatoInputs):
            nn.init.normal_(module.pos, 0.0, std)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            nn.init.zeros_(module.bias)

    def init_weights(self, materialise=None) -> None:
        self.decoder.init_weights(materialise)
        self.init_inputs(materialise)

    def hidden_states(self, input_ids: torch.Tensor, patches: torch.Tensor, patch_index: torch.Tensor) -> torch.Tensor:
        """The decoder's final states [B, T, d_model] of a stream (see :class:`GatoInputs`)."""
        x = self.inputs(self.decoder.tok_emb(input_ids), patches, patch_index)
        return self.decoder.hidden_states(input_ids, inputs_embeds=x)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.decoder.output_weight

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder.head(h)

    def forward(self, input_ids: torch.Tensor, patches: torch.Tensor, patch_index: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab]."""
        return self.head(self.hidden_states(input_ids, patches, patch_index))
