"""Models of the three modes, built from one transformer core (see ``layers.py``)."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..config import ModelConfig, model_preset, set_key
from .decoder import DecoderLM, LMOutput
from .encdec import EncoderDecoderLM, Seq2SeqOutput
from .encoder import EncoderLM, EncoderOutput
from .vit import ViT

__all__ = ["DecoderLM", "EncoderDecoderLM", "EncoderLM", "EncoderOutput", "LMOutput",
           "Seq2SeqOutput", "ViT", "build_model", "make_model", "model_config"]

#: The model class of each ``model.arch``.
ARCHS = {"decoder": DecoderLM, "encoder": EncoderLM, "encoder-decoder": EncoderDecoderLM, "vit": ViT}


def make_model(cfg: ModelConfig) -> torch.nn.Module:
    """The randomly initialised model of ``cfg`` (its ``arch`` picks the class)."""
    return ARCHS[cfg.arch](cfg)


def model_config(preset: str | ModelConfig, **overrides) -> ModelConfig:
    """A preset name (or a ModelConfig) with field overrides applied and validated."""
    cfg = model_preset(preset) if isinstance(preset, str) else dataclasses.replace(preset)
    for key, value in overrides.items():
        set_key(cfg, key, value, where="build_model")
    cfg.validate()
    return cfg


def build_model(preset: str | ModelConfig, device: str | torch.device | None = None,
                **overrides) -> torch.nn.Module:
    """A randomly initialised model: ``build_model("gpt2-small")``, ``build_model("bert-base")``,
    ``build_model("llama-tiny", vocab_size=8192, n_layer=2)``. ``device="meta"`` builds the
    structure without allocating weights (used to count parameters of large presets instantly)."""
    cfg = model_config(preset, **overrides)
    if cfg.vocab_size is None and cfg.arch != "vit":
        raise ValueError(f"preset '{cfg.preset}' takes its vocabulary from the data: pass vocab_size=N")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return make_model(cfg)
