"""Stream a FP32 ONNX model over calibration data and feed every chosen activation to its histogram.

The tensors to calibrate become extra graph outputs of an in-memory copy of the model; ONNX Runtime runs
it batch by batch and each batch's tensors update one :class:`StreamingHistogram` per tensor, then are
dropped. Peak memory is one batch of activations (the batch size is capped from a one-image probe so it
stays under a budget), whatever the number of images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from rescompress.calibration.histogram import DEFAULT_BINS, StreamingHistogram
from rescompress.errors import RescompressError

log = logging.getLogger("rescompress.calibration")
DEFAULT_MEMORY_BUDGET = 128 * 1024 * 1024  # bytes of activations held per batch (ORT output copies)


@dataclass(frozen=True)
class CollectStats:
    num_images: int
    num_batches: int
    seconds: float

    def to_dict(self) -> dict:
        return {"num_images": self.num_images, "num_batches": self.num_batches, "seconds": self.seconds}


def with_extra_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the named tensors (graph outputs stay first)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for name in names:
        if name not in existing:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            existing.add(name)
    return m


def make_session(model: onnx.ModelProto, threads: int | None = None, arena: bool = True):
    """An ONNX Runtime CPU session on an in-memory model, spinning off (the machine is shared).

    ``arena=False`` returns activation memory after every run instead of keeping ORT's arena at its
    high-water mark (the calibration session, whose every tensor is an output, wants that).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RescompressError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from exc


def suggest_batch_size(
    session, input_name: str, input_shape: tuple[int, ...], requested: int, budget: int = DEFAULT_MEMORY_BUDGET
) -> int:
    """Cap ``requested`` so one batch of collected activations stays under ``budget`` bytes."""
    probe = np.zeros((1, *input_shape[1:]), dtype=np.float32)
    per_image = sum(o.nbytes for o in session.run(None, {input_name: probe}))
    return max(1, min(requested, budget // max(per_image, 1)))


def collect_histograms(
    model: onnx.ModelProto,
    tensor_names: list[str],
    batches: Iterable,
    *,
    num_bins: int = DEFAULT_BINS,
    session=None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, StreamingHistogram], CollectStats]:
    """Run ``model`` over ``batches`` (``(x, y)`` pairs or arrays) and histogram each named tensor."""
    if session is None:
        session = make_session(with_extra_outputs(model, tensor_names), arena=False)
    input_name = session.get_inputs()[0].name
    histograms = {name: StreamingHistogram(num_bins) for name in tensor_names}
    n_images = n_batches = 0
    t0 = time.perf_counter()
    for batch in batches:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise RescompressError("calibration inputs contain NaN or Inf; check the data and preprocessing")
        outputs = session.run(tensor_names, {input_name: x})
        for name, value in zip(tensor_names, outputs, strict=True):
            try:
                histograms[name].collect(value)
            except RescompressError:
                raise RescompressError(
                    f"tensor {name!r} holds NaN or Inf during calibration; check the model weights"
                ) from None
        n_images += len(x)
        n_batches += 1
        if on_batch is not None:
            on_batch(len(x))
    if n_images == 0:
        raise RescompressError("no calibration images were read; check --calib-data")
    stats = CollectStats(n_images, n_batches, time.perf_counter() - t0)
    log.info("calibrated %d tensors on %d images in %.1f s", len(tensor_names), n_images, stats.seconds)
    return histograms, stats
