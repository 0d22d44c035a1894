"""Predictions from a fine-tuned run: :class:`Predictor` (Python) and :func:`predict_file`
(``pretrainer predict RUN --input FILE --out FILE``).

Input rows are read with the run's own column names (a label column, if present, is not read), one
prediction per input row: ``{"label", "probs"}`` (classification, labels by name), ``{"score"}``
(regression), ``{"words", "tags"}`` (tagging, one tag per word), ``{"id", "answer", "start",
"end", "score"}`` (QA, the answer's character span in the context).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from ..config import ModelConfig
from ..errors import CheckpointError, storage, write_atomic
from ..model import make_model
from ..progress import Progress
from ..tokenization import load_tokenizer
from ..train.checkpoint import latest_checkpoint, load_weights
from .backbone import is_finetune_run
from .heads import InputFormat
from .runner import _device
from .tasks import task_from_state


#: Batches predicted between two progress checks (each chunk is encoded, run and decoded on its own).
CHUNK_BATCHES = 4


class Predictor:
    """A fine-tuned model ready to predict: ``Predictor("runs/sst2").predict(["a fine film"])``."""

    def __init__(self, run: str | Path, device: str = "cpu", batch_size: int = 32):
        self.run = Path(run)
        if not is_finetune_run(self.run):
            raise CheckpointError(f"{self.run}: not a fine-tuning run folder (config.yaml with a 'task')")
        self.settings = yaml.safe_load((self.run / "config.yaml").read_text())
        self.task = task_from_state(self.settings)
        self.tok = load_tokenizer(self.run / "tokenizer")
        self.fmt = InputFormat(**self.settings["format"])
        self.max_len = int(self.settings["max_len"])
        self.device = _device(device)
        self.batch_size = batch_size
        cfg = ModelConfig(**self.settings["model"])
        options = self.settings["options"]
        self.model = self.task.build_model(make_model(cfg), options.get("dropout", 0.1), options.get("pooling", "cls"))
        ckpt, meta = latest_checkpoint(self.run)
        if not self.settings.get("best"):  # a finished fine-tune records its selected checkpoint
            print(f"warning: {self.run}: the fine-tuning did not finish; predicting with its newest "
                  f"checkpoint ({ckpt.name}, epoch {meta.get('epoch', '?')}); finish it with "
                  f"pretrainer finetune --resume {self.run}", file=sys.stderr, flush=True)
        load_weights(self.model, ckpt)
        self.model.to(self.device).eval()
        self.task.bind(self.tok)

    @property
    def labels(self) -> list[str] | None:
        return self.task.labels

    def _row(self, item) -> dict:
        """A plain Python input as a row under the run's column names: a string (the text, or a
        space-separated sentence for tagging), a pair ``(text, text_pair)``, a list of words
        (tagging) or a dict."""
        cols = self.task.columns
        if isinstance(item, dict):
            return item
        if isinstance(item, (list, tuple)) and self.task.name == "tagging":
            return {cols["text"]: list(item)}
        if isinstance(item, tuple) and len(item) == 2:
            return {cols["text"]: item[0], cols["text_pair"]: item[1]}
        return {cols["text"]: item}

    def predict(self, items: list) -> list[dict]:
        """Predictions for a list of inputs (see :meth:`_row`; QA takes ``{"question", "context"}``)."""
        examples = []
        for i, item in enumerate(items):
            row = self._row(item)
            if self.task.name == "qa":
                row = {"id": str(row.get("id", i)), "question": row.get("question"),
                       "context": row.get("context"), "answers": []}
            examples.append(self.task.example(row, f"input {i}", require_labels=False))
        return self.predict_examples(examples)

    def predict_examples(self, examples: list[dict], say=None) -> list[dict]:
        """Predictions for task examples, in chunks of a few batches; ``say``: where progress lines
        go (rows done, rows/s, eta), the first after a couple of seconds."""
        if not examples:
            return []
        progress = Progress("predict", len(examples), "rows", say)
        chunk = self.batch_size * CHUNK_BATCHES
        preds: list[dict] = []
        for start in range(0, len(examples), chunk):
            part = examples[start:start + chunk]
            feats = self.task.encode(part, self.tok, self.fmt, self.max_len)
            outputs = self.task.infer(self.model, feats, self.batch_size, self.fmt.pad_id, self.device)
            preds += self.task.decode(part, feats, outputs)
            progress.update(len(preds))
        return preds

    def predict_file(self, path: str) -> list[dict]:
        """Predictions for every row of a file in the run's format (or a built-in task's eval split)."""
        return self.predict_examples(self.task.load(str(path), "eval", require_labels=False))


def predict_file(run: str | Path, input_path: str, out: str | Path, device: str = "cpu", say=None) -> dict:
    """Write one JSON line per input row to ``out`` (its ``index``, its text fields, the prediction);
    returns ``{"run", "input", "out", "predictions"}``. ``say``: where progress lines go. An
    image-classification run takes a folder of images or of ``prepare --images``
    (:func:`pretrainer.finetune.images.predict_images`)."""
    from .images import is_image_run, predict_images

    if is_image_run(run, ("classify", "mae")):  # (an MAE run is refused there, with what to do)
        return predict_images(run, input_path, out, device=device)
    predictor = Predictor(run, device=device)
    examples = predictor.task.load(str(input_path), "eval", require_labels=False)
    preds = predictor.predict_examples(examples, say=say)
    # each line echoes its input beside the prediction (as Hugging Face pipelines do), with its row
    echo = ("text", "text_pair", "words", "question")
    preds = [{"index": i, **{k: ex[k] for k in echo if ex.get(k) is not None}, **p}
             for i, (ex, p) in enumerate(zip(examples, preds))]
    out = Path(out)
    with storage(out.parent, "create the folder"):
        out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    return {"run": str(run), "input": str(input_path), "out": str(out), "predictions": len(preds)}

