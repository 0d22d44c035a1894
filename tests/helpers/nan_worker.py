"""Run under ``torchrun``: train the runs described by a JSON file, with the training loss of one
process made NaN at one step, to check that every process skips that step together.

    torchrun --standalone --nproc_per_node=2 tests/helpers/nan_worker.py SPEC.json

SPEC: ``[{"overrides": [...], "nan_rank": 1, "nan_step": 3}, ...]`` (steps counted from 1).
"""

import json
import os
import sys

from pretrainer.config import load_config
from pretrainer.train.loop import TrainStep
from pretrainer.train.trainer import train


def main(spec_file: str) -> None:
    forward = TrainStep.forward
    for run in json.loads(open(spec_file).read()):
        calls = [0]

        def patched(self, batch, fn=None, _run=run, _calls=calls):
            out = forward(self, batch, fn)
            if fn is None:
                _calls[0] += 1
                if _calls[0] == _run["nan_step"] and int(os.environ["RANK"]) == _run["nan_rank"]:
                    return out * float("nan")
            return out

        TrainStep.forward = patched
        train(load_config(None, run["overrides"]), quiet=True)


if __name__ == "__main__":
    main(sys.argv[1])
