"""Gato-style serialisation (Reed et al. 2022, "A Generalist Agent", section 2.1): text, images and
continuous values as one flat sequence that a decoder-only model reads, and the small built-in
mixture of tasks that ``objective=gato`` trains on (a demonstration at CPU scale, not Gato).

Tokens, with V the size of the data's text vocabulary (:class:`Layout`)::

    [0, V)             text: the data's tokenizer
    [V, V + 1024)      continuous values: mu-law companded (mu = 100, M = 256), clipped to [-1, 1]
                       and cut into 1024 uniform bins, as Gato discretises them (:func:`discretise`)
    V + 1024           "|": Gato's separator between an observation and its action (here also
                       between an image and its caption)
    V + 1025           the place of an image patch: its input vector is the patch's embedding, not
                       a token's (:class:`pretrainer.model.gato.GatoModel`); never a target

so the model's vocabulary is V + 1026 (:data:`EXTRA`).

The tasks, one row of a batch each, in turn (row g is task ``tasks[g % k]``, the j = g // k-th
of its kind):

- ``caption``: scikit-learn's 8 x 8 digits (the train / val split that ``prepare --images
  builtin:digits`` makes), each as its patches (row by row, pixels scaled to [-1, 1] and divided by
  the square root of the patch size, as Gato's), ``|``, the caption "a digit seven" and the
  end-of-text token; as many whole examples as fit in a row, then padding. The loss is on the
  caption's tokens.
- ``text``: windows of the data's token stream, as ``clm`` reads them; the loss on every token.
- ``control``: a pendulum driven towards rest by a PD controller (:func:`pendulum`), from a seeded
  start: per time step the observation (angle, angular velocity), ``|``, the action (the torque).
  The loss is on the action only, as Gato's is on actions.

A row is a pure function of (seed, sample index), so resuming is a seek. Validation rows come from
the val split of the text and the images, and from other episodes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..common import IGNORE
from ..errors import ConfigError, DataError
from .images import ImageOrder, split_indices, to_pixels
from .tokens import TokenSplit, WindowOrder

MU, M, BINS = 100.0, 256.0, 1024  # Gato's mu-law parameters and number of bins
EXTRA = BINS + 2  # tokens after the text vocabulary: the bins, "|" and the patch place
TASKS = ("caption", "text", "control")
TEXT, PATCH, VALUE, SEPARATOR, PAD = range(5)  # token types
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE = (1, 8, 8)  # the digits: channels, height, width


# ----------------------------------------------------------------------------------------------
# Continuous values as tokens


def mu_law(x: torch.Tensor) -> torch.Tensor:
    """``sgn(x) log(|x| mu + 1) / log(M mu + 1)``: values up to M in size to [-1, 1], finer near 0."""
    return torch.sign(x) * torch.log1p(x.abs() * MU) / math.log(M * MU + 1)


def inverse_mu_law(y: torch.Tensor) -> torch.Tensor:
    return torch.sign(y) * torch.expm1(y.abs() * math.log(M * MU + 1)) / MU


def discretise(x) -> torch.Tensor:
    """The bin (0 .. 1023) of each value: mu-law companded, clipped to [-1, 1], 1024 equal bins."""
    y = mu_law(torch.as_tensor(x, dtype=torch.float64)).clamp(-1.0, 1.0)
    return ((y + 1) / 2 * BINS).floor().long().clamp(0, BINS - 1)


def undiscretise(bins) -> torch.Tensor:
    """The value at the middle of each bin (in companded units), float64."""
    y = (torch.as_tensor(bins, dtype=torch.float64) + 0.5) / BINS * 2 - 1
    return inverse_mu_law(y)


@dataclass(frozen=True)
class Layout:
    """The ids of a stream whose text vocabulary has ``text_vocab`` tokens (see the module doc)."""

    text_vocab: int

    @property
    def sep(self) -> int:
        return self.text_vocab + BINS

    @property
    def patch(self) -> int:
        return self.text_vocab + BINS + 1

    def value(self, x) -> np.ndarray:
        """Token ids of the values ``x``."""
        return discretise(x).numpy() + self.text_vocab


# ----------------------------------------------------------------------------------------------
# One row of a batch


class Stream:
    """A row being laid out: ``length`` positions of token ``ids`` and their ``types``, ``target``
    (whether the loss applies where this token is predicted), an image patch's pixels and its index
    in its image, a value's number in its own units, and the example of the row it belongs to."""

    def __init__(self, length: int, patch_dim: int, pad: int):
        self.ids = np.full(length, pad, np.int64)
        self.types = np.full(length, PAD, np.int64)
        self.target = np.zeros(length, bool)
        self.patches = np.zeros((length, patch_dim), np.float32)
        self.patch_index = np.full(length, -1, np.int64)
        self.values = np.zeros(length, np.float64)
        self.example = np.full(length, -1, np.int64)
        self.n = 0

    @property
    def room(self) -> int:
        return len(self.ids) - self.n

    def put(self, ids, kind: int, target: bool, example: int = -1, patches=None, values=None) -> None:
        ids = np.asarray(ids, np.int64)
        at = slice(self.n, self.n + len(ids))
        self.ids[at], self.types[at], self.target[at], self.example[at] = ids, kind, target, example
        if patches is not None:
            self.patches[at] = patches
            self.patch_index[at] = np.arange(len(ids))
        if values is not None:
            self.values[at] = values
        self.n += len(ids)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The model's inputs (all but the last position) and what each input position predicts
        (the next token where ``target`` holds it, else ``IGNORE``; its value and example)."""
        predicted = self.target[1:]
        return {"input_ids": torch.from_numpy(self.ids[:-1].copy()),
                "labels": torch.from_numpy(np.where(predicted, self.ids[1:], IGNORE)),
                "patches": torch.from_numpy(self.patches[:-1].copy()),
                "patch_index": torch.from_numpy(self.patch_index[:-1].copy()),
                "target_values": torch.from_numpy(np.where(predicted, self.values[1:], 0.0).astype(np.float32)),
                "example": torch.from_numpy(np.where(predicted, self.example[1:], -1))}


def image_patches(image: np.ndarray, patch_size: int) -> np.ndarray:
    """[N, P*P*C] patches of one uint8 image [C, H, W], row by row (ViT's order: :func:`patchify`),
    pixels in [-1, 1] divided by sqrt(P), as Gato normalises them."""
    from ..model.vit import patchify

    pixels = to_pixels(torch.from_numpy(np.ascontiguousarray(image))[None])
    return (patchify(pixels, patch_size)[0] / math.sqrt(patch_size)).numpy()


def put_caption(stream: Stream, image: np.ndarray, caption: list[int], layout: Layout, patch_size: int,
                example: int) -> None:
    """An image's patches, ``|``, then its caption's tokens (the targets)."""
    patches = image_patches(image, patch_size)
    stream.put([layout.patch] * len(patches), PATCH, False, example, patches=patches)
    stream.put([layout.sep], SEPARATOR, False, example)
    stream.put(caption, TEXT, True, example)


def put_control(stream: Stream, theta: np.ndarray, omega: np.ndarray, action: np.ndarray, layout: Layout) -> None:
    """Per time step t: the observation's values (angle, angular velocity), ``|``, the action (the target)."""
    obs, act = layout.value(np.stack([theta, omega], 1)), layout.value(action)
    for t in range(len(action)):
        stream.put(obs[t], VALUE, False, t, values=[theta[t], omega[t]])
        stream.put([layout.sep], SEPARATOR, False, t)
        stream.put([act[t]], VALUE, True, t, values=[action[t]])


# ----------------------------------------------------------------------------------------------
# The control signal: a pendulum under a PD controller

DT, GRAVITY, FRICTION, KP, KD, MAX_TORQUE = 0.01, 9.81, 0.1, 1.0, 0.3, 2.0


def pendulum(steps: int, seed: int, episode: int, split_tag: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(angle, angular velocity, torque)`` over ``steps`` steps of DT = 0.01 s of a unit pendulum
    (``theta'' = -g sin theta - 0.1 theta' + u``, semi-implicit Euler) whose torque is a PD
    controller's, ``u = clip(-theta - 0.3 theta', -2, 2)``, from a start drawn from (seed,
    split_tag, episode): angle in [-1.2, 1.2] rad, velocity in [-2, 2] rad/s. (The step is short
    enough for a small model to learn the torque's course at CPU scale: the torque moves by about
    one bin per step; at 0.05 s a 3 x 48 decoder learnt nothing of it in 400 steps.)"""
    rng = np.random.default_rng([seed, split_tag, episode])
    theta, omega = rng.uniform(-1.2, 1.2), rng.uniform(-2.0, 2.0)
    out = np.zeros((3, steps))
    for t in range(steps):
        u = float(np.clip(-KP * theta - KD * omega, -MAX_TORQUE, MAX_TORQUE))
        out[:, t] = theta, omega, u
        omega += DT * (-GRAVITY * math.sin(theta) - FRICTION * omega + u)
        theta += DT * omega
    return out[0], out[1], out[2]


# ----------------------------------------------------------------------------------------------
# The mixture's batches


@functools.lru_cache(maxsize=1)
def digit_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train", "val"}: (uint8 images [n, 1, 8, 8], labels [n])`` of scikit-learn's digits, split as
    ``pretrainer prepare --images builtin:digits`` splits them (10 %, seed 1337)."""
    from .images import _digits

    images, labels, _ = _digits()
    return {name: (images[idx], labels[idx]) for name, idx in split_indices(len(images), 0.1, 1337).items()}


def parse_tasks(spec: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in spec.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad or len(set(tasks)) != len(tasks):
        raise ConfigError(f"gato.tasks={spec!r}: expected a comma-separated list of distinct tasks among "
                          f"{', '.join(TASKS)}")
    return tasks


class GatoBatches:
    """The mixture's rows (see the module doc): ``batch(first, count)`` is samples ``first ..
    first+count-1``, a pure function of them; ``eval_batches`` the fixed validation rows. A batch is a
    dict: ``input_ids``, ``labels``, ``patches`` [B, T, P*P], ``patch_index`` [B, T] (-1: not a
    patch), ``target_values`` and ``example`` [B, T] (what each predicted position predicts: its
    value in its own units, the example of its row) and ``task`` [B] (an index into :data:`TASKS`)."""

    def __init__(self, split: TokenSplit, seq_len: int, seed: int, tasks: tuple[str, ...], patch_size: int):
        from ..tokenization import load_tokenizer

        self.split, self.seq_len, self.seed, self.tasks = split, seq_len, seed, tasks
        self.patch_size = patch_size
        self.layout = Layout(split.vocab_size)
        where = split.dir / split.manifest["tokenizer"]["path"]
        tok = load_tokenizer(where)
        self.pad = tok.pad_id
        eos = tok.need("eos", "to end each caption (objective=gato)")
        self.captions = []
        for word in WORDS:
            ids = tok.encode(f"a digit {word}")
            if tok.unk_id is not None and tok.unk_id in ids:
                raise DataError(f"{where}: the tokenizer cannot spell the caption 'a digit {word}'; objective=gato "
                                f"captions digits in lower-case English")
            self.captions.append(ids + [eos])
        self.order = WindowOrder(len(split), seq_len, seed)  # text rows (and the split's size checked)
        self.n_patches = (IMAGE[1] // patch_size) * (IMAGE[2] // patch_size)
        self.patch_dim = patch_size * patch_size * IMAGE[0]
        longest = self.n_patches + 1 + max(len(c) for c in self.captions)
        self.per_row = (seq_len + 1) // longest  # captioned images in a row
        self.steps = (seq_len + 1) // 4  # control time steps in a row
        if "caption" in tasks and self.per_row < 1:
            raise ConfigError(f"train.seq_len={seq_len}: too short for one captioned image ({longest} tokens)")
        if "control" in tasks and self.steps < 1:
            raise ConfigError(f"train.seq_len={seq_len}: too short for one control step (4 tokens)")
        self.images = digit_splits()["train" if split.split == "train" else "val"]
        self.image_order = ImageOrder(len(self.images[0]), seed, "builtin:digits")
        self.n_windows = (len(split) - 1) // seq_len  # validation windows

    def stream(self) -> Stream:
        return Stream(self.seq_len + 1, self.patch_dim, self.pad)

    def caption_row(self, image_indices) -> Stream:
        s = self.stream()
        images, labels = self.images
        for example, i in enumerate(image_indices):
            put_caption(s, images[i], self.captions[int(labels[i])], self.layout, self.patch_size, example)
        return s

    def control_row(self, episode: int, split_tag: int) -> Stream:
        s = self.stream()
        put_control(s, *pendulum(self.steps, self.seed if split_tag == 0 else 0, episode, split_tag), self.layout)
        return s

    def text_row(self, start: int) -> Stream:
        s = self.stream()
        s.put(self.split.read(start, self.seq_len + 1), TEXT, True)
        return s

    def _rows(self, rows: list[tuple[str, Stream]]) -> dict[str, torch.Tensor]:
        parts = [s.tensors() for _, s in rows]
        batch = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
        batch["task"] = torch.tensor([TASKS.index(t) for t, _ in rows])
        return batch

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        k, rows = len(self.tasks), []
        for g in range(first, first + count):
            task, j = self.tasks[g % k], g // k
            if task == "caption":
                row = self.caption_row([self.image_order.index(j * self.per_row + i) for i in range(self.per_row)])
            elif task == "control":
                row = self.control_row(j, 0)
            else:
                row = self.text_row(self.order.start(j))
            rows.append((task, row))
        return self._rows(rows)

    def eval_batches(self, batch_size: int, max_batches: int):
        """Fixed validation rows, the tasks in turn: consecutive images of the val digits,
        consecutive windows of the split, validation episodes 0, 1, ..."""
        k, n_images = len(self.tasks), len(self.images[0])
        if self.n_windows < 1:
            raise DataError(f"{self.split.dir}: split '{self.split.split}' has {len(self.split)} tokens, too few "
                            f"for one window of {self.seq_len + 1}")
        total = batch_size * max_batches
        for first in range(0, total, batch_size):
            rows = []
            for e in range(first, first + batch_size):
                task, j = self.tasks[e % k], e // k
                if task == "caption":
                    row = self.caption_row([(j * self.per_row + i) % n_images for i in range(self.per_row)])
                elif task == "control":
                    row = self.control_row(j, 1)
                else:
                    row = self.text_row((j % self.n_windows) * self.seq_len)
                rows.append((task, row))
            yield self._rows(rows)
