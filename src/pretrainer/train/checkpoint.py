"""Checkpoints: weights and optimizer moments in safetensors (or sharded), everything else in JSON.

``RUN/checkpoints/step_00001000/`` holds ``model.safetensors``, ``optimizer.safetensors``,
``rng.safetensors`` and ``state.json`` (step, data position, optimizer hyper-parameters, and the
byte size and SHA-256 of every file, computed from the bytes as they were written).
A run sharded with FSDP2 (``train.parallel=fsdp``) writes ``dcp/`` instead of the two weight
files: model and optimizer state through ``torch.distributed.checkpoint`` (each process writes its
own shards; no process gathers the model), and ``rng_rank{N}.safetensors`` per process. Either
kind resumes at any number of processes, sharded or not (:func:`restore`), and every reader of
weights (generation, export, fine-tuning) reads both (:func:`load_weights`).

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash leaves
the previous one intact (the next start of the run removes the temporary folder:
:func:`remove_failed_saves`); nothing is ever unpickled. Every reader verifies a checkpoint before
using it (:func:`verify_checkpoint`): ``state.json`` must be a JSON object whose own checksum and
step agree with its contents and its folder name, and every file must have its recorded size,
SHA-256 and a readable safetensors header. :func:`latest_checkpoint` skips a checkpoint that fails
(with a one-line warning naming it and why) for the newest one that passes. Checkpoints written
before checksums existed are checked by size and header.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import time
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError, storage
from . import lora

FORMAT = "pretrainer-checkpoint"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"  # a save in progress (or one that never finished): .tmp-step_00001000[-PID]
CHUNK = 1 << 20  # bytes hashed at a time


def checkpoint_dir(run: str | Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(run: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def save_checkpoint(run: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict, keep: int = 2) -> Path:
    """Write a checkpoint for ``state["step"]`` atomically and keep the newest ``keep``."""
    final = checkpoint_dir(run, state["step"])
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    # a full disk or a read-only folder: one line naming the checkpoint, and no half-written folder
    with storage(final, "save a checkpoint", cleanup=tmp):
        tmp.mkdir(parents=True)
        digests = {"model.safetensors": write_safetensors(model_tensors(model), tmp / "model.safetensors")}
        digests.update(lora.write_adapter(model, tmp, write_safetensors))  # a LoRA run's adapters (peft's files)
        meta = dict(state, format=FORMAT, saved_at=time.time())
        if optimizer is not None:
            tensors, opt_meta = _flatten_optimizer(optimizer)
            digests["optimizer.safetensors"] = write_safetensors(tensors, tmp / "optimizer.safetensors")
            meta["optimizer"] = opt_meta
        digests["rng.safetensors"] = write_safetensors(_rng_state(), tmp / "rng.safetensors")
        _write_state(tmp, meta, digests)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. end of a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    for old in list_checkpoints(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_failed_saves(run: str | Path) -> list[Path]:
    """Remove the temporary folders that saves which never finished (a kill, a full disk) left
    under ``RUN/checkpoints``; called when a run starts, holding the run's lock, so no save is in
    progress. Returns what was removed."""
    root = Path(run) / "checkpoints"
    gone = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)] if root.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return gone


# ----------------------------------------------------------------------------------------------
# Checksums: computed while writing, verified on every read


#: safetensors' dtype names, in the order safetensors itself lays tensors out (last first)
_DTYPES = [(torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"), (torch.float8_e5m2, "F8_E5M2"),
           (torch.float8_e4m3fn, "F8_E4M3"), (torch.int16, "I16"), (torch.uint16, "U16"),
           (torch.float16, "F16"), (torch.bfloat16, "BF16"), (torch.int32, "I32"), (torch.uint32, "U32"),
           (torch.float32, "F32"), (torch.float64, "F64"), (torch.int64, "I64"), (torch.uint64, "U64")]
_DTYPE_NAME = {d: name for d, name in _DTYPES}
_DTYPE_RANK = {d: i for i, (d, _) in enumerate(_DTYPES)}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> tuple[int, str]:
    """Write ``tensors`` as a safetensors file, byte for byte what ``safetensors.torch.save_file``
    writes (an 8-byte header length, the JSON header padded to 8 bytes, the tensors' bytes, largest
    dtypes first), streaming each tensor from its own memory; returns the file's size and the
    SHA-256 of the bytes as they were written."""
    items = sorted(((k, v.detach().cpu().contiguous()) for k, v in tensors.items()),
                   key=lambda kv: (-_DTYPE_RANK[kv[1].dtype], kv[0]))
    header, offset = {}, 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        def put(chunk) -> None:
            f.write(chunk)
            digest.update(chunk)

        put(struct.pack("<Q", len(text)))
        put(text)
        for _, t in items:
            data = t.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes, no copy
            for i in range(0, len(data), CHUNK):
                put(memoryview(data[i:i + CHUNK]))
    return 8 + len(text) + offset, digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _state_digest(meta: dict) -> str:
    """The checksum ``state.json`` carries of its own contents (every key but this one)."""
    body = {k: v for k, v in meta.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_state(folder: Path, meta: dict, digests: dict[str, tuple[int, str]]) -> None:
    """``state.json``: ``meta`` with each file's size (``files``) and SHA-256 (``sha256``), and
    the checksum of all that (``state_sha256``)."""
    meta = dict(meta, files={k: size for k, (size, _) in sorted(digests.items())},
                sha256={k: sha for k, (_, sha) in sorted(digests.items())})
    meta = json.loads(json.dumps(meta))  # what reading it back gives (tuples as lists, keys as text)
    meta["state_sha256"] = _state_digest(meta)
    (folder / "state.json").write_text(json.dumps(meta, indent=1))


def verify_checkpoint(path: Path) -> dict:
    """``state.json`` of the checkpoint folder ``path``, once everything checks: it is a JSON object
    of this format, its own checksum matches, its step is the folder's (``step_00001000``), and
    every file it lists is there with its size, SHA-256 and a readable safetensors header. Raises a
    one-line :class:`CheckpointError` naming the first thing that does not. Hashing reads every
    byte (1-2 s per GB on one CPU core)."""
    path = Path(path)
    state = path / "state.json"
    try:
        meta = json.loads(state.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no state.json (incomplete checkpoint)") from None
    except OSError as e:
        raise CheckpointError(f"{state}: unreadable ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state}: not valid JSON ({getattr(e, 'msg', None) or e.reason})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{state}: not a pretrainer checkpoint")
    if "state_sha256" in meta and meta["state_sha256"] != _state_digest(meta):
        raise CheckpointError(f"{state}: its contents do not match their checksum (damaged)")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise CheckpointError(f"{state}: no step (expected an integer)")
    name = path.name
    if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit() and int(name[len(STEP_PREFIX):]) != step:
        raise CheckpointError(f"{state}: step {step} disagrees with the folder name {name}")
    files, sums = meta.get("files", {}), meta.get("sha256", {})
    if not isinstance(files, dict) or not isinstance(sums, dict):
        raise CheckpointError(f"{state}: 'files' and 'sha256' must map file names to sizes and checksums")
    for name, size in files.items():
        f = path / name
        try:
            if not f.is_file():
                raise CheckpointError(f"{f}: missing")
            if f.stat().st_size != size:
                raise CheckpointError(f"{f}: {f.stat().st_size} bytes, expected {size} (truncated?)")
            if name.endswith(".safetensors"):
                _check_safetensors_header(f)
            if name in sums and sha256_file(f) != sums[name]:
                raise CheckpointError(f"{f}: SHA-256 differs from the one recorded when it was written (damaged)")
        except OSError as e:
            raise CheckpointError(f"{f}: unreadable ({e.strerror or e})") from None
    return meta


def _check_safetensors_header(f: Path) -> None:
    """The header of a safetensors file parses and its tensors fill the file exactly."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            raise CheckpointError(f"{f}: damaged safetensors header (length {n})")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise CheckpointError(f"{f}: damaged safetensors header (not a JSON table of tensors)") from None
    if max(ends, default=0) != size - 8 - n:
        raise CheckpointError(f"{f}: damaged safetensors header (its tensors do not fill the file)")


