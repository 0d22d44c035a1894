"""``pretrainer finetune FROM --task image-classification --data IMAGES``: a ViT classifier trained on
a folder from ``pretrainer prepare --images``, evaluated on its val split after every epoch.

Image batches take their own path: the run is a pretraining run of ``objective=classify``
(:mod:`pretrainer.train.image_objectives`) through the one training loop, so it checkpoints, resumes
exactly and loads (``pretrainer.load``, ``pretrainer export`` -> ``ViTForImageClassification``)
like any run. ``FROM`` is

- an MAE or ViT run (or one of its checkpoints), or a Hugging Face ViT / ViTMAE folder: its
  weights (``init_from``); a classifier with another number of classes, or none, starts fresh;
- a preset name (``vit-tiny``) with ``from_scratch``: random weights. A folder with ``from_scratch``
  keeps its architecture and draws fresh weights, so the two runs differ in nothing but the start.

Of the fine-tuning options, these apply: ``epochs``, ``batch_size``, ``lr``, ``warmup``,
``weight_decay``, ``seed``, ``device``, ``from_scratch``, ``quiet``, ``log_every``, ``loggers``; the
optimiser is the text tasks' (AdamW, betas 0.9 / 0.999, linear warmup then linear decay to zero,
clipping at 1). The model kept is the last epoch's (each epoch's validation accuracy is in
``metrics.jsonl``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..config import PRESETS, FinetuneConfig, RunConfig, model_preset
from ..errors import ConfigError
from .tasks import TASKS, Task

TASK = "image-classification"


class ImageClassificationTask(Task):
    """Registered as ``image-classification`` in :data:`~pretrainer.finetune.tasks.TASKS`; the runner
    hands the whole run to :func:`finetune_images` (``run``) instead of its text loop."""

    name = TASK
    main_metric = "accuracy"

    @staticmethod
    def run(source, train, out, eval=None, resume=False, stop_at=None, **options) -> dict:
        return finetune_images(source, train, out, eval=eval, resume=resume, stop_at=stop_at, **options)


TASKS[TASK] = ImageClassificationTask


def image_run_config(source: str, data: str, out: str, opts: FinetuneConfig) -> RunConfig:
    """The run config of an image-classification fine-tuning (see the module doc)."""
    from ..data.images import load_image_manifest
    from ..train.trainer import initial_model_config

    manifest = load_image_manifest(data)
    cfg = RunConfig(data=str(data), out=str(out), objective="classify")
    if Path(source).exists():
        if opts.from_scratch:
            cfg.model = initial_model_config(source)
        else:
            cfg.init_from = str(source)
    elif source in PRESETS:
        if not opts.from_scratch:
            raise ConfigError(f"FROM '{source}' is a preset name: nothing pretrained to start from (weights are "
                              f"never downloaded); pass --from-scratch, or an MAE/ViT run or Hugging Face folder")
        cfg.model = model_preset(source)
    else:
        raise ConfigError(f"FROM '{source}': not a run folder, a Hugging Face folder or a preset name")
    n_train, n_val = manifest["splits"]["train"]["count"], manifest["splits"]["val"]["count"]
    steps_per_epoch = math.ceil(n_train / opts.batch_size)
    total = steps_per_epoch * opts.epochs
    t = cfg.train
    t.max_steps, t.batch_size, t.lr, t.weight_decay = total, opts.batch_size, opts.lr, opts.weight_decay
    t.warmup_steps, t.schedule, t.min_lr_ratio, t.beta2 = int(opts.warmup * total), "linear", 0.0, 0.999
    t.seed, t.device, t.loggers = opts.seed, opts.device, opts.loggers
    t.eval_every = t.checkpoint_every = steps_per_epoch
    t.eval_batches = max(1, math.ceil(n_val / opts.batch_size))
    t.log_every = opts.log_every or max(1, steps_per_epoch // 5)
    t.keep_checkpoints = 1
    return cfg


def finetune_images(source: str, data: str, out: str, eval: str | None = None, resume: bool = False,
                    stop_at: int | None = None, **options) -> dict:
    """Fine-tune ``source`` on the images of ``data`` (see the module doc); returns the last
    epoch's ``accuracy`` and ``eval_loss`` with ``epoch``, ``run`` and a few counts."""
    from ..train.trainer import read_metrics, resume_config, train

    opts = FinetuneConfig(**options)
    opts.validate()
    if opts.pooling != "cls":
        raise ConfigError(f"--pooling {opts.pooling}: image-classification reads the ViT's pooled <cls> state; "
                          f"--pooling applies to text classification and regression")
    if eval is not None and str(eval) != str(data):
        raise ConfigError(f"--eval {eval}: image-classification evaluates on the val split of --data {data} "
                          f"(prepare --images with --val-fraction)")
    started = time.perf_counter()
    cfg = resume_config(out) if resume else image_run_config(source, data, out, opts)
    result = train(cfg, resume=resume, stop_at=stop_at, quiet=opts.quiet)
    run = Path(out)
    steps_per_epoch = cfg.train.eval_every
    if result.get("preempted") or result["step"] < cfg.train.max_steps:
        return {"run": str(run), "task": TASK, "stopped_at_step": result["step"],
                "epoch": result["step"] // steps_per_epoch + 1, "preempted": bool(result.get("preempted"))}
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "val_accuracy" in r and r["step"] > 0]
    last = evals[-1] if evals else {}
    manifest = json.loads((Path(cfg.data) / "manifest.json").read_text())
    return {"accuracy": last.get("val_accuracy"), "eval_loss": last.get("val_loss"), "run": str(run), "task": TASK,
            "epoch": result["step"] // steps_per_epoch, "epochs_run": result["step"] // steps_per_epoch,
            "steps": result["step"], "train_examples": manifest["splits"]["train"]["count"],
            "eval_examples": manifest["splits"]["val"]["count"], "selected_by": "last epoch",
            "seconds": round(time.perf_counter() - started, 1)}


