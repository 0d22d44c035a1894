"""pretrainer: pretrain, fine-tune, prompt and scale Transformers.

>>> import pretrainer
>>> model = pretrainer.build_model("gpt2-small")        # random weights, 124,439,808 parameters
>>> model = pretrainer.load("runs/quickstart")          # a trained run (or an HF folder)
>>> model(input_ids).logits                             # [batch, seq, vocab]
"""

from ._version import __version__
from .config import ModelConfig, RunConfig, TrainConfig, load_config
from .errors import PretrainerError

__all__ = ["build_model", "load", "load_config", "ModelConfig", "RunConfig", "TrainConfig",
           "PretrainerError", "__version__"]


def __getattr__(name: str):
    # torch is imported on first use of a model, so that the command line (--help, prepare with a
    # tokenizer folder, scaling fit) starts in a fraction of a second
    if name in ("build_model", "load"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'pretrainer' has no attribute {name!r}")
