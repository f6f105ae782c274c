"""Exports a trained checkpoint as a TF2 SavedModel and as a TF-Hub model (``export.py``).

The checkpoint is read exactly as ``eval.py`` reads it (``evaluation.restore_assignments``):
``moving_average_decay > 0`` takes the ``<name>/ExponentialMovingAverage`` shadows of every
model variable, batch-norm statistics included (``trainable_scopes`` is accepted and, as in
the original ``eval.py``, changes nothing), ``-1`` the plain variables (the released ALP
checkpoints have no shadows). The export is one SavedModel directory offering, by
``export_format``:

* ``saved_model``: the ``serving_default`` signature, ``images`` float32 [N, H, W, 3] in the
  dataset's range (-1, 1) -> ``logits`` [N, K] and ``probabilities`` (softmax) [N, K]. H and W
  are free (ResNet v2 ends in a global mean pool) unless ``image_size`` fixes both. The
  images must be preprocessed as the eval pipeline does for the model (its registered
  centre crop and TF1 resize kernel, to the training size, rescaled to [-1, 1]; recorded
  under ``preprocessing`` in the metadata; any further normalisation is inside the model);
  for ImageNet class 0 is the background class of a model that has one (1001 classes).
* ``hub``: TF Hub's reusable SavedModel API, so ``hub.load(dir)(images)`` gives the logits and
  ``hub.KerasLayer(dir)`` works in tf-keras: ``__call__(images, training=False)``,
  ``variables``, ``trainable_variables`` (weights, biases, gamma, beta; fine-tuning with
  ``training=True`` also moves the batch-norm statistics, as training does) and an empty
  ``regularization_losses`` (the weight decay of training is an hparam, not part of the model).
* ``both`` (default): the two in one directory.

``assets.extra/alp_export.json`` records where the weights came from and how to feed the
model. The directory is written under a temporary sibling name and renamed into place when
complete (:mod:`adversarial_logit_pairing.atomic_files`); a non-empty ``export_dir`` is
replaced only with ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import tensorflow as tf
from absl import logging

from adversarial_logit_pairing import (
    atomic_files,
    checkpoints,
    evaluation,
    model_lib,
    moving_average,
    tf_error_text,
)
from adversarial_logit_pairing.datasets import dataset_factory
from adversarial_logit_pairing.errors import ConfigError, DataError
from adversarial_logit_pairing.models import ImageClassifier, ModelConfig, get_model_config

FORMATS = ("saved_model", "hub", "both")
SIGNATURE_KEY = tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY  # "serving_default"
INPUT_KEY = "images"
METADATA_PATH = os.path.join("assets.extra", "alp_export.json")

@dataclasses.dataclass
class ExportConfig:
    """Plain-data mirror of ``export.py``'s flags."""

    checkpoint_path: str
    export_dir: str
    model_name: str = "resnet_v2_50"
    dataset: Optional[str] = None
    num_classes: Optional[int] = None
    moving_average_decay: float = 0.9999
    trainable_scopes: Optional[str] = None
    image_size: Optional[int] = None
    export_format: str = "both"
    overwrite: bool = False


@dataclasses.dataclass
class ExportResult:
    """What ``export`` wrote."""

    export_dir: str
    checkpoint_path: str
    global_step: Optional[int]
    num_classes: int
    moving_average: bool


def _checkpoint_class_count(model_config: ModelConfig, checkpoint_path: str
                            ) -> Optional[tuple[str, int]]:
    """(name, count) of the first 1-D bias under the model's classifier scopes, if any.

    Every family's head ends in a layer with a bias of one entry per class (ResNet v2's
    ``logits/biases``, Inception's ``Logits/Conv2d_1c_1x1/biases``, EfficientNet's
    ``head/dense/bias``); its plain or moving-average entry gives the class count.
    """
    shapes = checkpoints.variable_shapes(checkpoint_path)
    for scope in model_config.classifier_scopes:
        prefix = scope.rstrip("/") + "/"
        for name in sorted(shapes):
            plain = name.removesuffix(checkpoints.EMA_SUFFIX)
            if (plain.startswith(prefix) and plain.rsplit("/", 1)[-1] in ("bias", "biases")
                    and len(shapes[name]) == 1):
                return name, int(shapes[name][0])
    return None


