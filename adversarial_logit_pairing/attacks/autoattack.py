"""AutoAttack, standard version, L-infinity (Croce & Hein 2020): the reference for robustness.

Four complementary attacks, each run ONLY on the points all earlier ones failed on; a point is
robust only if it survives all of them:

1. ``apgd-ce``: APGD on the cross-entropy (100 iterations, 1 restart);
2. ``apgd-t``: APGD on the targeted DLR loss towards each of the 9 highest non-true classes
   (100 iterations each); the scale-invariant DLR defeats saturated softmaxes;
3. ``fab-t``: targeted FAB (9 targets, 100 iterations), a minimal-norm attack counted within
   eps; it does not rely on a loss at all;
4. ``square``: the Square attack (5000 queries, p_init 0.8, no schedule rescaling), which needs
   no gradient, so gradient masking does not stop it.

Models with fewer than 4 classes have no targeted DLR: ``apgd-t`` then uses the targeted
margin ``z_t - z_y`` (reported in the stage's detail).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from adversarial_logit_pairing.adversarial_attack import ModelFn
from adversarial_logit_pairing.attacks import batching
from adversarial_logit_pairing.attacks.apgd import run_apgd, run_apgd_targeted
from adversarial_logit_pairing.attacks.batching import ArrayLike, AttackResult, Bounds, Seed
from adversarial_logit_pairing.attacks.fab import run_fab_targeted
from adversarial_logit_pairing.attacks.losses import MIN_CLASSES
from adversarial_logit_pairing.attacks.square import run_square
from adversarial_logit_pairing.errors import ConfigError

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


@dataclasses.dataclass(frozen=True)
class StageReport:
    """What one attack of the sequence did."""

    name: str
    detail: str  # the settings it ran with, e.g. "loss=dlr-targeted, 9 targets, 100 iterations"
    attacked: int  # points it ran on (those robust after the previous stage)
    robust: np.ndarray  # bool [N]: robust after this stage
    seconds: float

    @property
    def robust_count(self) -> int:
        return int(self.robust.sum())

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.mean()) if self.robust.size else 0.0


@dataclasses.dataclass(frozen=True)
class AutoAttackReport:
    """Clean correctness, then the robust mask after each attack; the last one is final."""

    clean: np.ndarray  # bool [N]: correctly classified without attack
    stages: tuple[StageReport, ...]

    @property
    def robust(self) -> np.ndarray:
        return self.stages[-1].robust if self.stages else self.clean

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean.mean()) if self.clean.size else 0.0

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.mean()) if self.robust.size else 0.0

    def lines(self) -> list[str]:
        """A small table: accuracy after each attack, points attacked and time."""
        rows = [f"{'clean':<8} accuracy {self.clean_accuracy:7.2%} ({int(self.clean.sum())}/"
                f"{self.clean.size})"]
        for stage in self.stages:
            rows.append(
                f"{stage.name:<8} accuracy {stage.robust_accuracy:7.2%} ({stage.robust_count}/"
                f"{stage.robust.size}), attacked {stage.attacked}, {stage.seconds:.1f} s "
                f"[{stage.detail}]"
            )
        return rows


# run(model_fn, x, labels, *, robust, seed, eps, bounds, batch_size) -> AttackResult
StageFn = Callable[..., AttackResult]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One attack of a sequence: its name, the settings it runs with, and how to run it."""

    name: str
    detail: str
    run: StageFn


def autoattack_stages(
    num_classes: int,
    attacks: Sequence[str] = STANDARD_ATTACKS,
    apgd_iters: int = 100,
    apgd_restarts: int = 1,
    n_target_classes: int = 9,
    fab_iters: int = 100,
    square_queries: int = 5000,
) -> tuple[Stage, ...]:
    """The stages of the sequence for a model with ``num_classes`` logits, in order.

    Raises:
      ConfigError: for an unknown attack name.
    """
    unknown = [name for name in attacks if name not in STANDARD_ATTACKS]
    if unknown:
        raise ConfigError(f"unknown AutoAttack stage(s) {unknown}: expected some of "
                          f"{', '.join(STANDARD_ATTACKS)}")
    targeted_loss = (
        "dlr-targeted" if num_classes >= MIN_CLASSES["dlr-targeted"] else "margin-targeted")
    n_targets = max(min(n_target_classes, num_classes - 1), 0)
    table = {
        "apgd-ce": Stage(
            "apgd-ce", f"loss=ce, {apgd_iters} iterations, {apgd_restarts} restart(s)",
            lambda model_fn, x, labels, **common: run_apgd(
                model_fn, x, labels, loss="ce", n_iter=apgd_iters, n_restarts=apgd_restarts,
                **common)),
        "apgd-t": Stage(
            "apgd-t", f"loss={targeted_loss}, {n_targets} targets, {apgd_iters} iterations",
            lambda model_fn, x, labels, **common: run_apgd_targeted(
                model_fn, x, labels, loss=targeted_loss, n_target_classes=n_target_classes,
                n_iter=apgd_iters, **common)),
        "fab-t": Stage(
            "fab-t", f"{n_targets} targets, {fab_iters} iterations",
            lambda model_fn, x, labels, **common: run_fab_targeted(
                model_fn, x, labels, n_target_classes=n_target_classes, n_iter=fab_iters,
                **common)),
        "square": Stage(
            "square", f"{square_queries} queries, p_init 0.8, schedule not rescaled",
            lambda model_fn, x, labels, **common: run_square(
                model_fn, x, labels, n_queries=square_queries, rescale_schedule=False,
                **common)),
    }
    return tuple(table[name] for name in attacks)


