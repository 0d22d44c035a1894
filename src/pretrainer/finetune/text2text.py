"""Text-to-text fine-tuning of an encoder-decoder (T5's recipe, Raffel et al. 2020): every task is
"input text -> target text", told apart by a prefix on the input (``summarize: ``, ``translate
English to French: ``); the model is trained with teacher forcing on the target and evaluated by
generating. No layer is added.

Rows have an input and a target column (``--input-column``/``--target-column``; by default
``input``/``target``, or ``source``/``target``, ``text``/``summary``). ``--prefix`` is put in front
of every input; a row may carry its own in a ``prefix`` field, and a ``task`` field names its task,
so several tasks can share one training file and be mixed: ``proportional`` (each example once per
epoch) or ``temperature`` mixing, where task m is sampled at a rate proportional to
``min(n_m, K) ** (1 / T)`` (Raffel et al., 3.5.2; K = 2**21 there, T = 2 by default here).

Scores of the generated text against the target: ROUGE-1/2/L F-measures (``rouge-score``), corpus
BLEU and chrF (``sacrebleu``), and exact match, all on a 0-1 scale except BLEU and chrF, which
keep sacrebleu's 0-100.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, DataError
from ..common import IGNORE, shift_right
from ..train.objectives import lm_loss
from .tasks import TASKS, Task, _show, _text

MIXING = ("proportional", "temperature")


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    """ROUGE-1/2/L (mean F-measure, rouge-score), BLEU and chrF (sacrebleu, corpus level, 0-100),
    exact match (after stripping surrounding whitespace)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        for k, s in scorer.score(r, p).items():
            sums[k] += s.fmeasure
    n = max(1, len(predictions))
    return {
        **{k: v / n for k, v in sums.items()},
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
        "exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n,
    }


def mixing_rates(sizes: dict[str, int], mixing: str, temperature: float = 2.0,
                 limit: int = 2 ** 21) -> dict[str, float]:
    """The fraction of training examples drawn from each task: ``proportional`` to its size, or
    ``temperature``: proportional to ``min(size, limit) ** (1 / temperature)``."""
    if mixing not in MIXING:
        raise ConfigError(f"--mixing {mixing}: expected one of {', '.join(MIXING)}")
    if mixing == "proportional":
        weights = {t: float(n) for t, n in sizes.items()}
    else:
        if temperature <= 0:
            raise ConfigError(f"--mixing-temperature {temperature}: expected a positive number")
        weights = {t: min(n, limit) ** (1.0 / temperature) for t, n in sizes.items()}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


