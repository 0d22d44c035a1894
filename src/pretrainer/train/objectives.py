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
  head on the selected positions only, through the same fused loss (with the output bias);
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

import math
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F

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
    if cfg.distill.teacher and "distill" not in cls.options:
        users = [name for name, c in OBJECTIVES.items() if "distill" in c.options]
        raise ConfigError(f"distill.teacher applies to objective={' or '.join(users)} only "
                          f"(objective={cfg.objective})")
    if cfg.model.arch not in cls.archs:
        raise ConfigError(f"objective={cfg.objective} trains arch={' or '.join(cls.archs)} models, "
                          f"but model.arch={cfg.model.arch}")
    if cfg.model.rtd_head and cls.name != "electra":
        raise ConfigError(f"objective={cfg.objective}: model.rtd_head=true (ELECTRA's discriminator, no MLM "
                          f"head) trains with objective=electra only")
    if cfg.masking != "token" and "masking" not in cls.options:
        users = [name for name, c in OBJECTIVES.items() if "masking" in c.options]
        raise ConfigError(f"masking={cfg.masking} applies to objective={' or '.join(users)} only")
    if cfg.mask_prob != 0.15 and "mask_prob" not in cls.options:
        users = [name for name, c in OBJECTIVES.items() if "mask_prob" in c.options]
        raise ConfigError(f"mask_prob={cfg.mask_prob} applies to objective={' or '.join(users)} only"
                          f"{' (ELECTRA: electra.mask_prob)' if 'electra' in cls.options else ''}")
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


