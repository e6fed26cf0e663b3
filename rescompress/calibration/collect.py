"""Stream a FP32 ONNX model over calibration data and feed every chosen activation to its histogram.

Each tensor to calibrate gets a small summary inside an in-memory copy of the model: its exact minimum
and maximum (``ReduceMin``/``ReduceMax`` over the flattened tensor) and a strided sample of at most
``max_samples`` values per batch (a ``Slice`` with a prime step, the same sampling the histogram applies
to a whole tensor). ONNX Runtime runs the copy batch by batch and returns only the summaries, which
update one :class:`StreamingHistogram` per tensor and are dropped. So the activations never leave the
runtime (copying every intermediate tensor out cost more than running the model), peak memory is the
runtime's own working set for one batch (the batch size is capped from the largest tensor's size), and it
does not grow with the number of images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from rescompress.calibration.histogram import DEFAULT_BINS, DEFAULT_MAX_SAMPLES, StreamingHistogram, sample_stride
from rescompress.errors import RescompressError

log = logging.getLogger("rescompress.calibration")
WORKING_SET_BUDGET = 256 * 1024 * 1024  # bytes of observed activations per batch
INT64_MAX = 2**63 - 1
WINDOW_BUFFER_BUDGET = 64 * 1024 * 1024  # bytes of samples kept while per-channel factors are decided


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


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shape of every tensor ONNX shape inference can tell (``None`` for a symbolic dimension).

    Run once per model and pass the result on: on a large model inference costs about half a second.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a shortcut; per_image_sizes falls back to a probe run
        return {}
    infos = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    return {
        vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        for vi in infos if vi.type.tensor_type.HasField("shape")
    }


def per_image_sizes(
    model: onnx.ModelProto, names: Iterable[str], shapes: dict[str, list[int | None]] | None = None
) -> dict[str, int]:
    """Elements per image of each named tensor: from ONNX shape inference, else from a one-image run."""
    names = list(dict.fromkeys(names))
    shapes = tensor_shapes(model) if shapes is None else shapes
    sizes: dict[str, int] = {}
    for name in names:
        dims = shapes.get(name)
        if dims and all(d is not None for d in dims[1:]):
            sizes[name] = int(np.prod(dims[1:], dtype=np.int64))
    unknown = [n for n in names if n not in sizes]
    if unknown:
        session = make_session(with_extra_outputs(model, unknown), arena=False)
        inp = session.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        shape[0] = 1
        for name, value in zip(unknown, session.run(unknown, {inp.name: np.zeros(shape, np.float32)}), strict=True):
            sizes[name] = int(value.size // max(1, value.shape[0] if value.ndim else 1))
    return {n: sizes[n] for n in names}


def _reduce(op: str, src: str, dst: str, axes: list[int] | None, opset: int, graph, name: str):
    """ReduceMin/ReduceMax over ``axes`` (all when None), keepdims=0, in the opset's spelling of axes."""
    from onnx import helper, numpy_helper

    if axes is None:
        return helper.make_node(op, [src], [dst], name=name, keepdims=0)
    if opset >= 18:  # axes became an input
        graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), f"{name}_axes"))
        return helper.make_node(op, [src, f"{name}_axes"], [dst], name=name, keepdims=0)
    return helper.make_node(op, [src], [dst], name=name, keepdims=0, axes=axes)


