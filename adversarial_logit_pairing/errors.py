"""Errors caused by the user's input rather than by a bug.

Command-line entry points catch :class:`UserError` and print its message as a single
line (no traceback) before exiting with status 2 (``cli.run_program``). Library functions raise
the subclasses below; each also derives from the builtin exception a Python caller would
expect (``ValueError`` for bad values, ``FileNotFoundError`` for missing files), so the
library API keeps the original's exception types.

What raises what:

* :class:`ConfigError`: a flag, hparam, model or data set name, attack description,
  learning-rate schedule, SPSA setting, ``TF_CONFIG``, or a combination of them (e.g.
  ``--sync_batch_norm`` with a model it cannot switch).
* :class:`DataError`: a data file or record is unreadable or malformed, or an output location
  (``--output_dir``, ``--output_file``) cannot be written;
  :class:`MissingDataError` when a data file or directory does not exist.
* :class:`CheckpointError`: stored model weights (a checkpoint, or a TF-Hub module such as
  LLR's, see ``llr.hub_model.HubModuleError``) cannot be read or do not fit the model;
  :class:`MissingCheckpointError` when there is none at the given path.
* :class:`TrainingDivergedError`: the loss became NaN or infinite.
* ``distribution.ClusterError``: a worker of a multi-worker job or the TPU cannot be reached.

Everything else (``ValueError``, ``RuntimeError``, ``TypeError`` ... outside this tree) is a
bug or a misuse of the library by calling code, and keeps its traceback.
"""


class UserError(Exception):
    """Base class: bad flags, hparams, files or records supplied by the user."""


class ConfigError(UserError, ValueError):
    """A flag, hparam, model name, dataset name or attack description is invalid."""


class DataError(UserError, ValueError):
    """A data file or record is unreadable or malformed, or an output cannot be written."""


class MissingDataError(DataError, FileNotFoundError):
    """A required data file or directory does not exist."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or Hub module cannot be read or does not fit the model."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """No checkpoint (or Hub module) at the path a flag names."""


class TrainingDivergedError(UserError, FloatingPointError):
    """The training loss became NaN or infinite (usually a too large learning rate)."""
