"""User-facing errors.

A :class:`PretrainerError` carries a one-line message meant for the person at the terminal: the CLI
prints it without a traceback (unless ``--debug``) and exits with its ``exit_status``. Library
callers can catch it.

The command line's exit statuses: 0 done; 1 an unexpected error (a bug: run with ``--debug``); 2 a
:class:`PretrainerError` (bad input or state, the message says what to change); 3 a
:class:`DivergenceError` (training stopped on a non-finite or spiking loss; the last good
checkpoint is kept); :data:`EXIT_PREEMPTED` (75) a run stopped by SIGTERM or Ctrl-C after saving
a checkpoint, to be continued with ``--resume``; 130 a second Ctrl-C (stopped without a checkpoint).
"""

#: Exit status of a run stopped early by a signal (SIGTERM, as a scheduler preempting it, or Ctrl-C)
#: after saving a resumable checkpoint: BSD's EX_TEMPFAIL, "temporary failure, try again", so a
#: job script can tell "requeue me" from "done" (0) and "failed" (1, 2, 3).
EXIT_PREEMPTED = 75


class PretrainerError(Exception):
    """Bad input or a state the user can fix; the message is one line and names what was expected."""

    exit_status = 2


class ConfigError(PretrainerError):
    """A configuration key or value is wrong."""


class DataError(PretrainerError):
    """A corpus, data folder or task file is missing or malformed."""


class CheckpointError(PretrainerError):
    """A checkpoint is missing, truncated or does not match the model."""


class DivergenceError(PretrainerError):
    """Training diverged: too many steps in a row with a non-finite loss or gradient norm, a loss
    spike (``train.spike_factor``) or non-finite weights; the run stopped with its last good
    checkpoint kept."""

    exit_status = 3


class KernelWarning(UserWarning):
    """The fused CPU kernels (pretrainer.kernels) could not be built or loaded; PyTorch ops are
    used instead."""


def check_out_folder(path, kind: str, markers: tuple[str, ...]) -> None:
    """Refuse, in one line, an output path that is a file, or a folder holding files of something
    else: ``out`` must be absent, empty, or already a ``kind`` folder (one holding any of
    ``markers``), so that nothing foreign is overwritten or mixed in (a data folder, someone's notes)."""
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"out={p}: is a file; expected a folder (absent, empty, or a {kind} folder)")
    if not p.is_dir():
        return
    names = sorted(x.name for x in p.iterdir())
    if names and not any(m in names for m in markers):
        raise ConfigError(f"out={p}: holds other files ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}); "
                          f"expected an empty folder or a {kind} folder")
