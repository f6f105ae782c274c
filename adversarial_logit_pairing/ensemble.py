"""Ensemble adversarial training (Tramer et al., ICLR 2018, arXiv 1705.07204).

Each training batch takes its adversarial examples from a source drawn at random, uniformly,
among the model being trained and a few fixed pre-trained models (the paper's ens3: Inception
v3 trained with v3 and ResNet-v2-50 as static sources; ens4 adds IncRes-v2). Only the source
of the attack changes: the attack (``train_adv_method``), the mixed ``[clean; adversarial]``
training pass and the losses are those of ``training``.

``train.py --ensemble_sources=MODEL:CHECKPOINT,MODEL:CHECKPOINT`` names the static sources:
registered model names (``models.list_models``) and TF1 checkpoints (prefix or directory).
Each source is its own ``ImageClassifier`` object, so several models of one variable scope
(the released ``adv_``/``ens3_``/``ens4_adv_inception_v3`` all use ``InceptionV3``, as does the
model being trained) live side by side under their original names: a checkpoint is read by
name into one object's variables, never through a graph-wide scope. Each variable is read
from its moving-average shadow when the checkpoint holds one (``train.py``'s checkpoints, as
``eval.py`` would read them), else from its plain name (the released checkpoints).

Static sources are frozen: their variables are created non-trainable (so no optimizer,
gradient or weight decay reaches them), they run in inference mode only (batch-norm moving
statistics, no dropout), and they are not part of the training state, so checkpoints never
hold them and a resumed run reads them from their own checkpoints again.

The source is drawn inside the compiled step (``tf.switch_case`` over one attack branch per
source, each traced once), from the step's seed: no retracing per choice, and a resumed run
draws the same sources. With several replicas (or micro-batches) each replica's batch draws its
own source, as each worker's batch would; the reported ``adv_source`` is then their mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import tensorflow as tf
from absl import logging

from adversarial_logit_pairing import adversarial_attack, checkpoints, precision
from adversarial_logit_pairing.datasets import dataset_factory
from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.models import (
    ImageClassifier,
    create_model,
    get_model_config,
    inception_v3,
)

FLAG = "--ensemble_sources"
# The step output (and TensorBoard scalar) naming the source of the batch's adversarial
# examples: 0 the model being trained, i the i-th static source of the flag.
SOURCE_OUTPUT = "adv_source"
# Folded into the step seed for the choice, so the attack keeps the step seed itself: when the
# model being trained is drawn, its adversarial examples are those of plain adversarial training.
_CHOICE_STREAM = 0x656E73  # 'ens'

# Families whose networks take a bounded range of image sizes, by scope: their check.
_IMAGE_SIZE_CHECKS = {
    "InceptionV3": lambda side: inception_v3.check_image_size(side, side, with_aux=False),
}


@dataclasses.dataclass(frozen=True)
class StaticSource:
    """One ``MODEL:CHECKPOINT`` of ``--ensemble_sources``; ``checkpoint`` is a resolved prefix
    once ``check_sources`` has run."""

    model_name: str
    checkpoint: str

    def __str__(self) -> str:
        return f"{self.model_name}:{self.checkpoint}"


def parse_sources(value: str) -> list[StaticSource]:
    """``MODEL:CHECKPOINT,MODEL:CHECKPOINT`` -> sources; empty -> none.

    The model name ends at the first ':' (checkpoint paths may hold more, e.g. ``gs://``).

    Raises:
      ConfigError: naming the flag and the malformed entry.
    """
    sources = []
    for entry in (value or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        model_name, sep, checkpoint = entry.partition(":")
        if not sep or not model_name.strip() or not checkpoint.strip():
            raise ConfigError(f"{FLAG}: entry {entry!r} is not MODEL:CHECKPOINT (e.g. "
                              "inception_v3:/ckpts/adv_inception_v3.ckpt)")
        sources.append(StaticSource(model_name.strip(), checkpoint.strip()))
    return sources


def _head_classes(scopes: Sequence[str], shapes: dict) -> set[int]:
    """Class counts of the checkpoint's classification head (last dimension of its tensors)."""
    heads = tuple(scope.rstrip("/") + "/" for scope in scopes)
    return {shape[-1] for name, shape in shapes.items() if name.startswith(heads) and shape}


def check_sources(value: str, train_adv_method: str, dataset: str, num_classes: int,
                  image_size: int) -> tuple[StaticSource, ...]:
    """Checks ``--ensemble_sources`` before any model or data: names, checkpoints, fit.

    Reads only each checkpoint's index (names and shapes), never its data nor any TFRecord.

    Args:
      value: the flag.
      train_adv_method: the attack (hparam); sources need one.
      dataset: ``--dataset`` (the sources' class count on it).
      num_classes: logits of the model being trained on ``dataset``; every source must have
        as many (same task, same labels).
      image_size: ``--dataset_image_size``: the sources attack the training images as they are.

    Returns:
      The sources with their checkpoints resolved to prefixes.

    Raises:
      ConfigError: sources without an attack, a malformed entry, an unknown model, a
        checkpoint of another model or another class count, an image size the source's
        network cannot take.
      MissingCheckpointError, CheckpointError: no checkpoint there, or an unreadable one.
    """
    sources = parse_sources(value)
    if sources and adversarial_attack.parse_attack_description(train_adv_method).is_clean:
        raise ConfigError(f"{FLAG}: static sources make adversarial examples, but "
                          "train_adv_method=clean; set --hparams=train_adv_method=...")
    checked = []
    for i, source in enumerate(sources, start=1):
        where = f"{FLAG} source {i} ({source})"
        try:
            config = get_model_config(source.model_name)
            expected = dataset_factory.num_classes(dataset, config)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        prefix = checkpoints.resolve_checkpoint(source.checkpoint, f"{FLAG} source {i}")
        shapes = checkpoints.variable_shapes(prefix)
        classes = _head_classes(config.classifier_scopes, shapes)
        if not classes:
            scopes = sorted({name.split("/", 1)[0] for name in shapes if "/" in name})
            raise ConfigError(
                f"{where}: checkpoint {prefix} holds no {config.classifier_scopes[0]} "
                f"variables (its scopes: {', '.join(scopes[:8]) or 'none'}): not a checkpoint of "
                f"{source.model_name}")
        if classes != {num_classes} or expected != num_classes:
            raise ConfigError(
                f"{where}: the checkpoint has {'/'.join(map(str, sorted(classes)))} classes "
                f"(a {source.model_name} on --dataset={dataset} has {expected}), the model "
                f"being trained {num_classes}: a static source must classify the same labels")
        check_size = _IMAGE_SIZE_CHECKS.get(config.scope)
        if check_size is not None:
            try:
                check_size(image_size)
            except ConfigError as exc:
                raise ConfigError(f"{where} at --dataset_image_size={image_size}: {exc}") from None
        checked.append(StaticSource(source.model_name, prefix))
    return tuple(checked)


def _frozen(next_creator, **kwargs) -> tf.Variable:
    kwargs["trainable"] = False
    return next_creator(**kwargs)


def build_static_sources(sources: Sequence[StaticSource], num_classes: int,
                         compute_dtype: precision.DTypeLike = "float32"
                         ) -> tuple[ImageClassifier, ...]:
    """Builds each source as its own frozen model and restores it from its checkpoint.

    Call under the strategy's scope. Models of the same scope (each other's, or the model
    being trained's) get the same variable names; they are distinct objects, each restored by
    name from its own checkpoint.

    Raises:
      CheckpointError: a checkpoint that does not fit its model (all or nothing).
    """
    models = []
    for i, source in enumerate(sources, start=1):
        with tf.variable_creator_scope(_frozen):
            model = create_model(source.model_name, num_classes, seed=0,
                                 compute_dtype=compute_dtype)
        # The averaged value of each variable when the checkpoint holds one (train.py's
        # shadows), else its plain value (the released checkpoints hold no shadow).
        names = checkpoints.variable_shapes(source.checkpoint)
        assignments = {}
        for name, variable in model.variables_by_name.items():
            shadow = name + checkpoints.EMA_SUFFIX
            assignments[shadow if shadow in names else name] = variable
        checkpoints.restore(assignments, source.checkpoint,
                            what=f"{FLAG} source {i} ({source.model_name})",
                            classifier_scopes=model.config.classifier_scopes)
        averaged = sum(name.endswith(checkpoints.EMA_SUFFIX) for name in assignments)
        logging.info("Static source %d of ensemble adversarial training: %s (%d of %d "
                     "variables read from their moving averages)", i, source, averaged,
                     len(assignments))
        models.append(model)
    return tuple(models)


def adversarial_examples(
    images: tf.Tensor,
    bounds: tuple[float, float],
    model_fns: Sequence[adversarial_attack.ModelFn],
    attack_description: str,
    seed: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The batch's adversarial examples against a source drawn uniformly from ``model_fns``.

    Args:
      images: clean images [N, H, W, C] within ``bounds``.
      bounds: (lo, hi) range of the images.
      model_fns: inference-mode model functions; index 0 is the model being trained
        (``model.inference``), then the static sources.
      attack_description: as ``adversarial_attack.generate_adversarial_examples``.
      seed: the step's shape-[2] integer seed: it decides the source and the attack's own
        randomness (the same whichever source is drawn).

    Returns:
      (adversarial images, int32 index of the source in ``model_fns``).
    """
    seed = tf.cast(seed, tf.int64)
    choice_seed = tf.random.experimental.stateless_fold_in(seed, _CHOICE_STREAM)
    source = tf.random.stateless_uniform([], seed=choice_seed, minval=0,
                                         maxval=len(model_fns), dtype=tf.int32)

    def attack_with(model_fn):
        return lambda: adversarial_attack.generate_adversarial_examples(
            images, bounds, model_fn, attack_description, seed=seed)

    branches = [attack_with(model_fn) for model_fn in model_fns]
    return tf.switch_case(source, branches), source
