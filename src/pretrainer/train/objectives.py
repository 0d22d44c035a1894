"""Pretraining objectives as registered objects: the one place where an objective's name means
anything.

An objective owns

- its **batches**: ``objective.batches(split)`` is a builder whose ``batch(first, count)`` returns
  samples ``first .. first+count-1`` of the seeded global order as a dict of tensors (a pure
  function of the sample index, so resuming is a seek; the builders live in :mod:`pretrainer.data`),
  and ``objective.eval_batches(split, ...)`` the fixed validation batches;
- its **loss** from the model's outputs: ``objective.loss(model, batch)``. The LM objectives use
  the fused chunked output-projection loss (:func:`pretrainer.model.loss.linear_cross_entropy`)
  in training steps, so the [tokens x vocabulary] logits are never kept; the masked LM runs its
  head on the selected positions only;
- its **evaluation metrics**: ``objective.eval_sums(model, batch)`` (sums that add up across
  batches and processes) and ``objective.metrics(sums)`` (``val_loss``, and ``val_accuracy`` for
  the masked LM).

Each declares the architectures it can train (``archs``), and more than one where the T5 paper
(Raffel et al. 2020, section 3.2) crosses them: a prefix LM or span corruption trains an
encoder-decoder (the encoder reads the input, the decoder predicts the target) or a decoder-only
model (input and target as one sequence, the loss on the target; ``prefix_mask`` makes the input
part bidirectional: the paper's "prefix LM" architecture, else its causal "language model").

``register`` adds one; :func:`get_objective` builds the one a run config names.
"""

from __future__ import annotations

from typing import ClassVar, Iterator

import torch

from ..common import IGNORE, shift_right
from ..config import RunConfig
from ..data.tokens import TokenSplit
from ..errors import ConfigError, DataError
from ..model.loss import cross_entropy, linear_cross_entropy

OBJECTIVES: dict[str, type["Objective"]] = {}


def register(cls: type["Objective"]) -> type["Objective"]:
    OBJECTIVES[cls.name] = cls
    return cls


def get_objective(cfg: RunConfig) -> "Objective":
    """The objective ``cfg.objective`` names, checked against ``cfg.model.arch``."""
    cls = OBJECTIVES.get(cfg.objective)
    if cls is None:
        from ..config import _suggest

        raise ConfigError(f"objective={cfg.objective!r}: expected one of {', '.join(OBJECTIVES)}"
                          f"{_suggest(cfg.objective, OBJECTIVES)}")
    if cfg.model.arch not in cls.archs:
        raise ConfigError(f"objective={cfg.objective} trains arch={' or '.join(cls.archs)} models, "
                          f"but model.arch={cfg.model.arch}")
    if cfg.masking != "token" and "masking" not in cls.options:
        users = [name for name, c in OBJECTIVES.items() if "masking" in c.options]
        raise ConfigError(f"masking={cfg.masking} applies to objective={' or '.join(users)} only")
    return cls(cfg)


def default_objective(arch: str) -> str:
    """The first objective registered for an architecture (clm for a decoder, mlm for an
    encoder, span for an encoder-decoder)."""
    return next(name for name, cls in OBJECTIVES.items() if cls.archs[0] == arch)


