"""Top-1/top-5 accuracy and logit collection over a data loader, streamed batch by batch.

``evaluate_accuracy`` keeps only counters, so memory does not grow with the data; ``collect_logits``
keeps the logits when a caller needs them. ``evaluate_runners`` sends every batch through several
runners at once, so the data is decoded once and the agreement of each candidate with the first runner
(the baseline) is accumulated in the same pass. Accuracies are percentages; ``top5`` is ``None`` for
models with five classes or fewer, where it would be 100% by construction. Ties in the logits go to
the lowest class index (numpy's argmax), for top-1 and for agreement alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from rescompress.errors import DataError, RescompressError
from rescompress.measure.agreement import Agreement, AgreementCounter, predicted_class

TOLERANCE = 1e-9  # points / percent: float rounding, never a real difference in accuracy

ProgressFn = Callable[..., Iterable]  # progress(iterable, total=..., description=...) -> iterable


@dataclass(frozen=True)
class AccuracyResult:
    """Top-1/top-5 accuracy in percent over ``n`` labeled images."""

    top1: float
    top5: float | None  # None when the model has fewer than 5 classes
    n: int
    correct1: int
    correct5: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows have their label among the ``k`` largest logits (k=1: :func:`predicted_class`).

    Ties are broken towards the lower class index, as for top-1, so top-k never misses the top-1 class.
    """
    if k == 1:
        return int((predicted_class(logits) == labels).sum())
    top = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


class AccuracyCounter:
    """Accumulates top-1/top-5 counts batch by batch."""

    def __init__(self) -> None:
        self.n = 0
        self.correct1 = 0
        self.correct5 = 0
        self.classes: int | None = None

    def update(self, logits: np.ndarray, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if (labels < 0).any():
            raise DataError("accuracy needs labeled data, but this batch has unlabeled images")
        classes = max(logits.shape[1], 2)  # one output: a binary classifier, labels 0 and 1
        if (labels >= classes).any():
            raise DataError(f"a label ({int(labels.max())}) is out of range for a model with {classes} classes")
        self.classes = classes
        self.n += len(labels)
        self.correct1 += topk_correct(logits, labels, 1)
        if classes > 5:
            self.correct5 += topk_correct(logits, labels, 5)

    def result(self) -> AccuracyResult:
        if self.n == 0:
            raise DataError("no labeled images were evaluated; the data is empty")
        has5 = self.classes is not None and self.classes > 5
        return AccuracyResult(
            top1=100.0 * self.correct1 / self.n,
            top5=100.0 * self.correct5 / self.n if has5 else None,
            n=self.n,
            correct1=self.correct1,
            correct5=self.correct5 if has5 else None,
        )


def iter_batches(
    loader: Iterable, limit: int | None = None, progress: ProgressFn | None = None, description: str = ""
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(float32 inputs, int64 labels)`` numpy batches from a loader of tensors, at most ``limit`` images."""
    total = len(loader) if hasattr(loader, "__len__") else None
    it = progress(loader, total=total, description=description) if progress else loader
    seen = 0
    for x, y in it:
        x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        y = y.numpy() if hasattr(y, "numpy") else np.asarray(y)
        if limit is not None and seen + len(x) > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        if len(x):
            yield np.ascontiguousarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)
        seen += len(x)
        if limit is not None and seen >= limit:
            break


def finite_logits(logits: np.ndarray, name: str) -> np.ndarray:
    """``logits`` unchanged, or an error: argmax of NaN is a class, so a broken model would otherwise get a
    plausible-looking top-1."""
    if not np.isfinite(logits).all():
        raise RescompressError(f"{name}: logits contain NaN or Inf; the model output is broken")
    return logits


def evaluate_accuracy(runner, loader: Iterable, progress: ProgressFn | None = None) -> AccuracyResult:
    """Top-1/top-5 of ``runner`` over every batch of ``loader`` (labels required)."""
    counter = AccuracyCounter()
    for x, y in iter_batches(loader, progress=progress, description=f"evaluate {runner.name}"):
        counter.update(finite_logits(runner.run(x), runner.name), y)
    return counter.result()


def collect_logits(
    runner, loader: Iterable, limit: int | None = None, progress: ProgressFn | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All logits ``(N, classes)`` and labels ``(N,)`` (-1 where unlabeled) of ``runner`` over ``loader``."""
    logits, labels = [], []
    for x, y in iter_batches(loader, limit, progress, f"logits {runner.name}"):
        logits.append(runner.run(x))
        labels.append(y)
    if not logits:
        raise DataError("the data is empty; no logits were collected")
    return np.concatenate(logits), np.concatenate(labels)


@dataclass
class EvaluationPass:
    """What one pass of several runners over the same data produced (keyed by runner label)."""

    n: int
    labeled: bool
    accuracy: dict[str, AccuracyResult]  # empty when the data is unlabeled
    agreement: dict[str, Agreement]  # each candidate vs the first runner
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # top-1 class per image, if kept
    labels_sha256: str = ""  # fingerprint of the label sequence (which images, in which order)

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "labeled": self.labeled,
            "accuracy": {k: v.to_dict() for k, v in self.accuracy.items()},
            "agreement": {k: v.to_dict() for k, v in self.agreement.items()},
            "labels_sha256": self.labels_sha256,
        }


def evaluate_runners(
    runners: Mapping[str, object],
    loader: Iterable,
    limit: int | None = None,
    progress: ProgressFn | None = None,
    require_labels: bool = False,
    keep_predictions: bool = False,
) -> EvaluationPass:
    """Run every batch through all ``runners``; accuracy per runner, agreement of each with the first."""
    if not runners:
        raise RescompressError("no runners to evaluate")
    names = list(runners)
    acc = {k: AccuracyCounter() for k in names}
    agr = {k: AgreementCounter() for k in names[1:]}
    preds: dict[str, list[np.ndarray]] = {k: [] for k in names}
    digest = hashlib.sha256()
    n = 0
    labeled: bool | None = None
    for x, y in iter_batches(loader, limit, progress, "evaluate"):
        batch_labeled = bool((y >= 0).all())
        if labeled is None:
            labeled = batch_labeled
        elif labeled != batch_labeled:
            raise DataError("the data mixes labeled and unlabeled images")
        if require_labels and not labeled:
            raise DataError("accuracy needs labeled data, but the data has no labels")
        digest.update(y.astype("<i8").tobytes())
        n += len(y)
        outs = {k: finite_logits(runners[k].run(x), k) for k in names}
        base = outs[names[0]]
        for k in names:
            if labeled:
                acc[k].update(outs[k], y)
            if keep_predictions:
                preds[k].append(predicted_class(outs[k]))
        for k in names[1:]:
            agr[k].update(base, outs[k])
    if n == 0:
        raise DataError("the data is empty; nothing was evaluated")
    return EvaluationPass(
        n=n,
        labeled=bool(labeled),
        accuracy={k: c.result() for k, c in acc.items()} if labeled else {},
        agreement={k: c.result() for k, c in agr.items()},
        predictions={k: np.concatenate(v) for k, v in preds.items()} if keep_predictions else {},
        labels_sha256=digest.hexdigest(),
    )