def is_image_run(path: str | Path, objectives: tuple[str, ...] = ("classify",)) -> bool:
    """Whether ``path`` is a run of objective=classify on images (resumed by the trainer), or of one
    of ``objectives``."""
    try:
        import yaml

        raw = yaml.safe_load((Path(path) / "config.yaml").read_text()) or {}
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("objective") in objectives


# ----------------------------------------------------------------------------------------------
# Predictions of a fine-tuned image classifier (pretrainer predict RUN --input IMAGES)


def read_image_files(folder: str | Path, size: int, channels: int) -> tuple[list[Path], "torch.Tensor"]:
    """``(files, uint8 [n, C, size, size])``: every .png/.jpg/.jpeg under ``folder`` (sub-folders
    included, in path order), as ``channels`` channels (grey or RGB), resized to ``size`` x ``size``
    (bilinear) where they differ."""
    import numpy as np
    import torch

    from ..data.images import SUFFIXES
    from ..errors import DataError, PretrainerError

    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise PretrainerError("predicting for image files reads them with Pillow: pip install 'pretrainer[images]'") from None
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"--input {root}: no .png/.jpg/.jpeg images (expected a folder of images, or a folder "
                        f"from pretrainer prepare --images)")
    arrays = []
    for path in files:
        try:
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if img.size != (size, size):
                    img = img.resize((size, size), Image.Resampling.BILINEAR)
                a = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{path}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return files, torch.from_numpy(np.stack(arrays))


def predict_images(run: str | Path, input_path: str | Path, out: str | Path, device: str = "cpu",
                   batch_size: int = 256) -> dict:
    """One JSON line per image to ``out``: ``{"index", "file" (or "split"), "label", "probs"}`` from
    the classifier of an image-classification run. ``input_path``: a folder of images (any size:
    resized to the model's) or a folder from ``pretrainer prepare --images`` (its val split)."""
    import numpy as np
    import torch

    from .. import load
    from ..data.images import ImageSplit, is_image_folder, run_class_names, to_pixels
    from ..errors import CheckpointError, storage, write_atomic

    model = load(run, device=device)
    if getattr(model, "head", None) is None:
        raise CheckpointError(f"{run}: an image run without a classifier (an MAE encoder); fine-tune it first: "
                              f"pretrainer finetune {run} --task image-classification --data DIR --out RUN")
    cfg = model.cfg
    if is_image_folder(input_path):
        split = ImageSplit(input_path, "val")
        if split.shape != (cfg.channels, cfg.image_size, cfg.image_size):
            raise CheckpointError(f"{input_path}: images of {' x '.join(map(str, split.shape))}, but {run} reads "
                                  f"{cfg.channels} x {cfg.image_size} x {cfg.image_size}")
        images, names = torch.from_numpy(np.array(split.images)), [{"split": "val"}] * split.count
    else:
        files, images = read_image_files(input_path, cfg.image_size, cfg.channels)
        names = [{"file": str(f)} for f in files]
    classes = run_class_names(run) or [str(i) for i in range(cfg.n_classes)]
    rows = []
    with torch.no_grad():
        for first in range(0, len(images), batch_size):
            probs = model(to_pixels(images[first:first + batch_size]).to(device)).logits.float().softmax(-1).cpu()
            for i, p in enumerate(probs.tolist(), start=first):
                best = max(range(len(p)), key=p.__getitem__)
                rows.append({"index": i, **names[i], "label": classes[best],
                             "probs": {name: round(x, 5) for name, x in zip(classes, p)}})
    out = Path(out)
    with storage(out.parent, "create the folder"):
        out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"run": str(run), "input": str(input_path), "out": str(out), "predictions": len(rows)}
