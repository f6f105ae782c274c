"""Strong-attack evaluation of a split, attack by attack: what ``eval.py`` runs for a strong
``--adv_method`` (``autoattack_16``, ``apgdce_16``, ...; grammar in
:mod:`adversarial_logit_pairing.attacks`).

The split is read once for the clean pass, then once per attack of the sequence: each attack
runs over every batch, only on the points all earlier attacks failed on, with one progress
line per attack (images done, images/s, ETA). Reading the data again per attack keeps the
memory bounded by one batch whatever the split size; the evaluation split's order is fixed, so
every pass sees the same batches. Batch ``b`` is attacked with the stateless seed ``(0, b)``
folded with the attack's position in the sequence, as ``attacks.run_stages`` on that batch with
``seed=(0, b)`` would: the same checkpoint and flags give the same report on every run.

The per-example robust mask is kept in record order (the first ``n`` records of the split), so
the masks of separate runs (other attacks, other budgets) combine by a logical AND into the
per-example worst case. The report adds the masking checks of :mod:`masking_checks`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Iterable, Iterator
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
from absl import logging

from adversarial_logit_pairing import adversarial_attack, atomic_files, masking_checks
from adversarial_logit_pairing.adversarial_attack import ModelFn
from adversarial_logit_pairing.attacks import batching, descriptions
from adversarial_logit_pairing.progress import ProgressLog

Bounds = tuple[float, float]
# A callable giving a fresh pass over the data: (images, labels) numpy batches in a fixed order.
Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class AttackRow:
    """One attack of the sequence: points it ran on, robust after it, and its time."""

    name: str
    detail: str
    attacked: int
    robust_count: int
    accuracy: float
    seconds: float


@dataclasses.dataclass
class SequenceResult:
    """The sequence a description names, run at one eps over ``n`` examples."""

    adv_method: str
    eps: int  # on the 0..255 scale
    n: int
    clean: np.ndarray  # bool [n]
    robust: np.ndarray  # bool [n], robust after every attack
    top5: np.ndarray  # bool [n]: label among the 5 highest logits at the final image
    rows: list[AttackRow]

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean.mean()) if self.n else 0.0

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.mean()) if self.n else 0.0

    def as_dict(self) -> dict:
        return {
            "adv_method": self.adv_method, "eps": self.eps, "n": self.n,
            "clean_accuracy": self.clean_accuracy, "clean_count": int(self.clean.sum()),
            "robust_accuracy": self.robust_accuracy, "robust_count": int(self.robust.sum()),
            "top5": float(self.top5.mean()) if self.n else 0.0,
            "attacks": [dataclasses.asdict(row) for row in self.rows],
        }


@dataclasses.dataclass
class StrongReport:
    """The main sequence, the optional runs the masking checks compare with, the warnings."""

    main: SequenceResult
    gradients: masking_checks.GradientStats
    second: Optional[SequenceResult] = None
    training_attack: Optional[tuple[str, float]] = None  # (description, accuracy)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        report = self.main.as_dict()
        report["gradients"] = self.gradients._asdict()
        report["second_eps"] = self.second.as_dict() if self.second else None
        report["training_attack"] = (
            {"adv_method": self.training_attack[0], "accuracy": self.training_attack[1]}
            if self.training_attack else None)
        report["warnings"] = list(self.warnings)
        return report

    def lines(self) -> list[str]:
        """The printed table: clean, then accuracy after each attack; then the warnings."""
        main = self.main
        rows = [f"{main.adv_method} on {main.n} examples (eps {main.eps}/255)",
                f"  {'clean':<10} accuracy {main.clean_accuracy:7.2%} ({int(main.clean.sum())}"
                f"/{main.n})"]
        for row in main.rows:
            rows.append(f"  {row.name:<10} accuracy {row.accuracy:7.2%} ({row.robust_count}/"
                        f"{main.n}), attacked {row.attacked}, {row.seconds:.1f} s [{row.detail}]")
        if self.second:
            rows.append(f"  at eps {self.second.eps}/255: accuracy "
                        f"{self.second.robust_accuracy:7.2%}")
        if self.training_attack:
            rows.append(f"  {self.training_attack[0]}: accuracy {self.training_attack[1]:7.2%}")
        rows.extend(f"  WARNING: {warning}" for warning in self.warnings)
        if not self.warnings:
            rows.append("  masking checks: no warning")
        return rows


def _forward(model_fn: ModelFn, x: np.ndarray, batch_size: int) -> np.ndarray:
    return batching.logits_in_chunks(model_fn, np.asarray(x, np.float32), batch_size)


def _in_top5(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    k = min(5, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)


def _passes(batches: Batches) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for index, (images, labels) in enumerate(batches()):
        yield index, np.asarray(images, np.float32), np.asarray(labels).astype(np.int32)


def run_sequence(model_fn: ModelFn, batches: Batches, adv_method: str, *, bounds: Bounds,
                 num_classes: int, batch_size: int,
                 eps: Optional[int] = None) -> SequenceResult:
    """Runs the strong attack ``adv_method`` over every batch, attack by attack.

    Args:
      model_fn: images -> logits, in inference mode.
      batches: a fresh pass over (images, labels) numpy batches, the same order every call.
      adv_method: a strong attack description.
      bounds: the images' range; num_classes: the model's logits.
      batch_size: most points attacked at once.
      eps: run at this EPS (0..255 scale) instead of the description's.

    Raises:
      ConfigError: a malformed description or one the model cannot support.
    """
    spec = descriptions.parse_strong_attack_description(adv_method)
    if eps is not None and eps != spec.eps:
        prefix, _, rest = adv_method.partition("_")
        adv_method = "_".join([prefix, str(eps), *rest.split("_")[1:]])
        spec = descriptions.parse_strong_attack_description(adv_method)
    stages = descriptions.description_stages(adv_method, num_classes)(num_classes)
    eps_units = spec.eps_in(bounds)

    # ---- Clean pass: correctness and top-5, record order
    clean, top5, sizes = [], [], []
    for _, images, labels in _passes(batches):
        logits = _forward(model_fn, images, batch_size)
        clean.append(logits.argmax(axis=1) == labels)
        top5.append(_in_top5(logits, labels))
        sizes.append(len(labels))
    if not sizes:  # no batch at all: an empty result (the caller reports the empty split)
        empty = np.zeros(0, bool)
        return SequenceResult(adv_method, spec.eps, 0, empty, empty, empty, [])
    clean, top5 = np.concatenate(clean), np.concatenate(top5)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    robust = clean.copy()

    # ---- One pass per attack, only on the points still robust
    rows = []
    for position, stage in enumerate(stages):
        attacked = int(robust.sum())
        progress = ProgressLog(f"{adv_method} {stage.name}", attacked, unit="images")
        start = time.perf_counter()
        for index, images, labels in _passes(batches) if attacked else ():
            part = slice(offsets[index], offsets[index + 1])
            alive = robust[part]
            if not alive.any():
                continue
            seed = batching.fold_seed(tf.constant([0, index], tf.int64), position)
            x_adv, survived = stage.run(model_fn, images, labels, robust=alive, seed=seed,
                                        eps=eps_units, bounds=bounds, batch_size=batch_size)
            broken = alive & ~survived.numpy()
            if broken.any():
                adv_logits = _forward(model_fn, x_adv.numpy()[broken], batch_size)
                top5[part][broken] = _in_top5(adv_logits, labels[broken])
            robust[part] = alive & ~broken
            progress.update(int(alive.sum()))
        seconds = time.perf_counter() - start
        count = int(robust.sum())
        rows.append(AttackRow(stage.name, stage.detail, attacked, count,
                              count / len(robust) if len(robust) else 0.0, round(seconds, 3)))
        logging.info("%s: after %s accuracy %.4f (%d/%d), %.1f s", adv_method, stage.name,
                     rows[-1].accuracy, count, len(robust), seconds)
    return SequenceResult(adv_method, spec.eps, len(clean), clean, robust, top5, rows)


def evaluate(model_fn: ModelFn, batches: Batches, adv_method: str, *, bounds: Bounds,
             num_classes: int, batch_size: int,
             second_eps: Optional[int] = None,
             training_adv_method: Optional[str] = None) -> StrongReport:
    """The strong evaluation with its masking checks.

    Args:
      model_fn, batches, adv_method, bounds, num_classes, batch_size: as
        :func:`run_sequence`.
      second_eps: also run the sequence at this EPS (0..255) and check that accuracy falls
        as eps grows.
      training_adv_method: an original attack description (``pgdll_16_2_10``): also measure
        its accuracy (the attack keeps its own semantics, e.g. ``pgd_*`` moves away from the
        model's prediction; accuracy counts the true labels; batch ``b`` is seeded
        ``(0, b)``) and check the gap.

    Returns:
      The :class:`StrongReport`; its warnings are logged.
    """
    main = run_sequence(model_fn, batches, adv_method, bounds=bounds, num_classes=num_classes,
                        batch_size=batch_size)
    gradients = masking_checks.GradientStats(0, 0, 0)
    trained_correct = 0
    for index, images, labels in _passes(batches):
        gradients += masking_checks.gradient_stats(model_fn, images, labels)
        if training_adv_method:
            adversarial = adversarial_attack.generate_adversarial_examples(
                tf.constant(images), bounds, model_fn, training_adv_method,
                seed=tf.constant([0, index], tf.int64))
            logits = _forward(model_fn, adversarial.numpy(), batch_size)
            trained_correct += int((logits.argmax(axis=1) == labels).sum())
    report = StrongReport(main, gradients)
    if training_adv_method:
        report.training_attack = (training_adv_method, trained_correct / max(main.n, 1))
    if second_eps:
        report.second = run_sequence(model_fn, batches, adv_method, bounds=bounds,
                                     num_classes=num_classes, batch_size=batch_size,
                                     eps=second_eps)
    report.warnings = [warning for warning in (
        masking_checks.square_after_gradients(
            [(row.name, row.attacked, row.robust_count) for row in main.rows]),
        masking_checks.useless_gradients(gradients),
        report.second and masking_checks.eps_not_monotone(
            main.eps, main.robust_accuracy, report.second.eps, report.second.robust_accuracy),
        report.training_attack and masking_checks.training_attack_gap(
            training_adv_method, report.training_attack[1], adv_method,
            main.robust_accuracy),
    ) if warning]
    for warning in report.warnings:
        logging.warning("%s", warning)
    return report


def write_report(path: str, report: StrongReport, context: Optional[dict] = None) -> None:
    """Writes the report as one JSON object (``context`` first: checkpoint, step...),
    atomically."""
    atomic_files.write_file(path, json.dumps({**(context or {}), **report.as_dict()},
                                             indent=1) + "\n")


def write_robust_mask(path: str, robust: np.ndarray) -> None:
    """Writes the per-example robust mask, record order, as ``.npy`` (bool) or, for a name
    ending in ``.csv``, one ``index,robust`` line per example (0/1); atomically."""
    if path.lower().endswith(".csv"):
        text = "index,robust\n" + "".join(f"{i},{int(r)}\n" for i, r in enumerate(robust))
        atomic_files.write_file(path, text)
        return
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(robust, bool))
    atomic_files.write_file(path, buffer.getvalue())
