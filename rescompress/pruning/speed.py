"""Measured ONNX Runtime CPU latency of torch models, for ``--target-latency`` and the before/after report.

MACs are only a proxy: what the user keeps is time. Each model is exported to a temporary FP32 ONNX
file and run by ONNX Runtime on the CPU with intra-op spinning off (DESIGN decision 6); the models are
timed interleaved in blocks, so a change in machine load hits all of them alike, and compared as ratios
of medians, through the project's runners and ``measure.measure_latency``.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class LatencyResult:
    """Median milliseconds per batch for each model and batch size; ``ratio`` = candidate / baseline."""

    batch_sizes: tuple[int, ...]
    median_ms: dict[str, dict[int, float]]
    threads: int | None
    spread: dict[str, dict[int, float]] | None = None  # (max - min block median) / median: the noise

    def ratio(self, candidate: str, baseline: str, batch: int) -> float:
        return self.median_ms[candidate][batch] / self.median_ms[baseline][batch]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        d["median_ms"] = {k: {str(b): v for b, v in per.items()} for k, per in self.median_ms.items()}
        if self.spread is not None:
            d["spread"] = {k: {str(b): v for b, v in per.items()} for k, per in self.spread.items()}
        return d


def export_for_timing(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """FP32 ONNX with a dynamic batch axis (no metadata, no parity check: only speed matters here)."""
    model = model.eval().cpu()
    dummy = torch.zeros(input_shape)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices are not the user's concern
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    return path


def ort_latency(
    models: dict[str, nn.Module],
    input_shape: tuple[int, ...],
    batch_sizes: tuple[int, ...] = (1, 8),
    rounds: int = 5,
    iters: int = 5,
    warmup_s: float = 0.3,
    threads: int | None = None,
) -> LatencyResult:
    """Median ORT CPU latency of each model, timed interleaved by ``measure.measure_latency``."""
    from rescompress.measure.latency import measure_latency
    from rescompress.runtimes import make_runner

    with tempfile.TemporaryDirectory(prefix="rescompress-lat-") as tmp:
        runners = {}
        for i, (name, model) in enumerate(models.items()):
            path = export_for_timing(model, (1, *input_shape[1:]), Path(tmp) / f"m{i}.onnx")
            runners[name] = make_runner(str(path), runtime="onnxruntime", threads=threads, spinning=False)
        report = measure_latency(
            runners, lambda b: (b, *input_shape[1:]), batch_sizes=batch_sizes, warmup_s=warmup_s,
            iters=iters, rounds=rounds,
        )
    medians = {name: {b: report.get(name, b).median_ms for b in batch_sizes} for name in models}
    spread = {name: {b: report.get(name, b).spread for b in batch_sizes} for name in models}
    return LatencyResult(tuple(batch_sizes), medians, threads, spread)
