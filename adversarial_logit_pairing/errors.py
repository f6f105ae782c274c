"""Errors caused by the user's input rather than by a bug.

Command-line entry points catch :class:`UserError` and print its message as a single
line (no traceback) before exiting with a non-zero status. Library functions raise the
subclasses below; each also derives from the builtin exception a Python caller would
expect (``ValueError`` for bad values, ``FileNotFoundError`` for missing files), so the
library API keeps the original's exception types.
"""


class UserError(Exception):
    """Base class: bad flags, hparams, files or records supplied by the user."""


class ConfigError(UserError, ValueError):
    """A flag, hparam, model name, dataset name or attack description is invalid."""


class DataError(UserError, ValueError):
    """An input file or record is missing, unreadable or malformed."""


class MissingDataError(DataError, FileNotFoundError):
    """A required file or directory does not exist."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing or does not fit the model."""


class TrainingDivergedError(UserError, FloatingPointError):
    """The training loss became NaN or infinite (usually a too large learning rate)."""
