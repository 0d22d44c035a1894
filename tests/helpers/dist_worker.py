"""Run under ``torchrun``: train (or resume) the runs described by a JSON file, one after the
other in the same processes (one launch for several runs keeps the multi-process tests short).

    torchrun --standalone --nproc_per_node=2 tests/helpers/dist_worker.py SPEC.json

SPEC: ``[{"overrides": [...], "resume": false, "stop_at": null, "kill_at_save": null}, ...]``.
``kill_at_save``: the step whose checkpoint save is cut short by SIGKILL (every process kills
itself just before the checkpoint would be renamed into place), as a preemption would.
"""

import json
import os
import signal
import sys

from pretrainer.config import load_config
from pretrainer.train import checkpoint
from pretrainer.train.trainer import resume_config, train


def main(spec_file: str) -> None:
    for run in json.loads(open(spec_file).read()):
        if run.get("resume"):
            out = next(o.split("=", 1)[1] for o in run["overrides"] if o.startswith("out="))
            cfg = resume_config(out, [o for o in run["overrides"] if not o.startswith("out=")])
        else:
            cfg = load_config(None, run["overrides"])
        kill = run.get("kill_at_save")
        if kill is not None:
            real_replace = os.replace

            def replace(src, dst, _real=real_replace, _step=f"step_{kill:08d}"):
                if str(dst).endswith(_step):
                    os.kill(os.getpid(), signal.SIGKILL)
                return _real(src, dst)

            checkpoint.os.replace = replace
        train(cfg, resume=bool(run.get("resume")), stop_at=run.get("stop_at"), quiet=True)


if __name__ == "__main__":
    main(sys.argv[1])
