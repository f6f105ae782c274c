"""Evaluation of the LLR model on bird-or-bicycle under the challenge's attacks.

For each attack the whole split is read, attacked batch by batch and classified; the result is
the challenge's accuracy at 80% and at 100% coverage (see :mod:`llr.coverage`). Attacks:

* ``clean``: the images as they are.
* ``spatial_grid``: the worst of 5x5x31 rotations and translations per image (:mod:`llr.spatial`).
* ``pgd``, ``pgd_EPS_STEP_NITER``: white-box L-infinity PGD through both modules (the project's
  :func:`adversarial_logit_pairing.adversarial_attack.pgd`). The name is ALP's attack
  description, parsed by ``adversarial_attack.parse_attack_description`` with its limits, but
  the attack differs on purpose: it moves away from the TRUE label, as the challenge's PGD did,
  where ALP's ``pgd`` moves away from the model's prediction. EPS and STEP are on the 0..255
  scale (images are in [0,1], so 16 means 16/255). ALP's ``pgdll``/``pgdrnd`` are not offered.
* ``spsa``: gradient-free SPSA, eps 16/255, after one random rotation and translation as in the
  challenge (:mod:`llr.spsa`).
* ``common_corruptions``: per image, the worst of the selected corruptions; or one corruption
  by its name, e.g. ``jpeg_compression`` (:mod:`llr.corruptions`).
* Strong attacks on the TRUE labels (:mod:`adversarial_logit_pairing.attacks`, EPS on the
  0..255 scale): ``apgdce_EPS[_NITER]`` (APGD on the cross-entropy), ``apgdmargin_EPS[_NITER]``
  (APGD on the margin ``z_other - z_y``, the stand-in for DLR, which is undefined for two
  classes) and ``square_EPS[_NQUERIES]`` (gradient-free); also ``pgdtrue_*``, ``fabt_*`` and
  ``autoattack_EPS[_NITER_NQUERIES]`` (on two classes: APGD-CE, APGD on the targeted margin,
  FAB-T with one target, Square). ``apgddlr_*`` and ``apgdt_*`` are refused. Each returns the
  adversarial image of every point it fooled (the clean image elsewhere), scored at 80% and
  100% coverage like the other attacks.

The command line is :mod:`llr.evaluate`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
from absl import logging

from adversarial_logit_pairing import adversarial_attack, atomic_files, attacks
from adversarial_logit_pairing.errors import ConfigError, DataError
from adversarial_logit_pairing.progress import ProgressLog
from llr import corruptions, coverage, data, spatial, spsa

BASE_ATTACKS = ("clean", "spatial_grid", "pgd", "spsa", "common_corruptions")
DEFAULT_ATTACKS = ",".join(BASE_ATTACKS)

Attack = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


@dataclasses.dataclass
class EvalSettings:
    """What to evaluate and how hard to attack. Pixel budgets are on the 0..255 scale."""

    data_dir: str
    split: str = "test"
    batch_size: int = 16
    image_size: int = data.DEFAULT_IMAGE_SIZE
    num_examples: int = -1
    seed: int = 0
    spatial_limits: tuple = spatial.SPATIAL_LIMITS
    spatial_grid: tuple = spatial.GRID_GRANULARITY
    spatial_black_border: float = spatial.BLACK_BORDER_FRACTION
    pgd_eps: float = 16.0
    pgd_step_size: float = 2.0
    pgd_iters: int = 20
    spsa_eps: float = 16.0
    spsa_steps: int = spsa.NUM_STEPS
    spsa_samples: int = spsa.NUM_SAMPLES
    spsa_learning_rate: float = spsa.LEARNING_RATE
    spsa_delta: float = spsa.DELTA
    spsa_random_spatial: bool = True
    spsa_batch_size: int = 1
    corruptions: tuple = tuple(corruptions.CORRUPTIONS)
    corruption_severity: int = 1


@dataclasses.dataclass
class AttackResult:
    """The challenge's numbers for one attack."""

    attack: str
    num_examples: int
    accuracy_at_80: float
    accuracy_at_100: float
    num_covered_at_80: int
    num_errors_at_80: int
    num_errors_at_100: int
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_attacks(text: str) -> list[str]:
    """Splits and validates ``--attacks``.

    Raises:
      ConfigError: an empty list, an unknown or a repeated name.
    """
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if not names:
        raise ConfigError("--attacks is empty; choose from " + _valid_attacks())
    for name in names:
        known = name in BASE_ATTACKS or name in corruptions.CORRUPTIONS
        if attacks.is_strong_attack_description(name):
            try:  # the two classes of bird-or-bicycle: no DLR
                attacks.description_stages(name, num_classes=2)
            except ConfigError as exc:
                raise ConfigError(f"--attacks: {exc}") from None
        elif _pgd_spec(name) is None and not known:
            raise ConfigError(f"--attacks: unknown attack {name!r}; choose from "
                              + _valid_attacks())
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"--attacks: {', '.join(repeated)} listed more than once")
    return names


