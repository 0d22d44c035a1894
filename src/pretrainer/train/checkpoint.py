"""Checkpoints: weights and optimizer moments in safetensors (or sharded), everything else in JSON.

``RUN/checkpoints/step_00001000/`` holds ``model.safetensors``, ``optimizer.safetensors``,
``rng.safetensors`` and ``state.json`` (step, data position, optimizer hyper-parameters, and the
byte size of every file, so that a truncated checkpoint is recognised before anything is loaded).
A run sharded with FSDP2 (``train.parallel=fsdp``) writes ``dcp/`` instead of the two weight
files: model and optimizer state through ``torch.distributed.checkpoint`` (each process writes its
own shards; no process gathers the model), and ``rng_rank{N}.safetensors`` per process. Either
kind resumes at any number of processes, sharded or not (:func:`restore`), and every reader of
weights (generation, export, fine-tuning) reads both (:func:`load_weights`).

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash leaves
the previous one intact; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
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
    """Load ``model.safetensors`` (or the model part of a sharded ``dcp/`` checkpoint) of a
    checkpoint folder into ``model`` (tied weights restored)."""
    if path.is_dir() and (path / "dcp").is_dir():
        import torch.distributed.checkpoint as dcp

        state = {k: v for k, v in model.state_dict().items() if not is_tied_copy(model, k)}
        try:
            with _one_process_load():
                dcp.load({"model": state}, checkpoint_id=str(path / "dcp"))
        except Exception as e:  # noqa: BLE001 - DCP raises several kinds; all mean "cannot read"
            raise CheckpointError(f"{path / 'dcp'}: cannot read sharded weights ({_first_line(e)})") from None
        model.load_state_dict(state, strict=False)
        return
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
    _set_rng(rng)


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
    """Flush every file under ``path`` (sharded checkpoints have a ``dcp/`` folder) to disk."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP2) and restoring either kind at any number of processes


@contextlib.contextmanager
def _one_process_load():
    """DCP warns when it reads without a process group; that is what reading a sharded checkpoint
    on one process means, so the warning says nothing here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def save_sharded_checkpoint(run: str | Path, model: torch.nn.Module, optimizer, state: dict,
                            rank: int, world: int, keep: int = 2) -> Path:
    """Every process writes its shards of the model and optimizer (``torch.distributed.checkpoint``)
    and its RNG state into one temporary folder, then the first process records the file sizes,
    checks it can see every process's files (several machines need a shared run folder) and renames
    the folder into place. A crash (or SIGKILL) before the rename leaves the previous checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoint_dir(run, state["step"])
    tmp = final.parent / f".tmp-{final.name}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(world)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / "dcp"))
    save_file(_rng_state(), str(tmp / f"rng_rank{rank}.safetensors"))
    _barrier(world)
    if rank == 0:
        missing = [r for r in range(world) if not (tmp / f"rng_rank{r}.safetensors").is_file()]
        if missing:
            raise CheckpointError(f"{tmp}: the files of process {missing[0]} are not visible here; "
                                  f"on several machines out= must be a folder that all of them share")
        meta = dict(state, format=FORMAT, saved_at=time.time(), sharded=True, world_size=world)
        meta["files"] = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
                         if p.is_file()}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(world)
    return final


def restore(path: Path, model: torch.nn.Module, optimizer, meta: dict, rank: int = 0,
            sharded: bool = False) -> None:
    """Restore weights, optimizer moments and this process's RNG from a checkpoint of either kind
    into ``model`` / ``optimizer``, sharded (FSDP2) or not, whatever number of processes wrote it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_state_dict)

    if (path / "dcp").is_dir():
        import torch.distributed.checkpoint as dcp

        msd, osd = get_state_dict(model, optimizer)
        try:
            with _one_process_load():
                dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=str(path / "dcp"))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path / 'dcp'}: cannot read the sharded checkpoint ({_first_line(e)})") from None
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
        rng_file = path / f"rng_rank{rank}.safetensors"
        _set_rng(load_file(str(rng_file if rng_file.is_file() else path / "rng_rank0.safetensors")))
        return
    if not sharded:
        load_weights(model, path)
        load_training_state(path, optimizer, meta)
        return
    # a full (one-process or ddp) checkpoint into a sharded model: full tensors, each process
    # keeping its shards
    weights = load_file(str(path / "model.safetensors"))
    source = next(n for n, p in model.named_parameters() if p is model.tok_emb.weight)  # stored once
    for k in model.state_dict():
        if k not in weights and is_tied_copy(model, k):
            weights[k] = weights[source]
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state: dict = {}
    for key, tensor in opt_tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(order[int(idx)], {})[name] = tensor
    groups, i = [], 0
    for g in meta["optimizer"]["param_groups"]:
        groups.append({**g, "params": order[i:i + len(g["params"])]})
        i += len(g["params"])
    set_state_dict(model, optimizer, model_state_dict=weights,
                   optim_state_dict={"state": state, "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True))
    _set_rng(load_file(str(path / "rng.safetensors")))


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda_{i}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda_{i}"], i)
