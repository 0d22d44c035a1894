"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") and the masked
autoencoder around it (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

A ViT is the encoder stack of :mod:`.layers` with a patch embedding instead of a token embedding:
the image [B, C, H, W] is cut into ``(H / P) * (W / P)`` patches of P x P pixels, each mapped to
``d_model`` features by one linear map (a convolution of kernel and stride P), a learned ``<cls>``
vector goes in front, a learned position is added to each of the ``n_patches + 1`` vectors, and the
bidirectional blocks and final norm follow. The ``<cls>`` state is what a classifier reads
(``model.n_classes`` > 0: one linear layer, as ``ViTForImageClassification``); ``model.pooler``
adds ViTModel's dense + tanh pooler on it.

Pixels go in as floats; the data's uint8 pixels are scaled to [-1, 1] (``x / 127.5 - 1``, the mean
and standard deviation of 0.5 that Hugging Face's ViT image processor uses by default) by
:func:`pretrainer.data.images.to_pixels`.

:class:`MAEPretraining` is what ``objective=mae`` trains: the ViT (``encoder``, the run's product)
reads only the patches a per-image random mask keeps, and :class:`MAEDecoder` (its own width, depth
and positions, with a learned mask token in place of every hidden patch) predicts every patch's
pixels. Patches are flattened as Hugging Face's ViTMAE does (:func:`patchify`): rows of patches,
then inside a patch rows of pixels, then channels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import MAEConfig, ModelConfig
from ..errors import ConfigError
from .layers import init_each, make_norm, shared_blocks


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/P)(W/P), P*P*C]: patches row by row, each flattened as (row, column,
    channel) of its pixels."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: [B, N, P*P*C] -> [B, C, H, W]."""
    B = patches.shape[0]
    x = patches.reshape(B, height // patch, width // patch, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, height, width)


def random_masking(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """He et al.'s per-image random masking from ``noise`` [B, N] (uniform numbers): the patches with
    the ``int(N * (1 - mask_ratio))`` smallest numbers stay visible. Returns ``keep`` [B, K] (the
    visible patches' indices, in increasing noise), ``restore`` [B, N] (where each patch sits in
    that shuffled order) and ``mask`` [B, N] (1. hidden, 0. visible)."""
    B, N = noise.shape
    n_keep = int(N * (1 - mask_ratio))
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(B, N, device=noise.device)
    mask[:, :n_keep] = 0
    return shuffle[:, :n_keep], restore, torch.gather(mask, 1, restore)


@dataclass
class ViTOutput:
    hidden_states: torch.Tensor  # [B, 1 + patches, d_model], the <cls> state first
    logits: torch.Tensor | None = None  # [B, n_classes] with a classifier


class PatchEmbedding(nn.Module):
    """Each P x P patch of every channel to ``d_model`` features by one linear map, written as a
    convolution with kernel and stride P (ViT's "linear projection of flattened patches")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.channels, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, N, d]


class ViT(nn.Module):
    """Patch embedding, ``<cls>``, learned positions, the blocks and the final norm; BERT's pooler
    (``model.pooler``) and a classifier (``model.n_classes``) on the ``<cls>`` state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.image_size or not cfg.channels:
            raise ConfigError(f"model {cfg.preset or 'vit'}: image_size and channels are not set (they come from "
                              f"the data when training; pass model.image_size=N model.channels=C)")
        self.cfg = cfg
        d = cfg.d_model
        self.patch_emb = PatchEmbedding(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.n_patches + 1, d))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(shared_blocks(cfg, causal=False))
        self.norm_f = make_norm(cfg) if cfg.prenorm else nn.Identity()
        self.pooler = nn.Linear(d, d) if cfg.pooler else None
        self.head = nn.Linear(d, cfg.n_classes) if cfg.n_classes else None
        self.reset_parameters()

    @property
    def stacks(self) -> list["ViT"]:
        return [self]

    def reset_parameters(self, materialise=None) -> None:
        """N(0, init_std) for every matrix, the convolution, ``<cls>`` and the positions; zero
        biases; unit norm gains (the residual projections scaled by 1/sqrt(2 n_layer) with
        ``scaled_residual_init``), each module by :meth:`init_module` (:func:`init_each`)."""
        init_each(self, self.init_module, materialise)

    def init_weights(self, materialise=None) -> None:
        self.reset_parameters(materialise)

    def init_module(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if module is self:
            nn.init.normal_(self.cls_token, 0.0, std)
            nn.init.normal_(self.pos_emb, 0.0, std)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            resid = getattr(module, "is_residual_out", False) and self.cfg.scaled_residual_init
            nn.init.normal_(module.weight, 0.0, std / math.sqrt(2 * self.cfg.n_layer) if resid else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.ndim == 1:
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def hidden_states(self, pixel_values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final states [B, 1 + N, d_model] of the images [B, C, H, W]. ``keep`` [B, K]: only these
        patches go in (MAE's visible ones, in that order), and the result is [B, 1 + K, d_model]."""
        B, C, H, W = pixel_values.shape
        side = self.cfg.image_size
        if (C, H, W) != (self.cfg.channels, side, side):
            raise ValueError(f"images of {C} x {H} x {W}, expected {self.cfg.channels} x {side} x {side} "
                             f"(model.channels x model.image_size^2)")
        x = self.patch_emb(pixel_values) + self.pos_emb[:, 1:]
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_emb[:, :1]).expand(B, -1, -1)
        x = self.drop(torch.cat([cls, x], dim=1))
        for block in self.blocks:
            x = block(x)
        return self.norm_f(x)

    def pooled(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """ViTModel's pooler: ``tanh(dense(h[:, 0]))``."""
        if self.pooler is None:
            raise ValueError("this model has no pooler (model.pooler=false)")
        return torch.tanh(self.pooler(hidden_states[:, 0]))

    def forward(self, pixel_values: torch.Tensor) -> ViTOutput:
        """The final states and, with a classifier, its logits on the ``<cls>`` state."""
        h = self.hidden_states(pixel_values)
        return ViTOutput(hidden_states=h, logits=self.head(h[:, 0]) if self.head is not None else None)

    def load_initial_weights(self, weights: dict) -> list[str]:
        """Start from another ViT's weights (``init_from``): all of them, except a classifier that
        is missing or has another number of classes, which keeps its fresh draw. Returns the names
        left fresh."""
        own = self.state_dict()
        fresh = [k for k in own if k.startswith("head.") and (k not in weights or weights[k].shape != own[k].shape)]
        kept = {k: v for k, v in weights.items() if k not in fresh and not (k.startswith("head.") and k not in own)}
        missing, unexpected = self.load_state_dict(kept, strict=False)
        if set(missing) != set(fresh) or unexpected:
            raise ConfigError(f"init_from: the weights do not fit this ViT (missing {sorted(set(missing) - set(fresh))[:3]}, "
                              f"unexpected {unexpected[:3]})")
        return fresh


def decoder_config(enc: ModelConfig, mae: MAEConfig) -> ModelConfig:
    """The MAE decoder's blocks: the encoder's kind of block at ``mae.decoder_d_model`` width (half
    the encoder's by default), ``mae.decoder_layers`` deep, ``mae.decoder_heads`` heads (half the
    encoder's), FFN 4 x its width."""
    width = mae.decoder_d_model or max(1, enc.d_model // 2)
    heads = mae.decoder_heads or max(1, enc.n_head // 2)
    if width % heads:
        raise ConfigError(f"mae.decoder_heads={heads} does not divide mae.decoder_d_model={width}")
    dec = dataclasses.replace(enc, d_model=width, n_head=heads, n_kv_heads=None, d_head=None, d_ff=4 * width,
                              n_layer=mae.decoder_layers, pooler=False, n_classes=0, share_layers="none", preset=None)
    dec.validate("mae decoder")
    return dec


class MAEDecoder(nn.Module):
    """He et al.'s light decoder: the encoder's states mapped to its width (``embed``), a learned
    ``mask_token`` put where each hidden patch was, its own learned positions, blocks, a norm, and a
    linear map to the P*P*C pixels of every patch (``pred``)."""

    def __init__(self, cfg: ModelConfig, enc: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(enc.d_model, cfg.d_model)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_emb = nn.Parameter(torch.zeros(1, enc.n_patches + 1, cfg.d_model))
        self.blocks = nn.ModuleList(shared_blocks(cfg, causal=False))
        self.norm_f = make_norm(cfg) if cfg.prenorm else nn.Identity()
        self.pred = nn.Linear(cfg.d_model, enc.patch_size ** 2 * enc.channels)

    def forward(self, h: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Predicted patches [B, N, P*P*C] from the encoder's states [B, 1 + K, d] of the visible
        patches (in the shuffled order) and ``restore`` [B, N]."""
        x = self.embed(h)
        B, N = restore.shape
        masked = self.mask_token.expand(B, N + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)  # shuffled order: visible first
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_emb
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm_f(x))[:, 1:]


class MAEPretraining(nn.Module):
    """The ``encoder`` (the ViT a run produces) and its :class:`MAEDecoder` as one module: what
    ``objective=mae`` trains and checkpoints (``encoder.*``, ``decoder.*``)."""

    def __init__(self, encoder: ViT, mae: MAEConfig):
        super().__init__()
        self.encoder = encoder
        self.decoder = MAEDecoder(decoder_config(encoder.cfg, mae), encoder.cfg)
        self.mask_ratio, self.norm_pix_loss = mae.mask_ratio, mae.norm_pix_loss
        self.init_decoder()

    @property
    def stacks(self) -> list:
        return [self.encoder, self.decoder]

    @property
    def pooler(self):
        """The encoder's pooler, if any: no MAE loss reaches it (DDP asks)."""
        return self.encoder.pooler

    def init_decoder(self, materialise=None) -> None:
        """The decoder's weights as the encoder's: N(0, init_std) matrices, mask token and positions."""
        init_each(self.decoder, self._init_decoder_module, materialise)

    def _init_decoder_module(self, module: nn.Module) -> None:
        if module is self.decoder:
            nn.init.normal_(module.mask_token, 0.0, self.encoder.cfg.init_std)
            nn.init.normal_(module.pos_emb, 0.0, self.encoder.cfg.init_std)
        else:
            self.encoder.init_module(module)

    def init_weights(self, materialise=None) -> None:
        self.encoder.init_weights(materialise)
        self.init_decoder(materialise)

    def targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pixels each patch is to be reconstructed as [B, N, P*P*C]: with ``norm_pix_loss``,
        minus the patch's mean over its (unbiased) standard deviation, as He et al.'s code."""
        target = patchify(pixel_values, self.encoder.cfg.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def reconstruct(self, pixel_values: torch.Tensor, noise: torch.Tensor):
        """``(predicted patches [B, N, P*P*C], mask [B, N])`` for the images with the mask that
        ``noise`` [B, N] draws (:func:`random_masking`)."""
        keep, restore, mask = random_masking(noise, self.mask_ratio)
        h = self.encoder.hidden_states(pixel_values, keep=keep)
        return self.decoder(h, restore), mask

    def loss(self, pixel_values: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the hidden patches only (each patch: the mean over its pixels)."""
        pred, mask = self.reconstruct(pixel_values, noise)
        return masked_patch_loss(pred, self.targets(pixel_values), mask)


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_n mask_n * mean_pixels (pred_n - target_n)^2 / sum_n mask_n``: visible patches count
    for nothing."""
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def vit_info(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """:func:`pretrainer.model.info.model_info` of a ViT: ``params`` as ``ViTModel`` counts them (pooler
    included, the classifier apart as ``params_head``), the positions and ``<cls>`` as its embedding,
    and the training FLOPs per position (patch or ``<cls>``): 6 x the matrix parameters (the patch
    map included) + 12 n_layer d_model T with T = n_patches + 1."""
    with torch.device("meta"):
        model = ViT(cfg)
    head = sum(p.numel() for p in model.head.parameters()) if model.head is not None else 0
    total = sum(p.numel() for p in model.parameters()) - head
    emb = model.pos_emb.numel() + model.cls_token.numel()
    reused = sum(p.numel() for b in model.blocks for p in b.parameters()) - sum(p.numel() for p in model.blocks.parameters())
    T = cfg.n_patches + 1
    d, L = cfg.d_model, cfg.n_layer
    stored = total + head
    return {
        "preset": cfg.preset, "params": total, "params_non_embedding": total - emb, "params_embedding": emb,
        "params_head": head, "n_layer": L, "d_model": d, "n_head": cfg.n_head, "n_kv_heads": cfg.kv_heads,
        "d_ff": cfg.ff_dim, "image_size": cfg.image_size, "patch_size": cfg.patch_size, "channels": cfg.channels,
        "n_patches": cfg.n_patches, "max_seq_len": T, "seq_len": T,
        "flops_per_token_kaplan": 6 * (total - emb + reused) + 6 * L * T * d,
        "flops_per_token": 6 * (total - emb + reused + head) + 12 * L * T * d,
        "memory_bytes": {"weights_fp32": 4 * stored, "weights_bf16": 2 * stored,
                         "training_state_adamw": 16 * stored,
                         "activations_per_sequence_bf16": int(L * 34 * T * d)},
    }
