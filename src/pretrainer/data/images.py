"""Images as data: a labelled image folder (or scikit-learn's 8 x 8 digits) as memory-mapped uint8
arrays and a manifest, and the seekable batches ViT objectives train on.

``prepare_images(source, out)`` reads

- ``builtin:digits``: scikit-learn's bundled handwritten digits (1,797 grey 8 x 8 images, values
  0-16 scaled to 0-255, classes ``0`` to ``9``; offline, sklearn ships them);
- a folder ``DIR/CLASS/*.png|jpg|jpeg``: one sub-folder per class, named as the label (read with
  Pillow: ``pip install 'pretrainer[images]'``). Every image must have the size of the first unless
  ``image_size`` is given (each is then resized to ``image_size`` x ``image_size``, bilinear), and
  the folder is grey (1 channel) when every image is, else RGB (3).

Layout of the output folder (the same contract as token shards: built under a temporary name, the
manifest written last, the whole renamed into place; a previous output is replaced)::

    out/
      manifest.json       {"format": "pretrainer-images", "version": 1, "dtype": "uint8",
                           "layout": "NCHW", "image_size": [H, W], "channels": C,
                           "classes": ["0", "1", ...], "splits": {"train": {"images": "train_images.bin",
                           "labels": "train_labels.bin", "count": n}, "val": {...}},
                           "sources": [...], "val_fraction": 0.1, "seed": 1337, "created": "..."}
      train_images.bin    uint8 [n, C, H, W]
      train_labels.bin    little-endian int32 [n]: indices into "classes"
      val_images.bin, val_labels.bin

The validation split is ``round(n * val_fraction)`` images drawn by a seeded permutation (at least
one, when ``val_fraction`` > 0). Training visits the train split epoch by epoch in a seeded random
order, so the g-th sample depends only on (seed, g): resuming is a seek (:class:`ImageBatches`).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, PretrainerError, os_error_of, storage, storage_error

FORMAT, VERSION = "pretrainer-images", 1
SUFFIXES = (".png", ".jpg", ".jpeg")
BUILTIN = ("builtin:digits",)


# ----------------------------------------------------------------------------------------------
# Reading the source


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [n, 1, 8, 8]
    return images, d.target.astype(np.int32), [str(c) for c in d.target_names]


def _grey(mode: str) -> bool:
    return mode in ("1", "L", "LA", "I", "I;16", "F")


def _folder(root: Path, image_size: int | None, log) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise PretrainerError("--images DIR reads images with Pillow: pip install 'pretrainer[images]'") from None
    if not root.is_dir():
        raise DataError(f"--images {root}: no such folder (expected DIR/CLASS/*.png, or builtin:digits)")
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if loose:
        raise DataError(f"{loose[0]}: an image without a label; labels are the names of sub-folders "
                        f"(DIR/CLASS/image.png), and {root} has {len(loose)} image(s) directly in it")
    classes, files = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not found:
            log(f"warning: {sub}: no .png/.jpg/.jpeg images; not a class")
            continue
        files += [(f, len(classes)) for f in found]
        classes.append(sub.name)
    if not files:
        raise DataError(f"{root}: no labelled images (expected DIR/CLASS/*.png|jpg|jpeg, one sub-folder per class)")
    if len(classes) < 2:
        log(f"warning: {root}: one class only ({classes[0]})")
    first_size, arrays, labels, grey = None, [], [], True
    for path, label in files:
        try:
            with Image.open(path) as img:
                img.load()
                size, mode = img.size, img.mode
                grey = grey and _grey(mode)
                img = img.convert("RGB")
                if image_size is not None and size != (image_size, image_size):
                    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
                elif image_size is None:
                    first_size = first_size or (path, size)
                    if size != first_size[1]:
                        raise DataError(f"{path}: {size[0]} x {size[1]} pixels, but {first_size[0]} is "
                                        f"{first_size[1][0]} x {first_size[1][1]}; pass --image-size N to "
                                        f"resize every image to N x N")
                arrays.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # [3, H, W]
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{path}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        labels.append(label)
    images = np.stack(arrays)
    if grey:  # every image grey: keep one channel (the three are equal)
        images = images[:, :1]
    h, w = images.shape[2:]
    if h != w:
        raise DataError(f"{files[0][0]}: {w} x {h} pixels; a ViT reads square images: pass --image-size N")
    return np.ascontiguousarray(images), np.array(labels, dtype=np.int32), classes


def split_indices(n: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """``{"train", "val"}``: the sorted indices of each split of ``n`` images, the validation images
    ``round(n * val_fraction)`` of a seeded permutation (at least one when ``val_fraction`` > 0)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 else 0
    return {"val": np.sort(perm[:n_val]), "train": np.sort(perm[n_val:])}


