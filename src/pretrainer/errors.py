"""User-facing errors.

A :class:`PretrainerError` carries a one-line message meant for the person at the terminal: the CLI
prints it without a traceback (unless ``--debug``) and exits non-zero. Library callers can catch it.
"""


class PretrainerError(Exception):
    """Bad input or a state the user can fix; the message is one line and names what was expected."""


class ConfigError(PretrainerError):
    """A configuration key or value is wrong."""


class DataError(PretrainerError):
    """A corpus, data folder or task file is missing or malformed."""


class CheckpointError(PretrainerError):
    """A checkpoint is missing, truncated or does not match the model."""


class KernelWarning(UserWarning):
    """The fused CPU kernels (pretrainer.kernels) could not be built or loaded; PyTorch ops are
    used instead."""