def resolve_num_classes(model_name: str, checkpoint_path: str, num_classes: Optional[int],
                        dataset: Optional[str]) -> int:
    """The width of the logits: ``num_classes``, else ``dataset``'s, else the checkpoint's.

    A data set's count is the model's (``dataset_factory.num_classes``: ImageNet 1001 or
    1000 by the model's background class, Tiny ImageNet 200). The checkpoint's count is
    read from the bias of the model's classification head (``classifier_scopes``).

    Raises:
      ConfigError: an unknown model or data set, a class count that disagrees with the data
        set's, or nothing to take the count from.
      CheckpointError: the checkpoint has to be read and cannot be.
    """
    model_config = get_model_config(model_name)
    dataset_classes = None
    if dataset is not None:
        if dataset not in dataset_factory.DATASETS:
            raise ConfigError(f"--dataset={dataset}: unknown data set; known data sets: "
                              f"{', '.join(dataset_factory.DATASETS)}")
        dataset_classes = dataset_factory.num_classes(dataset, model_config)
    if num_classes is not None:
        if num_classes < 1:
            raise ConfigError(f"--num_classes={num_classes}: must be positive")
        if dataset_classes is not None and num_classes != dataset_classes:
            raise ConfigError(f"--num_classes={num_classes} disagrees with --dataset={dataset} "
                              f"({dataset_classes} classes for {model_name}); give one of them")
        return num_classes
    if dataset_classes is not None:
        return dataset_classes
    found = _checkpoint_class_count(model_config, checkpoint_path)
    if found is not None:
        logging.info("%d classes, from %s in %s", found[1], found[0], checkpoint_path)
        return found[1]
    raise ConfigError(
        f"cannot tell the number of classes: {checkpoint_path} holds no bias under "
        f"{', '.join(model_config.classifier_scopes)}; give --num_classes or --dataset"
    )


def restore_model(checkpoint_path: str, model_name: str, num_classes: int,
                  moving_average_decay: float,
                  trainable_scopes: Optional[str] = None) -> ImageClassifier:
    """Builds ``model_name`` and loads a checkpoint prefix into it as ``eval.py`` does.

    Raises:
      ConfigError: unknown model.
      CheckpointError: the checkpoint does not fit (see ``checkpoints.restore``), or moving
        averages were asked of a checkpoint saved without them.
    """
    model = model_lib.get_model(model_name, num_classes)
    assignments = evaluation.restore_assignments(model, moving_average_decay, trainable_scopes)
    checkpoints.require_shadows(assignments, checkpoint_path)
    checkpoints.restore(assignments, checkpoint_path,
                        what=f"{model_name} ({num_classes} classes) export model",
                        classifier_scopes=get_model_config(model_name).classifier_scopes)
    return model


def build_export_module(model: ImageClassifier, image_size: Optional[int] = None,
                        export_format: str = "both") -> tf.train.Checkpoint:
    """The object ``tf.saved_model.save`` writes: signature and/or Hub API over ``model``.

    Returns a ``tf.train.Checkpoint`` (a trackable that, unlike ``tf.Module``, accepts the
    ``variables`` and ``trainable_variables`` attributes the Hub API asks for).

    Raises:
      ConfigError: unknown format or a non-positive image size.
    """
    if export_format not in FORMATS:
        raise ConfigError(f"--format={export_format}: expected one of {', '.join(FORMATS)}")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"--image_size={image_size}: must be positive (or unset: any size)")
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name=INPUT_KEY)
    root = tf.train.Checkpoint()
    root.model = model

    if export_format in ("saved_model", "both"):
        @tf.function(input_signature=[spec])
        def serve(images):
            logits = model(images, is_training=False)
            return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

        root.serve = serve
    if export_format in ("hub", "both"):
        @tf.function
        def call(images, training=False):
            return model(images, is_training=training)

        # hub.KerasLayer passes a Python bool: both variants have to be in the SavedModel.
        for training in (False, True):
            call.get_concrete_function(spec, training=training)
        root.__call__ = call
        root.variables = list(model.variables)
        root.trainable_variables = list(model.trainable_variables)
        root.regularization_losses = []
    return root


def _prepare_destination(export_dir: str, overwrite: bool) -> None:
    if not tf.io.gfile.exists(export_dir):
        return
    if not tf.io.gfile.isdir(export_dir):
        raise ConfigError(f"--export_dir={export_dir}: exists and is not a directory")
    if tf.io.gfile.listdir(export_dir) and not overwrite:
        raise ConfigError(f"--export_dir={export_dir}: directory is not empty; pass "
                          "--overwrite to replace it")