def lm_loss(model, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's output layer on hidden states ``h`` against ``labels``
    (``IGNORE`` = not counted). In a training step (gradients on) of a model with the fast paths
    (:mod:`pretrainer.model.fast`: float32 on a CPU) the fused loss, which never keeps the logits;
    otherwise the plain logits (on a GPU ``torch.compile`` fuses those)."""
    if torch.is_grad_enabled() and getattr(model, "fast_paths", False):
        return linear_cross_entropy(h, model.output_weight, labels)
    return cross_entropy(model.head(h), labels)


class Objective:
    """The interface the trainer calls (see the module docstring)."""

    name: ClassVar[str]
    archs: ClassVar[tuple[str, ...]]  # the first is the architecture it is the default for
    about: ClassVar[str]
    sums: ClassVar[tuple[str, ...]] = ("count", "loss")  # the keys of eval_sums
    options: ClassVar[tuple[str, ...]] = ()  # run-config keys it reads besides train (masking ...)

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.arch = cfg.model.arch
        self._eval_builders: dict = {}  # the fixed validation builders, made once per split

    # -- data ----------------------------------------------------------------------------------
    def builder(self, split: TokenSplit, seq_len: int, seed: int):
        """The data package's builder: ``batch(first, count)`` and ``example`` / ``order``."""
        raise NotImplementedError

    def batches(self, split: TokenSplit, seq_len: int | None = None, seed: int | None = None) -> "Batches":
        """Training batches; a split too small for one window is refused now, not at the first step."""
        t = self.cfg.train
        b = Batches(self, self.builder(split, seq_len or t.seq_len, t.seed if seed is None else seed))
        b.order  # noqa: B018 - validates the split's size
        return b

    def eval_batches(self, split: TokenSplit, batch_size: int, max_batches: int,
                     seq_len: int | None = None) -> Iterator[dict]:
        """Fixed validation batches: consecutive windows from the start of the split, with any
        noise drawn from seed 0 (the same at every evaluation)."""
        key = (str(split.dir), split.split, seq_len or self.cfg.train.seq_len)
        if key not in self._eval_builders:  # (reading the tokenizer again at every evaluation is slow)
            self._eval_builders[key] = self.builder(split, key[2], 0)
        for pair in self._eval_builders[key].eval_batches(batch_size, max_batches):
            yield self.as_batch(pair)

    def as_batch(self, pair) -> dict:
        x, y = pair
        return {"input_ids": x, "labels": y}

    # -- loss ----------------------------------------------------------------------------------
    def loss(self, model, batch: dict) -> torch.Tensor:
        """The mean loss over the batch's predicted tokens."""
        raise NotImplementedError

    def count(self, batch: dict) -> torch.Tensor:
        """The number of predicted tokens (what :meth:`loss` averages over), as float64."""
        return (batch["labels"] != IGNORE).sum().double()

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Sums over one evaluation batch: ``loss`` (summed over the predicted tokens) and
        ``count`` (the predicted tokens)."""
        count = (batch["labels"] != IGNORE).sum()
        return {"loss": self.loss(model, batch).double() * count, "count": count.double()}

    def metrics(self, sums: dict[str, float]) -> dict:
        return {"val_loss": sums["loss"] / max(sums["count"], 1.0)}


class Batches:
    """An objective's training batches as dicts: ``batch(first, count)``."""

    def __init__(self, objective: Objective, builder):
        self.objective, self.builder = objective, builder

    @property
    def order(self):
        return self.builder.order

    def batch(self, first: int, count: int) -> dict:
        return self.objective.as_batch(self.builder.batch(first, count))


# ----------------------------------------------------------------------------------------------
# Decoder-only LM


@register
class CausalLM(Objective):
    name = "clm"
    archs = ("decoder",)
    about = "causal language modelling: targets are the inputs shifted by one (GPT)"

    def builder(self, split, seq_len, seed):
        from ..data.tokens import CLMBatches

        return CLMBatches(split, seq_len, seed)

    def loss(self, model, batch):
        h = model.hidden_states(batch["input_ids"], prefix_len=batch.get("prefix_len"))
        return lm_loss(model, h, batch["labels"])


# ----------------------------------------------------------------------------------------------
# Encoder-only masked LM


@register
class MaskedLM(Objective):
    name = "mlm"
    archs = ("encoder",)
    sums = ("correct", "count", "loss")
    options = ("masking",)
    about = ("masked language modelling: 15 % of the tokens selected (masking = token | word | "
             "span), 80/10/10 mask/random/kept (BERT); accuracy on the selected positions")

    def builder(self, split, seq_len, seed):
        from ..data.objectives import MLMBatches

        return MLMBatches(split, seq_len, seed, self.cfg.masking)

    def _logits(self, model, batch):
        labels = batch["labels"]
        picked = labels != IGNORE
        h = model.hidden_states(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return model.head(h[picked]), labels[picked]  # the head on the selected positions only

    def loss(self, model, batch):
        return cross_entropy(*self._logits(model, batch))

    def eval_sums(self, model, batch):
        logits, y = self._logits(model, batch)
        n = torch.tensor(float(len(y)), dtype=torch.float64, device=y.device)
        return {"loss": cross_entropy(logits, y).double() * n, "count": n,
                "correct": (logits.argmax(-1) == y).sum().double()}

    def metrics(self, sums):
        return {**super().metrics(sums), "val_accuracy": sums["correct"] / max(sums["count"], 1.0)}


class SentencePairMLM(MaskedLM):
    """Masked LM plus a sentence-pair task on the pooled ``<cls>`` state (``model.nsp_head``): the
    loss is the masked-LM mean plus the cross-entropy of the 2-way head, as BERT sums them
    (BertForPreTraining). Batches come from :class:`~pretrainer.data.objectives.SentencePairBatches`.
    ``val_loss`` and ``val_accuracy`` stay the masked LM's (comparable with an ``mlm`` run);
    ``val_{task}_loss`` and ``val_{task}_accuracy`` are the sentence task's."""

    task: ClassVar[str]
    sums = ("correct", "count", "loss", "pair_correct", "pair_count", "pair_loss")

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        if not cfg.model.nsp_head:
            raise ConfigError(f"objective={self.name} needs model.nsp_head=true (a 2-way classifier on the "
                              f"pooled <cls> state, which needs model.pooler=true)")

    def builder(self, split, seq_len, seed):
        from ..data.objectives import SentencePairBatches

        return SentencePairBatches(split, seq_len, seed, self.task, self.cfg.masking)

    def as_batch(self, batch):
        if self.cfg.model.type_vocab_size < 2:  # no segment embedding for B: <sep> alone marks it
            batch = {k: v for k, v in batch.items() if k != "token_type_ids"}
        return batch

    def _outputs(self, model, batch):
        """MLM logits and labels of the selected positions, sentence logits [B, 2]."""
        labels = batch["labels"]
        picked = labels != IGNORE
        h = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"],
                                token_type_ids=batch.get("token_type_ids"))
        return model.head(h[picked]), labels[picked], model.sentence_logits(h)

    def loss(self, model, batch):
        logits, y, pair_logits = self._outputs(model, batch)
        return cross_entropy(logits, y) + cross_entropy(pair_logits, batch["sentence_labels"])

    def eval_sums(self, model, batch):
        logits, y, pair_logits = self._outputs(model, batch)
        pair_y = batch["sentence_labels"]
        n = torch.tensor(float(len(y)), dtype=torch.float64, device=y.device)
        m = torch.tensor(float(len(pair_y)), dtype=torch.float64, device=y.device)
        return {"loss": cross_entropy(logits, y).double() * n, "count": n,
                "correct": (logits.argmax(-1) == y).sum().double(),
                "pair_loss": cross_entropy(pair_logits, pair_y).double() * m, "pair_count": m,
                "pair_correct": (pair_logits.argmax(-1) == pair_y).sum().double()}

    def metrics(self, sums):
        n = max(sums["pair_count"], 1.0)
        return {**super().metrics(sums), f"val_{self.task}_loss": sums["pair_loss"] / n,
                f"val_{self.task}_accuracy": sums["pair_correct"] / n}


@register
class NextSentenceMLM(SentencePairMLM):
    name = "mlm+nsp"
    task = "nsp"
    about = ("masked LM + next-sentence prediction (BERT): B follows A, or half of the time comes "
             "from another document; a 2-way head on the pooled <cls> (model.nsp_head)")


@register
class SentenceOrderMLM(SentencePairMLM):
    name = "mlm+sop"
    task = "sop"
    about = ("masked LM + sentence-order prediction (ALBERT): two consecutive segments, swapped half "
             "of the time; the same 2-way head (model.nsp_head)")


# ----------------------------------------------------------------------------------------------
# (input, target) objectives: encoder-decoders, or decoder-only models on the concatenation


class PairObjective(Objective):
    """An objective whose examples are ``(input, target)`` pairs. An encoder-decoder reads the
    input with its encoder and predicts the target with its decoder (teacher forcing on the target
    shifted right). A decoder-only model reads ``input + target`` as one sequence and predicts the
    target's tokens; with ``prefix_mask`` the input positions see each other (a prefix LM)."""

    archs = ("encoder-decoder", "decoder")
    pad = 0  # the data's padding id (its tokenizer's pad role, else end-of-text), once batches are made

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.on_decoder = self.arch == "decoder"  # input + target as one sequence

    def pair_builder(self, split, seq_len, seed):
        raise NotImplementedError

    def builder(self, split, seq_len, seed):
        from ..tokenization import padding_id

        self.pad = padding_id(split.manifest["special_ids"])
        if self.pad is None:
            raise DataError(f"{split.dir / 'manifest.json'}: the tokenizer has neither a pad nor an "
                            f"end-of-text token; prepare the data with --pad-token or --eos-token")
        pairs = self.pair_builder(split, seq_len, seed)
        if self.on_decoder:
            total = pairs.decoder_length
            m = self.cfg.model
            if m.position == "learned" and total > m.max_seq_len:
                raise ConfigError(f"objective={self.name} on a decoder: input + target = {total} "
                                  f"tokens exceed model.max_seq_len={m.max_seq_len}; lower train.seq_len")
            return _Concatenated(pairs, self.pad, self.cfg.prefix_mask)
        return pairs

    def as_batch(self, pair):
        if isinstance(pair, dict):  # already laid out for a decoder
            return pair
        x, y = pair  # the encoder's input is padded with the pad id: mask it out
        return {"input_ids": x, "labels": y, "attention_mask": (x != self.pad).long()}

    def loss(self, model, batch):
        if self.on_decoder:
            h = model.hidden_states(batch["input_ids"], prefix_len=batch.get("prefix_len"))
        else:  # teacher forcing: the decoder starts from the pad id (T5's convention)
            h = model.hidden_states(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                    decoder_input_ids=shift_right(batch["labels"], self.pad, self.pad))
        return lm_loss(model, h, batch["labels"])


class _Concatenated:
    """``(input, target)`` examples laid out for a decoder-only model: ``tokens = input + target``,
    ``input_ids = tokens[:-1]``, ``labels = tokens[1:]`` with the positions that predict input
    tokens ignored, right padding, and ``prefix_len`` = the input's length (with ``prefix_mask``)."""

    def __init__(self, pairs, pad_id: int, prefix_mask: bool):
        self.pairs, self.pad_id, self.prefix_mask = pairs, pad_id, prefix_mask
        self.length = pairs.decoder_length

    @property
    def order(self):
        return self.pairs.order

    def lay_out(self, examples) -> dict:
        x = torch.full((len(examples), self.length), self.pad_id, dtype=torch.long)
        y = torch.full((len(examples), self.length), IGNORE, dtype=torch.long)
        prefix = torch.zeros(len(examples), dtype=torch.long)
        for i, (src, tgt) in enumerate(examples):
            tokens = torch.cat([src, tgt])
            n = len(tokens) - 1
            x[i, :n] = tokens[:-1]
            y[i, len(src) - 1:n] = tgt  # position len(src)-1 predicts the target's first token
            prefix[i] = len(src)
        batch = {"input_ids": x, "labels": y}
        if self.prefix_mask:
            batch["prefix_len"] = prefix
        return batch

    def batch(self, first, count):
        p = self.pairs
        return self.lay_out([p.example(p.order.start(g), g) for g in range(first, first + count)])

    def eval_batches(self, batch_size, max_batches):
        from ..data.tokens import fixed_windows

        p = self.pairs
        for items in fixed_windows(p.split, p.raw_length, batch_size, max_batches):
            yield self.lay_out([p.example(start, index, 0) for start, index in items])


@register
class SpanCorruption(PairObjective):
    name = "span"
    about = ("T5 span corruption: 15 % of the tokens in spans of mean length 3, each span one "
             "sentinel in the input; the target lists the spans")

    def pair_builder(self, split, seq_len, seed):
        from ..data.seq2seq import SpanCorruptionBatches

        sentinels, _ = tokenizer_ids(split)
        if not sentinels:
            raise DataError(f"{split.dir}: objective=span needs T5 sentinel tokens in the tokenizer; "
                            f"prepare the data with --sentinels 100")
        ids, n = split.manifest["special_ids"], self.cfg.noise
        return SpanCorruptionBatches(split, seq_len, seed, sentinels, ids["eos"], self.pad,
                                     n.noise_density, n.mean_span_length)


@register
class Denoise(PairObjective):
    name = "denoise"
    about = "BART denoising: text infilling, masking, deletion, sentence permutation, rotation"

    def pair_builder(self, split, seq_len, seed):
        from ..data.seq2seq import DenoiseBatches

        ids, noise = split.manifest["special_ids"], self.cfg.noise
        if ids.get("mask") is None:
            raise DataError(f"{split.dir}: objective=denoise needs a mask token in the tokenizer; "
                            f"prepare the data with --mask-token TEXT")
        ends = tokenizer_ids(split)[1] if noise.permute_sentences else ()
        return DenoiseBatches(split, seq_len, seed, ids["mask"], ids["eos"], self.pad, noise, ends)


@register
class PrefixLM(PairObjective):
    name = "prefix_lm"
    archs = ("encoder-decoder", "decoder")
    about = ("prefix LM: a window split at a random point, the model reads the prefix and "
             "predicts the rest (T5's LM objective)")

    def pair_builder(self, split, seq_len, seed):
        from ..data.seq2seq import PrefixLMBatches

        return PrefixLMBatches(split, seq_len, seed, split.manifest["special_ids"]["eos"], self.pad)


def tokenizer_ids(split: TokenSplit) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(sentinel ids, sentence-end ids)`` of a data folder's tokenizer (read once per process)."""
    from ..data.objectives import _tokenizer_ids

    return _tokenizer_ids(str(split.dir / split.manifest["tokenizer"]["path"]))
