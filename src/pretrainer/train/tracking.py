"""Experiment tracking: the scalars of ``metrics.jsonl`` also sent to TensorBoard and Weights &
Biases (``train.loggers``; fine-tuning: ``--loggers``).

``metrics.jsonl`` is always written (it is what resume, sweeps and plots read); the other loggers
receive every numeric value of every line under the same name (``loss``, ``lr``, ``tokens_per_s``,
``val_loss``, ``moe_load_max`` ...) at the line's ``step``, so a curve in TensorBoard is the column
of ``metrics.jsonl``. TensorBoard's event files go to ``RUN/tensorboard``; a resumed run purges the
events logged after the checkpoint it restarts from, as it truncates ``metrics.jsonl``. W&B runs
offline by default (``WANDB_MODE`` overrides it; ``wandb sync RUN/wandb/...`` uploads later), keeps
its files in ``RUN/wandb`` and resumes the same W&B run (its id is kept in ``RUN/wandb_id``).
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

from ..errors import ConfigError

#: What ``train.loggers`` may name (``jsonl`` is always on).
LOGGERS = ("jsonl", "tensorboard", "wandb")


def parse_loggers(text: str, where: str = "train.loggers") -> list[str]:
    """``"jsonl,tensorboard"`` -> ``["jsonl", "tensorboard"]``; an unknown name is a ConfigError."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    for n in names:
        if n not in LOGGERS:
            raise ConfigError(f"{where}={text!r}: unknown logger '{n}'; expected a comma-separated list of "
                              f"{', '.join(LOGGERS)}")
    return ["jsonl"] + [n for n in dict.fromkeys(names) if n != "jsonl"]


def check_installed(names: list[str], where: str = "train.loggers") -> None:
    """A one-line error, before training starts, for a logger whose package is missing."""
    for name, module, extra in (("tensorboard", "tensorboard", "tensorboard"), ("wandb", "wandb", "wandb")):
        if name in names:
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(f"{where} names {name}, which is not installed; pip install "
                                  f"'pretrainer[{extra}]' (or {module})") from None


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a metrics line, ``step`` and ``epoch`` aside."""
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class Trackers:
    """The loggers beside ``metrics.jsonl`` for one run folder (the first process only)."""

    def __init__(self, run: Path, names: list[str], config: dict | None = None, resume_step: int | None = None,
                 enabled: bool = True):
        self.writers = []
        self._last: dict[str, tuple[int, float]] = {}
        if not enabled:
            return
        run = Path(run)
        check_installed(names)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at and after it (logged past the checkpoint we restart from) are dropped
            tb = SummaryWriter(log_dir=str(run / "tensorboard"),
                               purge_step=None if resume_step is None else resume_step + 1)
            self.writers.append(_TensorBoard(tb))
        if "wandb" in names:
            self.writers.append(_WandB(run, config or {}, resumed=resume_step is not None))

    def log(self, record: dict) -> None:
        if "step" not in record:
            return
        step = int(record["step"])
        # a value a line repeats at the same step (``tokens`` on a step's train and eval lines) once
        values = {k: v for k, v in scalars(record).items() if self._last.get(k) != (step, v)}
        self._last.update({k: (step, v) for k, v in values.items()})
        if values:
            for w in self.writers:
                w.log(values, step)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.writers = []


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run: Path, config: dict, resumed: bool):
        import wandb

        id_file = run / "wandb_id"
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "pretrainer"), name=run.name, id=run_id,
                              dir=str(run), config=config, resume="allow",
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
