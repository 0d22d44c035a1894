"""User-facing errors.

A :class:`PretrainerError` carries a one-line message meant for the person at the terminal: the CLI
prints it without a traceback (unless ``--debug``) and exits with its ``exit_status``. Library
callers can catch it.

The command line's exit statuses: 0 done; 1 an unexpected error (a bug: run with ``--debug``); 2 a
:class:`PretrainerError` (bad input or state, the message says what to change); 3 a
:class:`DivergenceError` (training stopped on a non-finite or spiking loss; the last good
checkpoint is kept); :data:`EXIT_PREEMPTED` (75) a run stopped by SIGTERM or Ctrl-C after saving
a checkpoint, to be continued with ``--resume``; 130 a second Ctrl-C (stopped without a checkpoint).
"""

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

#: Exit status of a run stopped early by a signal (SIGTERM, as a scheduler preempting it, or Ctrl-C)
#: after saving a resumable checkpoint: BSD's EX_TEMPFAIL, "temporary failure, try again", so a
#: job script can tell "requeue me" from "done" (0) and "failed" (1, 2, 3).
EXIT_PREEMPTED = 75


class PretrainerError(Exception):
    """Bad input or a state the user can fix; the message is one line and names what was expected."""

    exit_status = 2


class ConfigError(PretrainerError):
    """A configuration key or value is wrong."""


class DataError(PretrainerError):
    """A corpus, data folder or task file is missing or malformed."""


class CheckpointError(PretrainerError):
    """A checkpoint is missing, truncated or does not match the model."""


class DivergenceError(PretrainerError):
    """Training diverged: too many steps in a row with a non-finite loss or gradient norm, a loss
    spike (``train.spike_factor``) or non-finite weights; the run stopped with its last good
    checkpoint kept."""

    exit_status = 3


class StorageError(PretrainerError):
    """A file or folder could not be written or read: a full disk, a read-only file system, no
    permission, a file where a folder is expected. The message names the path and what to do."""


#: What to do about the file-system errors a user can fix, by errno.
_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is used up: free some space or choose a folder on another disk",
    errno.EFBIG: "the file is too large for this file system (or ulimit -f): choose another disk",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to, or fix its permissions",
    errno.ENOTDIR: "a file is where a folder is expected: move the file or choose another path",
    errno.EISDIR: "a folder is where a file is expected: choose a file path",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "a file is already there: move it or choose another path",
    errno.EIO: "an input/output error: check the disk",
}


def storage_error(e: OSError, path=None, doing: str = "write") -> StorageError:
    """The one-line :class:`StorageError` for ``e``, naming ``path`` (or the path the error carries)."""
    where = path if path is not None else (e.filename if e.filename is not None else None)
    advice = _ADVICE.get(e.errno, e.strerror or str(e))
    reason = e.strerror or type(e).__name__
    head = f"{where}: cannot {doing}" if where is not None else f"cannot {doing}"
    return StorageError(f"{head} ({reason}); {advice}" if advice != reason else f"{head} ({reason})")


def os_error_of(e: Exception) -> OSError | None:
    """``e`` as an OSError when it is one, or when a Rust library (tokenizers) reports one as text
    ('No space left on device (os error 28)'); None for anything else."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"\(os error (\d+)\)", str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


@contextmanager
def storage(path, doing: str = "write", cleanup=None):
    """Turn a file-system error inside the block into a one-line :class:`StorageError` naming
    ``path``; ``cleanup`` (a path to a temporary file or folder) is removed first, so that a failed
    write leaves nothing half-written behind."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is a file-system error
        if cleanup is not None:
            _remove(Path(cleanup))
        err = os_error_of(e)
        if err is None or isinstance(e, PretrainerError):
            raise
        raise storage_error(err, path, doing) from e


@contextmanager
def writing_folder(path, doing: str = "write"):
    """For a block that writes files into the folder ``path``: on any failure, what the block
    added is removed (the folder itself when the block created it), and a file-system error
    becomes a one-line :class:`StorageError` naming the folder."""
    p = Path(path)
    created = not p.exists()
    before = set(os.listdir(p)) if p.is_dir() else set()
    try:
        yield p
    except BaseException as e:
        if created:
            _remove(p)
        elif p.is_dir():
            for name in set(os.listdir(p)) - before:
                _remove(p / name)
        err = os_error_of(e) if isinstance(e, Exception) and not isinstance(e, PretrainerError) else None
        if err is None:
            raise
        raise storage_error(err, p, doing) from e


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place: a reader sees the old
    file or the new one, never half of it; a file-system error is one line naming ``path`` and
    leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with storage(path, "write", cleanup=tmp):
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


class KernelWarning(UserWarning):
    """The fused CPU kernels (pretrainer.kernels) could not be built or loaded; PyTorch ops are
    used instead."""


def check_out_folder(path, kind: str, markers: tuple[str, ...]) -> None:
    """Refuse, in one line, an output path that is a file, or a folder holding files of something
    else: ``out`` must be absent, empty, or already a ``kind`` folder (one holding any of
    ``markers``), so that nothing foreign is overwritten or mixed in (a data folder, someone's notes)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"out={p}: is a file; expected a folder (absent, empty, or a {kind} folder)")
    if not p.is_dir():
        return
    names = sorted(x.name for x in p.iterdir())
    if names and not any(m in names for m in markers):
        raise ConfigError(f"out={p}: holds other files ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}); "
                          f"expected an empty folder or a {kind} folder")
