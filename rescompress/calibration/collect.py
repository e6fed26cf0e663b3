"""Stream a FP32 ONNX model over calibration data and feed every chosen activation to its histogram.

Each tensor to calibrate gets a small summary inside an in-memory copy of the model: its exact minimum
and maximum (``ReduceMin``/``ReduceMax`` over the flattened tensor) and a strided sample of at most
``max_samples`` values per batch (a ``Slice`` with a prime step, the same sampling the histogram applies
to a whole tensor). ONNX Runtime runs the copy batch by batch and returns only the summaries, which
update one :class:`StreamingHistogram` per tensor and are dropped. So the activations never leave the
runtime (copying every intermediate tensor out cost more than running the model), peak memory is the
runtime's own working set for one batch (the batch size is capped from the largest tensor's size), and it
does not grow with the number of images. (Channel factors decided in the pass, :class:`Rescale`, add the
summaries kept until then: at most ``WINDOW_BUFFER_BUDGET`` bytes of samples.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from rescompress.calibration.histogram import (
    DEFAULT_BINS,
    DEFAULT_MAX_SAMPLES,
    StreamingHistogram,
    _next_prime,
    sample_stride,
)
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
        step = _stride(size, batch_size, max_samples)
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

    The pass runs the model as given and also returns the per-channel minima and maxima (axis 1) of
    ``tensors``. After the first ``images`` images, ``decide(extremes, images_read)`` returns, for each observed
    tensor whose values a rescaled model would change, one positive factor per channel. From then on each such
    tensor is histogrammed as that rescaled model would hold it (its samples multiplied by their channel's
    factor, its exact extremes from the per-channel ones), and as it is, under :func:`divided_name`. Values as
    they are go to their histograms at once, from the first image; the first images' samples are also kept
    until the factors are known, for the rescaled histograms. So a model rescaled from ranges measured on its
    calibration images is calibrated in one pass over them, by one session.
    """

    tensors: tuple[str, ...]
    images: int
    decide: Callable[[dict[str, tuple[np.ndarray, np.ndarray]], int], dict[str, np.ndarray]]


class _SummaryRun:
    """One ONNX Runtime session over :func:`with_summary_outputs` of a model, for batches of one size."""

    def __init__(self, model, names, sizes, shapes, batch_size, max_samples, per_channel, threads) -> None:
        missing = [n for n in per_channel if not shapes.get(n) or len(shapes[n]) < 2 or shapes[n][1] is None]
        if missing:
            raise RescompressError(f"per-channel histograms need the channel count of {missing[0]!r}")
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