def latest_checkpoint(run: str | Path, warn=None) -> tuple[Path, dict]:
    """The newest checkpoint that verifies. Each broken newer one is reported through ``warn``
    (default: one line on stderr) naming it, why, and the checkpoint used instead."""
    warn = warn or _stderr
    found = list_checkpoints(run)
    if not found:
        raise CheckpointError(f"{run}: no finished checkpoint under {Path(run) / 'checkpoints'}")
    broken = []
    for path in reversed(found):
        try:
            meta = verify_checkpoint(path)
        except CheckpointError as e:
            broken.append(str(e))
            continue
        for why in broken:
            warn(f"warning: skipping broken checkpoint: {why}; using {path.name}")
        return path, meta
    for why in broken:
        warn(f"warning: skipping broken checkpoint: {why}")
    raise CheckpointError(f"{run}: every checkpoint is broken (newest: {found[-1].name})")


def resume_point(run: str | Path, warn=None) -> tuple[Path, dict]:
    """:func:`latest_checkpoint` for ``--resume``: a run with no finished checkpoint (stopped before
    its first save finished) is said to be one that starts again."""
    if not list_checkpoints(run):
        raise CheckpointError(f"{run}: nothing to resume (no finished checkpoint: the run stopped before "
                              f"its first save); start it again without --resume: "
                              f"pretrainer pretrain -c {Path(run) / 'config.yaml'}")
    return latest_checkpoint(run, warn)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_weights(model: torch.nn.Module, path: Path, adapter: bool = True) -> None:
    """Load ``model.safetensors`` (or the model part of a sharded ``dcp/`` checkpoint) of a
    checkpoint folder into ``model`` (tied weights restored). A LoRA run's adapters come with them
    (:func:`.lora.load_adapter`: into the LoRA layers of an adapted model, else merged into the
    weights), unless ``adapter`` is false (the frozen base weights alone)."""
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
    own = lora.base_state(model.state_dict())  # an adapted model's base weights under the plain names
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
    if adapter or lora.adapted(model):
        lora.load_adapter(model, path if path.is_dir() else path.parent)


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
    """The model's state dict for saving: a tied output matrix is stored once (as the embedding),
    and weights shared across layers once (as the first layer's)."""
    return {k: v.detach().cpu().contiguous() for k, v in lora.base_state(model.state_dict()).items()
            if not is_tied_copy(model, k)}


