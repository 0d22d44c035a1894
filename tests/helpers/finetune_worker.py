"""Run under ``torchrun``: ``pretrainer.finetune.finetune`` with the JSON keyword arguments in
SPEC (``{"source": ..., "task": ..., "train": ..., "out": ..., ...}``)."""

import json
import sys

from pretrainer.finetune.runner import finetune

if __name__ == "__main__":
    kw = json.loads(open(sys.argv[1]).read())
    finetune(**kw)
