"""Instruction tuning of a decoder (supervised fine-tuning, ``--task sft``): every example is a
conversation, turned into one token sequence by the tokenizer's chat template
(:mod:`pretrainer.chat`), and the model is trained with the language-modelling loss on the
assistant's answers only (the prompt's tokens carry the label -100, as in InstructGPT's and
Alpaca's recipes). No layer is added: the model is the decoder itself, so ``generate``, ``chat``
and ``export`` take the run as they take a pretraining run.

Rows, in the formats instruction data comes in (one format a row; a file may mix them):

- Alpaca: ``instruction``, optional ``input`` (put after the instruction, a blank line between),
  ``output`` (the answer);
- ``messages``: a list of ``{"role": "system" | "user" | "assistant", "content": text}`` that ends
  with the assistant's answer; every assistant turn is trained on;
- ``prompt`` / ``completion``: text (a user turn and the answer) or lists of turns.

A row may add a ``system`` message (Alpaca, prompt/completion), a ``task`` name (the scores are
also given per task) and ``held_out: true`` (scores over those rows as ``held_out_*``: zero-shot
kinds). A missing field, an empty answer or a conversation that does not end with the assistant is
a one-line error naming the file and line.

``--packing`` puts the short examples of a batch into shared rows of up to ``--max-len`` tokens
(first fit, longest first): fewer padding tokens per step. Each example attends only to itself (a
block-diagonal causal mask), so its loss is what it would be alone, exactly with rotary positions
(relative); with learned absolute positions an example later in a row reads later positions.

Evaluation: the response loss (``eval_loss``, the mean over answer tokens, by which the kept epoch
is chosen by default) and greedy answers to each prompt (up to ``--max-new-tokens``, ending at
end-of-text), scored against the reference by ``exact_match`` (after stripping whitespace) and
ROUGE-L F-measure (``rouge-score``).
"""

from __future__ import annotations

import sys

import torch

from ..chat import ROLES, chat_template, encode_chat, encode_conversation, set_chat_template
from ..common import IGNORE
from ..errors import ConfigError, DataError
from ..train.objectives import lm_loss
from .tasks import TASKS, Task, _show


def _turns(value, where: str, field: str, role: str | None = None) -> list[dict]:
    """A field holding text (one ``role`` turn) or a list of ``{role, content}`` turns."""
    if isinstance(value, str) and role is not None:
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        expected = "text or a list" if role is not None else "a list"
        raise DataError(f"{where}: field '{field}' is {type(value).__name__ if value != [] else 'an empty list'}, "
                        f"expected {expected} of {{role, content}} turns")
    turns = []
    for k, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise DataError(f"{where}: turn {k} of '{field}' is {type(m).__name__}, expected an object "
                            f"with role and content")
        r, content = m.get("role"), m.get("content")
        if r not in ROLES:
            raise DataError(f"{where}: turn {k} of '{field}' has role {r!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {k} of '{field}' ({r}) has content of type "
                            f"{type(content).__name__}, expected text")
        turns.append({"role": r, "content": content})
    return turns


def _field(row: dict, name: str, where: str, kind: str) -> str:
    if name not in row:
        raise DataError(f"{where}: no field '{name}' (a {kind} row; fields: {_show(row) or 'none'})")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' is {type(value).__name__}, expected text")
    return value


def row_messages(row: dict, where: str, require_answer: bool = True) -> list[dict]:
    """The conversation of a row in any of the three formats (see the module doc), checked: a
    training row must end with a non-empty assistant answer, and no assistant turn may be empty."""
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field 'system' is {type(system).__name__}, expected text")
    head = [{"role": "system", "content": system}] if system else []
    if "messages" in row:  # its own system turn, if any
        head = []
        msgs = _turns(row["messages"], where, "messages")
        field = "messages"
    elif "instruction" in row:
        instruction = _field(row, "instruction", where, "Alpaca (instruction, input, output)")
        extra = row.get("input", "")
        if extra is None:
            extra = ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' is {type(extra).__name__}, expected text")
        msgs = head + [{"role": "user", "content": instruction + ("\n\n" + extra if extra.strip() else "")}]
        if require_answer or "output" in row:
            msgs.append({"role": "assistant",
                         "content": _field(row, "output", where, "Alpaca (instruction, input, output)")})
        field = "output"
    elif "prompt" in row:
        msgs = head + _turns(row["prompt"], where, "prompt", "user")
        if require_answer or "completion" in row:
            if "completion" not in row:
                raise DataError(f"{where}: no field 'completion' (a prompt/completion row; fields: {_show(row)})")
            msgs += _turns(row["completion"], where, "completion", "assistant")
        field = "completion"
    else:
        raise DataError(f"{where}: expected 'messages' (role/content turns), 'instruction' and 'output' "
                        f"(Alpaca) or 'prompt' and 'completion' fields (fields: {_show(row) or 'none'})")
    for k, m in enumerate(msgs, 1):
        if m["role"] == "assistant" and not m["content"].strip():
            what = f"turn {k - len(head)} of 'messages' (assistant)" if field == "messages" else f"field '{field}'"
            raise DataError(f"{where}: {what} is empty; expected the answer to train on")
    if require_answer and msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation ends with a '{msgs[-1]['role']}' turn; expected it to "
                        f"end with the assistant's answer")
    return msgs


