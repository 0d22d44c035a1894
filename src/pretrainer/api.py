"""The names scripts use: :func:`build_model` and :func:`load`."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import config_from_file
from .errors import CheckpointError
from .model import build_model, make_model
from .train.checkpoint import latest_checkpoint, load_weights, verify_checkpoint

__all__ = ["build_model", "load", "find_run_files"]


def find_run_files(path: str | Path, warn=lambda s: None) -> tuple[Path, Path]:
    """``(config.yaml, checkpoint folder)`` for a run folder (newest intact checkpoint) or for one
    checkpoint folder inside a run."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if (p / "config.yaml").is_file():
        ckpt, _ = latest_checkpoint(p, warn=warn)
        return p / "config.yaml", ckpt
    if (p / "state.json").is_file() and (p.parent.parent / "config.yaml").is_file():
        verify_checkpoint(p)
        return p.parent.parent / "config.yaml", p
    raise CheckpointError(f"{p}: not a run folder (no config.yaml), a checkpoint folder, "
                          f"or a Hugging Face folder (no config.json)")


def load(path: str | Path, device: str | torch.device = "cpu", warn=lambda s: None,
         fast_paths: bool | None = None) -> torch.nn.Module:
    """A model with its trained weights, from a run folder (newest intact checkpoint, sharded or
    not), one checkpoint folder, or a Hugging Face model folder (``config.json`` + safetensors).
    ``fast_paths`` (default: on a CPU) swaps in :mod:`pretrainer.model.fast`'s layers."""
    from .model.fast import apply_fast_paths

    p = Path(path)
    if (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        from .interop.hf import import_hf

        model = import_hf(p)
    else:
        config_file, ckpt = find_run_files(p, warn)
        cfg = config_from_file(config_file)
        model = make_model(cfg.model)
        load_weights(model, ckpt)
    if fast_paths if fast_paths is not None else torch.device(device).type == "cpu":
        apply_fast_paths(model)
    return model.to(device).eval()