def _pgd_spec(name: str) -> Optional[adversarial_attack.AttackSpec]:
    """EPS, STEP and NITER of ``pgd_EPS_STEP_NITER`` (ALP's grammar and limits); None for
    names of other attacks.

    Raises:
      ConfigError: naming the attack when it is malformed or a number is out of range.
    """
    if not name.startswith("pgd_"):
        return None
    try:
        return adversarial_attack.parse_attack_description(name)
    except ConfigError as exc:
        raise ConfigError(f"--attacks: {exc}") from None


def _valid_attacks() -> str:
    return (", ".join(BASE_ATTACKS) + ", pgd_EPS_STEP_NITER, apgdce_EPS, apgdmargin_EPS, "
            "square_EPS (strong attacks on the true labels), or one corruption: "
            + ", ".join(corruptions.CORRUPTIONS))


def check_settings(settings: EvalSettings) -> None:
    """Raises ConfigError (naming the flag) for values no attack can run with."""
    checks = [
        (settings.batch_size >= 1, "--batch_size must be >= 1"),
        (settings.num_examples != 0, "--num_examples must be positive, or -1 for the whole split"),
        (settings.image_size >= 8, "--image_size must be >= 8"),
        (len(settings.spatial_limits) == 3, "--spatial_limits takes 3 numbers: dx,dy,angle"),
        (len(settings.spatial_grid) == 3 and min(settings.spatial_grid) >= 1,
         "--spatial_grid takes 3 positive integers: n_dx,n_dy,n_angle"),
        (0.0 <= settings.spatial_black_border < 0.5, "--spatial_black_border must be in [0, 0.5)"),
        (settings.pgd_iters >= 1, "--pgd_iters must be >= 1"),
        (settings.pgd_eps > 0 and settings.pgd_step_size > 0,
         "--pgd_eps and --pgd_step_size must be > 0"),
        (settings.spsa_steps >= 1, "--spsa_steps must be >= 1"),
        (settings.spsa_eps > 0, "--spsa_eps must be > 0"),
        (settings.spsa_delta > 0, "--spsa_delta must be > 0 (the gradient estimate divides "
         "by it)"),
        (settings.spsa_learning_rate > 0, "--spsa_learning_rate must be > 0"),
        (settings.spsa_samples >= 2 and settings.spsa_samples % 2 == 0,
         "--spsa_samples must be even and >= 2 (half of the probes are mirrored)"),
        (settings.spsa_batch_size >= 1, "--spsa_batch_size must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    corruptions.check_names(settings.corruptions, settings.corruption_severity)


def _seed(seed: int, kind: int, batch_index: int, extra: int = 0) -> tf.Tensor:
    # Stateless seeds: the same flags and data give the same adversarial examples.
    mixed = ((kind * 1_000_003 + batch_index) * 1_000_003 + extra) % (2 ** 31)
    return tf.constant([seed, mixed], tf.int64)


def make_attack(name: str, model, settings: EvalSettings) -> Attack:
    """The attack called ``name``: ``attack(images, labels, batch_index) -> adversarial images``.

    ``model`` maps [0,1] images to two-class logits (an :class:`llr.hub_model.LLRModel`).
    """
    predict = tf.function(lambda x: model(x), reduce_retracing=True)

    if name == "clean":
        return lambda images, labels, batch_index: images

    if name == "spatial_grid":
        def spatial_grid(images, labels, batch_index):
            progress = ProgressLog(f"spatial_grid batch {batch_index + 1}",
                                   int(np.prod(settings.spatial_grid)), "transforms", 30.0)
            result = spatial.grid_attack(
                predict, images, labels, limits=settings.spatial_limits,
                granularity=settings.spatial_grid, black_border=settings.spatial_black_border,
                on_transform=lambda done, total: progress.update())
            return result.images.numpy()
        return spatial_grid

    spec = _pgd_spec(name)
    if name == "pgd" or spec:
        if spec:
            eps, step, iters = spec.eps, spec.step, spec.num_iter
        else:
            eps, step, iters = settings.pgd_eps, settings.pgd_step_size, settings.pgd_iters

        def pgd(images, labels, batch_index):
            return adversarial_attack.pgd(
                tf.constant(images), (0.0, 1.0), model, eps=eps / 255.0,
                step_size=step / 255.0, num_iter=int(iters), labels=tf.constant(labels),
                seed=_seed(settings.seed, 1, batch_index)).numpy()
        return pgd

    if name == "spsa":
        attack = spsa.compiled_spsa(
            model, eps=settings.spsa_eps / 255.0, num_steps=settings.spsa_steps,
            num_samples=settings.spsa_samples, learning_rate=settings.spsa_learning_rate,
            delta=settings.spsa_delta)

        def spsa_attack(images, labels, batch_index):
            if settings.spsa_random_spatial:
                # The challenge's SPSA starts from one random rotation and translation
                # (without a black border).
                images = spatial.random_spatial(
                    images, settings.spatial_limits, 0.0,
                    seed=_seed(settings.seed, 2, batch_index)).numpy()
            chunk = settings.spsa_batch_size
            progress = ProgressLog(f"spsa batch {batch_index + 1}", len(images), "images", 30.0)
            out = []
            for start in range(0, len(images), chunk):
                out.append(attack(tf.constant(images[start:start + chunk]),
                                  tf.constant(labels[start:start + chunk]),
                                  _seed(settings.seed, 3, batch_index, start)).numpy())
                progress.update(len(out[-1]))
            return np.concatenate(out)
        return spsa_attack

    if attacks.is_strong_attack_description(name):
        def strong(images, labels, batch_index):
            result, _ = attacks.run_strong_attack(
                name, model, images, labels, bounds=(0.0, 1.0),
                seed=_seed(settings.seed, 4, batch_index), batch_size=len(images))
            return result.x_adv.numpy()
        return strong

    if name == "common_corruptions" or name in corruptions.CORRUPTIONS:
        names = settings.corruptions if name == "common_corruptions" else (name,)

        def corrupted(images, labels, batch_index):
            worst, _ = corruptions.worst_corruption(
                lambda x: predict(tf.constant(x)).numpy(), images, labels, names,
                settings.corruption_severity, seed=settings.seed * 100003 + batch_index * 101)
            return worst
        return corrupted

    raise ConfigError(f"--attacks: unknown attack {name!r}; choose from {_valid_attacks()}")


def evaluate(model, settings: EvalSettings, attacks: list[str]) -> list[AttackResult]:
    """Runs each attack over the split and scores it at 80% and 100% coverage.

    Raises:
      ConfigError: bad settings or attack names.
      MissingDataError, DataError: a missing split or class folder, an unreadable image.
    """
    check_settings(settings)
    attack_fns = {name: make_attack(name, model, settings) for name in attacks}
    predict = tf.function(lambda x: model(x), reduce_retracing=True)
    total = data.count_examples(settings.data_dir, settings.split, settings.num_examples)
    if total == 0:
        raise DataError(f"split '{settings.split}' in {settings.data_dir} holds no examples")
    logging.info("Evaluating %d examples of %s/%s under %s", total, settings.data_dir,
                 settings.split, ", ".join(attacks))
    results = []
    for name in attacks:
        start = time.time()
        progress = ProgressLog(name, total, "images")
        all_logits, all_labels = [], []
        batches = data.iterate_split(settings.data_dir, settings.split, settings.batch_size,
                                     settings.image_size, settings.num_examples,
                                     shuffle_seed=settings.seed)
        for batch_index, batch in enumerate(batches):
            adversarial = attack_fns[name](batch.images, batch.labels, batch_index)
            all_logits.append(predict(tf.constant(adversarial, tf.float32)).numpy())
            all_labels.append(batch.labels)
            progress.update(len(batch.labels))
        logits, labels = np.concatenate(all_logits), np.concatenate(all_labels)
        at_80 = coverage.accuracy_at_coverage(logits, labels, 0.8)
        at_100 = coverage.accuracy_at_coverage(logits, labels, 1.0)
        result = AttackResult(name, len(labels), at_80.accuracy, at_100.accuracy,
                              at_80.num_covered, at_80.num_errors, at_100.num_errors,
                              round(time.time() - start, 3))
        logging.info("[%s] accuracy at 80%% coverage = %.3f, at 100%% = %.3f", name,
                     result.accuracy_at_80, result.accuracy_at_100)
        results.append(result)
    return results


def format_table(results: list[AttackResult]) -> str:
    """The printed table: one row per attack."""
    header = ("attack", "acc@80% cov", "acc@100% cov", "covered@80%", "examples")
    rows = [(r.attack, f"{r.accuracy_at_80:.3f}", f"{r.accuracy_at_100:.3f}",
             str(r.num_covered_at_80), str(r.num_examples)) for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def result_records(results: list[AttackResult], context: Optional[dict] = None) -> list[dict]:
    """One flat dict per attack: the result fields plus ``context`` (split, modules, ...)."""
    return [{**r.as_dict(), **(context or {})} for r in results]


def json_lines(records: list[dict]) -> str:
    return "".join(json.dumps(record, sort_keys=False) + "\n" for record in records)


def csv_text(records: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def write_results(path: str, records: list[dict]) -> None:
    """Writes JSON lines (CSV when ``path`` ends in .csv); the file appears only when complete.

    Raises:
      DataError: naming ``--output_file`` when it cannot be written.
    """
    text = csv_text(records) if path.lower().endswith(".csv") else json_lines(records)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_files.write_file(path, text)
    except (OSError, tf.errors.OpError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "message", None) or exc
        raise DataError(f"--output_file={path}: cannot write it ({reason})") from None
