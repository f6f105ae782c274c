"""Strong-attack descriptions: the strings a command line names an evaluation attack by.

The grammar is in the package docstring (``adversarial_logit_pairing.attacks``): METHOD_EPS
with an optional budget, ``pgdtrue_EPS_STEP_NITER_RESTARTS``, ``autoattack_EPS``; EPS and
STEP are integers 1..255 on the 0..255 pixel scale.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import tensorflow as tf

from adversarial_logit_pairing.adversarial_attack import ModelFn
from adversarial_logit_pairing.attacks.apgd import run_apgd, run_apgd_targeted
from adversarial_logit_pairing.attacks.autoattack import (
    AutoAttackReport,
    Stage,
    autoattack_stages,
    run_stages,
)
from adversarial_logit_pairing.attacks.batching import ArrayLike, AttackResult, Bounds, Seed
from adversarial_logit_pairing.attacks.fab import run_fab_targeted
from adversarial_logit_pairing.attacks.pgd import run_pgd_true_labels
from adversarial_logit_pairing.attacks.square import run_square
from adversarial_logit_pairing.errors import ConfigError

# method -> (number of integer fields after EPS it accepts, standard budget)
_FIELDS = {
    "apgdce": ((0, 1), 100),
    "apgddlr": ((0, 1), 100),
    "apgdmargin": ((0, 1), 100),
    "apgdt": ((0, 1), 100),
    "fabt": ((0, 1), 100),
    "square": ((0, 1), 5000),
    "pgdtrue": ((3,), 0),
    "autoattack": ((0, 2), 0),
}
# The smallest number of classes each method is defined for (DLR needs 3, targeted DLR 4).
_MIN_CLASSES = {"apgddlr": 3, "apgdt": 4}
_DESCRIPTION_RE = re.compile(r"^([a-z]+)((?:_\d+)+)$")
_GRAMMAR = ("apgdce_EPS[_NITER], apgddlr_EPS[_NITER], apgdmargin_EPS[_NITER], apgdt_EPS[_NITER], "
            "fabt_EPS[_NITER], square_EPS[_NQUERIES], pgdtrue_EPS_STEP_NITER_RESTARTS or "
            "autoattack_EPS[_NITER_NQUERIES]")


@dataclasses.dataclass(frozen=True)
class StrongAttackSpec:
    """A parsed strong-attack description; ``eps`` and ``step`` are on the 0..255 scale."""

    method: str
    eps: int
    budget: int = 0  # iterations (queries for square); autoattack: 0 = the standard ones
    step: int = 0  # pgdtrue only
    restarts: int = 1
    queries: int = 0  # autoattack only: Square's queries (0 = the standard 5000)

    def eps_in(self, bounds: Bounds) -> float:
        """EPS in model units for inputs in ``bounds``."""
        return self.eps * (bounds[1] - bounds[0]) / 255.0

    def step_in(self, bounds: Bounds) -> float:
        return self.step * (bounds[1] - bounds[0]) / 255.0


def parse_strong_attack_description(description: str) -> StrongAttackSpec:
    """Parses a strong-attack description (grammar in the module docstring).

    Raises:
      ConfigError: (a ValueError) with a one-line message naming the description.
    """
    text = (description or "").strip()
    match = _DESCRIPTION_RE.match(text)
    if not match or match.group(1) not in _FIELDS:
        raise ConfigError(f"invalid strong attack description {description!r}: expected "
                          f"{_GRAMMAR} (e.g. 'autoattack_8')")
    method = match.group(1)
    eps, *rest = (int(field) for field in match.group(2)[1:].split("_"))
    counts, standard = _FIELDS[method]
    if len(rest) not in counts:
        raise ConfigError(f"invalid strong attack description {description!r}: {method} takes "
                          f"{' or '.join(str(1 + c) for c in counts)} integer field(s)")
    if not 1 <= eps <= 255:
        raise ConfigError(f"invalid strong attack description {description!r}: EPS must be in "
                          f"1..255 (the 0..255 pixel scale), got {eps}")
    if method == "pgdtrue":
        step, budget, restarts = rest
        if not 1 <= step <= 255 or budget < 1 or restarts < 1:
            raise ConfigError(f"invalid strong attack description {description!r}: STEP must "
                              "be in 1..255, NITER and RESTARTS >= 1")
        return StrongAttackSpec(method, eps, budget, step, restarts)
    if rest and min(rest) < 1:
        raise ConfigError(f"invalid strong attack description {description!r}: the budget "
                          "must be >= 1")
    if method == "autoattack":
        return StrongAttackSpec(method, eps, *(rest[:1] or [0]), queries=(rest[1:] or [0])[0])
    return StrongAttackSpec(method, eps, rest[0] if rest else standard)


def is_strong_attack_description(description: str) -> bool:
    """Whether ``description`` names one of this package's methods (it may still be
    malformed: :func:`parse_strong_attack_description` says how)."""
    match = _DESCRIPTION_RE.match((description or "").strip())
    return bool(match) and match.group(1) in _FIELDS


def description_stages(description: str,
                       num_classes: Optional[int] = None) -> Callable[[int], tuple[Stage, ...]]:
    """The attack sequence a description names, as ``stages_for(num_classes)``.

    ``autoattack_*`` is the four-stage sequence (with its budgets); every other description is
    one stage named by its method. With ``num_classes`` given, a method the model cannot
    support is refused now rather than when it runs.

    Raises:
      ConfigError: a malformed description, or DLR with fewer classes than it needs.
    """
    spec = parse_strong_attack_description(description)
    needed = _MIN_CLASSES.get(spec.method, 2)
    if num_classes is not None and num_classes < needed:
        raise ConfigError(f"strong attack {description!r} needs >= {needed} classes (DLR is "
                          f"undefined below), the model has {num_classes}: use apgdce or "
                          "apgdmargin")
    if spec.method == "autoattack":
        budgets = {}
        if spec.budget:
            budgets = dict(apgd_iters=spec.budget, fab_iters=spec.budget)
        if spec.queries:
            budgets["square_queries"] = spec.queries
        return lambda classes: autoattack_stages(classes, **budgets)
    if spec.method.startswith("apgd") and spec.method != "apgdt":
        loss = {"apgdce": "ce", "apgddlr": "dlr", "apgdmargin": "margin"}[spec.method]
        stage = Stage(spec.method, f"loss={loss}, {spec.budget} iterations, 1 restart",
                      lambda model_fn, x, labels, **common: run_apgd(
                          model_fn, x, labels, loss=loss, n_iter=spec.budget, **common))
    elif spec.method == "apgdt":
        stage = Stage(spec.method, f"loss=dlr-targeted, 9 targets, {spec.budget} iterations",
                      lambda model_fn, x, labels, **common: run_apgd_targeted(
                          model_fn, x, labels, n_iter=spec.budget, **common))
    elif spec.method == "fabt":
        stage = Stage(spec.method, f"9 targets, {spec.budget} iterations",
                      lambda model_fn, x, labels, **common: run_fab_targeted(
                          model_fn, x, labels, n_iter=spec.budget, **common))
    elif spec.method == "square":
        stage = Stage(spec.method, f"{spec.budget} queries, p_init 0.8",
                      lambda model_fn, x, labels, **common: run_square(
                          model_fn, x, labels, n_queries=spec.budget, **common))
    else:
        def pgdtrue(model_fn, x, labels, *, bounds, **common):
            return run_pgd_true_labels(model_fn, x, labels, step_size=spec.step_in(bounds),
                                       n_iter=spec.budget, n_restarts=spec.restarts,
                                       bounds=bounds, **common)
        stage = Stage(spec.method, f"step {spec.step}/255, {spec.budget} iterations, "
                      f"{spec.restarts} restart(s), random start", pgdtrue)
    return lambda classes: (stage,)


def run_strong_attack(
    description: str,
    model_fn: ModelFn,
    x: ArrayLike,
    labels: ArrayLike,
    *,
    bounds: Bounds = (-1.0, 1.0),
    seed: Seed = (0, 0),
    batch_size: int = 128,
) -> tuple[AttackResult, Optional[AutoAttackReport]]:
    """Runs the attack a description names on the true ``labels``.

    Returns:
      (AttackResult(x_adv, robust), the AutoAttackReport for 'autoattack_*' else None).

    Raises:
      ConfigError: for a malformed description or one the model cannot support (DLR losses
        with too few classes).
    """
    spec = parse_strong_attack_description(description)
    common = dict(eps=spec.eps_in(bounds), bounds=bounds, seed=seed, batch_size=batch_size)
    stages_for = description_stages(description)
    if spec.method == "autoattack":
        x_adv, report = run_stages(stages_for, model_fn, x, labels, **common)
        return AttackResult(x_adv, tf.constant(report.robust)), report
    (stage,) = stages_for(0)  # one attack, run on all points with the seed as given
    return stage.run(model_fn, x, labels, **common), None