def calibration_batch_size(sizes: dict[str, int], requested: int, budget: int = WORKING_SET_BUDGET) -> int:
    """Cap ``requested`` so one batch's activations (all observed tensors, float32) fit ``budget``.

    Observed tensors stay alive until their summaries are computed, so ONNX Runtime's working set grows
    with the sum of their sizes (measured on resnet50 at 224x224: about 1.3x that sum per image).
    """
    per_image = sum(sizes.values()) * 4
    return max(1, min(requested, budget // max(per_image, 1)))


def with_summary_outputs(
    model: onnx.ModelProto,
    sizes: dict[str, int],
    batch_size: int,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    shapes: dict[str, list[int | None]] | None = None,
    per_channel: Iterable[str] = (),
) -> tuple[onnx.ModelProto, dict[str, tuple[str, ...]]]:
    """A copy of ``model`` that outputs, per named tensor, (min, max, strided sample) of each batch.

    The sample step is chosen for a batch of ``batch_size`` images (a smaller last batch gets fewer
    samples, never a different step). Returns the model and, per tensor, its output names; tensors in
    ``per_channel`` (rank known) also output their per-channel min and max (axis 1), as two more names.
    """
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 13)
    shapes = tensor_shapes(model) if shapes is None else shapes
    flat_shape = "rescompress_summary_flat_shape"
    g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), flat_shape))
    outputs: dict[str, tuple[str, ...]] = {}
    per_channel = set(per_channel)
    for i, (name, size) in enumerate(sizes.items()):
        tag = f"rescompress_summary_{i}"
        flat, lo, hi, sample = (f"{tag}_flat", f"{tag}_min", f"{tag}_max", f"{tag}_sample")
        nodes = [helper.make_node("Reshape", [name, flat_shape], [flat], name=f"{tag}_Reshape")]
        rank = len(shapes[name]) if name in shapes else None
        channel_outs = []
        for op, out in (("ReduceMin", lo), ("ReduceMax", hi)):
            if rank is not None and rank >= 3:
                # Reducing the spatial axes first runs multi-threaded in ONNX Runtime; one reduction over
                # a whole tensor runs on one thread and cost more than the model itself.
                part = f"{out}_spatial"
                nodes.append(_reduce(op, name, part, list(range(2, rank)), opset, g, f"{tag}_{op}_spatial"))
                nodes.append(_reduce(op, part, out, None, opset, g, f"{tag}_{op}"))
            else:
                part = name
                nodes.append(_reduce(op, flat, out, None, opset, g, f"{tag}_{op}"))
            if name in per_channel and rank is not None and rank >= 2:
                channel_outs.append(f"{out}_channels")
                nodes.append(_reduce(op, part, channel_outs[-1], [0], opset, g, f"{tag}_{op}_channels"))
        step = 1 if max_samples is None else sample_stride(size * batch_size, max_samples, period=size)
        if step > 1:
            consts = {f"{tag}_{k}": v for k, v in (("starts", 0), ("ends", INT64_MAX), ("axes", 0), ("steps", step))}
            g.initializer.extend(numpy_helper.from_array(np.array([v], np.int64), k) for k, v in consts.items())
            nodes.append(helper.make_node("Slice", [flat, *consts], [sample], name=f"{tag}_Slice"))
        else:
            sample = flat
        g.node.extend(nodes)
        for out in (lo, hi, sample, *channel_outs):
            g.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
        outputs[name] = (lo, hi, sample, *channel_outs)
    return m, outputs


def divided_name(name: str) -> str:
    """Key of the histogram of ``name`` divided by per-channel factors (see :func:`collect_histograms`)."""
    return f"{name}/divided"