def run_stages(
    stages_for: Callable[[int], Sequence[Stage]],
    model_fn: ModelFn,
    x: ArrayLike,
    labels: ArrayLike,
    *,
    eps: float,
    bounds: Bounds = (-1.0, 1.0),
    seed: Seed = (0, 0),
    batch_size: int = 128,
    robust: Optional[ArrayLike] = None,
) -> tuple[tf.Tensor, AutoAttackReport]:
    """Runs the stages ``stages_for(num_classes)`` in order, each only on the points all
    earlier ones failed on (the number of classes is read off the clean pass).

    Stage ``i`` is seeded with ``seed`` folded with ``i``. ``robust`` (optional bool [N])
    restricts the run to those points, as in :func:`run_autoattack`.

    Returns:
      (x_adv, report), as :func:`run_autoattack`.
    """
    eps, bounds = batching.check_inputs(eps, bounds, batch_size)
    seed = batching.as_seed(seed)
    x, labels, logits, robust = batching.start_state(model_fn, x, labels, robust, batch_size)
    stages = stages_for(logits.shape[1] if logits is not None else 0)
    clean = robust.copy()
    x_adv = x.copy()
    reports = []
    for position, stage in enumerate(stages):
        start = time.perf_counter()
        attacked = int(robust.sum())
        if attacked:
            images, survived = stage.run(
                model_fn, x, labels, robust=robust, seed=batching.fold_seed(seed, position),
                eps=eps, bounds=bounds, batch_size=batch_size)
            survived = survived.numpy()
            broken = robust & ~survived
            x_adv[broken] = images.numpy()[broken]
            robust = robust & survived
        reports.append(StageReport(stage.name, stage.detail, attacked, robust.copy(),
                                   time.perf_counter() - start))
    return tf.constant(x_adv), AutoAttackReport(clean, tuple(reports))


def run_autoattack(
    model_fn: ModelFn,
    x: ArrayLike,
    labels: ArrayLike,
    *,
    eps: float,
    bounds: Bounds = (-1.0, 1.0),
    seed: Seed = (0, 0),
    batch_size: int = 128,
    attacks: Sequence[str] = STANDARD_ATTACKS,
    apgd_iters: int = 100,
    apgd_restarts: int = 1,
    n_target_classes: int = 9,
    fab_iters: int = 100,
    square_queries: int = 5000,
) -> tuple[tf.Tensor, AutoAttackReport]:
    """Runs the AutoAttack sequence on the true ``labels``.

    Args:
      model_fn: images -> logits [N, K], in inference mode.
      x: images [N, H, W, C] within ``bounds``; labels: int [N].
      eps: L-infinity radius in model units; bounds: (lo, hi) range of valid inputs.
      seed: shape-[2] stateless seed; each stage folds in its position, so the same seed (and
        batch_size) gives the same images and report.
      batch_size: most points attacked at once.
      attacks: the stages, in order (a subsequence of STANDARD_ATTACKS' names).
      apgd_iters, apgd_restarts, n_target_classes, fab_iters, square_queries: the budgets
        (the standard version's defaults; tests use fewer).

    Returns:
      (x_adv, report): the adversarial image of every point some attack broke (the clean image
      elsewhere), and the :class:`AutoAttackReport`.

    Raises:
      ConfigError: for an unknown attack name or bad settings.
    """
    autoattack_stages(0, attacks)  # an unknown name fails before any work

    def stages_for(num_classes: int) -> tuple[Stage, ...]:
        return autoattack_stages(num_classes, attacks, apgd_iters, apgd_restarts,
                                 n_target_classes, fab_iters, square_queries)

    return run_stages(stages_for, model_fn, x, labels, eps=eps, bounds=bounds, seed=seed,
                      batch_size=batch_size)
