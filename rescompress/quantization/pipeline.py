"""``quantize_model``: load -> fold -> export FP32 -> calibrate -> plan -> emit -> measure -> report.

The library entry point behind ``rescompress quantize`` (and ``rescompress demo``). It takes a PyTorch
model file (loaded safely, BatchNorm folded, exported) or a FP32 ONNX file, streams calibration images
through it once, with factors that rescale its channels so that per-tensor grids fit them (equalize.py: decided
on the pass's first images, the FP32 function unchanged), turns the statistics into a :class:`QuantPlan` (or
reuses one given with ``plan``; with ``--method auto`` the held-out images also choose the method and refine the
scales of each target's most error-prone tensors, see refine.py),
emits the ONNX Runtime and TensorRT Q/DQ files and the TensorRT calibration cache from that one plan,
checks the TensorRT file's structure, and measures the INT8 files against FP32 (accuracy, agreement,
logit SQNR, the worst layers, latency on ORT CPU). Every output is written atomically into ``outdir``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from rescompress.calibration import DEFAULT_PERCENTILE, METHODS
from rescompress.calibration.collect import (
    Rescale,
    calibration_batch_size,
    collect_histograms,
    divided_name,
    make_session,
    per_image_sizes,
    tensor_shapes,
    with_extra_outputs,
)
from rescompress.errors import CheckFailed, DataError, RescompressError, UsageError
from rescompress.fileio import StagedOutputs, ensure_not_input, write_text_atomic
from rescompress.measure.agreement import sqnr_db as capped_sqnr_db
from rescompress.quantization.calibrate import activation_entries, check_finite_weights, weight_entries
from rescompress.quantization.checker import INTEGER_OPS, check_trt_qdq
from rescompress.quantization.emit import emit_qdq, save_model
from rescompress.quantization.equalize import EQUALIZE_IMAGES, Equalization, channel_groups
from rescompress.quantization.equalize import from_extremes as equalization_from_extremes
from rescompress.quantization.equalize import from_plan as equalization_from_plan
from rescompress.quantization.fallback import FallbackResult, rank_layers, search_fallback
from rescompress.quantization.fidelity import Fidelity, compare, run_sessions, sqnr_db
from rescompress.quantization.placement import GraphIndex, Placement, check_patterns, place, prepare_model
from rescompress.quantization.plan import ORT_RANGES, TARGETS, Provenance, QuantPlan, model_fingerprint
from rescompress.quantization.refine import DEFAULT_REFINE_TENSORS, onnx_macs, refine_budget, refine_plan
from rescompress.quantization.rounding import load_levels, rounding_images, save_levels, with_rounded_weights
from rescompress.quantization.stem import StemRewrite, rewrite_stem
from rescompress.quantization.trt_cache import DEFAULT_TRT_VERSION, write_cache
from rescompress.spec import Preprocess

log = logging.getLogger("rescompress.quantize")
ProgressFn = Callable[[Iterable, int | None, str], Iterable]
Notify = Callable[[str], None]
SENSITIVITY_IMAGES = 256  # images used to rank layers for fallback (one short run per layer)
LAYER_SQNR_IMAGES = 64  # images used for the per-layer SQNR table


WEIGHT_ROUNDINGS = ("auto", "hessian", "nearest")


@dataclass(frozen=True)
class CalibrationTensors:
    """Which activations get a range (``names``) and which of them are observed while calibrating."""

    names: list[str]
    observed: list[str]
    shared: dict[str, str]  # tensor -> the Relu output whose histogram it takes

    def root(self, tensor: str) -> str:
        """The observed tensor whose histogram ``tensor`` takes (itself, or the Relu output it feeds)."""
        while tensor in self.shared:  # Relu -> Relu chains
            tensor = self.shared[tensor]
        return tensor

    def divided(self, factors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Which observed tensors to histogram both rescaled by their channel ``factors`` and as they are
        (collect_histograms' ``divided``, or what a ``rescale`` decides) so that every rescaled tensor gets both
        ranges."""
        return {r: factors[r] for r in {self.root(t) for t in factors}}

    def complete(self, histograms: dict) -> dict:
        """``histograms`` of the observed tensors, plus the shared ones (the same objects)."""
        out = dict(histograms)
        for t in self.shared:
            out[t] = histograms[self.root(t)]
        return out


class EqualizingPass:
    """The :class:`Rescale` that decides channel equalization inside the calibration pass (equalize.py), and
    what it decided: ``equalization`` and ``divided`` (the observed tensors it rescales, with their factors)
    are set once the pass has read ``images`` images."""

    def __init__(self, groups, tensors: CalibrationTensors, images: int) -> None:
        self.groups = tuple(groups)
        self.tensors = tensors
        self.equalization: Equalization | None = None
        self.divided: dict[str, np.ndarray] = {}
        self.rescale = Rescale(tuple(t for g in self.groups for t in g.observed), images, self._decide)

    def _decide(self, extremes: dict, images: int) -> dict[str, np.ndarray]:
        self.equalization = equalization_from_extremes(self.groups, extremes, images)
        self.divided = self.tensors.divided(self.equalization.factors())
        return self.divided