def answer_scores(predictions: list[str], references: list[str]) -> dict:
    """``exact_match`` (after stripping surrounding whitespace) and ``rougeL`` (mean ROUGE-L
    F-measure, rouge-score's tokenizer: lower case, letters and digits) of answers, in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    n = max(1, len(predictions))
    return {"exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n,
            "rougeL": sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / n}


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most ``capacity`` tokens: first fit, longest first (a
    longer item than the capacity gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = next((r for r in range(len(rows)) if room[r] >= lengths[i]), None)
        if r is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[r].append(i)
            room[r] -= lengths[i]
    return rows


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T]: position i attends to j when j <= i and both are in the same segment
    (``segments`` [B, T]: the example each position belongs to; padding has its own)."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


class SFTTask(Task):
    """Decoders only; the model is the backbone itself."""

    name = "sft"
    reads = "text"  # no head: the decoder's own next-token output
    main_metric = "rougeL"
    select = "loss"  # the lowest response loss on the evaluation rows

    def __init__(self, packing: bool = False, max_new_tokens: int = 64, chat_template: str | None = None, **_):
        super().__init__(None, None, None, labels=None)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {max_new_tokens}: expected a positive integer")
        self.packing, self.max_new_tokens, self.chat_template = bool(packing), max_new_tokens, chat_template
        self.max_len = None

    def state(self) -> dict:
        return {**super().state(), "packing": self.packing, "max_new_tokens": self.max_new_tokens,
                "chat_template": self.chat_template}

    @classmethod
    def from_state(cls, state: dict) -> "SFTTask":
        return cls(state.get("packing", False), state.get("max_new_tokens", 64), state.get("chat_template"))

    # -- reading -------------------------------------------------------------------------------
    def load(self, source: str, split: str = "train", require_labels: bool = True) -> list[dict]:
        if source.startswith("builtin:"):
            from .builtin import builtin_rows

            task_name, rows = builtin_rows(source, split)
            if task_name != self.name:
                raise ConfigError(f"{source} is a {task_name} task, not {self.name}")
        else:
            from pathlib import Path

            from .files import read_rows

            rows = read_rows(Path(source))
        return [self.example(row, where, require_labels) for where, row in rows]

    def example(self, row: dict, where: str, require_labels: bool) -> dict:
        msgs = row_messages(row, where, require_labels)
        ex = {"where": where, "messages": msgs}
        if msgs[-1]["role"] == "assistant":
            ex["label"] = msgs[-1]["content"]
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if users:
            ex["text"] = users[-1]  # what `predict` echoes beside the answer
        if isinstance(row.get("task"), str):
            ex["task"] = row["task"]
        if row.get("held_out") is True:
            ex["held_out"] = True
        return ex

    def texts(self, examples):
        for e in examples:
            for m in e["messages"]:
                yield m["content"]

    # -- encoding ------------------------------------------------------------------------------
    def template(self, tok) -> str:
        """The chat template: ``--chat-template FILE``, else the tokenizer's own, else the
        default; stored with the tokenizer (the run's ``tokenizer/`` and an export carry it)."""
        if self.chat_template:
            from pathlib import Path

            path = Path(self.chat_template)
            if not path.is_file():
                raise ConfigError(f"--chat-template {path}: no such file (expected a Jinja chat template)")
            text = path.read_text(encoding="utf-8")
        else:
            text = chat_template(tok)
        set_chat_template(tok, text)
        return text

    def encode(self, examples, tok, fmt, max_len: int) -> list[dict]:
        """Features: ``ids`` (cut to ``max_len``), ``answer`` (whether each token is part of an
        answer), ``prompt`` (the ids before the last answer: what the model answers when
        evaluated) and ``ex``."""
        if fmt.arch != "decoder":
            hint = "; for an encoder-decoder use --task text2text" if fmt.arch == "encoder-decoder" else ""
            raise ConfigError(f"--task sft needs a decoder backbone (GPT, Llama); this one is arch={fmt.arch}{hint}")
        tok.need("eos", "to end the answers of instruction tuning")
        template = self.template(tok)
        self.max_len = max_len
        feats, empty = [], 0
        for i, ex in enumerate(examples):
            try:
                if "label" in ex:
                    ids, answer, start = encode_conversation(tok, ex["messages"], template)
                    prompt = ids[:start]
                else:
                    prompt = encode_chat(tok, ex["messages"], template)
                    ids, answer = prompt, [False] * len(prompt)
            except DataError as e:
                raise DataError(f"{ex['where']}: {e}") from None
            f = {"ids": ids[:max_len], "answer": answer[:max_len], "prompt": prompt, "ex": i}
            if "label" in ex and not any(f["answer"][1:]):
                empty += 1
            feats.append(f)
        if empty:
            print(f"note: {empty} of {len(examples)} examples have no answer token within --max-len {max_len} "
                  f"(their prompt fills it); they add nothing to the loss: raise --max-len",
                  file=sys.stderr, flush=True)
        return feats

    def collate(self, feats: list[dict], pad_id: int) -> dict:
        """``input_ids``, ``attention_mask`` and ``labels`` (the next token where it is part of an
        answer, else -100); packed (``segments``: the example of each position) with
        ``packing``."""
        if self.packing and len(feats) > 1:
            rows = [[feats[i] for i in r] for r in pack([len(f["ids"]) for f in feats], self.max_len or 10 ** 9)]
        else:
            rows = [[f] for f in feats]
        T = max(sum(len(f["ids"]) for f in row) for row in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        segments = torch.full((len(rows), T), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            pos = 0
            for k, f in enumerate(row):
                x = torch.tensor(f["ids"], dtype=torch.long)
                n = len(x)
                ids[r, pos:pos + n] = x
                segments[r, pos:pos + n] = k
                target = torch.tensor(f["answer"][1:], dtype=torch.bool)
                labels[r, pos:pos + n - 1] = torch.where(target, x[1:], IGNORE)
                pos += n
        batch = {"input_ids": ids, "attention_mask": (segments >= 0).long()}
        if any(any(f["answer"]) for f in feats):
            batch["labels"] = labels
        if any(len(row) > 1 for row in rows):
            batch["segments"] = segments
        return batch

    # -- model ---------------------------------------------------------------------------------
    def build_model(self, backbone, dropout: float = 0.1, pooling: str = "cls"):
        return backbone

    @staticmethod
    def states(model, batch: dict) -> torch.Tensor:
        """The decoder's final hidden states; a packed batch attends within each example only."""
        mask = segment_mask(batch["segments"]) if "segments" in batch else None
        return model.hidden_states(batch["input_ids"], attn_mask=mask)

    def loss(self, model, batch: dict) -> torch.Tensor:
        h = self.states(model, batch)
        labels = batch["labels"]
        if not bool((labels != IGNORE).any()):  # no answer token in reach: nothing to learn (count 0)
            return h.sum() * 0.0
        return lm_loss(model, h, labels)

    @torch.no_grad()
    def infer(self, model, feats: list[dict], batch_size: int, pad_id: int, device) -> list[str]:
        """The greedy answer to each feature's prompt (up to ``max_new_tokens``, ending at
        end-of-text)."""
        from ..eval.scoring import greedy_generate

        was_training = model.training
        model.eval()
        try:
            return greedy_generate(model, self._tok, [f["prompt"] for f in feats], self.max_new_tokens,
                                   stop=(), batch_size=batch_size)
        finally:
            model.train(was_training)

    # -- predictions ---------------------------------------------------------------------------
    def bind(self, tok) -> None:
        self._tok = tok

    def decode(self, examples, feats, outputs) -> list[dict]:
        preds = [None] * len(examples)
        for f, text in zip(feats, outputs):
            preds[f["ex"]] = {"prediction": text.strip()}
        return preds

    def metrics(self, examples, preds) -> dict:
        """``exact_match`` and ``rougeL`` over all examples and over the ``held_out`` ones
        (``held_out_exact_match`` ...), and ``TASK_rougeL`` per ``task`` when there are several."""
        if not examples:
            return {}
        pairs = [(p["prediction"], e["label"]) for e, p in zip(examples, preds)]
        out = answer_scores(*zip(*pairs))
        tasks = sorted({e["task"] for e in examples if "task" in e})
        groups = {"held_out": [e.get("held_out", False) for e in examples]} if any(
            e.get("held_out") for e in examples) else {}
        if len(tasks) > 1:
            groups.update({t: [e.get("task") == t for e in examples] for t in tasks})
        for name, keep in groups.items():
            chosen = [pair for pair, k in zip(pairs, keep) if k]
            for key, value in answer_scores(*zip(*chosen)).items():
                if name == "held_out" or key == "rougeL":
                    out[f"{name}_{key}"] = value
        return {k: round(v, 6) for k, v in out.items()}


TASKS[SFTTask.name] = SFTTask
