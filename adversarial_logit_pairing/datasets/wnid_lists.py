"""Reading the converters' class lists: wnid list files, other line files, class folders.

Tiny ImageNet's ``wnids.txt``, the ImageNet synsets file (``--labels_file``,
``--imagenet_synsets_path``) and the validation labels are read the same way, with errors that
name the flag or the role of the file and the line at fault; both raw layouts keep a class's
training images in a folder named by its wnid (:func:`class_folders`).
"""

from __future__ import annotations

import os

import tensorflow as tf

from adversarial_logit_pairing.errors import DataError, MissingDataError


def read_lines(path: str, what: str) -> list[str]:
    """All lines of ``path``; ``what`` is the flag (``--x``) or role of the file, for errors.

    Raises:
      MissingDataError: the file does not exist.
    """
    if not tf.io.gfile.exists(path):
        where = f"{what}={path}" if what.startswith("--") else f"{path} ({what})"
        raise MissingDataError(f"{where}: no such file")
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read().splitlines()


def read_wnid_list(path: str, what: str) -> list[str]:
    """Non-empty stripped lines of a wnid list; the label of a wnid is its position.

    Raises:
      MissingDataError: the file does not exist.
      DataError: a wnid repeats or the list is empty.
    """
    wnids: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(read_lines(path, what), start=1):
        wnid = line.strip()
        if not wnid:
            continue
        if wnid in first_line:
            raise DataError(f"{path}, line {number}: wnid {wnid} repeats line "
                            f"{first_line[wnid]}")
        first_line[wnid] = number
        wnids.append(wnid)
    if not wnids:
        raise DataError(f"{path}: no wnid in {what}")
    return wnids


def class_folders(train_dir: str) -> list[tuple[str, str]]:
    """(name, path) of every folder in ``train_dir``, sorted by name; files are left out."""
    folders = []
    for entry in sorted(tf.io.gfile.listdir(train_dir)):
        name = entry.rstrip("/")
        if tf.io.gfile.isdir(os.path.join(train_dir, name)):
            folders.append((name, os.path.join(train_dir, name)))
    return folders