def mlm_loss(model, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of an encoder's masked-LM head on hidden states ``h`` against ``labels``
    (``IGNORE`` = not counted): as :func:`lm_loss`, the head's transform then the fused output
    layer and loss (with its bias) in a fast-path training step, else the plain logits."""
    if torch.is_grad_enabled() and getattr(model, "fast_paths", False) and getattr(model, "mlm", None) is not None:
        out = model.mlm.out
        return linear_cross_entropy(model.mlm.transform(h), out.weight, labels, bias=out.bias)
    return cross_entropy(model.head(h), labels)


class Objective:
    """The interface the trainer calls (see the module docstring)."""

    name: ClassVar[str]
    archs: ClassVar[tuple[str, ...]]  # the first is the architecture it is the default for
    about: ClassVar[str]
    sums: ClassVar[tuple[str, ...]] = ("count", "loss")  # the keys of eval_sums
    options: ClassVar[tuple[str, ...]] = ()  # run-config keys it reads besides train (masking ...)
    wraps: ClassVar[bool] = False  # trains more than the model (:meth:`wrap`)
    perplexity: ClassVar[bool] = True  # val_loss is a language model's cross-entropy: exp of it is a perplexity
    extra_vocab: ClassVar[int] = 0  # tokens the model has beyond the data's vocabulary (gato: value bins ...)

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

    def prepare(self, model, device: torch.device, initialise: bool, sharded: bool = False) -> str | None:
        """Called by the trainer once, before the first step, with the model built on ``device``;
        ``initialise``: a fresh run without ``init_from`` (the objective may set the starting
        weights; ``sharded``: FSDP2). Returns a note for the run's first log line, or None."""
        return None

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

    def eval_note(self, metrics: dict) -> str:
        """What the evaluation line adds after the loss, accuracy and perplexity (`` | name value``)."""
        return ""

    # -- what is trained, and what it logs besides the loss --------------------------------------
    def wrap(self, model):
        """The module a run trains and checkpoints around ``model``: the model itself, or (ELECTRA)
        a module holding it and what else the objective trains. ``model`` is what the run produces."""
        return model

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token beyond the model's (ELECTRA: its generator's)."""
        return 0.0

    def train_metrics(self, all_sum) -> dict:
        """Metrics of the training steps since the last call (the logging window), summed over the
        processes with ``all_sum(tensor)``; ``{}`` for none."""
        return {}

    def window_state(self, all_sum) -> dict:
        """What :meth:`train_metrics` has gathered so far, summed over the processes with
        ``all_sum`` (every process calls it), for a checkpoint (JSON numbers)."""
        return {}

    def load_window_state(self, state: dict | None) -> None:
        """Take back :meth:`window_state` when a run resumes (the first process; the others
        start from nothing, so that the sum over the processes is what was saved)."""


def trained_module(cfg: RunConfig, model):
    """What a run of ``cfg`` trains and checkpoints around ``model`` (its objective's
    :meth:`Objective.wrap`): loading a checkpoint into it gives ``model`` its weights."""
    cls = OBJECTIVES.get(cfg.objective)
    return cls(cfg).wrap(model) if cls is not None and cls.wraps else model


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
    options = ("masking", "mask_prob")
    about = ("masked language modelling: mask_prob (15 %) of the tokens selected (masking = token | word | "
             "span), 80/10/10 mask/random/kept (BERT); accuracy on the selected positions")

    def builder(self, split, seq_len, seed):
        from ..data.objectives import MLMBatches

        return MLMBatches(split, seq_len, seed, self.cfg.masking, mask_prob=self.cfg.mask_prob)

    def _selected(self, model, batch):
        """Hidden states and labels of the selected positions (the head runs on those only)."""
        labels = batch["labels"]
        picked = labels != IGNORE
        h = model.hidden_states(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return h[picked], labels[picked]

    def _logits(self, model, batch):
        h, y = self._selected(model, batch)
        return model.head(h), y

    def loss(self, model, batch):
        return mlm_loss(model, *self._selected(model, batch))

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

        return SentencePairBatches(split, seq_len, seed, self.task, self.cfg.masking, self.cfg.mask_prob)

    def as_batch(self, batch):
        if self.cfg.model.type_vocab_size < 2:  # no segment embedding for B: <sep> alone marks it
            batch = {k: v for k, v in batch.items() if k != "token_type_ids"}
        return batch

    def _states(self, model, batch):
        """Hidden states [B, T, d], the selected positions' states and labels."""
        labels = batch["labels"]
        picked = labels != IGNORE
        h = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"],
                                token_type_ids=batch.get("token_type_ids"))
        return h, h[picked], labels[picked]

    def _outputs(self, model, batch):
        """MLM logits and labels of the selected positions, sentence logits [B, 2]."""
        h, selected, y = self._states(model, batch)
        return model.head(selected), y, model.sentence_logits(h)

    def loss(self, model, batch):
        h, selected, y = self._states(model, batch)
        return mlm_loss(model, selected, y) + cross_entropy(model.sentence_logits(h), batch["sentence_labels"])

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
# Encoder-only replaced-token detection (ELECTRA)