def calibration_tensors(base: onnx.ModelProto, placements) -> CalibrationTensors:
    """Every float activation gets a range: the TensorRT cache wants them all, and accuracy fallback or a
    later ``--plan`` run with other ``--exclude`` patterns may move Q/DQ pairs onto tensors a placement
    skips. Tensors read only by a Relu (about half of a ResNet's) are not observed but share their Relu
    output's histogram (see :meth:`GraphIndex.relu_only_inputs`): observing them kept ONNX Runtime from
    fusing Conv+Relu and made calibration about twice as slow.
    """
    index = GraphIndex(base)
    placed = set().union(*(p.calib_tensors() for p in placements))
    names = sorted(placed | set(index.float_activations()))
    shared = {t: r for t, r in index.relu_only_inputs().items() if t not in placed and r in names}
    return CalibrationTensors(names, [n for n in names if n not in shared], shared)


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything ``quantize_model`` can be told; defaults are the CLI's defaults."""

    method: str = "auto"  # max | percentile | entropy | mse | auto
    percentile: float = DEFAULT_PERCENTILE
    num_images: int = 512
    batch_size: int = 32
    seed: int = 0
    targets: tuple[str, ...] = TARGETS
    exclude: tuple[str, ...] = ()
    max_drop: float | None = None
    max_float_layers: int | None = None
    ort_range: str = "asymmetric"  # ORT grid: asymmetric | unsigned | symmetric (see plan.activation_entry)
    holdout_fraction: float = 0.25  # share of calibration images kept aside to choose the method (auto)
    refine_tensors: int = DEFAULT_REFINE_TENSORS  # per-target scale search on the K worst tensors (0: off)
    weight_rounding: str = "auto"  # hessian (GPTQ-style, rounding.py) | nearest | auto: hessian given images
    rounding_images: int = 128  # at most; large models get fewer (rounding.rounding_images)
    eval_limit: int | None = None
    latency: bool = True
    latency_batches: tuple[int, ...] = (1, 8)
    threads: int | None = None
    trt_version: str = DEFAULT_TRT_VERSION
    stem_s2d: bool = True  # ORT file: the image's stride-2 stem as a stride-1 conv over 2x2 blocks (stem.py)
    equalize: bool = True  # scale channels so per-tensor activation grids fit them all (equalize.py); a plan
    # given to quantize_model applies its own recorded factors whatever this says

    def __post_init__(self) -> None:
        if self.method not in (*METHODS, "auto"):
            raise UsageError(f"unknown --method {self.method!r}; choose {', '.join(METHODS)} or auto")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise UsageError(f"unknown --target {bad or self.targets}; choose onnxruntime, tensorrt or both")
        if self.ort_range not in ORT_RANGES:
            raise UsageError(f"--ort-range must be one of {', '.join(ORT_RANGES)}, got {self.ort_range!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise UsageError(f"--percentile must be in (0, 100], got {self.percentile}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise UsageError(f"--weight-rounding must be one of {', '.join(WEIGHT_ROUNDINGS)}, "
                                   f"got {self.weight_rounding!r}")
        if self.refine_tensors < 0:
            raise RescompressError(f"refine_tensors must be >= 0, got {self.refine_tensors}")
        if self.num_images < 1 or self.batch_size < 1:
            raise UsageError("--num-images and --batch-size must be positive")
        if self.max_drop is not None and (self.max_drop < 0 or not math.isfinite(self.max_drop)):
            raise UsageError(f"--max-drop must be a non-negative number of points, got {self.max_drop}")
        if not re.fullmatch(r"\d+(\.\d+){0,2}", self.trt_version) or int(self.trt_version.split(".")[0]) < 8:
            raise UsageError(f"--trt-version must look like 10.3.0 (TensorRT 8 or later), got {self.trt_version!r}")
        # (the default, default_trt_version(), always has this form: a pre-release suffix is dropped)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Fp32Model:
    path: Path
    proto: onnx.ModelProto
    preprocess: Preprocess
    num_classes: int
    arch: str | None
    stem: str
    exported: bool  # True when this run wrote it (a PyTorch file folded and exported, or a rewritten ONNX file)
    rewrites: tuple[str, ...] = ()  # what was changed in a given ONNX file (each change checked equal in ORT)


@dataclass(frozen=True)
class LayerSqnr:
    tensor: str
    sqnr_db: float

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "sqnr_db": self.sqnr_db}


@dataclass(frozen=True)
class QuantizeResult:
    model: Path
    fp32_path: Path
    artifacts: dict[str, Path]
    plan: QuantPlan
    method: str
    method_scores: dict[str, dict]
    fidelity: dict[str, Fidelity]
    eval_source: str
    worst_layers: dict[str, tuple[LayerSqnr, ...]]
    placements: dict[str, Placement]
    fallback: dict[str, FallbackResult] | None  # per target file, with --max-drop
    latency: dict | None
    calibration: dict
    warnings: tuple[str, ...] = ()
    config: QuantizeConfig = field(default_factory=QuantizeConfig)
    fp32_rewrites: tuple[str, ...] = ()  # changes made to a given ONNX file before quantizing (see load_fp32)
    stem_rewrite: StemRewrite | None = None  # the ORT file's space-to-depth stem (stem.py), when applied
    equalization: dict | None = None  # summary of the channel equalization (Equalization.to_dict), when applied

    @property
    def ranges(self) -> str:
        """The chosen ranges, e.g. ``percentile 99.999`` or ``max``."""
        return method_label(self.method, self.plan.provenance.percentile)

    def to_dict(self) -> dict:
        return {
            "model": str(self.model),
            "fp32": str(self.fp32_path),
            "fp32_rewrites": list(self.fp32_rewrites),
            "artifacts": {k: str(v) for k, v in self.artifacts.items()},
            "method": self.method,
            "ranges": self.ranges,
            "method_scores": self.method_scores,
            "eval_source": self.eval_source,
            "fidelity": {k: v.to_dict() for k, v in self.fidelity.items()},
            "worst_layers": {k: [x.to_dict() for x in v] for k, v in self.worst_layers.items()},
            "quantized_nodes": {k: len(p.quantized_nodes) for k, p in self.placements.items()},
            "float_nodes": {k: list(p.float_nodes) for k, p in self.placements.items()},
            "unsupported": {k: list(p.unsupported) for k, p in self.placements.items()},
            "fallback": {t: f.to_dict() for t, f in self.fallback.items()} if self.fallback else None,
            "latency": self.latency,
            "ort_stem_rewrite": self.stem_rewrite.to_dict() if self.stem_rewrite else None,
            "equalization": self.equalization,
            "calibration": self.calibration,
            "provenance": self.plan.provenance.to_dict(),
            "warnings": list(self.warnings),
            "config": self.config.to_dict(),
        }


# ------------------------------------------------------------------------------------------ model input
PreprocessArg = Preprocess | Callable[[Preprocess | None], Preprocess] | None


def output_stem(path: Path) -> str:
    """``r50.pt`` -> ``r50``, ``r50.fp32.onnx`` -> ``r50``, ``r50.pruned.safetensors`` -> ``r50.pruned``."""
    stem = path.stem
    return (stem[: -len(".fp32")] if stem.endswith(".fp32") else stem) or "model"


def _resolve(arg: PreprocessArg, default: Preprocess | None) -> Preprocess | None:
    if arg is None:
        return default
    return arg if isinstance(arg, Preprocess) else arg(default)


