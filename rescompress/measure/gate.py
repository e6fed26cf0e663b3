"""The CI accuracy-regression gate: thresholds, checks, stored metrics and JUnit output.

A gate compares a candidate model with a reference on labeled data and passes when every check holds:

* ``accuracy_drop``: baseline top-1 minus candidate top-1, in percentage points; passes when
  ``drop <= max_drop`` (the edge passes; a negative drop is an improvement).
* ``top1_agreement``: percent of images where both models predict the same class; passes when
  ``agreement >= min_agreement``.
* ``latency_ratio``: candidate median latency / baseline median latency at one batch size, timed
  interleaved in the same run; passes when ``ratio <= max_latency_ratio`` (only when that is given).

The reference is a baseline model run now (``--baseline``), stored metrics from an earlier run
(``--against m.json``, written by ``--save-metrics``), or both; with neither, ``--save-metrics`` alone
records the candidate's metrics (no checks run) so they can be pinned. Stored metrics hold the top-1
accuracy and each image's predicted class, so ``accuracy_drop_vs_stored`` and
``top1_agreement_vs_stored`` need no baseline model: a repository can pin its accuracy in a small JSON
file. They are only valid on the same images in the same order, which is checked through a hash of the
label sequence. Latency is never compared with stored times: absolute times from another run or
machine mean little, so ``latency_ratio`` needs ``--baseline``. Comparisons allow 1e-9 points of float
rounding, so a drop computed as 0.5000000000000142 still passes ``--max-drop 0.5``.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from rescompress import __version__
from rescompress.errors import DataError, RescompressError, UsageError
from rescompress.fileio import atomic_path, write_text_atomic
from rescompress.measure.accuracy import TOLERANCE, ProgressFn, evaluate_runners
from rescompress.measure.agreement import Agreement
from rescompress.measure.benchmark import check_compatible_runners
from rescompress.measure.latency import LatencyReport, measure_latency
from rescompress.runtimes import runner_info
from rescompress.spec import Preprocess

METRICS_FORMAT = "rescompress.gate-metrics"
METRICS_VERSION = 1


@dataclass(frozen=True)
class GateThresholds:
    max_drop: float = 0.5  # percentage points of top-1
    min_agreement: float = 99.0  # percent
    max_latency_ratio: float | None = None
    batch: int = 1  # batch size of the latency check

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise UsageError(f"--max-drop must be a non-negative number of points, got {self.max_drop}")
        if not 0.0 <= self.min_agreement <= 100.0:
            raise UsageError(f"--min-agreement is a percentage (0-100), got {self.min_agreement}")
        if self.max_latency_ratio is not None and not 0 < self.max_latency_ratio < math.inf:
            raise UsageError(f"--max-latency-ratio must be positive, got {self.max_latency_ratio}")
        if self.batch < 1:
            raise UsageError(f"--batch must be a positive integer, got {self.batch}")

    def to_dict(self) -> dict:
        return {
            "max_drop": self.max_drop, "min_agreement": self.min_agreement,
            "max_latency_ratio": self.max_latency_ratio, "batch": self.batch,
        }


@dataclass(frozen=True)
class GateMetrics:
    """What a gate run measured for one model; saved by ``--save-metrics``, read by ``--against``."""

    model: str
    runtime: str
    num_classes: int | None
    top1: float
    top5: float | None
    n: int
    correct1: int
    labels_sha256: str
    data: dict
    preprocess: dict | None
    predictions: tuple[int, ...] | None = None  # top-1 class per image, in data order
    latency_ms: float | None = None
    latency_batch: int | None = None
    tool_version: str = __version__

    def to_dict(self, with_predictions: bool = True) -> dict:
        d = {
            "format": METRICS_FORMAT,
            "format_version": METRICS_VERSION,
            "tool_version": self.tool_version,
            "model": self.model,
            "runtime": self.runtime,
            "num_classes": self.num_classes,
            "top1": self.top1,
            "top5": self.top5,
            "n": self.n,
            "correct1": self.correct1,
            "labels_sha256": self.labels_sha256,
            "data": self.data,
            "preprocess": self.preprocess,
            "latency_ms": self.latency_ms,
            "latency_batch": self.latency_batch,
        }
        if with_predictions:
            d["predictions"] = list(self.predictions) if self.predictions is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "metrics") -> GateMetrics:
        if d.get("format") != METRICS_FORMAT:
            raise RescompressError(f"{source} is not a rescompress gate metrics file (write one with --save-metrics)")
        if int(d.get("format_version", 0)) > METRICS_VERSION:
            raise RescompressError(f"{source} was written by a newer rescompress (format {d.get('format_version')})")
        try:
            preds = d.get("predictions")
            return cls(
                model=str(d["model"]),
                runtime=str(d.get("runtime", "")),
                num_classes=None if d.get("num_classes") is None else int(d["num_classes"]),
                top1=float(d["top1"]),
                top5=None if d.get("top5") is None else float(d["top5"]),
                n=int(d["n"]),
                correct1=int(d.get("correct1", round(float(d["top1"]) * int(d["n"]) / 100))),
                labels_sha256=str(d.get("labels_sha256", "")),
                data=dict(d.get("data") or {}),
                preprocess=d.get("preprocess"),
                predictions=None if preds is None else tuple(int(p) for p in preds),
                latency_ms=None if d.get("latency_ms") is None else float(d["latency_ms"]),
                latency_batch=None if d.get("latency_batch") is None else int(d["latency_batch"]),
                tool_version=str(d.get("tool_version", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RescompressError(f"{source} is a damaged gate metrics file: {exc}") from None

    def save(self, path: Path | str) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> GateMetrics:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RescompressError(f"metrics file {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise RescompressError(f"cannot read metrics file {path}: {exc}") from None
        if not isinstance(d, dict):
            raise RescompressError(f"{path} is not a rescompress gate metrics file")
        return cls.from_dict(d, str(path))


@dataclass(frozen=True)
class GateCheck:
    name: str
    passed: bool
    value: float
    threshold: float
    op: str  # "<=" or ">="
    detail: str

    @property
    def shown(self) -> str:
        """The value with as few digits as keep it on its side of the threshold: 98.9967 against 99 shows
        as 98.997, never as a failing "99"."""
        def side(v: float) -> int:
            return (v > self.threshold) - (v < self.threshold)

        for digits in range(4, 17):
            text = f"{self.value:.{digits}g}"
            if side(float(text)) == side(self.value):
                return text
        return repr(self.value)

    @property
    def message(self) -> str:
        verdict = "holds" if self.passed else "violated"
        return f"{self.name} = {self.shown} (must be {self.op} {self.threshold:g}): {verdict}; {self.detail}"

    def to_dict(self) -> dict:
        return {
            "name": self.name, "passed": self.passed, "value": self.value, "threshold": self.threshold,
            "op": self.op, "detail": self.detail, "message": self.message,
        }


def check_drop(name: str, reference_top1: float, candidate_top1: float, max_drop: float) -> GateCheck:
    drop = reference_top1 - candidate_top1
    return GateCheck(
        name, drop <= max_drop + TOLERANCE, drop, max_drop, "<=",
        f"top-1 {reference_top1:.4f}% -> {candidate_top1:.4f}% (points)",
    )


def check_agreement(name: str, agreement: float, min_agreement: float) -> GateCheck:
    return GateCheck(
        name, agreement >= min_agreement - TOLERANCE, agreement, min_agreement, ">=",
        "percent of images with the same top-1 class",
    )


def check_latency(name: str, ratio: float, max_ratio: float, batch: int) -> GateCheck:
    return GateCheck(
        name, ratio <= max_ratio + TOLERANCE, ratio, max_ratio, "<=",
        f"candidate / baseline median latency at batch {batch}, interleaved in this run",
    )


def prediction_agreement(reference: tuple[int, ...], candidate: tuple[int, ...]) -> float:
    if len(reference) != len(candidate) or not candidate:
        raise DataError(f"cannot compare {len(candidate)} predictions with {len(reference)} stored ones")
    same = sum(1 for a, b in zip(reference, candidate, strict=True) if a == b)
    return 100.0 * same / len(candidate)


@dataclass(frozen=True)
class GateResult:
    checks: tuple[GateCheck, ...]
    candidate: GateMetrics
    baseline: GateMetrics | None
    stored: GateMetrics | None
    thresholds: GateThresholds
    agreement: Agreement | None = None  # full logit agreement with the live baseline
    latency: LatencyReport | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    stored_source: str | None = None  # the --against file

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.checks if not c.passed)

    @property
    def verdict(self) -> str:
        """``PASSED`` or ``FAILED: check, check``; ``RECORDED`` for a run without a reference (no check)."""
        if not self.checks:
            return "RECORDED (no reference: metrics measured, nothing checked)"
        return "PASSED" if self.passed else "FAILED: " + ", ".join(self.failed)

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "passed": self.passed,
            "checks": [c.to_dict() for c in self.checks],
            "thresholds": self.thresholds.to_dict(),
            "candidate": self.candidate.to_dict(with_predictions=False),
            "baseline": self.baseline.to_dict(with_predictions=False) if self.baseline else None,
            "stored": self.stored.to_dict(with_predictions=False) if self.stored else None,
            "agreement": self.agreement.to_dict() if self.agreement else None,
            "latency": self.latency.to_dict() if self.latency else None,
            "notes": list(self.notes),
        }


def junit_xml(result: GateResult, suite: str = "rescompress.gate") -> str:
    """JUnit XML: one testcase per check, a ``failure`` element (with the message) for each violated one."""
    failures = len(result.failed)
    root = ET.Element("testsuites", name="rescompress", tests=str(len(result.checks)), failures=str(failures))
    ts = ET.SubElement(
        root, "testsuite", name=suite, tests=str(len(result.checks)), failures=str(failures), errors="0",
        skipped="0",
    )
    props = ET.SubElement(ts, "properties")
    for key, value in (
        ("candidate", result.candidate.model),
        ("baseline", result.baseline.model if result.baseline else ""),
        ("against", result.stored_source or "" if result.stored else ""),
        ("against_model", result.stored.model if result.stored else ""),
        ("images", str(result.candidate.n)),
    ):
        ET.SubElement(props, "property", name=key, value=value)
    for c in result.checks:
        case = ET.SubElement(ts, "testcase", classname=suite, name=c.name)
        if not c.passed:
            fail = ET.SubElement(case, "failure", message=c.message, type="ThresholdViolated")
            fail.text = c.message
        else:
            ET.SubElement(case, "system-out").text = c.message
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(result: GateResult, path: Path | str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(junit_xml(result), encoding="utf-8")
    return Path(path)


def junit_error_xml(message: str, suite: str = "rescompress.gate") -> str:
    """JUnit XML for a gate that could not measure (exit 1): one testcase with an ``error`` element."""
    root = ET.Element("testsuites", name="rescompress", tests="1", failures="0", errors="1")
    ts = ET.SubElement(root, "testsuite", name=suite, tests="1", failures="0", errors="1", skipped="0")
    case = ET.SubElement(ts, "testcase", classname=suite, name="gate")
    err = ET.SubElement(case, "error", message=message, type="GateError")
    err.text = message
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit_error(message: str, path: Path | str) -> Path:
    """Replace ``path`` with an error report, so CI never shows an earlier run's verdict for a broken one."""
    with atomic_path(path) as tmp:
        tmp.write_text(junit_error_xml(message), encoding="utf-8")
    return Path(path)


