"""Checkpoints: weights and optimizer moments in safetensors, everything else in JSON.

``RUN/checkpoints/step_00001000/`` holds ``model.safetensors``, ``optimizer.safetensors``,
``rng.safetensors`` and ``state.json`` (step, data position, optimizer hyper-parameters, and the
byte size of every file, so that a truncated checkpoint is recognised before anything is loaded).
A checkpoint is written into a hidden temporary folder and renamed into place, so a crash leaves
the previous one intact; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

FORMAT = "pretrainer-checkpoint"
STEP_PREFIX = "step_"


def checkpoint_dir(run: str | Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(run: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def save_checkpoint(run: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict, keep: int = 2) -> Path:
    """Write a checkpoint for ``state["step"]`` atomically and keep the newest ``keep``."""
    final = checkpoint_dir(run, state["step"])
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(model_tensors(model), str(tmp / "model.safetensors"))
    meta = dict(state, format=FORMAT, saved_at=time.time())
    if optimizer is not None:
        tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta["optimizer"] = opt_meta
    save_file(_rng_state(), str(tmp / "rng.safetensors"))
    meta["files"] = {p.name: p.stat().st_size for p in tmp.iterdir()}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. end of a resumed run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> dict:
    """Read ``state.json`` and check every file is present with its recorded size."""
    try:
        meta = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no state.json (incomplete checkpoint)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'state.json'}: not valid JSON ({e.msg})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / 'state.json'}: not a pretrainer checkpoint")
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, expected {size} (truncated?)")
    return meta


def latest_checkpoint(run: str | Path, warn=print) -> tuple[Path, dict]:
    """The newest checkpoint that verifies; broken newer ones are reported through ``warn``."""
    found = list_checkpoints(run)
    if not found:
        raise CheckpointError(f"{run}: no checkpoints under {Path(run) / 'checkpoints'}")
    for path in reversed(found):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as e:
            warn(f"warning: skipping broken checkpoint: {e}")
    raise CheckpointError(f"{run}: every checkpoint is broken (newest: {found[-1].name})")


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load ``model.safetensors`` of a checkpoint folder into ``model`` (tied weights restored)."""
    file = path / "model.safetensors" if path.is_dir() else path
    try:
        tensors = load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read weights ({e})") from None
    own = model.state_dict()
    missing = [k for k in own if k not in tensors and not is_tied_copy(model, k)]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{file}: weights do not match the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, t in tensors.items():
        if own[k].shape != t.shape:
            raise CheckpointError(f"{file}: '{k}' has shape {list(t.shape)}, model expects {list(own[k].shape)}")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)


def load_training_state(path: Path, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Restore optimizer moments and RNG streams saved by :func:`save_checkpoint`."""
    try:
        tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read training state ({e})") from None
    opt = meta["optimizer"]
    state = {}
    for key, tensor in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda_{i}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda_{i}"], i)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict for saving: a tied output matrix is stored once (as the embedding)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not is_tied_copy(model, k)}


def is_tied_copy(model: torch.nn.Module, key: str) -> bool:
    """Whether ``key`` is the output matrix that ``tie_embeddings`` shares with the embedding
    (each model names it in ``tied_output``) or another name of a shared tensor
    (``shared_copies``: an encoder-decoder's decoder embedding)."""
    return key in getattr(model, "shared_copies", ()) or (
        key == getattr(model, "tied_output", None)
        and getattr(getattr(model, "cfg", None), "tie_embeddings", False))


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, pstate in sd["state"].items():
        for name, value in pstate.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _rng_state() -> dict:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            out[f"cuda_{i}"] = torch.cuda.get_rng_state(i)
    return out


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