def load_fp32(
    model_path: Path | str,
    outdir: Path,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    preprocess: PreprocessArg = None,
    notify: Notify | None = None,
    stage: Callable[[Path], Path] | None = None,
) -> Fp32Model:
    """A FP32 ONNX model with BatchNorm folded: the given .onnx, or a PyTorch file folded and exported.

    ``preprocess`` replaces the model's own preprocessing, or (a callable) maps it to the one to use.
    ``stage`` maps the written file's final path to where it is written during the run (see
    :func:`_nothing_left_on_failure`); the returned ``path`` is the final one.
    """
    stage = stage or (lambda final: final)
    import torch

    from rescompress.export import export_onnx, preprocess_metadata, read_onnx_info, set_metadata
    from rescompress.loading import is_onnx_path, load_model

    p = Path(model_path)
    if not p.exists():
        raise RescompressError(f"model file {p} does not exist")
    stem = output_stem(p)
    if is_onnx_path(p):
        info = read_onnx_info(p)
        pre = _resolve(preprocess, info.preprocess)
        if pre is None:
            raise RescompressError(f"{p} does not record its preprocessing; pass --preset")
        from rescompress.measure.benchmark import check_input_fits

        check_input_fits(p.name, info.in_channels, info.input_size, pre)
        try:
            proto = onnx.load(str(p))
        except Exception as exc:
            raise RescompressError(f"cannot read ONNX model {p}: {exc}") from exc
        quantized = [n.op_type for n in proto.graph.node if n.op_type in QUANTIZED_OPS]
        if quantized:
            raise RescompressError(f"{p} is already quantized ({len(quantized)} {', '.join(sorted(set(quantized)))} "
                                   "nodes); quantize takes the FP32 model")
        proto, changes = _normalized_onnx(proto, p, pre)
        # The INT8 files record the preprocessing they were calibrated with (a file without it, or
        # --preset/--mean/--std overrides), so the next stage reads them without options.
        set_metadata(proto, preprocess_metadata(pre))
        if not changes:
            return Fp32Model(p, proto, pre, info.num_classes, info.arch, stem, exported=False)
        fp32_path = outdir / f"{stem}.fp32.onnx"
        ensure_not_input(fp32_path, [p])
        outdir.mkdir(parents=True, exist_ok=True)
        save_model(proto, stage(fp32_path))
        if notify:
            notify(f"{p.name}: {'; '.join(changes)} (outputs checked equal), written as {fp32_path.name}")
        return Fp32Model(fp32_path, proto, pre, info.num_classes, info.arch, stem, exported=True,
                         rewrites=tuple(changes))
    from rescompress.folding import fold_batchnorm

    loaded = load_model(p, arch=arch, trust_pickle=trust_pickle)
    pre = _resolve(preprocess, loaded.preprocess)
    if pre.channels != loaded.in_channels:
        raise RescompressError(
            f"the model takes {loaded.in_channels}-channel input but the preprocessing gives {pre.channels}; "
            f"pass --channels {loaded.in_channels}"
        )
    if notify:
        notify(f"loaded {loaded.arch} ({loaded.num_classes} classes, input {pre.input_shape(1)[1:]})")
    fp32_path = outdir / f"{stem}.fp32.onnx"
    ensure_not_input(fp32_path, [p])
    written = stage(fp32_path)
    if isinstance(loaded.module, torch.jit.ScriptModule):
        # torch.fx cannot trace TorchScript, so BatchNorm is folded in the exported graph instead (where the
        # exporter has not folded it already); checked in ORT against the unfolded export.
        export_onnx(loaded.module, pre, written, arch=loaded.arch, num_classes=loaded.num_classes, source=p)
        proto, changes = _normalized_onnx(onnx.load(str(written)), written, pre)
        if changes:
            save_model(proto, written)
        return Fp32Model(fp32_path, proto, pre, loaded.num_classes, loaded.arch, stem, exported=True)
    folded = fold_batchnorm(loaded.module, input_shape=pre.input_shape(8))
    export_onnx(
        folded.model, pre, written, arch=loaded.arch, num_classes=loaded.num_classes, source=p, folded=True,
    )
    return Fp32Model(fp32_path, onnx.load(str(written)), pre, loaded.num_classes, loaded.arch, stem, exported=True)


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", *INTEGER_OPS)
MIN_QDQ_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear


def _normalized_onnx(proto: onnx.ModelProto, p: Path, pre: Preprocess) -> tuple[onnx.ModelProto, list[str]]:
    """A user's FP32 ONNX graph made quantizable, and what was changed (checked to keep the function).

    Files below opset 13 are converted to opset 17; Conv -> BatchNormalization pairs are folded; weights
    listed as graph inputs are taken out of them; a fixed batch size becomes dynamic. The first three are
    checked together against the given graph in ORT; ``dynamic_batch_copy`` checks its own step.
    """
    given = proto
    from rescompress.export import MIN_OPSET, dynamic_batch_copy

    changes: list[str] = []
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if 0 < opset < MIN_QDQ_OPSET:  # per-channel Q/DQ needs opset 13: convert older exports
        from onnx import version_converter

        try:
            converted = version_converter.convert_version(proto, MIN_OPSET)
        except Exception:
            converted = None
        if converted is not None:
            proto = converted
            changes.append(f"opset {opset} converted to {MIN_OPSET}")
    if any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        from rescompress.folding import fold_onnx_batchnorm

        folded, count = fold_onnx_batchnorm(proto)
        if any(n.op_type == "BatchNormalization" for n in folded.graph.node):
            raise RescompressError(
                f"{p} has BatchNormalization nodes that do not follow a convolution with constant weights; "
                "re-export in eval mode with constant folding (torch.onnx.export(model.eval(), ...)) or "
                "pass the PyTorch model"
            )
        proto = folded
        changes.append(f"{count} BatchNormalization folded into the convolutions")
    init_names = {i.name for i in proto.graph.initializer}
    if any(i.name in init_names for i in proto.graph.input):
        # keep_initializers_as_inputs=True: ORT treats such weights as replaceable and optimizes around
        # them (no constant folding, no NCHWc convolutions), which would slow the FP32 baseline.
        proto = _without_initializer_inputs(proto)
        changes.append("its weights taken out of the graph inputs")
    if changes:
        _check_same_function(given, proto, pre, f"the rewritten copy of {p} ({'; '.join(changes)})")
    proto, fixed = dynamic_batch_copy(proto, str(p))
    if fixed is not None:  # calibration runs in batches, and users want INT8 files that take any batch
        changes.append(f"its fixed batch of {fixed} made dynamic")
    return proto, changes


def _without_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    kept = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(kept)
    return m


def _check_same_function(before: onnx.ModelProto, after: onnx.ModelProto, pre: Preprocess, what: str) -> None:
    """Raise unless two graphs give the same logits (float32 rounding aside) on a random batch."""
    from rescompress.export import ort_logits

    inits = {i.name for i in before.graph.initializer}
    dims = next(i for i in before.graph.input if i.name not in inits).type.tensor_type.shape.dim
    batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else 2
    x = np.random.default_rng(0).standard_normal(pre.input_shape(batch)).astype(np.float32)
    a, b = ort_logits(before.SerializeToString(), x), ort_logits(after.SerializeToString(), x)
    if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(a).max()))):
        raise RescompressError(f"{what} does not compute what the file does; pass the PyTorch model instead")


# ------------------------------------------------------------------------------------------ data
def _calibration_indices(n_avail: int, n: int, seed: int, holdout: int) -> tuple[list[int], list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_avail, generator=g)[:n].tolist()
    return sorted(perm[holdout:]), sorted(perm[:holdout])


def _loader(dataset, indices: Sequence[int] | None, batch_size: int):
    from torch.utils.data import Subset

    from rescompress.data import make_loader

    ds = Subset(dataset, list(indices)) if indices is not None else dataset
    return make_loader(ds, batch_size=batch_size, num_workers=0)


class _HashingBatches:
    """Iterate a loader over the dataset's images ``indices`` (in that order), fingerprinting the exact
    calibration inputs on the way: whatever order they are read in, the same images give the same print."""

    def __init__(self, loader, indices: Sequence[int]) -> None:
        self.loader = loader
        self.indices = list(indices)
        self.digests: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        at = 0
        for x, y in self.loader:
            images = np.ascontiguousarray(x.numpy(), dtype=np.float32)
            for i, image in zip(self.indices[at : at + len(images)], images, strict=True):
                self.digests[i] = hashlib.sha256(image.tobytes()).digest()
            at += len(images)
            yield x, y

    def fingerprint(self) -> str:
        sha = hashlib.sha256()
        for i in sorted(self.digests):
            sha.update(self.digests[i])
        return sha.hexdigest()