def _metrics_for(label: str, runner, ev, data_info: dict, preprocess: Preprocess) -> GateMetrics:
    acc = ev.accuracy[label]
    return GateMetrics(
        model=runner_info(runner).source,
        runtime=runner_info(runner).runtime,
        num_classes=runner_info(runner).num_classes,
        top1=acc.top1,
        top5=acc.top5,
        n=acc.n,
        correct1=acc.correct1,
        labels_sha256=ev.labels_sha256,
        data=data_info,
        preprocess=preprocess.to_dict(),
        predictions=tuple(int(p) for p in ev.predictions[label]),
    )


def _check_same_data(stored: GateMetrics, n: int, labels_sha256: str, source: str) -> None:
    if stored.n != n or (stored.labels_sha256 and stored.labels_sha256 != labels_sha256):
        raise DataError(
            f"{source} was measured on different images ({stored.n} images, labels hash "
            f"{stored.labels_sha256[:12]}) than this run ({n} images, {labels_sha256[:12]}); "
            "use the same --data and --limit as when the metrics were saved"
        )


def run_gate(
    candidate,
    preprocess: Preprocess,
    data: str | Path,
    *,
    baseline=None,
    stored: GateMetrics | None = None,
    stored_source: str = "stored metrics",
    thresholds: GateThresholds = GateThresholds(),  # noqa: B008 (frozen, immutable default)
    limit: int | None = None,
    eval_batch_size: int = 64,
    warmup_s: float = 1.0,
    iters: int = 20,
    rounds: int = 5,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
    record_only: bool = False,
) -> GateResult:
    """Measure ``candidate`` (and ``baseline``) on ``data`` and check ``thresholds``; never raises on a failed check.

    ``candidate``/``baseline`` are runners. Raises ``RescompressError`` for input problems: no reference,
    unlabeled data, class-count mismatch, stored metrics from other data. ``record_only`` allows no
    reference at all: the candidate is measured (to save its metrics, e.g. to pin them) and no check runs.
    """
    if baseline is None and stored is None and not record_only:
        raise UsageError("the gate needs a reference: --baseline MODEL, --against METRICS.json, or both")
    if thresholds.max_latency_ratio is not None and baseline is None:
        raise UsageError(
            "--max-latency-ratio needs --baseline: latency is compared in the same run, never with stored times"
        )
    runners: dict[str, object] = {}
    if baseline is not None:
        runners["baseline"] = baseline
    runners["candidate"] = candidate
    num_classes = check_compatible_runners(runners, preprocess)
    if stored is not None and None not in (stored.num_classes, runner_info(candidate).num_classes):
        if stored.num_classes != runner_info(candidate).num_classes:
            raise RescompressError(
                f"the candidate outputs {runner_info(candidate).num_classes} classes but {stored_source} "
                f"was measured on a model with {stored.num_classes}"
            )
    from rescompress.data import check_compatible, make_loader, open_dataset

    dataset = open_dataset(data, preprocess, split="test")
    # With an unknown class count only the labels are required; the runners' outputs are checked per batch.
    classes = num_classes if num_classes is not None else (dataset.info.num_classes or 1)
    check_compatible(dataset.info, classes, require_labels=True, purpose="the gate")
    planned = min(len(dataset), limit or len(dataset))
    if stored is not None and stored.n != planned:  # refused before any evaluation; labels are compared after
        raise DataError(
            f"{stored_source} was measured on {stored.n} images, this run would evaluate {planned}; "
            "use the same --data and --limit as when the metrics were saved"
        )
    loader = make_loader(dataset, batch_size=eval_batch_size, limit=limit)
    if log:
        log(f"evaluating {len(runners)} model(s) on {planned} images")
    ev = evaluate_runners(runners, loader, limit=limit, progress=progress, require_labels=True, keep_predictions=True)
    if stored is not None:
        _check_same_data(stored, ev.n, ev.labels_sha256, stored_source)
    data_info = {**dataset.info.to_dict(), "evaluated": ev.n, "limit": limit}
    cand = _metrics_for("candidate", candidate, ev, data_info, preprocess)
    base = _metrics_for("baseline", baseline, ev, data_info, preprocess) if baseline is not None else None

    latency = None
    if thresholds.max_latency_ratio is not None:
        if log:
            log(f"timing baseline and candidate at batch {thresholds.batch}, interleaved")
        latency = measure_latency(
            runners, lambda b: runner_info(baseline).input_shape(b, preprocess), (thresholds.batch,),
            warmup_s=warmup_s, iters=iters, rounds=rounds,
        )
        lat_c = latency.get("candidate", thresholds.batch).median_ms
        lat_b = latency.get("baseline", thresholds.batch).median_ms
        cand = _with_latency(cand, lat_c, thresholds.batch)
        base = _with_latency(base, lat_b, thresholds.batch)

    checks: list[GateCheck] = []
    notes: list[str] = []
    if base is not None:
        checks.append(check_drop("accuracy_drop", base.top1, cand.top1, thresholds.max_drop))
        checks.append(check_agreement("top1_agreement", ev.agreement["candidate"].top1_agreement,
                                      thresholds.min_agreement))
        if latency is not None:
            ratio = latency.ratio("candidate", thresholds.batch).latency_ratio
            checks.append(check_latency("latency_ratio", ratio, thresholds.max_latency_ratio, thresholds.batch))
    if stored is not None:
        checks.append(check_drop("accuracy_drop_vs_stored", stored.top1, cand.top1, thresholds.max_drop))
        if stored.predictions is not None:
            agree = prediction_agreement(stored.predictions, cand.predictions or ())
            checks.append(check_agreement("top1_agreement_vs_stored", agree, thresholds.min_agreement))
        else:
            notes.append(f"{stored_source} holds no predictions: agreement with it was not checked")
    return GateResult(
        stored_source=stored_source if stored is not None else None,
        checks=tuple(checks),
        candidate=cand,
        baseline=base,
        stored=stored,
        thresholds=thresholds,
        agreement=ev.agreement.get("candidate") if baseline is not None else None,
        latency=latency,
        notes=tuple(notes),
    )


def _with_latency(m: GateMetrics | None, ms: float, batch: int) -> GateMetrics | None:
    if m is None:
        return None
    return replace(m, latency_ms=ms, latency_batch=batch)

