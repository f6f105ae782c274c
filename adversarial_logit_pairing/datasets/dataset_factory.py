"""Builds the input pipelines by data set name, and diagnoses bad records.

``get_dataset`` is what the train and eval loops call. ``locate_bad_record`` is the slow scan
they run after a pipeline raised a decode error, to tell the user which record is bad.
``count_records`` tells how many examples a (possibly reduced) copy of a split really holds.

The model's registered ``ModelConfig`` is the one place that decides preprocessing: the
pipelines read its evaluation crop, resize kernels and (for ImageNet) its class count and
background class from it, so a model name is enough to feed a model. See docs/DATA.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType
from typing import Optional

import tensorflow as tf
from absl import logging

from adversarial_logit_pairing import tf_error_text
from adversarial_logit_pairing.datasets import imagenet_input, tfrecord_files, tiny_imagenet_input
from adversarial_logit_pairing.datasets.autoaugment import Augmentation
from adversarial_logit_pairing.datasets.dataset_facts import FACTS, DataSetFacts
from adversarial_logit_pairing.errors import ConfigError, DataError, MissingDataError
from adversarial_logit_pairing.models import ModelConfig, get_model_config

DATASETS = ("imagenet", "tiny_imagenet")
# Every image the pipelines yield lies in [BOUNDS[0], BOUNDS[1]].
BOUNDS = (-1.0, 1.0)

_INPUTS: dict[str, ModuleType] = {
    "imagenet": imagenet_input,
    "tiny_imagenet": tiny_imagenet_input,
}


def _input_module(dataset_name: str) -> ModuleType:
    if dataset_name not in _INPUTS:
        raise ConfigError(f"--dataset={dataset_name}: unknown data set; known data sets: "
                          f"{', '.join(DATASETS)}")
    return _INPUTS[dataset_name]


def _facts(dataset_name: str) -> DataSetFacts:
    _input_module(dataset_name)  # an unknown name fails, listing the known ones
    return FACTS[dataset_name]


# The model whose preprocessing is used when none is given: ALP's, as in the original.
DEFAULT_MODEL = "resnet_v2_50"


def _config(model_config: Optional[ModelConfig]) -> ModelConfig:
    return model_config if model_config is not None else get_model_config(DEFAULT_MODEL)


def data_files(dataset_name: str, split: str, data_dir: str | None) -> list[str]:
    """Sorted TFRecord files of ``split`` in ``data_dir`` (the data set's ``file_patterns``).

    Temporary files of a running conversion start with '.', so they never match.

    Raises:
      ConfigError: an unknown data set, or ``split`` is not 'train' or 'validation'.
      MissingDataError: naming the flag: it is unset, or the directory or the files are missing.
    """
    facts = _facts(dataset_name)
    flag = facts.data_dir_flag
    if split not in facts.file_patterns:
        raise ConfigError(f"invalid split '{split}': expected 'train' or 'validation'")
    if not data_dir:
        raise MissingDataError(f"{flag} is not set: it must name the directory with "
                               f"{facts.data_dir_contents}")
    if not tf.io.gfile.isdir(data_dir):
        raise MissingDataError(f"{flag}={data_dir}: no such directory")
    pattern = facts.file_patterns[split]
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, pattern)))
    if not files:
        missing = "no files matching" if "*" in pattern else "no file"
        raise MissingDataError(f"{flag}={data_dir}: {missing} {pattern}")
    return files


def data_dir_flag(dataset_name: str) -> str:
    """The command-line flag that names the data directory of ``dataset_name``."""
    return _facts(dataset_name).data_dir_flag


def num_classes(dataset_name: str, model_config: Optional[ModelConfig] = None) -> int:
    """Width of the logits a model needs on ``dataset_name``.

    ImageNet: the model's own count, 1001 when its class 0 is a background class (TF-Slim),
    else 1000; Tiny ImageNet: 200 for every model.

    Raises:
      ConfigError: unknown data set, or a model whose class count and background class
        disagree.
    """
    return _input_module(dataset_name).num_classes(_config(model_config))


def examples_per_epoch(dataset_name: str, split: str) -> int:
    """The original's size of a split, whatever a directory holds; no file is opened.

    ImageNet 1,281,167 / 50,000, Tiny ImageNet 100,000 / 10,000: the learning-rate schedule
    and ``current_epoch`` count epochs of the full data set, and evaluation plans its batches
    with it before reading any record.

    Raises:
      ConfigError: unknown data set or split.
    """
    sizes = _facts(dataset_name).examples_per_epoch
    if split not in sizes:
        raise ConfigError(f"invalid split '{split}': expected 'train' or 'validation'")
    return sizes[split]


def get_dataset(dataset_name: str, split: str, batch_size: int, image_size: int,
                is_training: bool, data_dir: str | None = None,
                model_config: Optional[ModelConfig] = None,
                augmentation: Optional[Augmentation] = None,
                ) -> tuple[tf.data.Dataset, int, int, tuple[float, float]]:
    """Returns the input pipeline of a split, preprocessed for a model, and facts about it.

    Args:
      dataset_name: 'imagenet' or 'tiny_imagenet'.
      split: 'train' or 'validation'.
      batch_size: examples per batch; the last partial batch is dropped so that the batch
        dimension is static.
      image_size: side of the square output images (may differ from the model's
        ``default_image_size``; ALP trains resnet_v2_50 at 64).
      is_training: True for training preprocessing (random crops, shuffling, repeating
        forever), False for evaluation preprocessing (one deterministic pass).
      data_dir: value of --imagenet_data_dir / --tiny_imagenet_data_dir.
      model_config: the model to feed (``models.get_model_config(name)``): its evaluation
        crop and resize kernels, and on ImageNet its labels. None: ``DEFAULT_MODEL``'s
        (ALP's ResNet v2 preprocessing).
      augmentation: AutoAugment / RandAugment applied to training images
        (``Augmentation.from_hparams``); None or 'none': no augmentation. Ignored in
        evaluation.

    Returns:
      dataset: yields (images float32 [batch_size, image_size, image_size, 3] in [-1, 1],
        labels int64 [batch_size]). ImageNet labels are the stored 1..1000 for a model with
        a background class (0 is never stored), else shifted to 0..999; Tiny ImageNet
        labels are 0..199.
      examples_per_epoch: the size of the full split as in the original (ImageNet 1,281,167 /
        50,000; Tiny ImageNet 100,000 / 10,000), whatever the directory holds; use
        count_records() for the real count of a smaller copy.
      num_classes: ``num_classes(dataset_name, model_config)``: 1001 or 1000 (ImageNet),
        200 (Tiny ImageNet).
      bounds: (-1.0, 1.0), for every model.

    Raises:
      ConfigError: unknown data set or split, a batch or image size < 1, or a model whose
        class count and background class disagree.
      MissingDataError: no data directory, or no record file of the split in it.
    """
    module = _input_module(dataset_name)
    model_config = _config(model_config)
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if image_size < 1:
        raise ConfigError(f"--dataset_image_size must be at least 1, got {image_size}")
    classes = module.num_classes(model_config)
    files = data_files(dataset_name, split, data_dir)
    if dataset_name == "imagenet":
        dataset = imagenet_input.imagenet_input(files, batch_size, image_size, is_training,
                                                model_config, augmentation)
    else:
        dataset = tiny_imagenet_input.tiny_imagenet_input(files, batch_size, image_size,
                                                          is_training, model_config,
                                                          augmentation)
    return dataset, examples_per_epoch(dataset_name, split), classes, BOUNDS


def log_image_size(model_config: ModelConfig, image_size: int) -> None:
    """Logs (info) an input size other than the model's native one; it is allowed.

    ALP trained and evaluated resnet_v2_50 at 64x64 although TF-Slim's ResNets are 224x224
    networks; any size works for fully convolutional models, but the released weights of a
    model are only calibrated for their own size, so a run says when it differs.
    """
    if image_size != model_config.default_image_size:
        logging.info("--dataset_image_size=%d differs from %s's native size %d: images are "
                     "resized to %d", image_size, model_config.name,
                     model_config.default_image_size, image_size)


def count_records(dataset_name: str, split: str, data_dir: str) -> int:
    """Number of records a split's files in ``data_dir`` really hold.

    Raises:
      ConfigError, MissingDataError: as get_dataset.
      DataError: a file is truncated.
    """
    return sum(tfrecord_files.count_records_in_file(path)
               for path in data_files(dataset_name, split, data_dir))


def next_batch(batches: Iterator, dataset_name: str, split: str, data_dir: Optional[str],
               model_config: Optional[ModelConfig] = None) -> tuple:
    """``next(batches)``; a corrupt image or truncated file is named in a DataError.

    Finding the record takes a slow scan of the split (``locate_bad_record``), run only after
    the pipeline failed. StopIteration passes through.
    """
    try:
        return next(batches)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as exc:
        where = locate_bad_record(dataset_name, split, data_dir, model_config)
        raise DataError(f"bad {split} record: {where or 'unknown record'} "
                        f"({tf_error_text.reason(exc)})") from None


def locate_bad_record(dataset_name: str, split: str, data_dir: str,
                      model_config: Optional[ModelConfig] = None) -> str | None:
    """Finds the first record of a split that the input pipeline cannot read.

    Every record of every file (in sorted file order) is parsed and its whole image decoded,
    so this is slow: it is meant to run once, after the pipeline raised an error. Labels are
    checked against ``model_config``'s range (as get_dataset), so pass the same model.

    Returns:
      "<file name>, record <i>: <reason>" for the first bad record, where i counts records
      of that file from 0 (``TFRecordDataset(file).skip(i)`` starts at it); None if every
      record reads fine.

    Raises:
      ConfigError, MissingDataError: as get_dataset.
    """
    module = _input_module(dataset_name)
    model_config = _config(model_config)
    for path in data_files(dataset_name, split, data_dir):
        records = tf.data.TFRecordDataset(path)
        # Deterministic parallel map: an error is delivered at the position of its record.
        checked = records.map(lambda record: module.check_record(record, model_config),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        index = 0
        iterator = iter(checked)
        while True:
            try:
                next(iterator)
            except StopIteration:
                break
            except tf.errors.OpError as exc:
                return f"{os.path.basename(path)}, record {index}: {tf_error_text.reason(exc)}"
            index += 1
    return None

