"""How closely a candidate's logits follow a baseline's: top-1 agreement, |Δlogit|, KL and logit SQNR.

All statistics are accumulated batch by batch (:class:`AgreementCounter`), so agreement over a large
evaluation set never keeps the logits; :func:`compare_logits` is the one-shot form. Sums run in float64.

Definitions (baseline ``b``, candidate ``c``, both ``(N, classes)``):

* ``top1_agreement``: percent of rows where ``argmax b == argmax c`` (first index on ties, as numpy). A
  model with a single output is a binary (sigmoid) classifier: its class is ``logit > 0``
  (:func:`predicted_class`), and ``mean_kl`` compares the two Bernoulli distributions.
* ``max_abs_diff`` / ``mean_abs_diff``: max and mean of ``|b - c|`` over every element.
* ``mean_kl``: mean over rows of KL(softmax(b) || softmax(c)), in nats.
* ``sqnr_db``: ``10 * log10(sum b^2 / sum (b - c)^2)``. Identical logits have an infinite SQNR; it is
  reported as :data:`SQNR_CAP_DB` (200 dB), and every value is capped there, so the field is always a
  finite number (JSON-safe, comparable). Any real difference between float32 logits lies far below the
  cap (float32 rounding alone gives ~140 dB), so 200 means "identical". A zero baseline with a non-zero
  difference reports ``-SQNR_CAP_DB``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from rescompress.errors import RescompressError

SQNR_CAP_DB = 200.0


@dataclass(frozen=True)
class Agreement:
    """Baseline-vs-candidate logit statistics over ``n`` images (see the module docstring)."""

    top1_agreement: float  # percent
    max_abs_diff: float
    mean_abs_diff: float
    mean_kl: float
    sqnr_db: float  # capped at SQNR_CAP_DB; SQNR_CAP_DB means identical
    n: int

    @property
    def identical(self) -> bool:
        return self.max_abs_diff == 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """``10 log10(signal / noise)`` clamped to ``[-SQNR_CAP_DB, SQNR_CAP_DB]`` (noise 0 -> the cap)."""
    if noise_energy <= 0.0:
        return SQNR_CAP_DB
    if signal_energy <= 0.0:
        return -SQNR_CAP_DB
    return float(max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10.0 * math.log10(signal_energy / noise_energy))))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def predicted_class(logits: np.ndarray) -> np.ndarray:
    """Each row's class: the argmax (ties -> lowest index); with one output (a binary classifier with a
    sigmoid), 1 where the logit is positive, else 0."""
    logits = np.asarray(logits)
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).astype(np.int64)
    return logits.argmax(axis=1).astype(np.int64)


def top1_agreement(baseline: np.ndarray, candidate: np.ndarray) -> float:
    """Percent of rows whose :func:`predicted_class` is the same (100 for no rows)."""
    if len(baseline) == 0:
        return 100.0
    return float(np.mean(predicted_class(baseline) == predicted_class(candidate)) * 100.0)


def kl_per_row(baseline: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """KL(softmax(b) || softmax(c)) for each row (Bernoulli sigmoid KL for one output), float64, >= 0."""
    b = np.asarray(baseline, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    if b.shape[1] == 1:  # [0, z] softmaxes to [1 - sigmoid(z), sigmoid(z)], as finetune.as_two_class pads
        b, c = np.concatenate([np.zeros_like(b), b], axis=1), np.concatenate([np.zeros_like(c), c], axis=1)
    lb, lc = _log_softmax(b), _log_softmax(c)
    return np.maximum((np.exp(lb) * (lb - lc)).sum(axis=1), 0.0)


class AgreementCounter:
    """Accumulates :class:`Agreement` statistics batch by batch."""

    def __init__(self) -> None:
        self.n = 0
        self.agree = 0
        self.elements = 0
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.sum_kl = 0.0
        self.signal = 0.0
        self.noise = 0.0

    def update(self, baseline: np.ndarray, candidate: np.ndarray) -> None:
        b = np.asarray(baseline, dtype=np.float64)
        c = np.asarray(candidate, dtype=np.float64)
        if b.ndim != 2 or b.shape != c.shape:
            raise RescompressError(
                f"cannot compare logits of shapes {tuple(b.shape)} and {tuple(c.shape)}: "
                "baseline and candidate must output the same number of classes"
            )
        if not (np.isfinite(b).all() and np.isfinite(c).all()):
            raise RescompressError("logits contain NaN or Inf; the model output is broken")
        d = b - c
        self.n += b.shape[0]
        self.agree += int((predicted_class(b) == predicted_class(c)).sum())
        self.elements += d.size
        if d.size:
            self.max_abs = max(self.max_abs, float(np.abs(d).max()))
        self.sum_abs += float(np.abs(d).sum())
        self.sum_kl += float(kl_per_row(b, c).sum())
        self.signal += float((b * b).sum())
        self.noise += float((d * d).sum())

    def result(self) -> Agreement:
        if self.n == 0:
            raise RescompressError("no images were compared; the data is empty")
        return Agreement(
            top1_agreement=100.0 * self.agree / self.n,
            max_abs_diff=self.max_abs,
            mean_abs_diff=self.sum_abs / self.elements,
            mean_kl=self.sum_kl / self.n,
            sqnr_db=sqnr_db(self.signal, self.noise),
            n=self.n,
        )


def compare_logits(baseline: np.ndarray, candidate: np.ndarray) -> Agreement:
    """Agreement of ``candidate`` with ``baseline`` logits (both ``(N, classes)``)."""
    counter = AgreementCounter()
    counter.update(baseline, candidate)
    return counter.result()
