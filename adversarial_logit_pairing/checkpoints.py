"""TF1 name-based checkpoints: what the original wrote and what TF-Slim restores.

Each tensor is stored under the variable's TF1 name (``resnet_v2_50/conv1/weights``,
``global_step``, ``<name>/ExponentialMovingAverage``, optimizer slots such as
``<name>/RMSProp``), in the TF1 V2 bundle format, with a ``checkpoint`` state file next to it,
so ``tf.train.list_variables`` shows the same names as an original checkpoint and
``tf.compat.v1.train.Saver`` restores it.

A checkpoint is written under a temporary directory and merged into its final prefix, and the
``checkpoint`` state file (the "latest" pointer) is rewritten atomically only after that, so a
crash never leaves a half-written checkpoint as the latest one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Optional

import tensorflow as tf
from absl import logging

from adversarial_logit_pairing.errors import CheckpointError, MissingDataError

CHECKPOINT_BASENAME = "model.ckpt"
_MAX_LISTED = 8


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
      MissingDataError: naming ``flag_name`` and ``path`` when nothing is found there.
    """
    if not path:
        raise MissingDataError(f"{flag_name} is empty")
    if tf.io.gfile.isdir(path):
        prefix = latest_checkpoint(path)
        if prefix is None:
            raise MissingDataError(f"{flag_name}={path}: directory holds no checkpoint")
        return prefix
    if tf.io.gfile.exists(path + ".index"):
        return path
    raise MissingDataError(
        f"{flag_name}={path}: no such checkpoint (expected a directory or a prefix "
        "with a .index file)"
    )


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


def _describe(items: list[str], total: int) -> str:
    listed = "; ".join(items[:_MAX_LISTED])
    more = f" (and {total - _MAX_LISTED} more)" if total > _MAX_LISTED else ""
    return listed + more


def restore(
    assignments: Mapping[str, tf.Variable],
    checkpoint_path: str,
    what: str = "model",
) -> None:
    """Assigns checkpoint tensors to variables, all or nothing.

    Args:
      assignments: name in the checkpoint -> variable to receive it.
      checkpoint_path: a checkpoint prefix.
      what: what is being restored, for error messages.

    Raises:
      CheckpointError: listing the first missing names and the first shape mismatches, before
        any variable is changed; a checkpoint never loads partially.
    """
    try:
        reader = tf.train.load_checkpoint(checkpoint_path)
    except (tf.errors.OpError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {checkpoint_path}: {exc}") from None
    shapes = reader.get_variable_to_shape_map()
    missing = [name for name in assignments if name not in shapes]
    mismatched = []
    for name, variable in assignments.items():
        if name in shapes and list(shapes[name]) != variable.shape.as_list():
            mismatched.append(
                f"{name}: checkpoint {list(shapes[name])} vs {what} {variable.shape.as_list()}"
            )
    if missing or mismatched:
        parts = [f"checkpoint {checkpoint_path} does not fit the {what}"]
        if missing:
            parts.append(
                f"{len(missing)} of {len(assignments)} variables missing: "
                + _describe(missing, len(missing))
            )
        if mismatched:
            parts.append(
                f"{len(mismatched)} shape mismatches: " + _describe(mismatched, len(mismatched))
            )
        scopes = sorted({name.split("/", 1)[0] for name in shapes if "/" in name})
        if scopes:
            parts.append("checkpoint scopes: " + ", ".join(scopes[:_MAX_LISTED]))
        raise CheckpointError(". ".join(parts))
    for name, variable in assignments.items():
        value = reader.get_tensor(name)
        variable.assign(tf.cast(value, variable.dtype))
    logging.info("Restored %d variables of the %s from %s", len(assignments), what, checkpoint_path)