def write_export(root: tf.train.Checkpoint, export_dir: str, metadata: dict,
                 overwrite: bool = False) -> str:
    """Saves ``root`` (with ``metadata`` as JSON) into ``export_dir``, atomically.

    The SavedModel is written and replaced as :mod:`atomic_files` says, so ``export_dir``
    never holds a partial export.

    Raises:
      ConfigError: ``export_dir`` is a file, or a non-empty directory without ``overwrite``.
      DataError: its parent directory cannot be created.
    """
    export_dir = export_dir.rstrip("/") or export_dir
    _prepare_destination(export_dir, overwrite)
    parent = os.path.dirname(export_dir)
    if parent:
        try:
            tf.io.gfile.makedirs(parent)
        except tf.errors.OpError as exc:
            raise DataError(f"--export_dir={export_dir}: cannot create {parent} "
                            f"({tf_error_text.reason(exc)})") from None
    signatures = {SIGNATURE_KEY: root.serve} if hasattr(root, "serve") else None
    with atomic_files.staged(export_dir) as staging:
        tf.saved_model.save(root, staging, signatures=signatures)
        tf.io.gfile.makedirs(os.path.dirname(os.path.join(staging, METADATA_PATH)))
        with tf.io.gfile.GFile(os.path.join(staging, METADATA_PATH), "w") as f:
            f.write(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return export_dir


def export(config: ExportConfig) -> ExportResult:
    """Runs ``export.py``: checkpoint -> SavedModel / Hub model in ``config.export_dir``.

    Raises:
      ConfigError: bad flags or an occupied export directory.
      MissingCheckpointError: no checkpoint at ``config.checkpoint_path``.
      CheckpointError: the checkpoint cannot be read or does not fit the model.
    """
    if not config.export_dir:
        raise ConfigError("--export_dir has to be provided")
    if config.export_format not in FORMATS:
        raise ConfigError(f"--format={config.export_format}: expected one of "
                          f"{', '.join(FORMATS)}")
    # Refuse early, before minutes of loading, when the destination is taken.
    _prepare_destination(config.export_dir, config.overwrite)
    start = time.time()
    prefix = checkpoints.resolve_checkpoint(config.checkpoint_path, "--checkpoint_path")
    model_config = get_model_config(config.model_name)
    num_classes = resolve_num_classes(config.model_name, prefix, config.num_classes,
                                      config.dataset)
    model = restore_model(prefix, config.model_name, num_classes, config.moving_average_decay,
                          config.trainable_scopes)
    use_ema = moving_average.enabled(config.moving_average_decay)
    step = checkpoints.checkpoint_step(prefix)
    root = build_export_module(model, config.image_size, config.export_format)
    low, high = dataset_factory.BOUNDS
    metadata = {
        "model_name": config.model_name,
        "num_classes": num_classes,
        # Class 0 is background only for a model that has one, at its ImageNet width.
        "background_class": (model_config.background_class
                             and num_classes == model_config.num_classes),
        "input": {
            "key": INPUT_KEY,
            "dtype": "float32",
            "shape": [None, config.image_size, config.image_size, 3],
            "range": [low, high],
        },
        # How eval.py fed the model (docs/DATA.md); normalisation is inside the export.
        "preprocessing": {
            "eval_crop": model_config.eval_crop,
            "crop_fraction": model_config.crop_fraction,
            "resize": model_config.eval_resize,
            "input_normalization_inside_model": model_config.input_normalization,
        },
        "outputs": ["logits", "probabilities"],
        "format": config.export_format,
        "signature": SIGNATURE_KEY if config.export_format != "hub" else None,
        "checkpoint_path": prefix,
        "global_step": step,
        "moving_average": use_ema,
        "moving_average_decay": config.moving_average_decay,
        "trainable_scopes": config.trainable_scopes,
    }
    logging.info("Exporting %s (global step %s, %s) as format '%s' to %s", prefix, step,
                 "moving averages" if use_ema else "plain variables", config.export_format,
                 config.export_dir)
    write_export(root, config.export_dir, metadata, config.overwrite)
    logging.info("Exported %s in %.1fs", config.export_dir, time.time() - start)
    return ExportResult(config.export_dir, prefix, step, num_classes, use_ema)


def read_metadata(export_dir: str) -> dict:
    """The ``alp_export.json`` an export carries (model, classes, input range, source)."""
    with tf.io.gfile.GFile(os.path.join(export_dir, METADATA_PATH)) as f:
        return json.load(f)
