"""TF1 name-based checkpoints: what the original wrote and what TF-Slim restores.

Each tensor is stored under the variable's TF1 name (``resnet_v2_50/conv1/weights``,
``global_step``, ``<name>/ExponentialMovingAverage``, optimizer slots such as
``<name>/RMSProp``), in the TF1 V2 bundle format, with a ``checkpoint`` state file next to it,
so ``tf.train.list_variables`` shows the same names as an original checkpoint and
``tf.compat.v1.train.Saver`` restores it.

A checkpoint is written under a temporary directory and merged into its final prefix, and the
``checkpoint`` state file (the "latest" pointer) is rewritten atomically only after that, so a
crash never leaves a half-written checkpoint as the latest one.

Why not ``tf.compat.v1.train.Saver``: it writes the same names, no faster (``bench/tf_parts.py``,
resnet_v2_50's 893-tensor training state: 1.06-1.43x our time in two runs), but eagerly it refuses
distributed variables (``ValueError: Can only save/restore ResourceVariables when executing eagerly,
got ... MirroredVariable``), its ``max_to_keep`` forgets the checkpoints of an earlier run (two runs
of 3 saves with max_to_keep=2 left 4), and it writes the data file in place, where a kill leaves
``*.tempstate*`` files next to the checkpoints rather than the staging directory that
``remove_stale_temporaries`` clears (TF 2.21, measured).

``restore`` is all or nothing: a checkpoint that does not fit (missing names, other shapes)
fails with the first offending names and shapes and the likely cause (no moving-average
shadows, another class count, another model) before any variable changes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

import tensorflow as tf
from absl import logging

from adversarial_logit_pairing import tf_error_text
from adversarial_logit_pairing.errors import CheckpointError, MissingCheckpointError

CHECKPOINT_BASENAME = "model.ckpt"
# Suffix of the moving-average shadows, as TF1's ExponentialMovingAverage named them.
EMA_SUFFIX = "/ExponentialMovingAverage"
_MAX_LISTED = 8


def variable_name(variable: tf.Variable) -> str:
    """The TF1 name of a variable (``v.op.name`` in TF1), its checkpoint key: no ``:0``."""
    name = variable.name
    return name[: name.rindex(":")] if ":" in name else name


def latest_checkpoint(directory: str) -> Optional[str]:
    """The newest checkpoint prefix of ``directory`` whose files exist, or None."""
    if not directory or not tf.io.gfile.isdir(directory):
        return None
    state = tf.train.get_checkpoint_state(directory)
    if state is None:
        return None
    candidates = [state.model_checkpoint_path] + list(reversed(state.all_model_checkpoint_paths))
    for prefix in candidates:
        if not os.path.isabs(prefix):
            prefix = os.path.join(directory, prefix)
        if tf.io.gfile.exists(prefix + ".index"):
            return prefix
    return None


def resolve_checkpoint(path: str, flag_name: str) -> str:
    """Turns a directory (its latest checkpoint) or a prefix into an existing prefix.

    Raises:
      MissingCheckpointError: (a FileNotFoundError) naming ``flag_name`` and ``path`` when
        nothing is found there.
      CheckpointError: a directory whose ``checkpoint`` state file is missing (or names no
        existing checkpoint) holds several.
    """
    if not path:
        raise MissingCheckpointError(f"{flag_name} is empty")
    if tf.io.gfile.isdir(path):
        prefix = latest_checkpoint(path)
        if prefix is not None:
            return prefix
        # An unpacked archive (a released checkpoint) may lack the ``checkpoint`` state file,
        # or hold one naming where training wrote it (an absolute path, gone since): a single
        # checkpoint in the directory is unambiguous.
        prefixes = sorted(name[: -len(".index")] for name in tf.io.gfile.listdir(path)
                          if name.endswith(".index"))
        if len(prefixes) == 1:
            logging.info("%s has no 'checkpoint' state file naming a checkpoint there; using "
                         "its only checkpoint %s", path, prefixes[0])
            return os.path.join(path, prefixes[0])
        if prefixes:
            raise CheckpointError(
                f"{flag_name}={path}: directory has no 'checkpoint' state file naming one of "
                f"its {len(prefixes)} checkpoints ({_describe(prefixes, len(prefixes))}); "
                "pass one prefix"
            )
        raise MissingCheckpointError(f"{flag_name}={path}: directory holds no checkpoint")
    if tf.io.gfile.exists(path + ".index"):
        return path
    raise MissingCheckpointError(
        f"{flag_name}={path}: no such checkpoint (expected a directory or a prefix "
        "with a .index file)"
    )


def remove_stale_temporaries(directory: str) -> None:
    """Deletes what checkpoint writes killed midway left behind; call it before training.

    ``save`` stages files in ``.tmp-model.ckpt-*`` directories, then MergeV2Checkpoints moves
    the data file to ``model.ckpt-N.data-*`` and writes ``model.ckpt-N.index`` last. A kill
    leaves a staging directory, or a data file without its index; neither is ever named by
    the ``checkpoint`` pointer, and both are removed here.
    """
    pattern = os.path.join(directory, f".tmp-{CHECKPOINT_BASENAME}-*")
    for path in tf.io.gfile.glob(pattern):
        logging.info("Removing %s, left by an interrupted checkpoint write", path)
        tf.io.gfile.rmtree(path)
    for path in tf.io.gfile.glob(os.path.join(directory, f"{CHECKPOINT_BASENAME}-*.data-*")):
        prefix = path.rsplit(".data-", 1)[0]
        if not tf.io.gfile.exists(prefix + ".index"):
            logging.info("Removing %s, a data file whose checkpoint was never completed", path)
            tf.io.gfile.remove(path)


def checkpoint_step(prefix: str) -> Optional[int]:
    """The global step stored in a checkpoint, else the number after its last '-', else None."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        if reader.has_tensor("global_step"):
            return int(reader.get_tensor("global_step"))
    except (tf.errors.OpError, ValueError):
        pass
    tail = prefix.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def save(
    variables: Mapping[str, tf.Variable],
    directory: str,
    step: int,
    max_to_keep: int = 5,
) -> str:
    """Writes ``variables`` (TF1 name -> variable) as ``directory/model.ckpt-<step>``.

    The files appear under their final names only when complete, and the state file moves to
    the new checkpoint last. The oldest checkpoints beyond ``max_to_keep`` are deleted, as the
    TF1 Saver did.

    Returns:
      The checkpoint prefix.
    """
    tf.io.gfile.makedirs(directory)
    prefix = os.path.join(directory, f"{CHECKPOINT_BASENAME}-{int(step)}")
    names = sorted(variables)
    tensors = [tf.convert_to_tensor(variables[name].read_value()) for name in names]
    tmp_dir = os.path.join(directory, f".tmp-{CHECKPOINT_BASENAME}-{int(step)}-{uuid.uuid4().hex}")
    tmp_prefix = os.path.join(tmp_dir, "part")
    try:
        tf.io.gfile.makedirs(tmp_dir)
        tf.raw_ops.SaveV2(
            prefix=tmp_prefix,
            tensor_names=names,
            shape_and_slices=[""] * len(names),
            tensors=tensors,
        )
        # MergeV2Checkpoints renames the data file into place and writes the index last.
        tf.raw_ops.MergeV2Checkpoints(
            checkpoint_prefixes=[tmp_prefix], destination_prefix=prefix, delete_old_dirs=True
        )
    finally:
        if tf.io.gfile.exists(tmp_dir):
            tf.io.gfile.rmtree(tmp_dir)

    state = tf.train.get_checkpoint_state(directory)
    kept = []
    if state is not None:
        kept = [p for p in state.all_model_checkpoint_paths
                if os.path.basename(p) != os.path.basename(prefix)]
    kept.append(prefix)
    to_delete, kept = kept[:-max_to_keep], kept[-max_to_keep:]
    tf.compat.v1.train.update_checkpoint_state(
        directory,
        model_checkpoint_path=prefix,
        all_model_checkpoint_paths=kept,
    )
    for old in to_delete:
        old = old if os.path.isabs(old) else os.path.join(directory, old)
        for path in tf.io.gfile.glob(old + ".*"):
            tf.io.gfile.remove(path)
    return prefix


