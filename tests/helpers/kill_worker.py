"""Start a pretraining run that SIGKILLs itself in the middle of its first checkpoint save, as a
preemption or an OOM kill would:

    python tests/helpers/kill_worker.py WHERE KEY=VALUE ...

WHERE: ``model``, ``optimizer`` or ``rng`` (half of that file written, then the kill), ``state``
(every file written, ``state.json`` not yet) or ``rename`` (the whole temporary folder written, the
kill just before it is renamed into place). The KEY=VALUE overrides are ``pretrainer pretrain``'s.
"""

import os
import signal
import sys
from pathlib import Path

from pretrainer.config import load_config
from pretrainer.train import checkpoint
from pretrainer.train.trainer import train


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(where: str, overrides: list[str]) -> None:
    write, write_state, replace = checkpoint.write_safetensors, checkpoint._write_state, checkpoint.os.replace

    def half_written(tensors, path: Path):
        if path.name == f"{where}.safetensors":
            write(tensors, path)
            size = path.stat().st_size
            with open(path, "r+b") as f:
                f.truncate(size // 2)
                f.flush()
                os.fsync(f.fileno())
            die()
        return write(tensors, path)

    def state(folder, meta, digests):
        if where == "state":
            die()
        return write_state(folder, meta, digests)

    def rename(src, dst):
        if where == "rename" and Path(dst).name.startswith(checkpoint.STEP_PREFIX):
            die()
        return replace(src, dst)

    checkpoint.write_safetensors = half_written
    checkpoint._write_state = state
    checkpoint.os.replace = rename
    train(load_config(None, overrides), quiet=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