class Text2TextTask(Task):
    """Encoder-decoder only; the model is the backbone itself."""

    name = "text2text"
    reads = "text"
    main_metric = "rougeL"
    # Keep the epoch with the lowest teacher-forced evaluation loss: the highest ROUGE-L on the same
    # split rewards epochs that write one generic sentence for every input (see benchmarks/README).
    select = "loss"
    text_columns = ("input", "source", "text")
    target_columns = ("target", "summary", "output")

    def __init__(self, input_column: str | None = None, target_column: str | None = None,
                 prefix: str = "", mixing: str = "proportional", mixing_temperature: float = 2.0,
                 max_target_len: int = 64, beams: int = 1, no_repeat_ngram: int = 0, **_):
        super().__init__(input_column, None, target_column, labels=None)
        self.prefix, self.mixing, self.mixing_temperature = prefix, mixing, mixing_temperature
        self.max_target_len, self.beams, self.no_repeat_ngram = max_target_len, beams, no_repeat_ngram
        self._need_targets = True
        mixing_rates({"a": 1}, mixing, mixing_temperature)  # validates both

    def state(self) -> dict:
        return {**super().state(), "prefix": self.prefix, "mixing": self.mixing,
                "mixing_temperature": self.mixing_temperature,
                "max_target_len": self.max_target_len, "beams": self.beams,
                "no_repeat_ngram": self.no_repeat_ngram}

    @classmethod
    def from_state(cls, state: dict) -> "Text2TextTask":
        cols = state.get("columns") or {}
        return cls(cols.get("text"), cols.get("label"), state.get("prefix", ""),
                   state.get("mixing", "proportional"), state.get("mixing_temperature", 2.0),
                   state.get("max_target_len", 64), state.get("beams", 1), state.get("no_repeat_ngram", 0))

    # -- reading -------------------------------------------------------------------------------
    def resolve_columns(self, first: dict, path) -> None:
        fields = list(first)
        for key, candidates, flag in (("text", self.text_columns, "--input-column"),
                                      ("label", self.target_columns, "--target-column")):
            if key == "label" and not self._need_targets:
                self.columns[key] = self.columns[key] or next((c for c in candidates if c in first),
                                                              candidates[0])
                continue
            if self.columns[key] is None:
                self.columns[key] = next((c for c in candidates if c in first), None)
                if self.columns[key] is None:
                    raise DataError(f"{path}: no {'input' if key == 'text' else 'target'} column "
                                    f"(tried {', '.join(candidates)}; fields: {_show(fields)}); "
                                    f"name it with {flag}")
            elif self.columns[key] not in first:
                raise DataError(f"{path}: no column '{self.columns[key]}' (fields: {_show(fields)}); "
                                f"expected the {flag}")

    def load(self, source: str, split: str = "train", require_labels: bool = True) -> list[dict]:
        if source.startswith("builtin:"):
            from .builtin import builtin_rows

            task_name, rows = builtin_rows(source, split)
            if task_name != self.name:
                raise ConfigError(f"{source} is a {task_name} task, not {self.name}")
            self.columns = {"text": "input", "text_pair": None, "label": "target"}
        else:
            from pathlib import Path

            self._need_targets = require_labels
            rows = self.read_file(Path(source))
        return [self.example(row, where, require_labels) for where, row in rows]

    def example(self, row: dict, where: str, require_labels: bool) -> dict:
        prefix = row.get("prefix", self.prefix)
        if not isinstance(prefix, str):
            raise DataError(f"{where}: field 'prefix' is {type(prefix).__name__}, expected text")
        ex = {"text": prefix + _text(row, self.columns["text"], where), "where": where,
              "task": str(row.get("task", prefix.strip() or "default"))}
        if require_labels or self.columns["label"] in row:
            ex["label"] = _text(row, self.columns["label"], where)
        return ex

    def texts(self, examples):
        for e in examples:
            yield e["text"]
            if "label" in e:
                yield e["label"]

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, examples, tok, fmt, max_len: int) -> list[dict]:
        if fmt.arch != "encoder-decoder":
            hint = "; for a decoder use --task sft" if fmt.arch == "decoder" else ""
            raise ConfigError("--task text2text needs an encoder-decoder backbone (T5, BART); "
                              f"this one is arch={fmt.arch}{hint}")
        ids = tok.encode_batch([e["text"] for e in examples])
        feats = []
        targets = tok.encode_batch([e.get("label", "") for e in examples])
        for i, (src, tgt) in enumerate(zip(ids, targets)):
            feats.append({"ids": src[:max_len - 1] + [fmt.end_id], "types": [],
                          "labels": tgt[:self.max_target_len - 1] + [fmt.end_id], "ex": i})
        return feats

    def collate(self, feats: list[dict], pad_id: int) -> dict:
        T = max(len(f["ids"]) for f in feats)
        L = max(len(f["labels"]) for f in feats)
        ids = torch.full((len(feats), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(feats), T), dtype=torch.long)
        labels = torch.full((len(feats), L), IGNORE, dtype=torch.long)
        for i, f in enumerate(feats):
            ids[i, :len(f["ids"])] = torch.tensor(f["ids"])
            mask[i, :len(f["ids"])] = 1
            labels[i, :len(f["labels"])] = torch.tensor(f["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def length(self, feat: dict) -> int:
        return len(feat["ids"]) + len(feat["labels"])  # both the input and the target are padded

    def epoch_order(self, examples: list[dict], feats: list[dict], generator: torch.Generator) -> list[int]:
        """The feature indices of one epoch: a shuffle (one task, or proportional mixing), or as
        many draws as there are features from the tasks at their temperature-scaled rates."""
        n = len(feats)
        tasks: dict[str, list[int]] = {}
        for i, f in enumerate(feats):
            tasks.setdefault(examples[f["ex"]]["task"], []).append(i)
        if self.mixing == "proportional" or len(tasks) == 1:
            return torch.randperm(n, generator=generator).tolist()
        names = sorted(tasks)
        rates = mixing_rates({t: len(tasks[t]) for t in names}, self.mixing, self.mixing_temperature)
        picks = torch.multinomial(torch.tensor([rates[t] for t in names]), n, replacement=True,
                                  generator=generator).tolist()
        order = []
        for k in picks:
            pool = tasks[names[k]]
            order.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
        return order

    # -- model ---------------------------------------------------------------------------------
    def build_model(self, backbone, dropout: float = 0.1, pooling: str = "cls"):
        return backbone

    def loss(self, model, batch: dict) -> torch.Tensor:
        h = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"],
                                decoder_input_ids=shift_right(batch["labels"]))
        return lm_loss(model, h, batch["labels"])

    @torch.no_grad()
    def infer(self, model, feats: list[dict], batch_size: int, pad_id: int, device) -> list[torch.Tensor]:
        """Generated target ids per feature (greedy, or beam search with ``beams``; no n-gram of
        ``no_repeat_ngram`` tokens twice when it is set)."""
        was_training = model.training
        model.eval()
        order = sorted(range(len(feats)), key=lambda i: len(feats[i]["ids"]))  # the input decides the cost
        outputs: list = [None] * len(feats)
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            batch = self.collate([feats[i] for i in idx], pad_id)
            out = model.generate(batch["input_ids"].to(device), max_new_tokens=self.max_target_len,
                                 num_beams=self.beams, attention_mask=batch["attention_mask"].to(device),
                                 no_repeat_ngram_size=self.no_repeat_ngram)
            for row, i in enumerate(idx):
                outputs[i] = out[row].cpu()
        model.train(was_training)
        return outputs

    # -- predictions ---------------------------------------------------------------------------
    def decode(self, examples, feats, outputs) -> list[dict]:
        preds = [None] * len(examples)
        for f, out in zip(feats, outputs):
            ids = out.tolist()
            ids = ids[:ids.index(self._eos)] if self._eos in ids else ids
            preds[f["ex"]] = {"prediction": self._tok.decode([i for i in ids if i != 0]).strip()}
        return preds

    def bind(self, tok) -> None:
        """The tokenizer that decodes generated ids (set by the runner before evaluating)."""
        self._tok, self._eos = tok, tok.eos_id

    def metrics(self, examples, preds) -> dict:
        if not examples:
            return {}
        scores = generation_metrics([p["prediction"] for p in preds], [e["label"] for e in examples])
        return {k: (round(v, 6) if not math.isnan(v) else v) for k, v in scores.items()}


TASKS[Text2TextTask.name] = Text2TextTask