# ------------------------------------------------------------------------------------------ helpers
def _sessions_for(models: dict[str, onnx.ModelProto], threads: int | None) -> dict:
    return {k: make_session(m, threads) for k, m in models.items()}


def _emit_checked(model: onnx.ModelProto, plan: QuantPlan, placement: Placement) -> onnx.ModelProto:
    q = emit_qdq(model, plan, placement)
    if placement.target == "tensorrt":
        problems = check_trt_qdq(q, allow_float=placement.float_nodes)
        if problems:
            raise RescompressError(f"the TensorRT Q/DQ file breaks TensorRT's rules: {problems[0]}")
    return q


def _layer_sqnr(
    fp32: onnx.ModelProto, qmodel: onnx.ModelProto, placement: Placement, xs: list[np.ndarray],
    threads: int | None,
) -> tuple[LayerSqnr, ...]:
    """SQNR of every quantized activation over the batches ``xs``, one batch at a time (every activation of
    both models is held for one batch only)."""
    names = [a.name for a in placement.activations]
    fp = make_session(with_extra_outputs(fp32, names), threads)
    qs = make_session(with_extra_outputs(qmodel, [f"{n}_dequantized" for n in names]), threads)
    in_fp, in_q = fp.get_inputs()[0].name, qs.get_inputs()[0].name
    signal, noise = np.zeros(len(names)), np.zeros(len(names))
    for x in xs:
        ref = fp.run(names, {in_fp: x})
        got = qs.run([f"{n}_dequantized" for n in names], {in_q: x})
        for i, (r, g) in enumerate(zip(ref, got, strict=True)):
            r = r.astype(np.float64)
            signal[i] += float(np.sum(r * r))
            noise[i] += float(np.sum((r - g) ** 2))
    scores = [LayerSqnr(n, capped_sqnr_db(signal[i], noise[i])) for i, n in enumerate(names)]
    return tuple(sorted(scores, key=lambda s: s.sqnr_db))


# --method auto computes percentile ranges at each of these (and at --percentile): the clipping that pays differs
# between models, and each level costs only one held-out evaluation (the histograms are shared)
AUTO_PERCENTILES: tuple[float, ...] = (99.99, 99.999)


def method_label(method: str, percentile: float | None) -> str:
    """``percentile 99.999`` for percentile ranges, else the method's name."""
    return f"percentile {percentile:.10g}" if method == "percentile" and percentile is not None else method


def range_candidates(method: str, percentile: float) -> dict[str, tuple[str, float]]:
    """The ranges calibration computes, by label: ``(method, percentile)``. ``auto``: every method, percentile at
    ``percentile`` and at each of :data:`AUTO_PERCENTILES`."""
    if method != "auto":
        return {method_label(method, percentile): (method, percentile)}
    out = {}
    for m in METHODS:
        for pct in sorted({percentile, *AUTO_PERCENTILES}) if m == "percentile" else (percentile,):
            out[method_label(m, pct)] = (m, pct)
    return out


def choose_method(fids: dict[str, Fidelity]) -> str:
    """Best top-1 (labeled) or agreement (unlabeled), up to noise; among the tied, the highest logit SQNR.

    On a small held-out set the best method can lead by a few images by chance: its lead can only come from
    images where it departs from FP32's answer and is lucky. So a method counts as tied with the best unless
    it trails by more than twice the square root of the best's departures (and always when it trails by at
    most one image).
    """
    acc = {m: (f.top1 if f.top1 is not None else f.top1_agreement) for m, f in fids.items()}
    best = max(fids, key=lambda m: (acc[m], fids[m].sqnr_db))
    flips = fids[best].n * (100.0 - fids[best].top1_agreement) / 100.0
    slack = max(1.0, 2.0 * math.sqrt(flips))  # images

    def tied(m: str) -> bool:
        return (acc[best] - acc[m]) * fids[m].n / 100.0 <= slack + 1e-9

    return max((m for m in fids if tied(m)), key=lambda m: fids[m].sqnr_db)


# ------------------------------------------------------------------------------------------ main entry
def _nothing_left_on_failure(run):
    """Every file of a run is written into a staging folder inside ``outdir`` and moved into it at the end
    (:class:`~rescompress.fileio.StagedOutputs`): a run that fails or is interrupted leaves ``outdir`` as
    it was (no half set of outputs, no file of another run or user removed), and removes the folders it
    created for it."""

    @functools.wraps(run)
    def wrapper(model, calib_data, outdir="out", **kwargs):
        with StagedOutputs(outdir) as staged:
            result = run(model, calib_data, Path(outdir), _staged=staged, **kwargs)
            staged.commit()
            return result

    return wrapper