@register
class Electra(Objective):
    """ELECTRA (Clark et al. 2020, section 2): a small generator, trained as a masked LM, fills the
    selected positions with tokens sampled from its softmax (no gradient flows through the sample);
    the discriminator (the model) then says for every token whether it was replaced. A sample equal
    to the original token counts as original (label 0). The loss is the generator's MLM loss plus
    ``electra.disc_weight`` (lambda = 50) times the discriminator's binary cross-entropy over every
    (non-padding) token.

    The selection is BERT's (``masking``, ``electra.mask_prob`` of the tokens) but shown to the
    generator as ELECTRA's code does: 85 % ``<mask>``, 15 % unchanged, none random. The module
    trained is :class:`~pretrainer.model.electra.ElectraPretraining` (discriminator + generator);
    the run's product is the discriminator."""

    name = "electra"
    archs = ("encoder",)
    wraps = True
    sums = ("count", "gen_loss", "gen_correct", "tokens", "disc_loss", "disc_correct", "replaced",
            "predicted", "caught")
    options = ("masking", "electra")
    about = ("ELECTRA replaced-token detection: a small MLM generator samples replacements for 15 % "
             "of the tokens; the discriminator labels every token original or replaced (model.rtd_head)")
    MASK_FRAC = 0.85  # of the selected positions shown as <mask>; the rest unchanged

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        if not cfg.model.rtd_head:
            raise ConfigError("objective=electra trains a discriminator: it needs model.rtd_head=true "
                              "(presets electra-tiny, electra-small)")
        from ..model.electra import generator_config

        self.generator_cfg = generator_config(cfg.model, cfg.electra)
        self.weight, self.temperature = cfg.electra.disc_weight, cfg.electra.temperature
        self._window: dict[str, torch.Tensor] = {}

    def wrap(self, model):
        from ..model.electra import ElectraPretraining

        return ElectraPretraining(model, self.generator_cfg)

    def extra_flops_per_token(self, seq_len):
        from ..model.info import model_info

        return model_info(self.generator_cfg, seq_len)["flops_per_token"]

    def builder(self, split, seq_len, seed):
        from ..data.objectives import ElectraBatches

        return ElectraBatches(split, seq_len, seed, self.cfg.masking, mask_prob=self.cfg.electra.mask_prob,
                              mask_frac=self.MASK_FRAC, random_frac=0.0)

    def as_batch(self, triple):
        x, y, u = triple
        return {"input_ids": x, "labels": y, "uniform": u}

    def corrupt(self, model, batch: dict):
        """The generator's half: its logits at the selected positions and their labels (the
        original tokens), the discriminator's input (every selected position replaced by a token
        sampled from the generator's softmax at ``electra.temperature``: the first token whose
        cumulative probability exceeds the batch's ``uniform`` number at that position, drawn with
        the masks; without one, from the global random stream) and its labels: True where that
        token differs from the original."""
        x, labels = batch["input_ids"], batch["labels"]
        picked = labels != IGNORE
        gen = model.generator
        logits = gen.head(gen.hidden_states(x, attention_mask=batch.get("attention_mask"))[picked])
        with torch.no_grad():
            probs = torch.softmax(logits.float() / self.temperature, dim=-1)
            u = batch["uniform"][picked] if "uniform" in batch else torch.rand(len(probs), device=x.device)
            cdf = probs.cumsum(-1)
            sampled = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
            sampled = sampled.clamp_(max=probs.size(-1) - 1)  # (u at the very top of a rounded CDF)
            corrupted = x.masked_scatter(picked, sampled)
            replaced = corrupted != torch.where(picked, labels, x)  # a sampled original counts as real
        return logits, labels[picked], corrupted, replaced

    def replace(self, model, batch: dict):
        """Both halves: the generator's logits and labels at the selected positions, then the
        discriminator's logits and labels (replaced = 1) at every counted (non-padding) position."""
        logits, y, corrupted, replaced = self.corrupt(model, batch)
        mask = batch.get("attention_mask")
        disc = model.discriminator
        rtd = disc.rtd(disc.hidden_states(corrupted, attention_mask=mask))
        counted = mask.bool() if mask is not None else torch.ones_like(replaced)
        return logits, y, rtd[counted].float(), replaced[counted].float()

    def loss(self, model, batch):
        logits, y, rtd, replaced = self.replace(model, batch)
        disc = F.binary_cross_entropy_with_logits(rtd, replaced)
        if torch.is_grad_enabled():  # a training step: the logging window's sums
            self._add(self._window, rtd, replaced)
        return cross_entropy(logits, y) + self.weight * disc  # both float32

    @staticmethod
    def _add(sums: dict, rtd: torch.Tensor, replaced: torch.Tensor) -> dict:
        """Add the discriminator's counts (tokens, correct, replaced, predicted replaced, replaced
        and caught) to ``sums`` (float64 tensors, no host transfer)."""
        said = rtd > 0
        truth = replaced.bool()
        for key, value in (("tokens", truth.numel()), ("disc_correct", (said == truth).sum()),
                           ("replaced", truth.sum()), ("predicted", said.sum()), ("caught", (said & truth).sum())):
            value = torch.as_tensor(value, dtype=torch.float64, device=rtd.device)
            sums[key] = value + sums.get(key, 0.0)  # (a resumed window starts from numbers)
        return sums

    def eval_sums(self, model, batch):
        logits, y, rtd, replaced = self.replace(model, batch)  # samples as fixed as the masks
        n = torch.tensor(float(len(y)), dtype=torch.float64, device=y.device)
        sums = {"count": n, "gen_loss": cross_entropy(logits, y).double() * n,
                "gen_correct": (logits.argmax(-1) == y).sum().double(),
                "disc_loss": F.binary_cross_entropy_with_logits(rtd, replaced, reduction="sum").double()}
        return self._add(sums, rtd, replaced)

    @staticmethod
    def _disc_metrics(s: dict, prefix: str) -> dict:
        return {f"{prefix}disc_accuracy": s["disc_correct"] / max(s["tokens"], 1.0),
                f"{prefix}replaced": s["replaced"] / max(s["tokens"], 1.0),
                f"{prefix}disc_precision": s["caught"] / max(s["predicted"], 1.0),
                f"{prefix}disc_recall": s["caught"] / max(s["replaced"], 1.0)}

    def metrics(self, sums):
        gen = sums["gen_loss"] / max(sums["count"], 1.0)
        disc = sums["disc_loss"] / max(sums["tokens"], 1.0)
        return {"val_loss": gen + self.weight * disc, "val_gen_loss": gen, "val_disc_loss": disc,
                "val_ppl": math.exp(min(gen, 50)),  # the generator's
                "val_accuracy": sums["gen_correct"] / max(sums["count"], 1.0),
                **self._disc_metrics(sums, "val_")}

    def train_metrics(self, all_sum):
        if not self._window:
            return {}
        total = self.window_state(all_sum)
        self._window = {}
        return self._disc_metrics(total, "")

    def window_state(self, all_sum):
        if not self._window:
            return {}
        keys = sorted(self._window)
        total = all_sum(torch.stack([torch.as_tensor(self._window[k], dtype=torch.float64).cpu()
                                     for k in keys])).tolist()
        return dict(zip(keys, total))

    def load_window_state(self, state):
        self._window = {k: float(v) for k, v in (state or {}).items()}


