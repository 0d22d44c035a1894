"""One run, one writer: an operating-system lock on ``FOLDER/.lock`` for a run's life.

Pretraining, fine-tuning and sweeps hold ``fcntl.flock`` on their folder's ``.lock`` while they
run, with the holder's process id and host written into it. A second writer (another
``pretrain`` with the same ``out``, a ``--resume`` of a live run) is refused in one line that
names the holder. The kernel drops the lock when its process ends, however it ends (SIGKILL
included), so a lock file left by a dead process never blocks anyone; the file itself stays (to
delete it while others may be opening it would let two processes lock two different files).

Under ``torchrun`` the first process takes the lock and tells the others whether it got it, so
every process fails with the same line. ``flock`` is advisory and local to what the file system
shares: on a network file system it holds across machines only where the file system supports
locks (NFSv4 does). Where ``fcntl`` does not exist (Windows), nothing is locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from .errors import PretrainerError, storage_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".lock"


class RunLocked(PretrainerError):
    """The folder is in use by another live process."""


class RunLock:
    """``with RunLock(folder, "run") as lock: ... lock.acquire(rank, world) ...``: the lock is
    taken by :meth:`acquire` (once the processes of a job can talk to each other) and released
    when the ``with`` block ends, however it ends."""

    def __init__(self, folder: str | Path | None, what: str = "run"):
        self._folder, self.what = folder, what  # (checked when the lock is taken)
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self, rank: int = 0, world: int = 1) -> RunLock:
        """Take the lock (the first process of a job); raise :class:`RunLocked` on every process
        when another process holds it."""
        error = None  # (held by another process?, the line to say)
        if rank == 0:
            try:
                self._take()
            except PretrainerError as e:
                error = (isinstance(e, RunLocked), str(e))
        if world > 1:
            import torch.distributed as dist

            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise (RunLocked if error[0] else PretrainerError)(error[1])
        return self

    @property
    def folder(self) -> Path:
        return Path(self._folder)

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    def _take(self) -> None:
        try:
            self._created = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise storage_error(e, self.path, "create the lock file") from None
        if fcntl is None:  # pragma: no cover
            self._fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(f"{self.folder}: in use by another {self.what} ({holder}); wait for it to end "
                            f"or stop it, or choose another folder") from None
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (record + "\n").encode(), 0)
        except OSError as e:  # a full disk
            os.close(fd)
            raise storage_error(e, self.path, "write the lock file") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        if self._created and {p.name for p in self.folder.iterdir()} == {LOCK_FILE}:
            # nothing was written: leave no folder behind (the lock is still held while unlinking)
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.folder.rmdir()
        os.close(self._fd)  # drops the flock
        self._fd = None


def _read_holder(fd: int) -> str:
    """``pid N on HOST since TIME`` from a held lock file (its holder wrote it)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet"
