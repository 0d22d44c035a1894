"""``objective=gato``: one decoder trained on a mixture of tasks serialised Gato-style (Reed et al.
2022, "A Generalist Agent"): captions of digit images, text continuation and a control signal's
discretised values in one token stream (:mod:`pretrainer.data.gato`; the model:
:class:`pretrainer.model.gato.GatoModel`). A demonstration at CPU scale, not a reproduction.

The data folder is a text one (``pretrainer prepare``): the text task reads its windows and the
captions are spelt with its tokenizer; the images (scikit-learn's digits) and the control episodes
are built in. The model's vocabulary is the data's plus 1,026 tokens (1,024 value bins, the
separator, the patch place). The loss is the mean cross-entropy over the targets of the batch: text
tokens, caption tokens, actions. Evaluation reports, per task (``val_<task>_...``):

- caption: ``val_caption_loss`` and ``val_caption_accuracy``, the share of captions whose every
  token (the end-of-text included) is the most likely one given the image and the caption so far:
  what greedy decoding from the image and ``|`` would write exactly;
- text: ``val_text_loss``;
- control: ``val_control_loss`` and ``val_control_mae``, the mean absolute error of the predicted
  torque (the most likely of the 1,024 value tokens, at its bin's middle) against the true one, in
  the torque's units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import IGNORE
from ..data.gato import BINS, EXTRA, TASKS, GatoBatches, parse_tasks, undiscretise
from ..errors import ConfigError
from .objectives import Objective, lm_loss, register


@register
class Gato(Objective):
    name = "gato"
    archs = ("decoder",)
    wraps = True
    perplexity = False  # a mixture of text, caption and value tokens
    extra_vocab = EXTRA
    options = ("gato",)
    sums = ("count", "loss", "caption_count", "caption_loss", "captions", "captions_right", "text_count",
            "text_loss", "control_count", "control_loss", "control_abs_error")
    about = ("Gato-style mixture (Reed et al. 2022): digit images captioned in text, text continued and a "
             "pendulum's torque predicted as mu-law tokens, in one stream (gato.tasks); per-task metrics")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tasks = parse_tasks(cfg.gato.tasks)
        self.text_vocab = None  # the data's, once batches are made: the value tokens follow it

    def builder(self, split, seq_len, seed):
        from ..data.tokens import TokenSplit

        if not isinstance(split, TokenSplit):
            raise ConfigError(f"objective=gato reads a text data folder (its images and control episodes are built "
                              f"in); data={split.dir} holds images")
        self.text_vocab = split.vocab_size
        return GatoBatches(split, seq_len, seed, self.tasks, self.cfg.gato.patch_size)

    def as_batch(self, batch):
        return batch

    def wrap(self, model):
        from ..model.gato import GatoModel

        return GatoModel(model, self.cfg.gato.patch_size)

    def loss(self, model, batch):
        h = model.hidden_states(batch["input_ids"], batch["patches"], batch["patch_index"])
        return lm_loss(model, h, batch["labels"])

    def eval_sums(self, model, batch):
        labels = batch["labels"]
        picked = labels != IGNORE
        h = model.hidden_states(batch["input_ids"], batch["patches"], batch["patch_index"])
        logits = model.head(h[picked]).float()
        y = labels[picked]
        ce = F.cross_entropy(logits, y, reduction="none").double()
        task = batch["task"][:, None].expand_as(labels)[picked]
        out = {"count": torch.tensor(float(len(y)), dtype=torch.float64, device=y.device), "loss": ce.sum()}
        for i, name in enumerate(TASKS):
            mine = task == i
            out[f"{name}_count"], out[f"{name}_loss"] = mine.sum().double(), ce[mine].sum()
        # caption: an example is right when every one of its tokens is the argmax
        mine = task == TASKS.index("caption")
        rows = torch.arange(labels.shape[0], device=y.device)[:, None].expand_as(labels)[picked][mine]
        key = rows * labels.shape[1] + batch["example"][picked][mine]
        wrong = logits[mine].argmax(-1) != y[mine]
        examples = torch.unique(key)
        out["captions"] = torch.tensor(float(len(examples)), dtype=torch.float64, device=y.device)
        out["captions_right"] = out["captions"] - len(torch.unique(key[wrong]))
        # control: the torque of the most likely value token against the true one
        mine = task == TASKS.index("control")
        if self.text_vocab is None:
            raise RuntimeError("objective=gato: eval_sums before any batches were made")
        values = logits[mine][:, self.text_vocab:self.text_vocab + BINS].argmax(-1)
        true = batch["target_values"][picked][mine].double()
        out["control_abs_error"] = (undiscretise(values.cpu()).to(true.device) - true).abs().sum()
        return out

    def metrics(self, sums):
        out = {"val_loss": sums["loss"] / max(sums["count"], 1.0)}
        for name in self.tasks:
            n = max(sums[f"{name}_count"], 1.0)
            out[f"val_{name}_loss"] = sums[f"{name}_loss"] / n
        if "caption" in self.tasks:
            out["val_caption_accuracy"] = sums["captions_right"] / max(sums["captions"], 1.0)
        if "control" in self.tasks:
            out["val_control_mae"] = sums["control_abs_error"] / max(sums["control_count"], 1.0)
        return out

    def eval_note(self, metrics):
        parts = {"val_caption_accuracy": "caption accuracy {:.4f}", "val_text_loss": "text loss {:.4f}",
                 "val_control_mae": "control MAE {:.4f}"}
        return "".join(f" | {fmt.format(metrics[k])}" for k, fmt in parts.items() if k in metrics)