def _describe(items: list[str], total: int, limit: int = _MAX_LISTED) -> str:
    listed = "; ".join(items[:limit])
    more = f" (and {total - limit} more)" if total > limit else ""
    return listed + more


def _scope(name: str) -> str:
    return name.split("/", 1)[0] if "/" in name else ""


def _reader(checkpoint_path: str):
    try:
        return tf.train.load_checkpoint(checkpoint_path)
    except (tf.errors.OpError, ValueError) as exc:
        reason = (getattr(exc, "message", None) or str(exc) or type(exc).__name__)
        raise CheckpointError(f"cannot read checkpoint {checkpoint_path}: "
                              f"{reason.strip().splitlines()[0]}") from None


def variable_shapes(checkpoint_path: str) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a checkpoint (``tf.train.list_variables`` as a dict).

    Raises:
      CheckpointError: the checkpoint cannot be read (a corrupt or truncated index).
    """
    return dict(_reader(checkpoint_path).get_variable_to_shape_map())


def has_moving_averages(checkpoint_path: str) -> bool:
    """Whether a checkpoint holds any ``<name>/ExponentialMovingAverage`` shadow.

    Raises:
      CheckpointError: the checkpoint cannot be read.
    """
    reader = _reader(checkpoint_path)
    return any(name.endswith(EMA_SUFFIX) for name in reader.get_variable_to_shape_map())


def plain_names_without_shadows(
    assignments: Mapping[str, tf.Variable], checkpoint_path: str
) -> dict[str, tf.Variable]:
    """Reads shadow-named entries from their plain names when the checkpoint has no shadows.

    Fine-tuning with the moving average on reads the trainable variables from their
    ``<name>/ExponentialMovingAverage`` shadows. The released ALP checkpoints were re-saved
    without any shadow, so for such a checkpoint the plain values are the averaged ones: this
    maps ``<name>/ExponentialMovingAverage -> v`` to ``<name> -> v``. A checkpoint holding at
    least one shadow is left alone, so a partly averaged checkpoint still fails loudly in
    :func:`restore`.
    """
    if not _wants_shadows(assignments) or has_moving_averages(checkpoint_path):
        return dict(assignments)
    logging.info("%s: reading the averaged variables from their plain names",
                 _no_shadows(checkpoint_path))
    return {name.removesuffix(EMA_SUFFIX): variable for name, variable in assignments.items()}


def require_shadows(assignments: Mapping[str, tf.Variable], checkpoint_path: str) -> None:
    """Refuses, before any reading, to take moving averages from a checkpoint without any.

    The usual mistake with the released ALP checkpoints (evaluation and export read every
    variable from its shadow when ``--moving_average_decay > 0``); the message says what to do
    instead of listing every missing shadow name.

    Raises:
      CheckpointError: ``assignments`` asks for ``/ExponentialMovingAverage`` names and the
        checkpoint holds none, or the checkpoint cannot be read.
    """
    if _wants_shadows(assignments) and not has_moving_averages(checkpoint_path):
        raise CheckpointError(f"{_no_shadows(checkpoint_path)}: use --moving_average_decay=-1")


def _wants_shadows(names: Iterable[str]) -> bool:
    return any(name.endswith(EMA_SUFFIX) for name in names)


def _no_shadows(checkpoint_path: str) -> str:
    """The one explanation of a checkpoint saved without moving averages."""
    return (f"checkpoint {checkpoint_path} holds no {EMA_SUFFIX} shadows (saved without moving "
            "averages, like the released ALP checkpoints)")


def _hints(
    checkpoint_path: str,
    assignments: Mapping[str, tf.Variable],
    shapes: Mapping[str, list[int]],
    missing: list[str],
    mismatched: list[str],
    what: str,
    classifier_scopes: Sequence[str],
) -> list[str]:
    """Names the usual causes of a misfit: no shadows, another class count, another model.

    A shape mismatch under one of ``classifier_scopes`` (the model's head, whose last
    dimension is the class count in every family) is read as another class count.
    """
    hints = []
    if _wants_shadows(missing) and not _wants_shadows(shapes):
        hints.append(f"{_no_shadows(checkpoint_path)}: use --moving_average_decay=-1")
    plain = {name.removesuffix(EMA_SUFFIX) for name in assignments}
    if not any(name in shapes for name in plain):
        model_scopes = sorted({_scope(name) for name in plain})
        checkpoint_scopes = sorted({_scope(name) for name in shapes} - {""})
        if set(model_scopes) != set(checkpoint_scopes):
            hints.append(
                f"none of the variables is in the checkpoint, which holds another model "
                f"(scopes {', '.join(checkpoint_scopes[:_MAX_LISTED]) or 'none'}; the {what} "
                f"has {', '.join(model_scopes)}): check --model_name"
            )
    heads = tuple(scope.rstrip("/") + "/" for scope in classifier_scopes)
    for name in mismatched:
        theirs, ours = shapes[name][-1], assignments[name].shape[-1]
        # Only the class count (the head's last dimension) makes it a class-count mismatch;
        # a head with another input width is another size of the network.
        if heads and name.startswith(heads) and theirs != ours:
            hints.append(
                f"the checkpoint was trained for {theirs} classes, the {what} has {ours} "
                "(Tiny ImageNet: 200; ImageNet: 1001 with a background class, else 1000): "
                "choose the matching --dataset, or, to fine-tune across data sets, exclude "
                "the classification head with --finetune_exclude_pretrained_scopes="
                + ",".join(classifier_scopes)
            )
            break
    return hints


def restore(
    assignments: Mapping[str, tf.Variable],
    checkpoint_path: str,
    what: str = "model",
    classifier_scopes: Sequence[str] = (),
) -> None:
    """Assigns checkpoint tensors to variables, all or nothing.

    Entries not read (optimizer slots, ``global_step``, other variables) are ignored with one
    info log line giving their number and the first names.

    Args:
      assignments: name in the checkpoint -> variable to receive it.
      checkpoint_path: a checkpoint prefix.
      what: what is being restored, for error messages.
      classifier_scopes: the model's head scopes (``ModelConfig.classifier_scopes``); a
        shape mismatch there is explained as another class count, naming the
        ``--finetune_exclude_pretrained_scopes`` value that skips the head.

    Raises:
      CheckpointError: listing the first missing names (with the shapes the variables have)
        and the first shape mismatches, and naming the likely cause (a checkpoint without
        moving averages, another class count, another model), before any variable is
        changed; a checkpoint never loads partially.
    """
    reader = _reader(checkpoint_path)
    shapes = reader.get_variable_to_shape_map()
    missing = [name for name in assignments if name not in shapes]
    mismatched = [name for name, variable in assignments.items()
                  if name in shapes and list(shapes[name]) != variable.shape.as_list()]
    if missing or mismatched:
        parts = [f"checkpoint {checkpoint_path} does not fit the {what}"]
        if missing:
            listed = [f"{name} {assignments[name].shape.as_list()}" for name in missing]
            parts.append(
                f"{len(missing)} of {len(assignments)} variables missing: "
                + _describe(listed, len(listed))
            )
        if mismatched:
            listed = [
                f"{name}: checkpoint {list(shapes[name])} vs {what} "
                f"{assignments[name].shape.as_list()}"
                for name in mismatched
            ]
            parts.append(f"{len(listed)} shape mismatches: " + _describe(listed, len(listed)))
        scopes = sorted({_scope(name) for name in shapes} - {""})
        if scopes:
            parts.append("checkpoint scopes: " + ", ".join(scopes[:_MAX_LISTED]))
        hints = _hints(checkpoint_path, assignments, shapes, missing, mismatched, what,
                       classifier_scopes)
        if hints:
            parts.append("Likely cause: " + "; ".join(hints))
        raise CheckpointError(". ".join(parts))
    # Read every tensor before assigning any: a truncated or corrupt data file fails on some
    # tensor in the middle (TF raises IndexError 'Read less bytes than requested' for a short
    # file), and the variables must not be left half restored.
    values = {}
    for name in assignments:
        try:
            values[name] = reader.get_tensor(name)
        except (tf.errors.OpError, ValueError, IndexError) as exc:
            raise CheckpointError(
                f"checkpoint {checkpoint_path} cannot be read at {name} "
                f"({tf_error_text.reason(exc)}): its data file is truncated or corrupt; nothing "
                f"of the {what} was restored"
            ) from None
    for name, variable in assignments.items():
        variable.assign(tf.cast(values[name], variable.dtype))
    logging.info("Restored %d variables of the %s from %s", len(assignments), what, checkpoint_path)
    _log_ignored(shapes, assignments, checkpoint_path, what)


def _log_ignored(shapes: Mapping[str, list[int]], assignments: Mapping[str, tf.Variable],
                 checkpoint_path: str, what: str) -> None:
    """Says once which checkpoint entries were not read (optimizer slots, global_step, ...).

    A released checkpoint holds more than a model reads (tensorflow/tpu's hold RMSProp's
    ``/RMSProp`` and ``/RMSProp_1`` slots and ``global_step``); they are ignored, but not
    silently. The other copy of each variable read (its plain value when the shadow is read,
    or the reverse) is expected and not counted.
    """
    plain = {name.removesuffix(EMA_SUFFIX) for name in assignments}
    expected = plain | {name + EMA_SUFFIX for name in plain}
    ignored = sorted(name for name in shapes if name not in expected)
    if ignored:
        logging.info("Ignored %d entries of %s that the %s does not read (optimizer slots, "
                     "global_step, other variables): %s", len(ignored), checkpoint_path, what,
                     _describe(ignored, len(ignored), limit=3))