def is_tied_copy(model: torch.nn.Module, key: str) -> bool:
    """Whether ``key`` is the output matrix that ``tie_embeddings`` shares with the embedding
    (each model names it in ``tied_output``) or another name of a shared tensor
    (``shared_copies``: an encoder-decoder's decoder embedding; the later layers' names of the
    weights that ``model.share_layers`` shares)."""
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
    and its RNG state into one temporary folder, hashing each file as it writes it, and lists the
    sizes and SHA-256 of its files in ``sha256_rank{N}.json``; then the first process checks it can
    see every process's files (several machines need a shared run folder), merges the lists into
    ``state.json`` and renames the folder into place. A crash (or SIGKILL) before the rename leaves
    the previous checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoint_dir(run, state["step"])
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(world)
    msd, osd = get_state_dict(model, optimizer)
    written: dict[Path, tuple[int, str]] = {}
    # the temporary folder of a failed save is removed when the run next starts (remove_failed_saves):
    # here other processes may still be writing into it
    with storage(final, "save a checkpoint"):
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / "dcp"),
                 storage_writer=_hashing_dcp_writer(tmp / "dcp", written))
        written[tmp / f"rng_rank{rank}.safetensors"] = write_safetensors(_rng_state(), tmp / f"rng_rank{rank}.safetensors")
        mine = {str(p.relative_to(tmp)): list(v) for p, v in written.items()}
        (tmp / f"sha256_rank{rank}.json").write_text(json.dumps(mine))
    _barrier(world)
    if rank == 0:
        missing = [r for r in range(world) if not (tmp / f"sha256_rank{r}.json").is_file()]
        if missing:
            raise CheckpointError(f"{tmp}: the files of process {missing[0]} are not visible here; "
                                  f"on several machines out= must be a folder that all of them share")
        recorded = {}
        for r in range(world):
            manifest = tmp / f"sha256_rank{r}.json"
            recorded.update(json.loads(manifest.read_text()))
            manifest.unlink()
        digests = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                name = str(p.relative_to(tmp))
                size, sha = recorded.get(name, (None, None))
                # a file written past the hashing stream (a change inside torch): hash it as it is
                digests[name] = (size, sha) if size == p.stat().st_size else (p.stat().st_size, sha256_file(p))
        meta = dict(state, format=FORMAT, saved_at=time.time(), sharded=True, world_size=world)
        with storage(final, "save a checkpoint", cleanup=tmp):  # every process has written by now
            _write_state(tmp, meta, digests)
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        for old in list_checkpoints(run)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(world)
    return final


def _hashing_dcp_writer(path: Path, written: dict):
    """A ``torch.distributed.checkpoint`` file-system writer that records the size and SHA-256 of
    every file it writes into ``written`` (by path), from the bytes as they go out."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, target, mode):
            with super().create_stream(target, mode) as stream:
                if "w" not in mode:
                    yield stream
                    return
                out = _HashingStream(stream)
                yield out
            written[Path(target)] = (out.size, out.digest.hexdigest())

        def rename(self, src, dst) -> None:  # DCP writes .metadata.tmp, then renames it
            super().rename(src, dst)
            if Path(src) in written:
                written[Path(dst)] = written.pop(Path(src))

    writer = FileSystemWriter(path)
    writer.fs = HashingFileSystem()
    return writer


class _HashingStream:
    """A binary file being written, hashed on the way."""

    def __init__(self, raw):
        self.raw, self.size, self.digest = raw, 0, hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += len(view)
        return self.raw.write(view)

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed


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
    first: dict[int, str] = {}  # a tied or shared tensor is stored once, under its first name
    for k, v in model.state_dict(keep_vars=True).items():
        if k not in weights and is_tied_copy(model, k):
            weights[k] = weights[first[id(v)]]
        first.setdefault(id(v), k)
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
