"""Measured ONNX Runtime CPU latency of torch models, for ``--target-latency`` and the before/after report.

MACs are only a proxy: what the user keeps is time. Each model is exported to a temporary FP32 ONNX
file and run by ONNX Runtime on the CPU with intra-op spinning off (DESIGN decision 6); the models are
timed interleaved in blocks, so a change in machine load hits all of them alike, and compared as ratios
of medians. Uses the project's runner and latency code (``runtimes``, ``measure``) where present.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class LatencyResult:
    """Median milliseconds per batch for each model and batch size; ``ratio`` = candidate / baseline."""

    batch_sizes: tuple[int, ...]
    median_ms: dict[str, dict[int, float]]
    threads: int | None

    def ratio(self, candidate: str, baseline: str, batch: int) -> float:
        return self.median_ms[candidate][batch] / self.median_ms[baseline][batch]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        d["median_ms"] = {k: {str(b): v for b, v in per.items()} for k, per in self.median_ms.items()}
        return d


def export_for_timing(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """FP32 ONNX with a dynamic batch axis (no metadata, no parity check: only speed matters here)."""
    model = model.eval().cpu()
    dummy = torch.zeros(input_shape)
    torch.onnx.export(
        model, (dummy,), str(path), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    return path


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    try:
        from rescompress.runtimes import make_runner

        runner = make_runner(str(path), runtime="onnxruntime", threads=threads, spinning=False)
        return runner.run
    except ImportError:
        pass
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda batch: sess.run(None, {name: batch})[0]


def ort_latency(
    models: dict[str, nn.Module],
    input_shape: tuple[int, ...],
    batch_sizes: tuple[int, ...] = (1, 8),
    rounds: int = 5,
    iters: int = 5,
    warmup: int = 2,
    threads: int | None = None,
) -> LatencyResult:
    """Median ORT CPU latency of each model (interleaved blocks of ``iters`` runs, ``rounds`` blocks)."""
    with tempfile.TemporaryDirectory(prefix="rescompress-lat-") as tmp:
        runs = {}
        for i, (name, model) in enumerate(models.items()):
            path = export_for_timing(model, (1, *input_shape[1:]), Path(tmp) / f"m{i}.onnx")
            runs[name] = _session(path, threads)
        medians: dict[str, dict[int, float]] = {name: {} for name in models}
        rng = np.random.default_rng(0)
        for b in batch_sizes:
            x = rng.standard_normal((b, *input_shape[1:])).astype(np.float32)
            for run in runs.values():
                for _ in range(warmup):
                    run(x)
            samples: dict[str, list[float]] = {name: [] for name in models}
            for r in range(rounds):
                # Alternate the order each round so no model always runs right after another's cache use.
                order = list(runs.items()) if r % 2 == 0 else list(reversed(runs.items()))
                for name, run in order:
                    for _ in range(iters):
                        t0 = time.perf_counter()
                        run(x)
                        samples[name].append((time.perf_counter() - t0) * 1e3)
            for name in models:
                medians[name][b] = statistics.median(samples[name])
    return LatencyResult(tuple(batch_sizes), medians, threads)