@_nothing_left_on_failure
def quantize_model(
    model: Path | str,
    calib_data: Path | str | None,
    outdir: Path | str = "out",
    *,
    config: QuantizeConfig | None = None,
    eval_data: Path | str | None = None,
    plan: Path | str | QuantPlan | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    preprocess: PreprocessArg = None,
    progress: ProgressFn | None = None,
    notify: Notify | None = None,
    _staged: StagedOutputs | None = None,
) -> QuantizeResult:
    """Quantize ``model`` to INT8 artifacts in ``outdir``; see the module docstring for the stages.

    A run that fails leaves nothing behind in ``outdir`` (see :func:`_nothing_left_on_failure`, which
    passes ``_staged``: files are written there and land in ``outdir`` together at the end).
    """
    from rescompress.data import check_compatible, describe_source, labels_fit, limit_indices, open_dataset
    from rescompress.system import library_versions

    cfg = config or QuantizeConfig()
    say = notify or (lambda msg: log.info(msg))
    prog = progress or (lambda it, total, desc: it)
    out = Path(outdir)

    def w(final: Path) -> Path:  # where an output that will be ``final`` is written during the run
        return _staged.path(final) if _staged is not None else final

    warnings: list[str] = []
    # Refuse unusable data before anything is exported or written.
    for d, split in ((calib_data, "train"), (eval_data, "test")):
        if d is not None and (plan is None or d is eval_data):
            if describe_source(d, split)[0].length == 0:
                raise DataError(f"{d} holds no images")
    if plan is not None and not isinstance(plan, QuantPlan):  # the plan this run writes must not replace it
        ensure_not_input(out / f"{output_stem(Path(model))}.plan.json", [plan])  # before anything is written
    src = load_fp32(model, out, arch=arch, trust_pickle=trust_pickle, preprocess=preprocess, notify=say, stage=w)
    base = prepare_model(src.proto)
    check_finite_weights(base)
    fingerprint = model_fingerprint(base)
    pre = src.preprocess
    want = [t for t in TARGETS if t in cfg.targets]
    qplan_in = None
    if plan is not None:
        qplan_in = plan if isinstance(plan, QuantPlan) else QuantPlan.load(plan)
        qplan_in.check_model(fingerprint, pre.to_dict())
        kept = [e for e in qplan_in.provenance.exclude if e not in cfg.exclude]
        if kept:  # the plan has no scales for what its run kept in float
            say(f"keeping in float what the plan's run excluded: {', '.join(kept)}")
            cfg = replace(cfg, exclude=cfg.exclude + tuple(kept))

    check_patterns(base, cfg.exclude)
    placements = {t: place(base, t, cfg.exclude) for t in want}
    for t, p in placements.items():
        if p.unsupported:
            warnings.append(f"{t}: left in float (op type not quantized): {', '.join(p.unsupported[:8])}")
        if not p.quantized_nodes:
            raise RescompressError(f"nothing to quantize for {t}: no Conv/Gemm/MatMul layer with constant weights")
    all_tensors = GraphIndex(base).float_activations()
    cache_tensors = all_tensors if "tensorrt" in want else []
    tensors = calibration_tensors(base, placements.values())
    calib_names = tensors.names
    shapes = tensor_shapes(base)  # one shape inference serves calibration, rounding and refinement

    holdout_batches = None
    calib_stats: dict = {}
    reference = base  # the FP32 function the INT8 files are measured against
    equalization: Equalization | None = None  # when set, ``base`` is ``reference`` with channels rescaled
    method_scores: dict[str, dict] = {}
    if qplan_in is not None:
        qplan = qplan_in
        missing = [n for n in calib_names if n not in qplan.activations]
        if missing:
            raise RescompressError(
                f"the plan has no range for {len(missing)} tensor(s) this run needs (e.g. {missing[0]!r}); "
                "recalibrate without --plan"
            )
        if qplan.equalization:
            try:
                equalization = equalization_from_plan(base, shapes, qplan.equalization)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise RescompressError(f"the plan's channel equalization is malformed: {exc!r}") from exc
            base = equalization.apply(base)
            if "tensorrt" in want and equalization.scaled_tensors and not qplan.equalization.get("fp32_cache_scales"):
                raise RescompressError("the plan's channel equalization lacks the FP32 file's ranges the TensorRT "
                                       "cache needs; recalibrate without --plan")
        method = qplan.provenance.method
        say(f"using plan {plan if not isinstance(plan, QuantPlan) else ''} (method {method}); calibration skipped")
        calib_stats = {"skipped": True, "num_images": qplan.provenance.num_images}
    else:
        if calib_data is None:
            raise UsageError("--calib-data is required (or --plan to reuse a calibration)")
        dataset = open_dataset(calib_data, pre, split="train")
        # Calibration needs images only: labels that cannot be the model's classes (a bigger labeled set, e.g.
        # ImageNet folders for a 10-class fine-tuned model) are ignored, and --method auto compares by agreement.
        calib_labels = labels_fit(dataset.info, src.num_classes)
        if calib_labels:
            check_compatible(dataset.info, src.num_classes, purpose="calibration")
        else:
            warnings.append(f"the calibration data has {dataset.info.num_classes} classes, the model "
                            f"{src.num_classes}: its labels are ignored (calibration needs images only)")
        n_avail = len(dataset)
        n = min(cfg.num_images, n_avail)
        if n < cfg.num_images:
            warnings.append(f"the calibration data holds {n_avail} images, fewer than --num-images {cfg.num_images}")
        holdout = 0
        if cfg.method == "auto":
            holdout = max(1, min(n // 2, round(n * cfg.holdout_fraction)))
            if n < 4:
                raise DataError(f"--method auto needs at least 4 calibration images, got {n}")
        calib_idx, hold_idx = _calibration_indices(n_avail, n, cfg.seed, holdout)
        batch = calibration_batch_size(per_image_sizes(base, tensors.observed, shapes), cfg.batch_size)
        if batch < cfg.batch_size:
            say(f"calibration batch size capped at {batch} to bound activation memory")
        # Channel equalization (equalize.py) takes its factors from the first images of the calibration pass
        # itself, spread over the (sorted) calibration indices so that a folder ordered by class gives every
        # class; the pass then histograms the rescaled tensors as the rescaled model holds them, and also as the
        # FP32 file holds them, for the TensorRT cache, which goes with that file (TensorRT's implicit path
        # quantizes it); kept in the plan even without the tensorrt target, so that a later --plan run can write
        # the cache.
        order, equalizing = calib_idx, None
        groups = channel_groups(base, shapes, tensors.shared) if cfg.equalize else []
        if groups:
            first = [calib_idx[int(i)] for i in np.linspace(0, len(calib_idx) - 1, EQUALIZE_IMAGES).round()
                     ] if len(calib_idx) > EQUALIZE_IMAGES else list(calib_idx)
            chosen = set(first)
            order = first + [i for i in calib_idx if i not in chosen]
            equalizing = EqualizingPass(groups, tensors, len(first))
        elif cfg.equalize:
            say("equalization: no channel group can be rescaled in this graph")
        batches = _HashingBatches(_loader(dataset, order, batch), order)
        t0 = time.perf_counter()
        histograms, stats = collect_histograms(
            base, tensors.observed, prog(batches, len(batches), "calibrating"), threads=cfg.threads, shapes=shapes,
            rescale=equalizing.rescale if equalizing else None,
        )
        divided, apply_seconds = {}, 0.0
        if equalizing:
            t_apply = time.perf_counter()
            equalization, divided = equalizing.equalization, equalizing.divided
            base = equalization.apply(base)
            apply_seconds = time.perf_counter() - t_apply
            say(f"equalized {len(equalization.scaled_tensors)} activation(s) in "
                f"{equalization.to_dict()['groups_scaled']} channel group(s) on the first {equalization.images} "
                "calibration images")
        fp32_histograms = {r: histograms.pop(divided_name(r)) for r in divided}
        histograms = tensors.complete(histograms)
        calib_stats = {**stats.to_dict(), "batch_size": batch, "tensors": len(calib_names),
                       "tensors_observed": len(tensors.observed), "holdout": holdout}
        if equalizing:  # applying the factors to the model (their ranges come from the calibration pass)
            calib_stats["equalization_seconds"] = apply_seconds
        data_fp = batches.fingerprint()
        weights = weight_entries(base, [w for p in placements.values() for w in p.weights])
        provenance = Provenance(
            model_fingerprint=fingerprint, data_fingerprint=data_fp, num_images=stats.num_images,
            method=cfg.method, percentile=cfg.percentile, library_versions=library_versions(),
            preprocess=pre.to_dict(), exclude=tuple(cfg.exclude),
        )
        plans = {
            label: QuantPlan(activation_entries(histograms, m, pct, cfg.ort_range), weights,
                             replace(provenance, method=m, percentile=pct))
            for label, (m, pct) in range_candidates(cfg.method, cfg.percentile).items()
        }
        calib_stats["ranges_seconds"] = time.perf_counter() - t0 - stats.seconds - apply_seconds
        if cfg.method == "auto":
            holdout_batches = _loader(dataset, hold_idx, cfg.batch_size)
            chooser = "onnxruntime" if "onnxruntime" in want else "tensorrt"
            cands = {m: _emit_checked(base, p, placements[chooser]) for m, p in plans.items()}
            logits, labels = run_sessions(_sessions_for({"fp32": base, **cands}, cfg.threads), holdout_batches)
            fids = {m: compare(logits["fp32"], logits[m], labels if calib_labels else None) for m in cands}
            method_scores = {m: f.to_dict() for m, f in fids.items()}
            label = choose_method(fids)
            say(f"auto: chose {label} on {len(hold_idx)} held-out images ({chooser} file: "
                f"SQNR {fids[label].sqnr_db:.1f} dB)")
        else:
            label = next(iter(plans))
        qplan = plans[label]
        method = qplan.provenance.method
        if equalization is not None:
            entry = equalization.to_plan()
            if fp32_histograms:
                fp32_entries = activation_entries(fp32_histograms, method, qplan.provenance.percentile,
                                                  cfg.ort_range)
                entry["fp32_cache_scales"] = {
                    t: float(fp32_entries[tensors.root(t)].params["tensorrt"].scale)
                    for t in all_tensors if tensors.root(t) in fp32_entries}
            qplan = replace(qplan, equalization=entry)

    rounded: dict = {}  # initializer -> Hessian-rounded float weight; ``base`` keeps the float ones
    reuse = plan is not None and qplan.rounding and cfg.weight_rounding != "nearest"
    if reuse:
        src_plan = Path(plan) if not isinstance(plan, QuantPlan) else None
        if src_plan is None:
            raise RescompressError("a plan with rounded weights must be given as a file (its weights sit beside it)")
        rounded = load_levels(src_plan.parent / qplan.rounding["file"], qplan.rounding["sha256"], qplan)
        calib_stats["weight_rounding"] = {**qplan.rounding, "reused": True}
        say(f"weight rounding: reused {qplan.rounding['file']}")
    elif cfg.weight_rounding == "hessian" or (cfg.weight_rounding == "auto" and calib_data is not None):
        rounded = _round_weights(base, qplan, placements, calib_data, pre, cfg, calib_stats, say, shapes,
                                 calib_idx if plan is None else None)
    elif cfg.weight_rounding == "auto":
        calib_stats["weight_rounding"] = "nearest (no --calib-data to collect layer statistics from)"
    if not rounded:
        qplan = replace(qplan, rounding=None)

    def emit(plan_: QuantPlan, placement_: Placement) -> onnx.ModelProto:
        return _emit_checked(with_rounded_weights(base, rounded, placement_), plan_, placement_)

    if plan is None and cfg.refine_tensors and holdout_batches is not None:
        unrefined = qplan
        qplan = _refine(base, qplan, placements, holdout_batches, cfg, calib_stats, say, emit, shapes)
        if qplan.equalization and qplan.equalization.get("fp32_cache_scales"):
            # the TensorRT cache takes refined ranges; for the FP32 file's tensors, by the same factor
            fp32 = {}
            for t, v in qplan.equalization["fp32_cache_scales"].items():
                after, before = (p.activation(t).params["tensorrt"].scale for p in (qplan, unrefined))
                fp32[t] = v * after / before if before > 0 else v
            qplan = replace(qplan, equalization={**qplan.equalization, "fp32_cache_scales": fp32})

    # Evaluation data: the given set, else the held-out / calibration images (agreement only).
    if eval_data is not None:
        eval_ds = open_dataset(eval_data, pre, split="test")
        check_compatible(eval_ds.info, src.num_classes, purpose="evaluation")
        n_eval = len(eval_ds) if cfg.eval_limit is None else min(cfg.eval_limit, len(eval_ds))
        eval_loader = _loader(eval_ds, limit_indices(len(eval_ds), cfg.eval_limit), cfg.batch_size)
        eval_source = f"{eval_data} ({n_eval} images{'' if eval_ds.info.labeled else ', unlabeled'})"
    elif holdout_batches is not None:
        eval_loader = holdout_batches
        eval_source = "held-out calibration images (no --eval-data: agreement only)"
    elif calib_data is not None:
        eval_ds = open_dataset(calib_data, pre, split="train")
        n_eval = min(cfg.num_images, len(eval_ds))
        eval_loader = _loader(eval_ds, _calibration_indices(len(eval_ds), n_eval, cfg.seed, 0)[0], cfg.batch_size)
        eval_source = "calibration images (no --eval-data: agreement only)"
    else:
        eval_loader, eval_source = None, "none (no --eval-data or --calib-data)"
    use_labels = eval_data is not None and eval_ds.info.labeled

    fallback = None
    if cfg.max_drop is not None:
        if eval_loader is None:
            raise UsageError("--max-drop needs --eval-data (or --calib-data to measure agreement)")
        # Each file meets --max-drop on its own: the TensorRT placement loses more than the ORT one. The FP32
        # reference is computed once for both searches.
        ref = _fallback_reference(reference, eval_loader, use_labels, cfg.threads)
        if ref.labels is None:
            say("no labeled --eval-data: --max-drop applies to top-1 disagreement with FP32 (percent)")
        fallback = {t: _fallback(base, qplan, placements[t], cfg, eval_loader, ref, say, emit) for t in want}
        placements = {t: place(base, t, cfg.exclude + fallback[t].float_nodes) for t in want}

    # Emit the artifacts.
    artifacts: dict[str, Path] = {"fp32": src.path}
    qmodels: dict[str, onnx.ModelProto] = {}
    suffix = {"onnxruntime": "ort", "tensorrt": "trt"}
    inputs = [model, calib_data, eval_data, plan if not isinstance(plan, QuantPlan) else None]
    stem_rewrite = None
    for t in want:
        qmodels[t] = emit(qplan, placements[t])
    files = dict(qmodels)  # what is written; qmodels keep every Q/DQ pair's name for the per-tensor SQNR
    if "onnxruntime" in files and cfg.stem_s2d:
        files["onnxruntime"], stem_rewrite = rewrite_stem(files["onnxruntime"])
    for t in want:
        path = out / f"{src.stem}.int8.{suffix[t]}.onnx"
        ensure_not_input(path, inputs)
        save_model(files[t], w(path))
        artifacts[t] = path
    if "tensorrt" in want:
        fp32_scales = (qplan.equalization or {}).get("fp32_cache_scales", {})
        scales = {n: fp32_scales.get(n, qplan.activation(n).params["tensorrt"].scale) for n in cache_tensors}
        artifacts["trt_cache"] = out / f"{src.stem}.int8.trt.cache"
        write_cache(w(artifacts["trt_cache"]), scales, cfg.trt_version)
    if rounded and not reuse:
        weights_file = out / f"{src.stem}.weights.npz"
        ensure_not_input(weights_file, inputs)
        sha = save_levels(w(weights_file), rounded, qplan)
        qplan = replace(qplan, rounding={"method": "hessian", "file": weights_file.name, "sha256": sha,
                                         "images": calib_stats["weight_rounding"]["images"]})
        artifacts["weights"] = weights_file
    elif rounded:  # reused: the plan's weights file goes beside the new plan, byte for byte
        import shutil

        from rescompress.fileio import atomic_path

        src_file = Path(plan).parent / qplan.rounding["file"]
        weights_file = out / qplan.rounding["file"]
        if weights_file.resolve() != src_file.resolve():
            ensure_not_input(weights_file, inputs)
            with atomic_path(w(weights_file)) as tmp:
                shutil.copyfile(src_file, tmp)
        artifacts["weights"] = weights_file
    artifacts["plan"] = out / f"{src.stem}.plan.json"
    qplan.save(w(artifacts["plan"]))

    # Measure.
    fidelity: dict[str, Fidelity] = {}
    worst: dict[str, tuple[LayerSqnr, ...]] = {}
    if eval_loader is not None:
        sessions = _sessions_for({"fp32": reference, **files}, cfg.threads)
        logits, labels = run_sessions(sessions, prog(eval_loader, len(eval_loader), "evaluating"))
        labels = labels if use_labels else None
        fidelity = {t: compare(logits["fp32"], logits[t], labels) for t in qmodels}
        xs = _first_images(eval_loader, LAYER_SQNR_IMAGES)
        for t in qmodels:
            worst[t] = _layer_sqnr(base, qmodels[t], placements[t], xs, cfg.threads)[:5]
    latency = _latency(src, files.get("onnxruntime"), cfg, say) if cfg.latency and "onnxruntime" in files else None

    result = QuantizeResult(
        model=Path(model), fp32_path=src.path, artifacts=artifacts, plan=qplan, method=method,
        method_scores=method_scores, fidelity=fidelity, eval_source=eval_source, worst_layers=worst,
        placements=placements, fallback=fallback, latency=latency, calibration=calib_stats,
        warnings=tuple(warnings), config=cfg, fp32_rewrites=src.rewrites, stem_rewrite=stem_rewrite,
        equalization=equalization.to_dict() if equalization is not None else None,
    )
    report_json = out / f"{src.stem}.quantize.json"
    report_md = out / f"{src.stem}.quantize.md"
    artifacts["report_json"] = report_json
    artifacts["report_md"] = report_md
    write_text_atomic(w(report_json), json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    write_text_atomic(w(report_md), render_markdown(result))
    return result


def _round_weights(
    base: onnx.ModelProto, plan: QuantPlan, placements: dict[str, Placement], calib_data, pre, cfg: QuantizeConfig,
    calib_stats: dict, say: Notify, shapes: dict, calib_idx: Sequence[int] | None = None,
) -> dict:
    """Hessian-aware weight rounding on at most ``rounding_images`` calibration images (rounding.py).

    They come from this run's calibration images (``calib_idx``): never from the held-out ones, which
    choose the method, refine the ranges and, without --eval-data, measure the result; and never beyond
    --num-images. With a reused plan, from the plan's seeded sample of the data.
    """
    from rescompress.data import open_dataset
    from rescompress.quantization.rounding import round_weights

    if calib_data is None:
        raise RescompressError("--weight-rounding hessian needs --calib-data (layer inputs come from images)")
    dataset = open_dataset(calib_data, pre, split="train")
    layer_inputs = {n.input[0] for n in base.graph.node for p in placements.values() for w in p.weights
                    if n.name == w.node}
    pool = list(calib_idx) if calib_idx is not None else None
    n = min(rounding_images(onnx_macs(base, shapes), cfg.rounding_images), len(pool or dataset))
    batch = calibration_batch_size(per_image_sizes(base, sorted(layer_inputs), shapes), cfg.batch_size)
    if pool is not None:  # an even spread over the calibration images (they are a seeded random sample)
        idx = [pool[int(i)] for i in np.linspace(0, len(pool) - 1, n).round().astype(int)] if n < len(pool) else pool
    else:
        idx, _ = _calibration_indices(len(dataset), n, cfg.seed, 0)
    batches = [b[0].numpy() for b in _loader(dataset, idx, batch)]
    t0 = time.perf_counter()
    rounded, report = round_weights(base, plan, placements.values(), batches, cfg.threads)
    calib_stats["weight_rounding"] = {**report.to_dict(), "seconds": time.perf_counter() - t0}
    say(f"weight rounding (hessian): {report.layers} layer(s) on {report.images} images"
        + (f", {len(report.skipped)} left to nearest rounding" if report.skipped else ""))
    return rounded


def _first_images(loader, n: int) -> list[np.ndarray]:
    """The first ``n`` images of ``loader`` (fewer if it holds fewer), as its batches, whatever its batch size."""
    out, have = [], 0
    for b in loader:
        out.append(b[0].numpy()[: n - have])
        have += len(out[-1])
        if have >= n:
            break
    return out


def _refine(
    base: onnx.ModelProto, plan: QuantPlan, placements: dict[str, Placement], loader, cfg: QuantizeConfig,
    calib_stats: dict, say: Notify, emit=None, shapes: dict | None = None,
) -> QuantPlan:
    """Refine each target's scales on the held-out images (see refine.py); record what changed.

    The work is capped by a compute budget (``refine_budget``): large models refine on fewer images, then
    fewer tensors, so the default run time stays bounded whatever the model.
    """
    emit = emit or _default_emit(base)
    dataset = getattr(loader, "dataset", None)
    held = len(dataset) if dataset is not None else sum(len(b[0]) for b in loader)
    shapes = tensor_shapes(base) if shapes is None else shapes
    budget = refine_budget(onnx_macs(base, shapes), held, cfg.refine_tensors, len(placements))
    if budget.tensors == 0:
        calib_stats["refine"] = {"skipped": budget.note}
        say(f"refine: {budget.note}")
        return plan
    x = np.concatenate(_first_images(loader, budget.images))
    t0 = time.perf_counter()
    report = {}
    if budget.note:
        say(f"refine: {budget.note}")
    for t, p in placements.items():
        r = refine_plan(base, plan, p, x, lambda _m, plan_, placement_: emit(plan_, placement_),
                        max_tensors=budget.tensors, threads=cfg.threads)
        plan = r.plan
        report[t] = r.to_dict()
        say(f"refine ({t}): {len(r.changed)} scale(s) changed, held-out SQNR {r.before_db:.1f} -> {r.after_db:.1f} dB")
    calib_stats["refine"] = {**report, "images": len(x), "tensors": budget.tensors, "budget_note": budget.note,
                             "seconds": time.perf_counter() - t0}
    return plan


def _default_emit(base: onnx.ModelProto):
    return lambda plan_, placement_: _emit_checked(base, plan_, placement_)


@dataclass(frozen=True)
class _FallbackReference:
    logits: np.ndarray  # FP32 logits over the whole evaluation loader
    labels: np.ndarray | None  # None: no labels, the budget is disagreement with FP32
    small: list[np.ndarray]  # the first SENSITIVITY_IMAGES images, for ranking layers


def _fallback_reference(base: onnx.ModelProto, loader, use_labels: bool, threads: int | None) -> _FallbackReference:
    logits, labels = run_sessions({"fp32": make_session(base, threads)}, loader)
    # Only the first few batches: sensitivity needs a ranking, not a precise number.
    return _FallbackReference(logits["fp32"], labels if use_labels else None, _first_images(loader, SENSITIVITY_IMAGES))


def _fallback(
    base: onnx.ModelProto, plan: QuantPlan, placement: Placement, cfg: QuantizeConfig, loader,
    ref: _FallbackReference, say: Notify, emit=None,
) -> FallbackResult:
    """Rank ``placement``'s layers on a few images, then search the fewest to keep in float (see
    fallback.py) so that its target's file meets ``cfg.max_drop``."""
    emit = emit or _default_emit(base)
    target = placement.target
    layers = list(placement.quantized_nodes)
    ref_small = ref.logits[:SENSITIVITY_IMAGES]

    def only(node: str) -> float:
        others = tuple(n for n in layers if n != node)
        q = emit(plan, place(base, target, cfg.exclude + others))
        got = run_sessions({"q": make_session(q, cfg.threads)}, ref.small)[0]["q"]
        return sqnr_db(ref_small, got)

    def ranking() -> list:  # only needed when the fully quantized file misses the target
        say(f"{target}: ranking {len(layers)} layers by sensitivity on {len(ref_small)} images")
        return rank_layers(layers, only)

    def measure(float_nodes: tuple[str, ...]) -> float:
        q = emit(plan, place(base, target, cfg.exclude + float_nodes))
        got = run_sessions({"q": make_session(q, cfg.threads)}, loader)[0]["q"]
        f = compare(ref.logits, got, ref.labels)
        return f.top1_drop if f.top1_drop is not None else 100.0 - f.top1_agreement

    metric = "top1_drop" if ref.labels is not None else "disagreement"
    try:
        res = search_fallback(ranking, measure, cfg.max_drop, metric, cfg.max_float_layers)
    except CheckFailed as exc:  # say which file could not meet it
        raise CheckFailed(f"{target} file: {exc}", {"target": target, **exc.details}) from None
    say(f"{target} fallback: {len(res.float_nodes)} layer(s) in float, {metric} {res.achieved:.3g}")
    return res


def _latency(src: Fp32Model, qmodel: onnx.ModelProto | None, cfg: QuantizeConfig, say: Notify) -> dict | None:
    try:
        from rescompress.measure.latency import measure_latency
    except ImportError:  # the measure package is optional for this stage
        return None

    class _Runner:
        def __init__(self, name: str, session) -> None:
            self.name = name
            self.session = session
            self.input = session.get_inputs()[0].name

        def run(self, batch: np.ndarray) -> np.ndarray:
            return self.session.run(None, {self.input: batch})[0]

    runners = {
        "fp32": _Runner("fp32", make_session(src.proto, cfg.threads)),
        "int8-ort": _Runner("int8-ort", make_session(qmodel, cfg.threads)),
    }
    say(f"timing FP32 vs INT8 on ONNX Runtime CPU at batch {', '.join(map(str, cfg.latency_batches))}")
    rep = measure_latency(runners, src.preprocess.input_shape, cfg.latency_batches, warmup_s=0.5, iters=10, rounds=3)
    return {
        "runtime": "onnxruntime-cpu",
        "speedup": {str(b): rep.ratio("int8-ort", b).speedup for b in cfg.latency_batches},
        "fp32_ms": {str(b): rep.get("fp32", b).median_ms for b in cfg.latency_batches},
        "int8_ms": {str(b): rep.get("int8-ort", b).median_ms for b in cfg.latency_batches},
        "spread": {str(b): max(rep.get("fp32", b).spread, rep.get("int8-ort", b).spread) for b in cfg.latency_batches},
    }


# ------------------------------------------------------------------------------------------ report
def _f(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{digits}f}"
    return str(v)


def render_markdown(r: QuantizeResult) -> str:
    lines = [
        f"# INT8 quantization of `{r.model.name}`", "",
        f"- method: **{r.ranges}** (config: {r.config.method}), calibration images: {r.plan.provenance.num_images}",
        f"- evaluated on: {r.eval_source}",
        f"- artifacts: {', '.join(f'`{p.name}`' for k, p in r.artifacts.items() if k != 'fp32')}", "",
    ]
    if r.fp32_rewrites:
        lines[-1:-1] = [f"- FP32 reference `{r.fp32_path.name}`: the given file with "
                        f"{'; '.join(r.fp32_rewrites)} (outputs checked equal in ONNX Runtime)"]
    if r.fidelity:
        lines += [
            "| file | top-1 | top-5 | FP32 top-1 | top-1 drop | agreement % | logit SQNR dB |",
            "|---|---|---|---|---|---|---|",
        ]
        for t, f in r.fidelity.items():
            lines.append(
                f"| {t} | {_f(f.top1)} | {_f(f.top5)} | {_f(f.fp32_top1)} | {_f(f.top1_drop, 3)} | "
                f"{_f(f.top1_agreement, 3)} | {_f(f.sqnr_db, 1)} |"
            )
        lines.append("")
    for t, layers in r.worst_layers.items():
        lines.append(f"Worst tensors ({t}, SQNR vs FP32 dB): " + ", ".join(
            f"`{x.tensor}` {_f(x.sqnr_db, 1)}" for x in layers))
    if r.method_scores:
        lines += ["", "Method choice (held-out calibration images): " + ", ".join(
            f"{m} {_f(s['sqnr_db'], 1)} dB" for m, s in r.method_scores.items())]
    if r.equalization:
        e = r.equalization
        lines += ["", f"Channel equalization: {e['channels']} channels in {e['groups_scaled']} of {e['groups']} "
                  f"channel groups rescaled (median factor {_f(e['median_scale'])}, largest {_f(e['max_scale'])}; "
                  f"from {e['images']} calibration images). The FP32 function is unchanged; the INT8 files carry the "
                  "rescaled weights, the FP32 file and the TensorRT cache do not."]
    if r.stem_rewrite:
        k, b = r.stem_rewrite.kernel, r.stem_rewrite.block_kernel
        lines += ["", f"ONNX Runtime file: stem `{r.stem_rewrite.node}` ({k[0]}x{k[1]} stride 2) computed as a "
                  f"{b[0]}x{b[1]} stride-1 convolution over 2x2 blocks (SpaceToDepth; the same integer products)"]
    if r.latency:
        lines += ["", "Latency on ONNX Runtime CPU (INT8 speed-up over FP32): " + ", ".join(
            f"batch {b}: {_f(s)}x" for b, s in r.latency["speedup"].items())]
    for t, fb in (r.fallback or {}).items():
        lines += ["", f"Fallback for the {t} file (--max-drop {fb.max_drop:g}, {fb.metric} {fb.achieved:.3g}): "
                  f"{len(fb.float_nodes)} layer(s) in float: "
                  + (", ".join(f"`{n}`" for n in fb.float_nodes) or "none")]
    if r.warnings:
        lines += ["", "Warnings:", *[f"- {w}" for w in r.warnings]]
    return "\n".join(lines) + "\n"
