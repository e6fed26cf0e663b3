"""Measurement: accuracy, agreement with a baseline, interleaved latency, benchmark reports and the CI gate.

Every function here takes runners (:mod:`rescompress.runtimes`), so the same code measures a torch
model, an ONNX file in ONNX Runtime or OpenVINO, or a TensorRT engine. Results are small dataclasses
with ``to_dict``; the CLI only renders them.
"""

from rescompress.measure.accuracy import (
    AccuracyResult,
    EvaluationPass,
    collect_logits,
    evaluate_accuracy,
    evaluate_runners,
)
from rescompress.measure.agreement import SQNR_CAP_DB, Agreement, compare_logits
from rescompress.measure.latency import LatencyRatio, LatencyReport, LatencyStats, measure_latency

__all__ = [
    "SQNR_CAP_DB",
    "AccuracyResult",
    "Agreement",
    "EvaluationPass",
    "LatencyRatio",
    "LatencyReport",
    "LatencyStats",
    "collect_logits",
    "compare_logits",
    "evaluate_accuracy",
    "evaluate_runners",
    "measure_latency",
]
