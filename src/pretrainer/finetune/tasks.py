"""Fine-tuning tasks: how each reads its files, discovers labels, encodes examples for a backbone,
scores outputs and turns them back into predictions.

A task is a class in :data:`TASKS` (``name -> class``); the runner only calls the methods of
:class:`Task`, so a new task (say ``text2text`` with an encoder–decoder) is one more class and one
more registry entry. The flow for every task::

    rows = task.load(source, split)           # examples, checked; labels looked up
    task.fit_labels(train_rows)               # label discovery (classification, tagging)
    feats = task.encode(rows, tok, fmt, max_len)
    model = task.build_model(backbone)        # backbone + head
    loss = task.loss(model, task.collate(feats, pad_id))
    preds = task.decode(rows, feats, outputs) # one prediction dict per example
    task.metrics(rows, preds)

An example is a dict with the task's canonical fields (``text``, ``text_pair``, ``label``;
``words``, ``tags``; ``id``, ``question``, ``context``, ``answers``) and ``where`` (file and line).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..common import IGNORE
from . import metrics as M
from .files import JSON_SUFFIXES, TABLE_SUFFIXES, read_conll, read_rows, read_squad
from .heads import InputFormat, SequenceHead, TaskModel, TokenHead, truncate_pair


def _show(values, limit: int = 12) -> str:
    values = list(values)
    more = f", … ({len(values)} in all)" if len(values) > limit else ""
    return ", ".join(map(str, values[:limit])) + more


def _sorted_labels(labels) -> list[str]:
    """Numeric labels in numeric order (``0, 1, 2`` / ``-1, 0, 1``), others alphabetically."""
    labels = set(labels)
    try:
        return sorted(labels, key=lambda s: (float(s), s))
    except ValueError:
        return sorted(labels)


def _label_text(value, where: str, column: str) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise DataError(f"{where}: field '{column}' is {value!r}, expected a label (a string or an integer)")


def _text(row: dict, column: str, where: str) -> str:
    if column not in row:
        raise DataError(f"{where}: no field '{column}' (fields: {_show(row) or 'none'})")
    value = row[column]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{column}' is {type(value).__name__}, expected text")
    return value


class Task:
    """The interface the runner uses; see the module doc."""

    name: ClassVar[str]
    reads: ClassVar[str] = "sequence"  # what the head sees: "sequence" or "tokens"
    main_metric: ClassVar[str]  # higher is better; picks the best epoch when select is "metric"
    select: ClassVar[str] = "metric"  # the default rule for the kept epoch: "metric" or lowest eval "loss"
    #: column names tried, in order, when the user names none
    text_columns: ClassVar[tuple[str, ...]] = ("text", "sentence", "sentence1")
    pair_columns: ClassVar[tuple[str, ...]] = ("text_pair", "sentence2")
    label_columns: ClassVar[tuple[str, ...]] = ("label",)

    def __init__(self, text_column: str | None = None, text_pair_column: str | None = None,
                 label_column: str | None = None, labels: list[str] | None = None):
        self.columns = {"text": text_column, "text_pair": text_pair_column, "label": label_column}
        self.labels = labels

    # -- saving --------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"task": self.name, "columns": dict(self.columns), "labels": self.labels}

    @classmethod
    def from_state(cls, state: dict) -> "Task":
        cols = state.get("columns") or {}
        return cls(cols.get("text"), cols.get("text_pair"), cols.get("label"), labels=state.get("labels"))

    # -- reading -------------------------------------------------------------------------------
    def load(self, source: str, split: str = "train", require_labels: bool = True) -> list[dict]:
        """Examples of a file (or a ``builtin:`` task's ``split``), with labels checked when the
        task already knows its labels."""
        if source.startswith("builtin:"):
            from .builtin import builtin_rows

            task_name, rows = builtin_rows(source, split)
            if task_name != self.name:
                raise ConfigError(f"{source} is a {task_name} task, not {self.name}")
            self.columns = {"text": "text", "text_pair": "text_pair" if any("text_pair" in r for _, r in rows)
                            else None, "label": "label"}
        else:
            rows = self.read_file(Path(source))
        examples = [self.example(row, where, require_labels) for where, row in rows]
        if self.labels is not None and require_labels:
            self.check_labels(examples)
        return examples

    def read_file(self, path: Path) -> list[tuple[str, dict]]:
        rows = read_rows(path)
        self.resolve_columns(rows[0][1], path)
        return rows

    def resolve_columns(self, first: dict, path: Path) -> None:
        """Fill unnamed columns from the defaults found in the file's first row; a named column
        that is missing is an error."""
        fields = list(first)
        for key, candidates in (("text", self.text_columns), ("text_pair", self.pair_columns),
                                ("label", self.label_columns)):
            if self.columns[key] is None and key != "label":
                self.columns[key] = next((c for c in candidates if c in first), None)
            elif self.columns[key] is None:
                self.columns[key] = candidates[0]
        if self.columns["text"] is None:
            raise DataError(f"{path}: no text column (tried {', '.join(self.text_columns)}; fields: "
                            f"{_show(fields)}); name it with --text-column")
        for key in ("text", "text_pair"):
            col = self.columns[key]
            if col is not None and col not in first:
                raise DataError(f"{path}: no column '{col}' (fields: {_show(fields)}); "
                                f"expected the --{key.replace('_', '-')}-column")

    def example(self, row: dict, where: str, require_labels: bool) -> dict:
        raise NotImplementedError

    def gold(self, example: dict):
        """The example's label in the form predictions use (for ``predictions.jsonl``)."""
        return example.get("label")

    def fit_labels(self, examples: list[dict]) -> None:
        """Discover the label set from the training examples (tasks with named labels)."""

    def texts(self, examples: list[dict]):
        """The raw texts of the examples (to train a tokenizer for a model from scratch)."""
        for e in examples:
            for key in ("text", "text_pair", "question", "context"):
                if key in e:
                    yield e[key]
            if "words" in e:
                yield " ".join(e["words"])

    def check_labels(self, examples: list[dict]) -> None:
        pass

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, examples: list[dict], tok, fmt: InputFormat, max_len: int) -> list[dict]:
        """Features: ``ids``, ``types``, ``ex`` (the example's index) and the task's targets."""
        raise NotImplementedError

    def collate(self, feats: list[dict], pad_id: int) -> dict:
        """The features padded to the longest of them (one tensor built per field)."""
        T = max(len(f["ids"]) for f in feats)
        pad = [T - len(f["ids"]) for f in feats]
        ids = torch.tensor([list(f["ids"]) + [pad_id] * n for f, n in zip(feats, pad)], dtype=torch.long)
        types = torch.tensor([list(f["types"]) + [0] * n for f, n in zip(feats, pad)], dtype=torch.long)
        mask = torch.tensor([[1] * (T - n) + [0] * n for n in pad], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        batch.update(self.targets(feats, T))
        return batch

    def targets(self, feats: list[dict], T: int) -> dict:
        return {}

    def length(self, feat: dict) -> int:
        """A feature's size for batching by length (the padded dimension of :meth:`collate`)."""
        return len(feat["ids"])

    # -- model ---------------------------------------------------------------------------------
    def n_outputs(self) -> int:
        return len(self.labels)

    def build_model(self, backbone: torch.nn.Module, dropout: float = 0.1, pooling: str = "cls") -> torch.nn.Module:
        head_cls = SequenceHead if self.reads == "sequence" else TokenHead
        return TaskModel(backbone, head_cls(backbone.cfg.d_model, self.n_outputs(), dropout), self.reads, pooling)

    def forward(self, model, batch: dict) -> torch.Tensor:
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    def loss(self, model, batch: dict) -> torch.Tensor:
        return self.loss_from(self.forward(model, batch), batch)

    def count(self, batch: dict) -> torch.Tensor:
        """What :meth:`loss` averages over (float64): the labelled tokens when labels are per
        token (tagging, text2text), else the examples."""
        labels = batch.get("labels")
        if labels is not None and labels.dim() == 2:
            return (labels != IGNORE).sum().double()
        ids = batch["input_ids"]
        return torch.tensor(float(len(ids)), dtype=torch.float64, device=ids.device)

    def loss_from(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def epoch_order(self, examples: list[dict], feats: list[dict], generator: torch.Generator) -> list[int]:
        """The order of the training features in one epoch (a seeded shuffle)."""
        return torch.randperm(len(feats), generator=generator).tolist()

    # -- predictions ---------------------------------------------------------------------------
    def one_class(self, preds: list[dict]) -> str | None:
        """The label a classifier gave every example, when it gave only one (and knows more);
        else None (and for tasks without classes)."""
        return None

    def bind(self, tok) -> None:
        """Called with the run's tokenizer before predictions are made (tasks that decode text)."""

    def infer(self, model, feats: list[dict], batch_size: int, pad_id: int, device) -> list[torch.Tensor]:
        """The model's outputs per feature (a forward pass; generating tasks override this)."""
        from .runner import infer

        return infer(self, model, feats, batch_size, pad_id, device)

    def decode(self, examples: list[dict], feats: list[dict], outputs: list[torch.Tensor]) -> list[dict]:
        """One prediction per example from the per-feature outputs (float32, on the CPU)."""
        raise NotImplementedError

    def metrics(self, examples: list[dict], preds: list[dict]) -> dict:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Sequence tasks: one text or a pair, one output


class _SequenceTask(Task):
    def example(self, row, where, require_labels):
        ex = {"where": where, "text": _text(row, self.columns["text"], where)}
        if self.columns["text_pair"] is not None:
            ex["text_pair"] = _text(row, self.columns["text_pair"], where)
        col = self.columns["label"]
        if not require_labels:
            return ex  # prediction input: a label column, if any, is not read
        if col in row:
            ex["label"] = self.parse_label(row[col], where, col)
        else:
            raise DataError(f"{where}: no field '{col}' (fields: {_show(row) or 'none'}); "
                            f"expected the --label-column")
        return ex

    def parse_label(self, value, where, column):
        raise NotImplementedError

    def encode(self, examples, tok, fmt, max_len):
        firsts = tok.encode_batch([e["text"] for e in examples])
        pair = self.columns["text_pair"] is not None
        seconds = tok.encode_batch([e["text_pair"] for e in examples]) if pair else [None] * len(examples)
        room = max_len - fmt.overhead(pair)
        feats = []
        for i, (ex, a, b) in enumerate(zip(examples, firsts, seconds)):
            ids, types = fmt.build(*truncate_pair(a, b, room))
            f = {"ids": ids, "types": types, "ex": i}
            if "label" in ex:
                f["label"] = self.label_value(ex["label"])
            feats.append(f)
        return feats

    def label_value(self, label):
        return label


class ClassificationTask(_SequenceTask):
    """One text or a text pair to one of the labels found in the training file."""

    name = "classification"
    main_metric = "accuracy"

    def parse_label(self, value, where, column):
        return _label_text(value, where, column)

    def fit_labels(self, examples):
        labels = _sorted_labels(e["label"] for e in examples)
        if len(labels) < 2:
            raise DataError(f"{examples[0]['where'].split(' line ')[0]}: only one label "
                            f"({_show(labels)}) in the training data; expected at least two")
        self.labels = labels

    def check_labels(self, examples):
        known = set(self.labels)
        for ex in examples:
            if "label" in ex and ex["label"] not in known:
                raise DataError(f"{ex['where']}: label '{ex['label']}' not seen in training "
                                f"(labels: {_show(self.labels)})")

    def label_value(self, label):
        return self.labels.index(label)

    def targets(self, feats, T):
        if "label" not in feats[0]:
            return {}
        return {"labels": torch.tensor([f["label"] for f in feats], dtype=torch.long)}

    def loss_from(self, out, batch):
        return F.cross_entropy(out.float(), batch["labels"])

    def decode(self, examples, feats, outputs):
        preds = []
        for f, out in zip(feats, outputs):
            probs = out.softmax(-1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            preds.append({"label": self.labels[best],
                          "probs": {name: round(p, 5) for name, p in zip(self.labels, probs)}})
        return preds

    def one_class(self, preds):
        answered = {p["label"] for p in preds}
        return next(iter(answered)) if len(answered) == 1 and len(self.labels) > 1 else None

    def metrics(self, examples, preds):
        index = {name: i for i, name in enumerate(self.labels)}
        return M.classification_metrics([index[e["label"]] for e in examples],
                                        [index[p["label"]] for p in preds], len(self.labels))


class RegressionTask(_SequenceTask):
    """One text or a text pair to a number (e.g. similarity 0–5); mean squared error."""

    name = "regression"
    main_metric = "pearson"

    def parse_label(self, value, where, column):
        if isinstance(value, bool):
            value = None
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise DataError(f"{where}: field '{column}' is {value!r}, expected a number")
        return number

    def n_outputs(self):
        return 1

    def targets(self, feats, T):
        if "label" not in feats[0]:
            return {}
        return {"labels": torch.tensor([f["label"] for f in feats], dtype=torch.float32)}

    def loss_from(self, out, batch):
        return F.mse_loss(out[:, 0].float(), batch["labels"])

    def decode(self, examples, feats, outputs):
        return [{"score": float(out[0])} for out in outputs]

    def gold(self, example):
        return example.get("label")

    def metrics(self, examples, preds):
        return M.regression_metrics([e["label"] for e in examples], [p["score"] for p in preds])


# ----------------------------------------------------------------------------------------------
# Tagging


def word_spans(words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The words joined by single spaces, and each word's character span in that text."""
    spans, pos = [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    return " ".join(words), spans


def token_words(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], n_chars: int) -> list[int]:
    """For each token (character ``offsets``), the index of the first word it overlaps, or -1 for
    a token that covers only spaces (byte-level BPE's leading space is part of the next token)."""
    owner = [-1] * n_chars
    for w, (s, e) in enumerate(spans):
        for c in range(s, e):
            owner[c] = w
    out = []
    for s, e in offsets:
        out.append(next((owner[c] for c in range(s, min(e, n_chars)) if owner[c] >= 0), -1))
    return out


def align_labels(word_ids: list[int], word_labels: list[int]) -> list[int]:
    """Sub-token labels: each word's label on its first sub-token, ``-100`` (ignored) on the rest
    and on tokens that belong to no word."""
    out, seen = [], set()
    for w in word_ids:
        if w < 0 or w in seen:
            out.append(IGNORE)
        else:
            seen.add(w)
            out.append(word_labels[w])
    return out


class TaggingTask(Task):
    """A label per word (NER, POS): the head reads every sub-token; a word's label is predicted
    on its first sub-token, the others are ignored. Words beyond ``max_len`` get ``O`` (or the
    first label when there is no ``O``)."""

    name = "tagging"
    reads = "tokens"
    main_metric = "f1"
    text_columns = ("tokens", "words")
    label_columns = ("tags", "ner_tags", "labels")

    def read_file(self, path):
        if path.suffix.lower() in TABLE_SUFFIXES + JSON_SUFFIXES:
            rows = read_rows(path)
            first = rows[0][1]
            if self.columns["text"] is None:
                self.columns["text"] = next((c for c in self.text_columns if c in first), None)
            if self.columns["label"] is None:
                self.columns["label"] = next((c for c in self.label_columns if c in first), self.label_columns[0])
            if self.columns["text"] is None:
                raise DataError(f"{path}: no tokens column (tried {', '.join(self.text_columns)}; fields: "
                                f"{_show(first)}); name it with --text-column")
            return rows
        self.columns = {"text": "tokens", "text_pair": None, "label": "tags"}
        return read_conll(path)

    def example(self, row, where, require_labels):
        words = self._words(row, self.columns["text"], where)
        ex = {"where": where, "words": words}
        col = self.columns["label"]
        if not require_labels:
            return ex
        if "untagged_line" in row:
            raise DataError(f"{where.rsplit(' line ', 1)[0]} line {row['untagged_line']}: expected a token "
                            f"and its tag separated by whitespace (CoNLL), got a token only")
        if col in row:
            tags = self._words(row, col, where, tags=True)
            if len(tags) != len(words):
                raise DataError(f"{where}: {len(words)} tokens but {len(tags)} tags in '{col}'; "
                                f"expected one tag per token")
            ex["tags"] = tags
        else:
            raise DataError(f"{where}: no field '{col}' (fields: {_show(row)}); expected the "
                            f"--label-column with one tag per token")
        return ex

    @staticmethod
    def _words(row, column, where, tags=False) -> list[str]:
        if column not in row:
            raise DataError(f"{where}: no field '{column}' (fields: {_show(row)})")
        value = row[column]
        if isinstance(value, str):
            return value.split()
        if not isinstance(value, list):
            raise DataError(f"{where}: field '{column}' is {type(value).__name__}, expected a list "
                            f"of {'tags' if tags else 'tokens'} (or a space-separated string)")
        return [_label_text(v, where, column) if tags else str(v) for v in value]

    def gold(self, example):
        return example.get("tags")

    def fit_labels(self, examples):
        self.labels = _sorted_labels(t for e in examples for t in e["tags"])

    def check_labels(self, examples):
        known = set(self.labels)
        for ex in examples:
            for t in ex.get("tags", ()):
                if t not in known:
                    raise DataError(f"{ex['where']}: tag '{t}' not seen in training (tags: {_show(self.labels)})")

    def encode(self, examples, tok, fmt, max_len):
        texts_spans = [word_spans(e["words"]) for e in examples]
        encodings = tok.tok.encode_batch([t for t, _ in texts_spans], add_special_tokens=False)
        index = {name: i for i, name in enumerate(self.labels)}
        room = max_len - fmt.overhead(False)
        feats = []
        for i, (ex, (text, spans), enc) in enumerate(zip(examples, texts_spans, encodings)):
            words = token_words(enc.offsets, spans, len(text))[:room]
            ids, types = fmt.build(enc.ids[:room])
            # position of each word's first sub-token in the model input (a starts at 1)
            first_pos = {}
            for p, w in enumerate(words):
                if w >= 0 and w not in first_pos:
                    first_pos[w] = p + 1
            f = {"ids": ids, "types": types, "ex": i, "word_pos": [first_pos.get(w, -1) for w in range(len(spans))]}
            if "tags" in ex:
                aligned = align_labels(words, [index[t] for t in ex["tags"]])
                f["labels"] = [IGNORE] + aligned + [IGNORE]
            feats.append(f)
        return feats

    def targets(self, feats, T):
        if "labels" not in feats[0]:
            return {}
        out = torch.full((len(feats), T), IGNORE, dtype=torch.long)
        for i, f in enumerate(feats):
            out[i, :len(f["labels"])] = torch.tensor(f["labels"])
        return {"labels": out}

    def loss_from(self, out, batch):
        return F.cross_entropy(out.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    def decode(self, examples, feats, outputs):
        fallback = "O" if "O" in self.labels else self.labels[0]
        preds = []
        for ex, f, out in zip(examples, feats, outputs):
            best = out.argmax(-1).tolist()
            tags = [self.labels[best[p]] if p >= 0 else fallback for p in f["word_pos"]]
            preds.append({"words": ex["words"], "tags": tags})
        return preds

    def metrics(self, examples, preds):
        return M.tagging_metrics([e["tags"] for e in examples], [p["tags"] for p in preds])


# ----------------------------------------------------------------------------------------------
# Extractive question answering


class QATask(Task):
    """Extractive QA (SQuAD v1 style): start and end logits over the context's tokens. A context
    longer than the model input is cut into windows of the room left after the question, each
    overlapping the previous one by ``stride`` tokens; a training window that does not hold the
    whole answer points at position 0. An example's answer is the best-scoring span (start logit
    + end logit, at most ``max_answer_tokens`` long) over all its windows, mapped back to
    characters of the context."""

    name = "qa"
    reads = "tokens"
    main_metric = "f1"
    max_question_tokens = 64
    max_answer_tokens = 30
    n_best = 20

    def __init__(self, *args, stride: int | None = None, **kw):
        super().__init__(*args, **kw)
        self.stride = stride

    def state(self):
        return {**super().state(), "stride": self.stride}

    @classmethod
    def from_state(cls, state):
        task = super().from_state(state)
        task.stride = state.get("stride")
        return task

    def read_file(self, path):
        self.columns = {"text": "question", "text_pair": "context", "label": "answers"}
        return read_squad(path)

    def example(self, row, where, require_labels):
        for key in ("question", "context"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: field '{key}' is {type(row.get(key)).__name__}, expected text")
        if require_labels and not row["answers"]:
            raise DataError(f"{where}: no answers; expected at least one {{'text', 'answer_start'}} "
                            f"to train or evaluate on")
        return {"where": where, **row, "answers": row["answers"] if require_labels else []}

    def gold(self, example):
        return [a["text"] for a in example["answers"]]

    def n_outputs(self):
        return 2

    def windows(self, n_tokens: int, room: int) -> list[tuple[int, int]]:
        """``[start, end)`` token ranges covering ``n_tokens`` in windows of ``room`` that overlap
        by ``stride`` (default: a quarter of ``room``)."""
        stride = self.stride if self.stride is not None else room // 4
        if not 0 <= stride < room:
            raise ConfigError(f"--stride {stride}: expected 0 <= stride < {room} (the context room "
                              f"left in --max-len after the question)")
        out, start = [], 0
        while True:
            end = min(n_tokens, start + room)
            out.append((start, end))
            if end >= n_tokens:
                return out
            start = end - stride

    def encode(self, examples, tok, fmt, max_len):
        questions = tok.encode_batch([e["question"] for e in examples])
        contexts = tok.tok.encode_batch([e["context"] for e in examples], add_special_tokens=False)
        feats = []
        for i, (ex, q, ctx) in enumerate(zip(examples, questions, contexts)):
            q = q[:self.max_question_tokens]
            room = max_len - fmt.overhead(True) - len(q)
            if room < 8:
                raise ConfigError(f"--max-len {max_len} leaves {room} tokens for the context after a "
                                  f"{len(q)}-token question; expected at least 8")
            offsets = ctx.offsets
            span = self.answer_tokens(ex, offsets)
            for w0, w1 in self.windows(len(ctx.ids), room):
                ids, types = fmt.build(q, ctx.ids[w0:w1])
                first = len(q) + 2  # position of the window's first context token
                f = {"ids": ids, "types": types, "ex": i, "first": first, "offsets": offsets[w0:w1]}
                if span is not None:
                    s, e = span
                    inside = w0 <= s and e < w1
                    f["start"], f["end"] = (first + s - w0, first + e - w0) if inside else (0, 0)
                feats.append(f)
        return feats

    @staticmethod
    def answer_tokens(ex: dict, offsets: list[tuple[int, int]]) -> tuple[int, int] | None:
        """First and last context token of the first gold answer (by character overlap)."""
        if not ex["answers"]:
            return None
        a = ex["answers"][0]
        c0, c1 = a["answer_start"], a["answer_start"] + len(a["text"])
        inside = [t for t, (s, e) in enumerate(offsets) if s < c1 and e > c0 and e > s]
        if not inside:  # no token covers it (whitespace): no window holds it
            return -1, -1
        return inside[0], inside[-1]

    def targets(self, feats, T):
        if "start" not in feats[0]:
            return {}
        return {"start": torch.tensor([f["start"] for f in feats]), "end": torch.tensor([f["end"] for f in feats])}

    def loss_from(self, out, batch):
        out = out.float().masked_fill(~batch["attention_mask"].bool()[..., None], -1e4)
        return (F.cross_entropy(out[..., 0], batch["start"]) + F.cross_entropy(out[..., 1], batch["end"])) / 2

    def decode(self, examples, feats, outputs):
        best = [None] * len(examples)  # (score, char start, char end)
        for f, out in zip(feats, outputs):
            n = len(f["offsets"])
            start = out[f["first"]:f["first"] + n, 0]
            end = out[f["first"]:f["first"] + n, 1]
            k = min(self.n_best, n)
            top_s, top_e = start.topk(k).indices.tolist(), end.topk(k).indices.tolist()
            for s in top_s:
                for e in top_e:
                    if e < s or e - s + 1 > self.max_answer_tokens:
                        continue
                    score = float(start[s] + end[e])
                    if best[f["ex"]] is None or score > best[f["ex"]][0]:
                        best[f["ex"]] = (score, f["offsets"][s][0], f["offsets"][e][1])
        preds = []
        for ex, b in zip(examples, best):
            if b is None:
                preds.append({"id": ex["id"], "answer": "", "start": 0, "end": 0, "score": None})
                continue
            score, c0, c1 = b
            ctx = ex["context"]
            while c0 < c1 and ctx[c0].isspace():  # byte-level BPE puts the space before a word in it
                c0 += 1
            while c1 > c0 and ctx[c1 - 1].isspace():
                c1 -= 1
            preds.append({"id": ex["id"], "answer": ctx[c0:c1], "start": c0, "end": c1, "score": score})
        return preds

    def metrics(self, examples, preds):
        return M.squad_metrics([p["answer"] for p in preds], [[a["text"] for a in e["answers"]] for e in examples])


#: Task name -> class. ``pretrainer finetune --task NAME`` and :func:`make_task` look here.
TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
    "tagging": TaggingTask,
    "qa": QATask,
}


from . import text2text  # noqa: E402,F401 - builds on Task and adds "text2text" to TASKS
from . import sft  # noqa: E402,F401 - adds "sft" (instruction tuning of a decoder)
from . import images  # noqa: E402,F401 - adds "image-classification" (a ViT run of its own: finetune.images)


def make_task(name: str, **kw) -> Task:
    if name not in TASKS:
        raise ConfigError(f"--task {name}: expected one of {', '.join(TASKS)}")
    return TASKS[name](**kw)


def task_from_state(state: dict) -> Task:
    return TASKS[state["task"]].from_state(state)
