"""pretrainer: pretrain, fine-tune, prompt and scale Transformers.

>>> import pretrainer
>>> model = pretrainer.build_model("gpt2-small")        # random weights, 124,439,808 parameters
>>> model = pretrainer.load("runs/quickstart")          # a trained run (or an HF folder)
>>> model(input_ids).logits                             # [batch, seq, vocab]
"""

from .api import build_model, load
from .config import ModelConfig, RunConfig, TrainConfig, load_config
from .errors import PretrainerError

__version__ = "0.1.0"
__all__ = ["build_model", "load", "load_config", "ModelConfig", "RunConfig", "TrainConfig",
           "PretrainerError", "__version__"]
