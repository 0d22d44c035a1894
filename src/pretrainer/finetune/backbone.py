"""Where a fine-tuning run starts: the backbone model and its tokenizer.

``FROM`` is one of

- a pretraining run folder (or one checkpoint folder in it): its config, newest intact weights and
  ``tokenizer/``;
- a Hugging Face model folder (``config.json`` + weights + ``tokenizer.json``), converted on load;
- a fine-tuning run folder: its backbone (the head is dropped), so tasks can be chained;
- a preset name (``bert-mini``), with ``from_scratch`` only: random weights, and a tokenizer from
  ``tokenizer`` (a folder or ``tokenizer.json``) or, without one, a WordPiece tokenizer of
  ``vocab_size`` trained on the training texts.

``from_scratch`` with a folder keeps the folder's config and tokenizer and draws fresh random
weights, so pretrained and from-scratch runs differ in nothing but the weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

import torch
import yaml

from ..config import PRESETS, ModelConfig, config_from_file
from ..errors import ConfigError, DataError, PretrainerError
from ..model import make_model, model_config
from ..tokenization import Tok, load_tokenizer
from ..train.checkpoint import is_tied_copy, latest_checkpoint, load_weights

FINETUNE_MARK = "task"  # a fine-tuning run's config.yaml has this key


@dataclasses.dataclass
class Backbone:
    model: torch.nn.Module
    tok: Tok
    origin: dict  # what it was loaded from, for the run's config


def is_finetune_run(path: Path) -> bool:
    if not (path / "config.yaml").is_file():
        return False
    try:
        raw = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except yaml.YAMLError:
        return False
    return isinstance(raw, dict) and FINETUNE_MARK in raw


def _folder_tokenizer(folder: Path) -> Tok:
    for candidate in (folder / "tokenizer", folder):
        if (candidate / "tokenizer.json").is_file():
            return load_tokenizer(candidate)
    raise DataError(f"{folder}: no tokenizer (expected tokenizer/tokenizer.json or tokenizer.json)")


def load_backbone(source: str, from_scratch: bool = False, tokenizer: str | None = None,
                  vocab_size: int = 8192, texts: Callable[[], Iterable[str]] | None = None,
                  warn=lambda s: None) -> Backbone:
    """The backbone and tokenizer for ``source`` (see the module doc). ``texts`` yields training
    texts for a tokenizer when a preset starts without one."""
    path = Path(source)
    if path.exists():
        if tokenizer is not None:
            raise ConfigError(f"--tokenizer applies to a preset name; {source} brings its own tokenizer")
        if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
            return _from_hf(path, from_scratch)
        if is_finetune_run(path):
            return _from_finetune_run(path, from_scratch)
        return _from_run(path, from_scratch, warn)
    if source in PRESETS:
        if not from_scratch:
            raise ConfigError(f"FROM '{source}' is a preset name: nothing pretrained to start from "
                              f"(weights are never downloaded); pass --from-scratch, or a run or "
                              f"Hugging Face folder")
        return _from_preset(source, tokenizer, vocab_size, texts)
    raise ConfigError(f"FROM '{source}': not a run folder, a Hugging Face folder or a preset name "
                      f"(presets: {', '.join(PRESETS)})")


def _from_run(path: Path, from_scratch: bool, warn) -> Backbone:
    from ..api import find_run_files

    from ..train.objectives import trained_module

    config_file, ckpt = find_run_files(path, warn)
    run_cfg = config_from_file(config_file)
    run = config_file.parent
    model = make_model(run_cfg.model)  # an ELECTRA run's: the discriminator
    if not from_scratch:
        load_weights(trained_module(run_cfg, model), ckpt)
    return Backbone(model, _folder_tokenizer(run), {"kind": "run", "path": str(path),
                                                    "checkpoint": None if from_scratch else str(ckpt)})


def _from_hf(path: Path, from_scratch: bool) -> Backbone:
    from ..interop.hf import config_from_hf, import_hf, _read_json

    if from_scratch:
        model = make_model(config_from_hf(_read_json(path / "config.json"), str(path / "config.json")))
    else:
        model = import_hf(path)
    return Backbone(model, _folder_tokenizer(path), {"kind": "hf", "path": str(path)})


def _from_finetune_run(path: Path, from_scratch: bool, adapter: bool = True) -> Backbone:
    """A fine-tuning run's backbone; a LoRA run's with its adapters merged in (unless ``adapter``
    is false: the frozen base weights)."""
    from safetensors.torch import load_file

    raw = yaml.safe_load((path / "config.yaml").read_text())
    cfg = ModelConfig(**raw["model"])
    model = make_model(cfg)
    ckpt = None
    if not from_scratch:
        ckpt, _ = latest_checkpoint(path)
        tensors = load_file(str(ckpt / "model.safetensors"))
        prefix = "backbone." if any(k.startswith("backbone.") for k in tensors) else ""
        # a task head around the backbone; text2text: the fine-tuned model is the backbone itself
        own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = model.load_state_dict(own, strict=False)
        missing = [k for k in missing if not is_tied_copy(model, k)]  # stored once (tied, shared)
        if missing or unexpected:
            raise PretrainerError(f"{ckpt}: backbone weights do not match its config "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if adapter:  # a LoRA run's adapters, merged into the weights
            from ..train.lora import load_adapter

            load_adapter(model, ckpt, prefix)
    return Backbone(model, _folder_tokenizer(path), {"kind": "finetune-run", "path": str(path),
                                                     "checkpoint": str(ckpt) if ckpt else None})


def _from_preset(name: str, tokenizer: str | None, vocab_size: int,
                 texts: Callable[[], Iterable[str]] | None) -> Backbone:
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        origin_tok = str(tokenizer)
    else:
        if texts is None:
            raise ConfigError(f"FROM '{name}' --from-scratch needs a tokenizer: pass --tokenizer DIR")
        # WordPiece for encoders (BERT's); Unigram for text-to-text, whose outputs are decoded
        kind = "unigram" if PRESETS[name].get("arch") == "encoder-decoder" else "wordpiece"
        tok = Tok.train(texts(), kind, vocab_size)
        origin_tok = f"{kind}:{vocab_size} trained on the training texts"
    cfg = model_config(name, vocab_size=tok.vocab_size)
    return Backbone(make_model(cfg), tok, {"kind": "preset", "preset": name, "tokenizer": origin_tok})


def with_settings(model: torch.nn.Module, changes: dict) -> torch.nn.Module:
    """``model`` with some config fields changed (``pretrainer.config.FINETUNE_MODEL_KEYS``: the
    dropout rate, the longest input): the same weights in a model built from the changed config
    (layers read their settings when built), or ``model`` itself when nothing changes. The global
    random state is left as it was. A change the weights do not fit (a learned position table of
    another length) is a one-line ConfigError."""
    cfg = dataclasses.replace(model.cfg, **changes)
    cfg.validate("model")
    if cfg == model.cfg:
        return model
    with torch.random.fork_rng(devices=[]):
        new = make_model(cfg)
    old = model.state_dict()
    for name, t in new.state_dict().items():
        if name in old and old[name].shape != t.shape:
            key = next((k for k in changes if getattr(cfg, k) != getattr(model.cfg, k) and k != "dropout"), "model")
            raise ConfigError(f"model.{key}={changes.get(key)}: the backbone's {name} has shape "
                              f"{tuple(old[name].shape)}, this setting needs {tuple(t.shape)} (a learned "
                              f"position table is fixed by the pretrained weights); leave model.{key} as it is")
    new.load_state_dict(old)
    return new
