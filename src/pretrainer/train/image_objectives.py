"""The objectives of image runs (``model.arch=vit`` on a folder from ``pretrainer prepare --images``),
registered beside the text ones (:mod:`.objectives`): the same trainer, checkpoints and exact resume.

- ``mae`` (He et al. 2022): each image's patches masked at random (``mae.mask_ratio``, 75 %), the
  ViT encodes the visible ones, a light decoder reconstructs the pixels, the loss is on the hidden
  patches only (:class:`pretrainer.model.vit.MAEPretraining`). The mask of sample g is drawn by a
  generator seeded with (seed, g), so a batch is a pure function of its sample indices.
- ``classify``: supervised image classification, cross-entropy of the ViT's classifier on the
  ``<cls>`` state (``model.n_classes``: the data's classes); ``val_accuracy``. This is what
  ``pretrainer finetune ... --task image-classification`` trains.

Image runs count "tokens" as positions: ``train.seq_len`` is set to the model's patches + ``<cls>``.
"""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..errors import ConfigError
from ..model.loss import cross_entropy
from .objectives import OBJECTIVES, Objective, register


class ImageObjective(Objective):
    archs = ("vit",)
    perplexity = False  # an MSE (mae) or a classifier's cross-entropy (classify)
    noise = False  # batches carry MAE's per-sample noise
    reads_labels = False  # trains the classifier: model.n_classes is taken from the data's classes

    def builder(self, split, seq_len, seed):
        from ..data.images import ImageBatches, ImageSplit

        if not isinstance(split, ImageSplit):
            raise ConfigError(f"objective={self.name} trains on images; data={split.dir} holds token shards "
                              f"(prepare images with: pretrainer prepare --images DIR --out DATA)")
        return ImageBatches(split, seed, self.cfg.model.n_patches if self.noise else 0)

    def as_batch(self, batch):
        return batch

    def count(self, batch):
        return torch.tensor(float(len(batch["labels"])), dtype=torch.float64, device=batch["labels"].device)


@register
class MaskedAutoencoder(ImageObjective):
    name = "mae"
    noise = True
    wraps = True
    options = ("mae",)
    about = ("masked autoencoder (He et al. 2022): 75 % of each image's patches hidden, the ViT encodes the "
             "rest, a light decoder reconstructs the hidden patches' normalised pixels (MSE on them only)")

    def wrap(self, model):
        from ..model.vit import MAEPretraining

        return MAEPretraining(model, self.cfg.mae)

    def n_masked(self) -> int:
        n = self.cfg.model.n_patches
        return n - int(n * (1 - self.cfg.mae.mask_ratio))

    def extra_flops_per_token(self, seq_len):
        from ..model.vit import decoder_config

        dec = decoder_config(self.cfg.model, self.cfg.mae)
        per_block = 2 * 4 * dec.d_model ** 2 + 2 * 2 * dec.d_model * dec.ff_dim  # attention + MLP matrices
        return 6 * dec.n_layer * per_block + 12 * dec.n_layer * seq_len * dec.d_model

    def loss(self, model, batch):
        if self.n_masked() < 1:
            raise ConfigError(f"mae.mask_ratio={self.cfg.mae.mask_ratio} hides no patch of {self.cfg.model.n_patches}")
        return model.loss(batch["pixel_values"], batch["noise"])

    def count(self, batch):  # the loss is a mean over the hidden patches
        n = len(batch["labels"]) * self.n_masked()
        return torch.tensor(float(n), dtype=torch.float64, device=batch["labels"].device)

    def eval_sums(self, model, batch):
        n = self.count(batch)
        return {"loss": self.loss(model, batch).double() * n, "count": n}


@register
class ImageClassification(ImageObjective):
    name = "classify"
    reads_labels = True
    sums = ("correct", "count", "loss")
    about = "image classification: cross-entropy of the ViT's classifier on the <cls> state (model.n_classes)"

    def logits(self, model, batch):
        if model.head is None:
            raise ConfigError("objective=classify needs a classifier: model.n_classes > 0 (the data's classes)")
        return model(batch["pixel_values"]).logits

    def loss(self, model, batch):
        return cross_entropy(self.logits(model, batch), batch["labels"])

    def eval_sums(self, model, batch):
        logits, y = self.logits(model, batch), batch["labels"]
        n = self.count(batch)
        return {"loss": cross_entropy(logits, y).double() * n, "count": n,
                "correct": (logits.argmax(-1) == y).sum().double()}

    def metrics(self, sums):
        return {**super().metrics(sums), "val_accuracy": sums["correct"] / max(sums["count"], 1.0)}


def fit_model_to_images(cfg: RunConfig, split) -> None:
    """What an image run takes from its data: the model's image size and channels (when unset; a
    mismatch is refused), the classifier's outputs (objective=classify: the data's classes), and
    ``train.seq_len`` = patches + <cls> (positions per image: what the run counts as tokens)."""
    m, where = cfg.model, split.dir / "manifest.json"
    if m.arch != "vit":
        raise ConfigError(f"data={cfg.data} holds images; model.arch={m.arch} reads tokens (use a ViT: model=vit-tiny)")
    h, w = split.manifest["image_size"]
    if h != w:
        raise ConfigError(f"{where}: {w} x {h} images; a ViT reads square ones (prepare with --image-size N)")
    for name, have in (("image_size", h), ("channels", split.manifest["channels"])):
        if getattr(m, name) is None:
            setattr(m, name, have)
        elif getattr(m, name) != have:
            raise ConfigError(f"model.{name}={getattr(m, name)}, but {where} has {have}; set model.{name}={have} "
                              f"or prepare the images to fit (--image-size)")
    if getattr(OBJECTIVES.get(cfg.objective), "reads_labels", False):  # the classifier fits the data's classes
        m.n_classes = len(split.classes)
    cfg.train.seq_len = m.n_patches + 1 if m.image_size % m.patch_size == 0 else cfg.train.seq_len
    split.tokens_per_image = cfg.train.seq_len
