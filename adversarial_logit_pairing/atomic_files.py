"""Writing a file or a directory so that a reader never sees it partial.

Every output of the project's programs (prediction and result files, TFRecords of the
converters, exports, Hub modules) is written under a temporary name beside its final one and
renamed into place once complete. The one naming scheme, for a final path ``DIR/NAME``:

* ``DIR/.NAME.tmp-XXXXXXXX`` (8 hex digits): an output being written. Its leading '.' keeps it
  out of the input pipelines' patterns (``train-*``, ``train.tfrecord``) and of directory
  listings; one left behind by a killed run is unfinished and may be deleted.
* ``DIR/.NAME.old-XXXXXXXX``: a directory being replaced, moved aside until its successor is
  in place, then deleted; one left behind is the previous output and may be deleted too.

``rm -r DIR/.*.tmp-* DIR/.*.old-*`` removes every leftover. Checkpoints keep their own
staging (``checkpoints.save``), as TF's checkpoint writer needs. Paths go through
``tf.io.gfile``, so ``gs://`` outputs work too (where a rename is a copy, not atomic).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import tensorflow as tf


def sibling_name(path: str, kind: str = "tmp") -> str:
    """``DIR/.NAME.<kind>-XXXXXXXX`` for ``path`` = ``DIR/NAME``: a fresh temporary name."""
    directory, name = os.path.split(path.rstrip("/") or path)
    return os.path.join(directory, f".{name}.{kind}-{uuid.uuid4().hex[:8]}")


def publish(temporary: str, path: str, overwrite: bool = True) -> None:
    """Renames the complete ``temporary`` (file or directory) to ``path``.

    An existing file is replaced in one rename; an existing directory (which a rename cannot
    replace) is moved aside, then deleted once ``path`` holds the new one. Without
    ``overwrite`` an existing ``path`` is an error (``tf.errors.AlreadyExistsError``).
    """
    if not (overwrite and tf.io.gfile.isdir(path)):
        tf.io.gfile.rename(temporary, path, overwrite=overwrite)
        return
    old = sibling_name(path, "old")
    tf.io.gfile.rename(path, old)
    tf.io.gfile.rename(temporary, path)
    tf.io.gfile.rmtree(old)


def discard(temporary: str) -> None:
    """Deletes a temporary file or directory, if it exists."""
    if tf.io.gfile.isdir(temporary):
        tf.io.gfile.rmtree(temporary)
    elif tf.io.gfile.exists(temporary):
        tf.io.gfile.remove(temporary)


@contextlib.contextmanager
def staged(path: str, overwrite: bool = True) -> Iterator[str]:
    """Yields a temporary path to write ``path``'s file or directory into.

    When the block completes, what it wrote is published at ``path`` (see :func:`publish`);
    whatever happens, the temporary is gone afterwards. The temporary does not exist yet:
    the block creates it (a file, or a directory by ``makedirs``, ``tf.saved_model.save``...).
    """
    temporary = sibling_name(path)
    try:
        yield temporary
        publish(temporary, path, overwrite)
    finally:
        discard(temporary)


def write_file(path: str, contents: bytes | str) -> None:
    """Writes ``contents`` (bytes, or text) to ``path`` under a temporary name, then renames."""
    with staged(path) as temporary:
        with tf.io.gfile.GFile(temporary, "wb" if isinstance(contents, bytes) else "w") as f:
            f.write(contents)