def prepare_images(source: str, out: str | Path, *, image_size: int | None = None, val_fraction: float = 0.1,
                   seed: int = 1337, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the images of ``source`` (a folder of class sub-folders, or ``builtin:digits``) to
    ``out`` (see the module doc); returns the manifest."""
    from .prepare import _check_out, _move_into_place

    log = (lambda s: print(f"prepare: {s}", file=sys.stderr, flush=True)) if progress else (lambda s: None)
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: expected a number in [0, 1)")
    if image_size is not None and image_size < 1:
        raise DataError(f"--image-size {image_size}: expected a positive number of pixels")
    out = Path(out)
    _check_out(out, [source], overwrite)
    if source.startswith("builtin:"):
        if source not in BUILTIN:
            raise DataError(f"--images {source}: unknown built-in image set; expected {', '.join(BUILTIN)} or a folder")
        images, labels, classes = _digits()
        if image_size is not None and image_size != images.shape[-1]:
            raise DataError(f"--images {source}: its images are {images.shape[-1]} x {images.shape[-1]}; "
                            f"--image-size applies to folders")
    else:
        images, labels, classes = _folder(Path(source), image_size, log)
    n = len(images)
    splits = split_indices(n, val_fraction, seed)
    with storage(out, "write the data folder"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-prepare-", dir=out.parent))
    try:
        summary = {}
        for name in ("train", "val"):
            idx = splits[name]
            images[idx].tofile(tmp / f"{name}_images.bin")
            labels[idx].astype("<i4").tofile(tmp / f"{name}_labels.bin")
            summary[name] = {"images": f"{name}_images.bin", "labels": f"{name}_labels.bin", "count": int(len(idx))}
        manifest = {"format": FORMAT, "version": VERSION, "dtype": "uint8", "layout": "NCHW",
                    "image_size": [int(images.shape[2]), int(images.shape[3])], "channels": int(images.shape[1]),
                    "classes": classes, "splits": summary, "sources": [source], "val_fraction": val_fraction,
                    "seed": seed, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        _move_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = os_error_of(e) if isinstance(e, Exception) and not isinstance(e, PretrainerError) else None
        if err is not None:
            raise storage_error(err, out, "write the data folder") from e
        raise
    log(f"{n:,} images of {manifest['channels']} x {images.shape[2]} x {images.shape[3]}, {len(classes)} classes: "
        f"train {summary['train']['count']:,}, val {summary['val']['count']:,}")
    return manifest


# ----------------------------------------------------------------------------------------------
# Reading a prepared folder


def is_image_folder(data_dir: str | Path) -> bool:
    try:
        return json.loads((Path(data_dir) / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_image_manifest(data_dir: str | Path) -> dict:
    """``data_dir/manifest.json`` of an image folder, checked: the format, and every array file's size."""
    data_dir = Path(data_dir)
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise DataError(f"data folder '{data_dir}': no manifest.json (prepare it first: pretrainer prepare --images)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise DataError(f"{path}: not a pretrainer image folder (expected \"format\": \"{FORMAT}\", version {VERSION})")
        h, w = m["image_size"]
        per_image = m["channels"] * h * w
        for name in ("train", "val"):
            s = m["splits"][name]
            for key, size in (("images", per_image), ("labels", 4)):
                file = data_dir / s[key]
                if not file.is_file() or file.stat().st_size != s["count"] * size:
                    raise DataError(f"{file}: missing or not {s['count']} x {size} bytes")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: malformed image manifest ({type(e).__name__}: {e})") from None
    return m


class ImageSplit:
    """One split of an image folder: ``images`` uint8 [n, C, H, W] and ``labels`` int32 [n], memory-mapped.

    ``len()`` is counted in positions, as a token split's is in tokens: images x
    ``tokens_per_image`` (a ViT's patches + <cls>, set by the trainer), so that the trainer's
    tokens-per-step arithmetic holds for images too; ``count`` is the number of images."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.dir, self.split = Path(data_dir), split
        self.manifest = load_image_manifest(self.dir)
        s = self.manifest["splits"].get(split)
        if s is None:
            raise DataError(f"{self.dir / 'manifest.json'}: no split '{split}'")
        h, w = self.manifest["image_size"]
        self.shape = (self.manifest["channels"], h, w)
        self.count = s["count"]
        self.images = np.memmap(self.dir / s["images"], dtype=np.uint8, mode="r", shape=(self.count, *self.shape)) \
            if self.count else np.zeros((0, *self.shape), np.uint8)
        self.labels = np.fromfile(self.dir / s["labels"], dtype="<i4") if self.count else np.zeros(0, np.int32)
        self.tokens_per_image = 1

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    def __len__(self) -> int:
        return self.count * self.tokens_per_image

    def read(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixels float [k, C, H, W] in [-1, 1], labels long [k])`` of the images at ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        return to_pixels(torch.from_numpy(np.array(self.images[idx]))), torch.from_numpy(self.labels[idx].astype(np.int64))


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to the floats a ViT reads: ``x / 127.5 - 1``, in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def open_split(data_dir: str | Path, split: str, tokens_per_image: int | None = None):
    """The split of a prepared folder: an :class:`ImageSplit` for images, else a token split."""
    if is_image_folder(data_dir):
        s = ImageSplit(data_dir, split)
        s.tokens_per_image = tokens_per_image or 1
        return s
    from .tokens import TokenSplit

    return TokenSplit(data_dir, split)


class ImageOrder:
    """Sample g -> image index: a seeded permutation of the split per epoch."""

    def __init__(self, n: int, seed: int, where: str = "data"):
        if n < 1:
            raise DataError(f"{where}: no images to train on")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def index(self, sample: int) -> int:
        epoch = sample // self.n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g).numpy(), epoch
        return int(self._perm[sample % self.n])


def sample_noise(seed: int, sample: int, n: int) -> torch.Tensor:
    """``n`` uniform numbers drawn for sample ``sample`` alone: MAE's mask of that sample."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + sample + 7_919))


class ImageBatches:
    """Batches of ``{"pixel_values", "labels"}`` (and with ``noise_patches`` = N, ``"noise"`` [B, N]:
    uniform numbers a per-sample generator draws, from which the MAE mask follows): ``batch(first,
    count)`` is samples ``first .. first+count-1`` of the seeded order, a pure function of them."""

    def __init__(self, split: ImageSplit, seed: int, noise_patches: int = 0):
        self.split, self.seed, self.noise_patches = split, seed, noise_patches
        self.order = ImageOrder(split.count, seed, f"{split.dir} ({split.split} split)")

    def _batch(self, indices, samples, seed) -> dict:
        pixels, labels = self.split.read(indices)
        batch = {"pixel_values": pixels, "labels": labels}
        if self.noise_patches:
            batch["noise"] = torch.stack([sample_noise(seed, g, self.noise_patches) for g in samples])
        return batch

    def batch(self, first: int, count: int) -> dict:
        samples = range(first, first + count)
        return self._batch([self.order.index(g) for g in samples], samples, self.seed)

    def eval_batches(self, batch_size: int, max_batches: int):
        """The first ``batch_size * max_batches`` images of the split in order, masks from seed 0."""
        total = min(self.split.count, batch_size * max_batches)
        if total < 1:
            raise DataError(f"{self.split.dir}: split '{self.split.split}' has no images")
        for first in range(0, total, batch_size):
            idx = list(range(first, min(first + batch_size, total)))
            yield self._batch(idx, idx, 0)


def run_class_names(run: str | Path) -> list[str] | None:
    """The class names of an image run's data (its ``config.yaml``'s ``data`` folder), or None when
    that folder is gone or holds no images."""
    import yaml

    for folder in (Path(run), Path(run).parent.parent):  # a run, or one of its checkpoints
        try:
            data = (yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("data")
        except (OSError, ValueError, AttributeError):
            continue
        if data and is_image_folder(data):
            return json.loads((Path(data) / "manifest.json").read_text()).get("classes")
    return None
