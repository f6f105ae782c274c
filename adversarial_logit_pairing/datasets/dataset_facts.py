"""What the original code fixed about each data set: directory flag, files, sizes, classes.

One row per data set, read by the input pipelines, the converters, the programs' flags and
the bench scripts, so a number such as ImageNet's 1,281,167 training examples stands once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Optional


@dataclasses.dataclass(frozen=True)
class DataSetFacts:
    """One data set's fixed facts (docs/DATA.md).

    Attributes:
      data_dir_flag: the flag of ``train.py``/``eval.py`` naming its TFRecord directory.
      data_dir_contents: what that directory holds, for messages and the flag's help.
      file_patterns: split -> glob of its TFRecord files (a plain name: a single file); the
        temporaries of a running conversion start with '.' and never match.
      examples_per_epoch: the original's epoch sizes, whatever a directory holds: the
        learning-rate schedule and ``current_epoch`` count epochs with them.
      stored_classes: classes of the stored labels (Tiny ImageNet 0..199, ImageNet 1..1000).
    """

    data_dir_flag: str
    data_dir_contents: str
    file_patterns: Mapping[str, str]
    examples_per_epoch: Mapping[str, int]
    stored_classes: int


IMAGENET = DataSetFacts(
    "--imagenet_data_dir", "the TF-Slim ImageNet TFRecords (train-*, validation-*)",
    {"train": "train-*", "validation": "validation-*"}, {"train": 1281167, "validation": 50000},
    stored_classes=1000)
TINY_IMAGENET = DataSetFacts(
    "--tiny_imagenet_data_dir", "train.tfrecord and validation.tfrecord of Tiny ImageNet",
    {"train": "train.tfrecord", "validation": "validation.tfrecord"},
    {"train": 100000, "validation": 10000}, stored_classes=200)
FACTS = {"imagenet": IMAGENET, "tiny_imagenet": TINY_IMAGENET}


def data_dir(dataset: str, config: object) -> Optional[str]:
    """The directory ``config`` names for ``dataset``: its field of the data set's flag
    (``TrainConfig`` and ``EvalConfig`` have one field per flag)."""
    return getattr(config, FACTS[dataset].data_dir_flag.removeprefix("--"))