# ----------------------------------------------------------------------------------------------
# Knowledge distillation (DistilBERT), for encoders and decoders


@register
class Distill(Objective):
    """Sanh et al. (2019)'s distillation loss for the student ``model``, from a frozen teacher
    (``distill.teacher``, loaded in eval mode on first use; never part of the trained module, its
    state dict or its checkpoints)::

        loss = ce_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))     (mean over positions)
             + lm_weight * the student's own loss (MLM on the selected tokens, or next-token CE)
             + cos_weight * mean(1 - cos(h_t, h_s))                            (every token)

    ``z``: output logits, ``h``: final hidden states (the cosine term only when the widths match).
    The soft targets cover every token (an encoder with ``distill.masked_only``: the MLM-selected
    ones only; a decoder: every predicted next token). Batches and evaluation are the student's own
    objective's, ``mlm`` for an encoder (with ``masking``) and ``clm`` for a decoder, so
    ``val_loss`` is the student's masked-LM or causal-LM loss, comparable with its teacher's. A
    micro-batch weighs by its soft-target positions (``count``)."""

    name = "distill"
    archs = ("encoder", "decoder")
    options = ("masking", "distill")
    about = ("knowledge distillation from distill.teacher (DistilBERT): soft targets at a temperature "
             "+ the student's own mlm/clm loss + hidden-state cosine; encoder or decoder")

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        d = cfg.distill
        if not d.teacher:
            raise ConfigError("objective=distill: distill.teacher is missing; expected a run, checkpoint or "
                              "Hugging Face folder (pretrainer distill TEACHER_RUN --student PRESET ...)")
        if d.masked_only and self.arch != "encoder":
            raise ConfigError("distill.masked_only applies to encoders (a decoder predicts every position)")
        if cfg.masking != "token" and self.arch != "encoder":
            raise ConfigError(f"masking={cfg.masking} applies to an encoder student (objective=distill on a "
                              f"decoder predicts the next token)")
        self.base = (MaskedLM if self.arch == "encoder" else CausalLM)(cfg)
        self.sums = self.base.sums
        self._teacher = None
        self.cosine = None  # whether the widths match: known once the teacher is read

    # -- the teacher ---------------------------------------------------------------------------
    def teacher(self, device: torch.device):
        """The frozen teacher on ``device`` (loaded once)."""
        from .distill import load_teacher

        if self._teacher is None:
            self._teacher = load_teacher(self.cfg.distill.teacher, device)
            self.cosine = self._teacher.cfg.d_model == self.cfg.model.d_model
        return self._teacher.to(device)

    def prepare(self, model, device, initialise: bool, sharded: bool = False) -> str:
        from .distill import init_student

        teacher = self.teacher(device)
        d = self.cfg.distill
        note = (f"teacher {d.teacher} ({teacher.cfg.n_layer} x {teacher.cfg.d_model}); T={d.temperature:g}, "
                f"weights ce {d.ce_weight:g} / {'mlm' if self.arch == 'encoder' else 'clm'} {d.lm_weight:g} / "
                f"cos {d.cos_weight if self.cosine else 0:g}"
                f"{'' if self.cosine or not d.cos_weight else ' (off: the widths differ)'}")
        if initialise:
            note += "; " + init_student(model, teacher, sharded)
        return note

    # -- data ----------------------------------------------------------------------------------
    def builder(self, split, seq_len, seed):
        return self.base.builder(split, seq_len, seed)

    def batches(self, split, seq_len=None, seed=None):
        from .distill import check_teacher

        check_teacher(self.cfg, split.manifest["tokenizer"].get("hash"))  # before the run folder is written
        return super().batches(split, seq_len, seed)

    def as_batch(self, pair):
        return self.base.as_batch(pair)

    # -- loss ----------------------------------------------------------------------------------
    def soft_positions(self, batch: dict) -> torch.Tensor:
        """Boolean [B, T]: where the soft targets are compared."""
        labels = batch["labels"]
        if self.arch == "decoder" or self.cfg.distill.masked_only:
            return labels != IGNORE
        mask = batch.get("attention_mask")
        return torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()

    def count(self, batch):
        return self.soft_positions(batch).sum().double()

    def terms(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """The three losses, unweighted: ``ce`` (soft targets, times T^2), ``lm`` and ``cos``."""
        ids, labels = batch["input_ids"], batch["labels"]
        extras = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
        teacher = self.teacher(ids.device)
        with torch.no_grad():
            h_t = teacher.hidden_states(ids, **extras)
        h_s = model.hidden_states(ids, **extras)
        soft = self.soft_positions(batch)
        z_s = model.head(h_s[soft]).float()
        y = labels[soft]  # the labelled positions are among the soft ones
        picked = y != IGNORE
        out = {"lm": cross_entropy(z_s[picked], y[picked])}
        T = self.cfg.distill.temperature
        with torch.no_grad():  # KL(p_t || p_s) = sum p_t log p_t - sum p_t log p_s: the first term is fixed
            z_t = teacher.head(h_t[soft]).float() / T
            p_t = torch.softmax(z_t, dim=-1)
            neg_entropy = (p_t * torch.log_softmax(z_t, dim=-1)).sum(-1).mean()
        soft_ce = torch.nn.functional.cross_entropy(z_s / T, p_t)  # - mean sum p_t log softmax(z_s / T)
        out["ce"] = (soft_ce + neg_entropy) * T * T
        if self.cosine:
            tokens = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(soft)
            cos = torch.nn.functional.cosine_similarity(h_s[tokens].float(), h_t[tokens].float(), dim=-1)
            out["cos"] = (1 - cos).mean()
        return out

    def loss(self, model, batch):
        d = self.cfg.distill
        t = self.terms(model, batch)
        loss = d.ce_weight * t["ce"] + d.lm_weight * t["lm"]
        return loss + d.cos_weight * t["cos"] if "cos" in t else loss

    # -- evaluation: the student's own objective -----------------------------------------------
    def eval_sums(self, model, batch):
        return self.base.eval_sums(model, batch)

    def metrics(self, sums):
        return self.base.metrics(sums)


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


from . import image_objectives  # noqa: E402,F401 - registers mae and classify (images, arch=vit)
from . import gato_objective  # noqa: E402,F401 - registers gato (text, image patches and values in one stream)