def _sample_channels(c: int, per_image: int, batch_size: int, step: int) -> np.ndarray:
    """Channel (axis 1) of each value of the strided sample ``flat[::step]`` of a [batch, c, ...] tensor with
    ``per_image`` values per image."""
    inner = per_image // c
    positions = np.arange(0, batch_size * per_image, step, dtype=np.int64)
    return ((positions // inner) % c).astype(np.int32)


@dataclass(frozen=True)
class Rescale:
    """Per-channel factors decided inside the calibration pass (``collect_histograms(rescale=...)``).

    The first batches, until ``images`` images have been read, run through the model as given and also
    return the per-channel minima and maxima (axis 1) of ``tensors``. Then ``decide(extremes, images_read)``
    returns the rescaled model and, for each observed tensor whose values it changes, one positive factor per
    channel. The first batches' samples, kept meanwhile, are histogrammed multiplied by those factors (and,
    under :func:`divided_name`, as they were); the later batches run through the rescaled model and are also
    histogrammed divided back. So a model rescaled from ranges measured on its calibration images is
    calibrated in one pass over them, not two.
    """

    tensors: tuple[str, ...]
    images: int
    decide: Callable[[dict[str, tuple[np.ndarray, np.ndarray]], int], tuple[onnx.ModelProto, dict[str, np.ndarray]]]


class _SummaryRun:
    """One ONNX Runtime session over :func:`with_summary_outputs` of a model, for batches of one size."""

    def __init__(self, model, names, sizes, shapes, batch_size, max_samples, per_channel, threads) -> None:
        summary, self.outputs = with_summary_outputs(model, sizes, batch_size, max_samples, shapes, per_channel)
        self.session = make_session(summary, threads)
        self.input = self.session.get_inputs()[0].name
        self.names = names
        self.fetch = [o for name in names for o in self.outputs[name]]
        self.steps = {n: _stride(sizes[n], batch_size, max_samples) for n in names}
        self.channels = {n: _sample_channels(int(shapes[n][1]), sizes[n], batch_size, self.steps[n])
                         for n in per_channel}

    def run(self, x: np.ndarray) -> dict[str, tuple]:
        """Per tensor: (min, max, sample, and for ``per_channel`` tensors per-channel min and max)."""
        values = dict(zip(self.fetch, self.session.run(self.fetch, {self.input: x}), strict=True))
        return {n: tuple(values[o] for o in self.outputs[n]) for n in self.names}


def collect_histograms(
    model: onnx.ModelProto,
    tensor_names: list[str],
    batches: Iterable,
    *,
    num_bins: int = DEFAULT_BINS,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    shapes: dict[str, list[int | None]] | None = None,
    divided: dict[str, np.ndarray] | None = None,
    rescale: Rescale | None = None,
    window_budget: int = WINDOW_BUFFER_BUDGET,
) -> tuple[dict[str, StreamingHistogram], CollectStats]:
    """Run ``model`` over ``batches`` (``(x, y)`` pairs or arrays) and histogram each named tensor.

    The sample step is set from the first batch's size, so pass batches of one size (a short last one
    is fine). ``max_samples=None`` bins every value (exact histograms, for tests and small models).
    ``shapes`` (from :func:`tensor_shapes`) saves a second shape inference when the caller has one.
    ``divided`` (tensor -> one positive factor per channel, axis 1; the tensor's shape must be known) also
    histograms each such tensor with channel ``c`` divided by its factor, under :func:`divided_name`: the
    same samples, rescaled in numpy, and exact extremes from per-channel minima and maxima. That is how a
    channel-rescaled model also gives the ranges of the model it was rescaled from, in the same pass.
    ``rescale`` decides such factors on the first images of this same pass (see :class:`Rescale`; not with
    ``divided``); the returned histograms are then those of the rescaled model (and ``divided_name`` ones for
    the tensors it changed). While the factors are pending, the first batches' samples are kept, thinned so
    that they take at most ``window_budget`` bytes; each kept value then counts for the ones left out.
    """
    names = list(dict.fromkeys(tensor_names))
    if rescale is not None and divided:
        raise RescompressError("collect_histograms takes divided factors or a rescale, not both")
    inverse = {k: 1.0 / np.asarray(v, np.float32) for k, v in (divided or {}).items()}  # per channel
    unknown = [n for n in [*inverse, *(rescale.tensors if rescale else ())] if n not in names]
    if unknown:
        raise RescompressError(f"divided histograms asked for tensors not observed: {unknown[:3]}")
    histograms = {name: StreamingHistogram(num_bins, max_samples=max_samples) for name in names}
    histograms.update({divided_name(n): StreamingHistogram(num_bins, max_samples=max_samples) for n in inverse})
    current: _SummaryRun | None = None
    sizes: dict[str, int] = {}
    window: list[dict[str, tuple]] = []  # the first batches' summaries while the factors are pending
    weights: dict[str, float] = {}  # per tensor: values each window sample stands for
    extremes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pending = rescale is not None
    n_images = n_batches = n_window = 0
    t0 = time.perf_counter()

    def start(m: onnx.ModelProto, batch_size: int, cap: int | None, per_channel) -> _SummaryRun:
        missing = [n for n in per_channel if not shapes.get(n) or len(shapes[n]) < 2 or shapes[n][1] is None]
        if missing:
            raise RescompressError(f"per-channel factors need the channel count of {missing[0]!r}")
        return _SummaryRun(m, names, sizes, shapes, batch_size, cap, per_channel, threads)

    def add(name: str, summary: tuple, channels: dict, inv: np.ndarray | None, weight: float = 1.0) -> None:
        lo, hi, sample, *per_channel = summary
        try:
            histograms[name].collect_summary(float(lo), float(hi), sample, weight)
            if inv is not None:
                flat = np.asarray(sample).reshape(-1)
                histograms[divided_name(name)].collect_summary(
                    float((per_channel[0] * inv).min()), float((per_channel[1] * inv).max()),
                    flat * inv[channels[name][: flat.size]], weight)
        except RescompressError:
            raise RescompressError(
                f"tensor {name!r} holds NaN or Inf during calibration; check the model weights"
            ) from None

    def settle(channels: dict[str, np.ndarray]) -> None:
        """Decide the factors, histogram the kept window (``channels``: its samples' channels), and go on with
        the rescaled model (the caller has let the window's session go, so the two are not held together)."""
        nonlocal inverse, pending, model
        model, factors = rescale.decide(extremes, n_window)
        stray = [n for n in factors if n not in rescale.tensors]
        if stray:
            raise RescompressError(f"rescale factors for tensors without channel ranges: {stray[:3]}")
        factors = {n: np.asarray(f, np.float32) for n, f in factors.items()}
        inverse = {n: 1.0 / f for n, f in factors.items()}
        histograms.update({divided_name(n): StreamingHistogram(num_bins, max_samples=max_samples) for n in factors})
        for summaries in window:
            for name, (lo, hi, sample, *per_channel) in summaries.items():
                f = factors.get(name)
                if f is None:
                    add(name, (lo, hi, sample), channels, None, weights[name])
                    continue
                flat = np.asarray(sample).reshape(-1)
                add(name, (float((per_channel[0] * f).min()), float((per_channel[1] * f).max()),
                           flat * f[channels[name][: flat.size]]), channels, None, weights[name])
                histograms[divided_name(name)].collect_summary(float(lo), float(hi), flat, weights[name])
        window.clear()
        pending = False  # the next batch starts a session on the rescaled model

    for batch in batches:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise RescompressError("calibration inputs contain NaN or Inf; check the data and preprocessing")
        if current is None:
            if not sizes:
                shapes = tensor_shapes(model) if shapes is None else shapes
                sizes = per_image_sizes(model, names, shapes)
                batch_size = len(x)
            if pending:
                cap = _window_cap(len(names), -(-rescale.images // batch_size), max_samples, window_budget)
                current = start(model, batch_size, cap, rescale.tensors)
                weights = {n: current.steps[n] / _stride(sizes[n], batch_size, max_samples) for n in names}
            else:
                current = start(model, batch_size, max_samples, inverse)
        summaries = current.run(x)
        n_images += len(x)
        n_batches += 1
        if pending:
            for t in rescale.tensors:
                lo_c, hi_c = summaries[t][3], summaries[t][4]
                old = extremes.get(t)
                extremes[t] = (lo_c, hi_c) if old is None else (np.minimum(old[0], lo_c), np.maximum(old[1], hi_c))
            window.append(summaries)
            n_window += len(x)
            if n_window >= rescale.images:
                channels, current = current.channels, None
                settle(channels)
        else:
            for name in names:
                add(name, summaries[name], current.channels, inverse.get(name))
        if on_batch is not None:
            on_batch(len(x))
    if n_images == 0:
        raise RescompressError("no calibration images were read; check --calib-data")
    if pending:  # fewer images than the window
        channels, current = current.channels, None
        settle(channels)
    stats = CollectStats(n_images, n_batches, time.perf_counter() - t0)
    log.info("calibrated %d tensors on %d images in %.1f s", len(names), n_images, stats.seconds)
    return histograms, stats


def _stride(per_image: int, batch_size: int, max_samples: int | None) -> int:
    return 1 if max_samples is None else sample_stride(per_image * batch_size, max_samples, period=per_image)


def _window_cap(n_tensors: int, n_batches: int, max_samples: int | None, budget: int) -> int | None:
    """Samples per tensor per batch to keep while factors are pending: ``max_samples``, or fewer (a larger
    stride) so that ``n_batches`` batches of ``n_tensors`` float32 samples fit ``budget`` bytes."""
    if max_samples is None:
        return None
    fit = budget // max(1, 4 * n_tensors * n_batches)
    return max(min(max_samples, fit), min(max_samples, 1024))