def _scaled(summary: tuple, factors: np.ndarray, channels: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(min, max, sample) of a summarized tensor with channel ``c`` multiplied by ``factors[c]`` (> 0)."""
    _, _, sample, lo_c, hi_c = summary
    flat = np.asarray(sample).reshape(-1)
    return float((lo_c * factors).min()), float((hi_c * factors).max()), flat * factors[channels[: flat.size]]


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
    ``rescale`` (not with ``divided``) is the other way round: factors decided on the first images of the pass
    (see :class:`Rescale`); the returned histograms are then those of the rescaled model, with the tensors it
    changes also under ``divided_name`` as ``model`` holds them. While the factors are pending, every tensor is
    histogrammed as it is, and the first batches' samples of the tensors factors may change are kept, thinned (a
    further prime stride) so that they take at most ``window_budget`` bytes, for their rescaled histograms; each
    kept value then counts for the ones left out.
    """
    names = list(dict.fromkeys(tensor_names))
    if rescale is not None and divided:
        raise RescompressError("collect_histograms takes divided factors or a rescale, not both")
    unknown = [n for n in [*(divided or {}), *(rescale.tensors if rescale else ())] if n not in names]
    if unknown:
        raise RescompressError(f"per-channel histograms asked for tensors not observed: {unknown[:3]}")
    # per tensor, the factors by which its samples are multiplied into the histogram held under its own name
    # (rescale) or under divided_name (divided); the other one takes them as they are
    factors = {k: 1.0 / np.asarray(v, np.float32) for k, v in (divided or {}).items()}
    histograms = {name: StreamingHistogram(num_bins, max_samples=max_samples) for name in names}
    histograms.update({divided_name(n): StreamingHistogram(num_bins, max_samples=max_samples) for n in factors})
    run: _SummaryRun | None = None
    window: list[dict[str, tuple]] = []  # the first batches' (thinned) summaries while the factors are pending
    thin: dict[str, int] = {}  # per tensor: the further stride of the kept samples (each stands for that many)
    extremes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pending = rescale is not None
    n_images = n_batches = n_window = 0
    t0 = time.perf_counter()

    def collect(name: str, key: str, values: tuple, weight: int = 1) -> None:
        try:
            histograms[key].collect_summary(*values, weight)
        except RescompressError:
            raise RescompressError(
                f"tensor {name!r} holds NaN or Inf during calibration; check the model weights"
            ) from None

    def add(summary: tuple, name: str) -> None:
        f = factors.get(name)
        raw = (float(summary[0]), float(summary[1]), summary[2])
        if f is None:
            collect(name, name, raw)
            return
        scaled = _scaled(summary, f, run.channels[name])
        own, other = (raw, scaled) if rescale is None else (scaled, raw)
        collect(name, name, own)
        collect(name, divided_name(name), other)

    def settle() -> None:
        """Decide the factors; the raw histograms so far become the rescaled tensors' ``divided_name`` ones, and
        the kept window is histogrammed rescaled."""
        nonlocal pending
        decided = rescale.decide(extremes, n_window)
        stray = [n for n in decided if n not in rescale.tensors]
        if stray:
            raise RescompressError(f"rescale factors for tensors without channel ranges: {stray[:3]}")
        factors.update({n: np.asarray(f, np.float32) for n, f in decided.items()})
        for n in decided:
            histograms[divided_name(n)] = histograms[n]
            histograms[n] = StreamingHistogram(num_bins, max_samples=max_samples)
        pending = False
        for summaries in window:
            for name, summary in summaries.items():
                if name in decided:
                    k = thin.get(name, 1)
                    collect(name, name, _scaled(summary, factors[name], run.channels[name][::k]), k)
        window.clear()

    for batch in batches:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise RescompressError("calibration inputs contain NaN or Inf; check the data and preprocessing")
        if run is None:
            shapes = tensor_shapes(model) if shapes is None else shapes
            sizes = per_image_sizes(model, names, shapes)
            per_channel = rescale.tensors if rescale is not None else tuple(factors)
            run = _SummaryRun(model, names, sizes, shapes, len(x), max_samples, per_channel, threads)
            if rescale is not None and max_samples is not None:  # (max_samples=None promises every value)
                held = {n: sizes[n] for n in rescale.tensors}
                thin = _window_thinning(held, run.steps, len(x), -(-rescale.images // len(x)), window_budget)
        summaries = run.run(x)
        n_images += len(x)
        n_batches += 1
        if pending:
            for t in rescale.tensors:
                merge_extremes(extremes, t, summaries[t][3], summaries[t][4])
            window.append({n: _thinned(summaries[n], thin.get(n, 1)) for n in rescale.tensors})
        for name in names:  # (while the factors are pending, every tensor as it is)
            add(summaries[name], name)
        if pending:
            n_window += len(x)
            if n_window >= rescale.images:
                settle()
        if on_batch is not None:
            on_batch(len(x))
    if n_images == 0:
        raise RescompressError("no calibration images were read; check --calib-data")
    if pending:  # fewer images than the window
        settle()
    stats = CollectStats(n_images, n_batches, time.perf_counter() - t0)
    log.info("calibrated %d tensors on %d images in %.1f s", len(names), n_images, stats.seconds)
    return histograms, stats


def merge_extremes(extremes: dict[str, tuple[np.ndarray, np.ndarray]], name: str, lo: np.ndarray,
                   hi: np.ndarray) -> None:
    """Fold one batch's per-channel (min, max) of ``name`` into the running ``extremes``."""
    old = extremes.get(name)
    extremes[name] = (lo, hi) if old is None else (np.minimum(old[0], lo), np.maximum(old[1], hi))


def _thinned(summary: tuple, k: int) -> tuple:
    if k == 1:
        return summary
    return (summary[0], summary[1], np.asarray(summary[2]).reshape(-1)[::k].copy(), *summary[3:])


def _stride(per_image: int, batch_size: int, max_samples: int | None) -> int:
    return 1 if max_samples is None else sample_stride(per_image * batch_size, max_samples, period=per_image)


def _window_thinning(sizes: dict[str, int], steps: dict[str, int], batch_size: int, n_batches: int,
                     budget: int) -> dict[str, int]:
    """Per tensor of ``sizes`` (values per image), a further stride for the samples kept while factors are
    pending: 1, or the smallest prime at least the overall ratio, so that ``n_batches`` batches' kept float32
    samples fit ``budget`` bytes (their per-channel extremes, a few thousand values, come on top). Each prime is
    one that does not divide the tensor's per-image size, so, like the sampling stride itself, it does not alias
    with the rows and columns (the product of two such primes shares no factor with C*H*W)."""
    per_batch = {n: -(-sizes[n] * batch_size // steps[n]) for n in sizes}
    total = 4 * n_batches * sum(per_batch.values())
    if total <= budget:
        return dict.fromkeys(sizes, 1)
    first = _next_prime(-(-total // budget))
    out = {}
    for n, size in sizes.items():
        p = first
        while size % p == 0:
            p = _next_prime(p + 1)
        out[n] = p
    return out
