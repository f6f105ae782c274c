"""AdvProp (Xie et al. 2020, arXiv 1911.09665): auxiliary batch norms for adversarial examples.

Clean and adversarial images have different statistics; AdvProp gives every batch norm an
auxiliary twin (its own gamma, beta and moving statistics) that only adversarial images go
through, so the main batch norms, the ones evaluation and export use, see clean images only.
Per training step (``--hparams=advprop=true``, see ``training.make_train_step``):

* the adversarial batch is made with the model in inference mode through the AUXILIARY batch
  norms (their moving statistics), as ALP's attack runs in inference mode;
* the clean batch runs in training mode through the main batch norms and the adversarial batch
  through the auxiliary ones: two passes, so each set normalises with, and moves its
  statistics towards, its own half only (no mixed-batch statistics);
* the loss is the sum of the clean and the adversarial cross-entropies (each a mean over its
  half), plus logit pairing between the two passes' logits and weight decay, as in ALP.

The model constructors know nothing of it: ``add_auxiliary_batch_norms`` adds a twin to each
:class:`~adversarial_logit_pairing.models.layers.BatchNorm` of a built model, named
``<batch norm scope>/aux/{gamma,beta,moving_mean,moving_variance}`` and appended to
``model.variables_by_name`` (so the optimizer, weight decay, the moving average and training
checkpoints hold them), and ``auxiliary_batch_norms(model)`` is the block inside which every
batch norm runs as its twin (a check at the top of ``BatchNorm.__call__``, and in
``distribution.CrossReplicaBatchNorm`` for ``--sync_batch_norm``). A model built by
``eval.py`` or export has no twins, and the auxiliary entries of a training checkpoint are
ignored there like optimizer slots.

Fine-tuning from a checkpoint without auxiliary batch norms (the released EfficientNets, any
checkpoint of a run without AdvProp) starts each twin as a copy of its main batch norm, as
timm's ``convert_splitbn_model`` does (``finetune_without_missing_twins`` then
``copy_main_into_auxiliary``).

The routing is decided when the model is traced (``is_training`` and the block are Python
state), per thread: ``MirroredStrategy`` runs each replica in its own thread, and each enters
the block itself inside the step. An attack that caches its own ``tf.function`` when called
eagerly (``adversarial_attack``) traces once per model: call it inside a ``tf.function``, as
the training step does, to have it traced in the block.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import tensorflow as tf

from adversarial_logit_pairing import adversarial_attack
from adversarial_logit_pairing.checkpoints import EMA_SUFFIX
from adversarial_logit_pairing.errors import ConfigError

# The twin's variables live under ``<batch norm scope>/AUX_SCOPE/``.
AUX_SCOPE = "aux"

_routing = threading.local()


def enabled(hparams: Any) -> bool:
    """Whether ``hparams`` turn AdvProp on (``advprop=true``)."""
    return bool(getattr(hparams, "advprop", False))


def check_hparams(hparams: Any, aux_weight: float = 0.0) -> None:
    """AdvProp trains the auxiliary batch norms on adversarial examples: it needs an attack,
    and each batch-norm set must see only its own half of ``[clean; adversarial]``.

    ``aux_weight`` is the training loss's auxiliary-head weight (``training.aux_loss_weight``):
    the auxiliary head is not run by AdvProp's two passes.

    Raises:
      ConfigError: naming the hparams, for ``advprop=true`` with ``train_adv_method=clean``,
        with Kurakin's mixed batch (``train_adv_fraction > 0``) or with an auxiliary-head loss.
    """
    if not enabled(hparams):
        return
    if adversarial_attack.parse_attack_description(hparams.train_adv_method).is_clean:
        raise ConfigError("--hparams: advprop=true trains the auxiliary batch norms on "
                          "adversarial examples and needs an attack, got train_adv_method="
                          f"{hparams.train_adv_method} (e.g. train_adv_method=pgd_1_1_1)")
    if hparams.train_adv_fraction > 0 or aux_weight > 0:
        raise ConfigError("hparam 'advprop': not combined with a mixed batch "
                          "(train_adv_fraction > 0) or an auxiliary-head loss (set "
                          "aux_loss_weight=0): each BN set must see only its own half")


def twin_of(batch_norm: tf.Module) -> Optional[tf.Module]:
    """The auxiliary twin of ``batch_norm``, or None when it has none."""
    return getattr(batch_norm, "auxiliary", None)


def twin_in_use(batch_norm: tf.Module) -> Optional[tf.Module]:
    """The layer ``batch_norm`` must run as now: its twin inside ``auxiliary_batch_norms``.

    None outside the block (and for a twin itself, which has no twin): the layer runs as usual.
    ``BatchNorm.__call__`` starts with this check.
    """
    if getattr(_routing, "depth", 0):
        return twin_of(batch_norm)
    return None


def batch_norm_pairs(model: tf.Module) -> list[tuple[tf.Module, tf.Module]]:
    """(main, twin) for every batch norm of ``model`` that has a twin, in model order."""
    pairs = []
    for main in _batch_norms(model):
        twin = twin_of(main)
        if twin is not None:
            pairs.append((main, twin))
    return pairs


def _batch_norms(model: tf.Module) -> list[tf.Module]:
    """The main batch norms of ``model`` (twins excluded), each once, in creation order."""
    # Imported here: layers.py imports this module for its hook.
    from adversarial_logit_pairing.models.layers import BatchNorm

    found: dict[int, tf.Module] = {}
    twins = set()
    for module in (model, *model.submodules):
        if isinstance(module, BatchNorm) and id(module) not in found:
            found[id(module)] = module
            twin = twin_of(module)
            if twin is not None:
                twins.add(id(twin))
    # Slim's creation order (the order of the model's variables), not tf.Module's sorting.
    order = {v.ref(): i for i, v in enumerate(model.variables)}

    def position(bn: tf.Module) -> int:
        return min((order.get(v.ref(), len(order)) for v in bn.variables_by_name.values()),
                   default=len(order))

    return sorted((bn for key, bn in found.items() if key not in twins), key=position)


def add_auxiliary_batch_norms(model: tf.Module) -> int:
    """Gives every batch norm of a built model an auxiliary twin; returns how many.

    Each twin is a layer of the same class (fused or not), with the same decay, epsilon,
    centring and scaling, whose variables are ``<scope>/aux/<name>``, start as copies of the
    main ones, and are appended to ``model.variables_by_name``. Call it under the strategy
    scope the model was built in, after ``distribution.use_cross_replica_batch_norm`` if any.

    Raises:
      ConfigError: the model has no batch norm, or already has twins.
    """
    from adversarial_logit_pairing.models.layers import VariableFactory

    mains = _batch_norms(model)
    if not mains:
        raise ConfigError(f"--hparams: advprop=true needs batch norms, and {model.scope} has "
                          "none")
    if any(twin_of(bn) is not None for bn in mains):
        raise ConfigError(f"{model.scope} already has auxiliary batch norms")
    factory = VariableFactory()
    for main in mains:
        twin = type(main)(
            f"{main.scope}/{AUX_SCOPE}", main.channels, factory, decay=main.decay,
            epsilon=main.epsilon, center=main.beta is not None, scale=main.gamma is not None)
        main.auxiliary = twin
        model._track(twin)
    copy_main_into_auxiliary(batch_norm_pairs(model))
    return len(mains)


@contextlib.contextmanager
def auxiliary_batch_norms(model: tf.Module) -> Iterator[None]:
    """A block in which every batch norm of ``model`` runs as its auxiliary twin.

    Both modes: inference normalises with the twin's moving statistics, training with the
    batch's and moves the twin's. Blocks nest; the routing is per thread (see the module
    docstring).

    Raises:
      ConfigError: the model has no twins (``add_auxiliary_batch_norms`` was not called).
    """
    if not batch_norm_pairs(model):
        raise ConfigError(f"{model.scope} has no auxiliary batch norms: build the training "
                          "state with --hparams=advprop=true")
    _routing.depth = getattr(_routing, "depth", 0) + 1
    try:
        yield
    finally:
        _routing.depth -= 1


def attack_context(model: tf.Module, hparams: Any) -> contextlib.AbstractContextManager:
    """Where the training step makes its adversarial batch: through the twins with AdvProp."""
    return auxiliary_batch_norms(model) if enabled(hparams) else contextlib.nullcontext()


def training_logits(model: tf.Module, images: tf.Tensor, adv_images: tf.Tensor) -> tf.Tensor:
    """``[clean; adversarial]`` logits of AdvProp's two training-mode passes.

    The clean images go through the main batch norms and the adversarial ones through the
    twins, so each set sees only its own half. The result lines up with the labels and the
    logit-pairing halves of ALP's single ``[clean; adversarial]`` pass.
    """
    clean = model(images, is_training=True)
    with auxiliary_batch_norms(model):
        adversarial = model(adv_images, is_training=True)
    return tf.concat([clean, adversarial], axis=0)


def copy_main_into_auxiliary(pairs: list[tuple[tf.Module, tf.Module]]) -> None:
    """Assigns each main batch norm's variables to its twin's (gamma, beta, statistics)."""
    for main, twin in pairs:
        for source, target in zip(main.variables_by_name.values(),
                                  twin.variables_by_name.values()):
            target.assign(source.read_value())


def finetune_without_missing_twins(
    model: tf.Module, assignments: Mapping[str, tf.Variable], checkpoint_names: set[str]
) -> tuple[dict[str, tf.Variable], list[tuple[tf.Module, tf.Module]]]:
    """Splits fine-tuning assignments into those to read and the twins to copy afterwards.

    A twin whose variables the checkpoint does not hold all (a checkpoint without AdvProp) is
    not read; it is returned, with its main batch norm, for ``copy_main_into_auxiliary`` once
    the main one is restored. A twin the checkpoint holds (an AdvProp run) is read. Twins of
    excluded scopes are not in ``assignments`` and stay as they are.

    Args:
      model: the model being fine-tuned.
      assignments: checkpoint name (plain or ``/ExponentialMovingAverage``) -> variable.
      checkpoint_names: the names the checkpoint holds.

    Returns:
      The assignments to restore and the (main, twin) pairs to copy afterwards.
    """
    kept = dict(assignments)
    to_copy = []
    for main, twin in batch_norm_pairs(model):
        names = [name for name, variable in assignments.items()
                 if any(variable is v for v in twin.variables_by_name.values())]
        if not names or all(name.removesuffix(EMA_SUFFIX) in checkpoint_names
                            for name in names):
            continue
        for name in names:
            del kept[name]
        to_copy.append((main, twin))
    return kept, to_copy
