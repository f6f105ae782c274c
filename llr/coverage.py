"""Accuracy at a coverage: the Unrestricted Adversarial Examples challenge's metric.

A two-class model may abstain on the examples it is least confident about. Confidence is the
larger of the two logits; at coverage c the model answers the ``int(c * N)`` most confident
examples and every example tied with the last of them (the challenge thresholds with ``>=``),
and accuracy is measured on the answered examples only. The challenge reports c = 0.8 and 1.0.
The prediction is bird (1) only when ``logits[:, 0] < logits[:, 1]``: a tie is a bicycle.
"""

from __future__ import annotations

import dataclasses

import numpy as np

REPORTED_COVERAGES = (0.8, 1.0)


@dataclasses.dataclass(frozen=True)
class CoverageResult:
    coverage: float
    accuracy: float
    num_covered: int
    num_errors: int


def predictions(logits: np.ndarray) -> np.ndarray:
    """Class predictions [N] of two-class logits [N, 2]; ties go to class 0 (bicycle)."""
    logits = np.asarray(logits)
    return (logits[:, 0] < logits[:, 1]).astype(np.int64)


def confidences(logits: np.ndarray) -> np.ndarray:
    """The challenge's confidence: the larger logit."""
    return np.max(np.asarray(logits), axis=1)


def accuracy_at_coverage(logits: np.ndarray, labels: np.ndarray,
                         coverage: float) -> CoverageResult:
    """Accuracy on the ``coverage`` fraction of most confident examples.

    Args:
      logits: two-class logits [N, 2].
      labels: true classes [N] (0 = bicycle, 1 = bird).
      coverage: fraction in (0, 1].

    Returns:
      The accuracy, the number of answered examples (ties at the threshold included) and the
      number of errors among them.

    Raises:
      ValueError: no examples, mismatched shapes or a coverage outside (0, 1].
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[1] != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits [N, 2] and labels [N], got {logits.shape} and "
                         f"{labels.shape}")
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    n = logits.shape[0]
    if n == 0:
        raise ValueError("no examples")
    conf = confidences(logits)
    num_answered = int(coverage * n)
    # The challenge indexes its descending sort with int(c*N) - 1; when int(c*N) == 0 that
    # index is -1, the least confident example, so everything is answered. Kept as is.
    threshold = np.sort(conf)[::-1][num_answered - 1]
    covered = conf >= threshold
    errors = int(np.sum(covered & (predictions(logits) != labels)))
    num_covered = int(np.sum(covered))
    return CoverageResult(coverage, 1.0 - errors / num_covered, num_covered, errors)
