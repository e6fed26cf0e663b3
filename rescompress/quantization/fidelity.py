"""Numbers that say how close a quantized model stays to FP32: logit SQNR, top-k agreement, accuracy.

Pure functions over logit arrays (and one helper that runs ONNX Runtime sessions over a loader), used to
pick the calibration method, rank layers for fallback and fill the report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from rescompress.measure.accuracy import topk_correct
from rescompress.measure.agreement import sqnr_db as capped_sqnr_db
from rescompress.measure.agreement import top1_agreement


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """10·log10(‖ref‖² / ‖ref − cand‖²) in dB, capped at ±``SQNR_CAP_DB`` (identical: the cap) so reports
    stay strict JSON."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(candidate, dtype=np.float64)) ** 2))
    return capped_sqnr_db(float(np.sum(ref * ref)), noise)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percent of rows whose label is among the ``k`` largest logits (k=1: the predicted class)."""
    return topk_correct(logits, labels, min(k, logits.shape[1])) * 100.0 / len(logits)


@dataclass(frozen=True)
class Fidelity:
    """A candidate's logits against FP32's on the same images."""

    n: int
    top1_agreement: float  # percent of images with the same argmax
    sqnr_db: float
    max_abs_diff: float
    top1: float | None = None  # accuracy, when the data has labels
    top5: float | None = None
    fp32_top1: float | None = None
    fp32_top5: float | None = None

    @property
    def top1_drop(self) -> float | None:
        return None if self.top1 is None or self.fp32_top1 is None else self.fp32_top1 - self.top1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top1_drop"] = self.top1_drop
        return d


def compare(fp32: np.ndarray, cand: np.ndarray, labels: np.ndarray | None = None) -> Fidelity:
    agreement = top1_agreement(fp32, cand) if len(fp32) else 0.0
    kw = {}
    if labels is not None and len(labels) and np.all(labels >= 0):
        kw = {"top1": topk_accuracy(cand, labels, 1), "fp32_top1": topk_accuracy(fp32, labels, 1)}
        if fp32.shape[1] > 5:  # with five classes or fewer, top-5 is 100% by construction
            kw |= {"top5": topk_accuracy(cand, labels, 5), "fp32_top5": topk_accuracy(fp32, labels, 5)}
    return Fidelity(
        n=len(fp32), top1_agreement=agreement, sqnr_db=sqnr_db(fp32, cand),
        max_abs_diff=float(np.max(np.abs(fp32 - cand))) if len(fp32) else 0.0, **kw,
    )


def run_sessions(sessions: dict, batches: Iterable) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Logits of every session over the same batches (one pass over the data), and the labels."""
    outs: dict[str, list[np.ndarray]] = {k: [] for k in sessions}
    labels: list[np.ndarray] = []
    for batch in batches:
        x, y = (batch[0], batch[1]) if isinstance(batch, list | tuple) else (batch, None)
        x = np.ascontiguousarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float32)
        for name, s in sessions.items():
            outs[name].append(s.run(None, {s.get_inputs()[0].name: x})[0])
        if y is not None:
            labels.append(np.asarray(y.numpy() if hasattr(y, "numpy") else y).reshape(-1))
    logits = {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in outs.items()}
    lab = np.concatenate(labels) if labels else None
    return logits, lab
