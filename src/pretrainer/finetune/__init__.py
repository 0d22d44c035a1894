"""Fine-tuning: task heads on a pretrained (or fresh) encoder or decoder backbone.

>>> from pretrainer.finetune import finetune, Predictor
>>> scores = finetune("runs/bert-mini-stdlib", "classification", train="data/sst2/train.tsv",
...                   eval="data/sst2/dev.tsv", out="runs/sst2", epochs=3)
>>> scores["accuracy"]
>>> Predictor("runs/sst2").predict(["a gripping, funny film"])   # [{"label": "1", "probs": {...}}]

Tasks (:data:`TASKS`): ``classification`` (one text or a pair), ``regression``, ``tagging``,
``qa`` (extractive). Built-in offline tasks: ``builtin:stdlib-package``, ``builtin:stdlib-docstring``.

Modules: ``files`` (readers), ``builtin`` (the built-in tasks), ``tasks`` (the task classes and
the registry), ``heads`` (input layouts and heads), ``backbone`` (where a run starts), ``metrics``,
``runner`` (the loop), ``predict``, ``cli``. The names below are imported on first use, so the
command line stays quick to start.
"""

import importlib

_NAMES = {"finetune": "runner", "FinetuneOptions": "runner", "Predictor": "predict",
          "predict_file": "predict", "TASKS": "tasks", "Task": "tasks", "make_task": "tasks"}
__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
