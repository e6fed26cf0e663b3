"""Checks an ONNX file must pass before TensorRT is asked to build an engine from it — all without TensorRT.

An engine build takes minutes on the target machine (often a Jetson) and fails late with parser messages
that rarely say what to fix. Everything that can be decided from the ONNX graph alone is checked here
first, so it also runs in CI on machines without a GPU (``rescompress build-engine --check-only``):
the file is a Q/DQ file for ``int8`` (signed 8-bit, zero point 0, constant positive scales, and the
quantize stage's own TensorRT placement checker where present), a plain float file for the other
precisions, opset ≥ 13 for Q/DQ, one 4-D input whose batch dimension is dynamic if a profile needs it,
profiles well ordered, and, for the legacy ``int8-implicit`` path, a TensorRT calibration cache that
matches the graph. Checks that depend on the TensorRT version (``int8-implicit`` and builder-flag FP16
are gone in TensorRT 11) run when the version is known.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rescompress.engine.profiles import ProfileSpec
from rescompress.errors import RescompressError, UsageError

PRECISIONS: tuple[str, ...] = ("auto", "int8", "fp16", "fp32", "int8-implicit")
MIN_QDQ_OPSET = 13  # per-channel (axis) QuantizeLinear/DequantizeLinear arrived in opset 13
MIN_OPSET = 9  # the oldest opset TensorRT 10's ONNX parser imports
DEFAULT_DYNAMIC_PROFILE = ProfileSpec(1, 8, 32)
PREPROCESS_KEY = "rescompress.preprocess"

_CACHE_HEADER = re.compile(r"^TRT-(?P<version>\d+)-(?P<algorithm>[A-Za-z0-9_]+)\s*$")
_CACHE_LINE = re.compile(r"^(?P<name>.+):\s*(?P<hex>[0-9a-fA-F]{8})\s*$")
_FLOAT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64"}


class EnginePreflightError(RescompressError):
    """The ONNX file (or the requested build) is not ready for a TensorRT engine build."""


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EngineBuildConfig:
    """What to build: the source ONNX, profiles, precision and builder settings.

    ``precision``: ``int8`` builds a strongly typed network from the file's Q/DQ nodes (the only INT8
    path on TensorRT 11); ``fp32`` builds strongly typed with the file's own types; ``fp16`` lets
    TensorRT 10 pick FP16 kernels (builder flag) or, on TensorRT 11, needs a file already in FP16;
    ``int8-implicit`` is TensorRT 10's legacy calibration-cache path; ``auto`` picks ``int8`` for a Q/DQ
    file, ``fp16`` for a file with float16 tensors, and ``fp32`` otherwise (strongly typed, so a bfloat16
    file keeps its types). ``profiles=None`` means ``N:N:N`` for a static batch N, else 1:8:32.
    ``workspace_mib=None`` keeps TensorRT's default (the device's memory). Hardware compatibility stays
    off: the engine is built for this GPU's compute capability only.
    """

    onnx_path: Path
    profiles: tuple[ProfileSpec, ...] | None = None
    precision: str = "auto"
    output: Path | None = None
    workspace_mib: int | None = None
    timing_cache: Path | None = None
    optimization_level: int = 3
    dla_core: int | None = None
    calib_cache: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "onnx_path", Path(self.onnx_path))
        for name in ("output", "timing_cache", "calib_cache"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if self.profiles is not None:
            object.__setattr__(self, "profiles", tuple(self.profiles))
            if not self.profiles:
                raise UsageError("at least one batch profile is needed, e.g. --batch 1:8:32")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise UsageError(f"--workspace must be a positive number of MiB, got {self.workspace_mib}")
        if not 0 <= self.optimization_level <= 5:
            raise UsageError(
                f"--opt-level must be 0..5 (TensorRT builder optimization level), got {self.optimization_level}"
            )
        if self.dla_core is not None and self.dla_core < 0:
            raise UsageError(f"--dla-core must be 0 or more, got {self.dla_core}")

    @property
    def engine_path(self) -> Path:
        """``-o`` if given, else ``<stem>.engine`` beside the ONNX (``m.int8.trt.onnx`` -> ``m.int8.trt.engine``)."""
        if self.output is not None:
            return self.output
        name = self.onnx_path.name
        stem = name[: -len(".onnx")] if name.lower().endswith(".onnx") else name
        return self.onnx_path.with_name(stem + ".engine")

    def to_dict(self) -> dict:
        return {
            "onnx_path": str(self.onnx_path),
            "profiles": None if self.profiles is None else [p.to_dict() for p in self.profiles],
            "precision": self.precision,
            "output": str(self.engine_path),
            "workspace_mib": self.workspace_mib,
            "timing_cache": None if self.timing_cache is None else str(self.timing_cache),
            "optimization_level": self.optimization_level,
            "dla_core": self.dla_core,
            "calib_cache": None if self.calib_cache is None else str(self.calib_cache),
        }


# ------------------------------------------------------------------------------------------- ONNX facts
@dataclass(frozen=True)
class QdqFacts:
    """What the Q/DQ nodes of a graph look like, as far as TensorRT cares."""

    quantize: int
    dequantize: int
    zero_point_types: tuple[str, ...]
    nonzero_zero_points: int
    missing_zero_points: int
    nonconstant_params: int
    nonpositive_scales: int

    @property
    def total(self) -> int:
        return self.quantize + self.dequantize

    def to_dict(self) -> dict:
        return {
            "QuantizeLinear": self.quantize,
            "DequantizeLinear": self.dequantize,
            "zero_point_types": list(self.zero_point_types),
            "nonzero_zero_points": self.nonzero_zero_points,
            "missing_zero_points": self.missing_zero_points,
            "nonconstant_params": self.nonconstant_params,
            "nonpositive_scales": self.nonpositive_scales,
        }


@dataclass(frozen=True)
class OnnxFacts:
    """The parts of an ONNX graph an engine build depends on."""

    path: Path
    opset: int
    inputs: tuple[tuple[str, tuple[int | str | None, ...]], ...]
    outputs: tuple[str, ...]
    op_counts: dict[str, int]
    qdq: QdqFacts
    float_types: tuple[str, ...]
    tensor_names: frozenset[str]
    num_classes: int | None
    preprocess: dict | None
    arch: str | None
    declared_chw: tuple[int, int, int] | None = None
    activation_names: frozenset[str] = frozenset()  # the image input and every node output

    @property
    def input_name(self) -> str | None:
        return self.inputs[0][0] if self.inputs else None

    @property
    def input_dims(self) -> tuple[int | str | None, ...]:
        return self.inputs[0][1] if self.inputs else ()

    @property
    def has_float16(self) -> bool:
        """float16 only: a bfloat16 file is not what TensorRT's FP16 precision means."""
        return "float16" in self.float_types


def _dims(value_info) -> tuple[int | str | None, ...]:
    dims: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _constants(graph, names: set[str], base_dir: Path) -> dict:
    """Name -> (TensorProto, numpy array) for the initializers and Constant nodes in ``names`` (Q/DQ
    scales and zero points, read from ``base_dir`` when stored as external data; the weights are not read)."""
    from onnx import numpy_helper

    consts = {init.name: init for init in graph.initializer if init.name in names}
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in names:
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t
    return {name: (tensor, numpy_helper.to_array(tensor, base_dir=str(base_dir))) for name, tensor in consts.items()}


def _qdq_facts(graph, base_dir: Path) -> QdqFacts:
    from onnx import TensorProto

    qdq_params = {t for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for t in n.input[1:]}
    consts = _constants(graph, qdq_params, base_dir)
    counts = Counter(n.op_type for n in graph.node)
    zp_types: set[str] = set()
    int8_inits = {t.name: t for t in graph.initializer if t.data_type == TensorProto.INT8}
    nonzero = missing = nonconstant = nonpositive = 0
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = node.input[1] if len(node.input) > 1 else ""
        zp = node.input[2] if len(node.input) > 2 else ""
        if scale not in consts:
            nonconstant += 1
        elif (consts[scale][1] <= 0).any():
            nonpositive += 1
        if not zp:
            # A DequantizeLinear of an int8 initializer is int8 without one; elsewhere ONNX means uint8.
            src = int8_inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
            missing += src is None
            continue
        if zp not in consts:
            nonconstant += 1
            continue
        tensor, arr = consts[zp]
        zp_types.add(TensorProto.DataType.Name(tensor.data_type).lower())
        if (arr != 0).any():
            nonzero += 1
    return QdqFacts(
        quantize=counts.get("QuantizeLinear", 0),
        dequantize=counts.get("DequantizeLinear", 0),
        zero_point_types=tuple(sorted(zp_types)),
        nonzero_zero_points=nonzero,
        missing_zero_points=missing,
        nonconstant_params=nonconstant,
        nonpositive_scales=nonpositive,
    )


def _float_types(graph) -> tuple[str, ...]:
    found: set[str] = set()
    for init in graph.initializer:
        if init.data_type in _FLOAT_TYPES:
            found.add(_FLOAT_TYPES[init.data_type])
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        t = vi.type.tensor_type.elem_type
        if t in _FLOAT_TYPES:
            found.add(_FLOAT_TYPES[t])
    for node in graph.node:
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i in _FLOAT_TYPES:
                    found.add(_FLOAT_TYPES[attr.i])
    return tuple(sorted(found))


def _metadata(model) -> tuple[int | None, dict | None, str | None]:
    """num_classes, preprocess and arch from the exporter's metadata (read_onnx_info where it exists)."""
    props = {p.key: p.value for p in model.metadata_props}
    preprocess = None
    if PREPROCESS_KEY in props:
        try:
            preprocess = json.loads(props[PREPROCESS_KEY])
        except json.JSONDecodeError:
            preprocess = None
    num_classes = None
    for key in ("rescompress.num_classes", "num_classes"):
        if props.get(key, "").isdigit():
            num_classes = int(props[key])
            break
    arch = props.get("rescompress.arch") or props.get("arch")
    return num_classes, preprocess, arch


def inspect_onnx(path: Path | str) -> OnnxFacts:
    """Read the graph facts an engine build needs (weights stay on disk: external data is not loaded)."""
    import onnx

    p = Path(path)
    if not p.exists():
        raise EnginePreflightError(f"ONNX file {p} does not exist")
    if p.is_file() and p.stat().st_size == 0:  # protobuf reads 0 bytes as an empty model
        raise EnginePreflightError(f"{p} is empty (0 bytes)")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / ValueError variants for a non-ONNX file
        raise EnginePreflightError(f"{p} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    graph = model.graph
    missing = sorted({loc for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                      for e in t.external_data if e.key == "location" and not (p.parent / (loc := e.value)).exists()})
    if missing:
        raise EnginePreflightError(f"{p} keeps its weights in {', '.join(missing)}, which is not beside it; copy "
                                   "the data file(s) with the model")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    init_names = {i.name for i in graph.initializer}
    inputs = tuple((vi.name, _dims(vi)) for vi in graph.input if vi.name not in init_names)
    outputs = tuple(vi.name for vi in graph.output)
    names: set[str] = set(init_names) | {name for name, _ in inputs}
    for node in graph.node:
        names.update(o for o in node.output if o)
    num_classes, preprocess, arch = _metadata(model)
    if num_classes is None and len(graph.output) == 1:
        out_dims = _dims(graph.output[0])
        if len(out_dims) == 2 and isinstance(out_dims[1], int):
            num_classes = out_dims[1]
    declared_chw = None
    info = _onnx_info(p)
    if info is not None:
        # The exporter's reader knows channels/size even where the graph leaves them symbolic.
        num_classes, arch = info.num_classes, info.arch or arch
        preprocess = info.preprocess.to_dict() if info.preprocess is not None else preprocess
        if info.input_size is not None:
            declared_chw = (int(info.in_channels), int(info.input_size[0]), int(info.input_size[1]))
    return OnnxFacts(
        path=p,
        opset=opset,
        inputs=inputs,
        outputs=outputs,
        op_counts=dict(Counter(n.op_type for n in graph.node)),
        qdq=_qdq_facts(graph, p.parent),
        float_types=_float_types(graph),
        tensor_names=frozenset(names),
        num_classes=num_classes,
        preprocess=preprocess,
        arch=arch,
        declared_chw=declared_chw,
        activation_names=frozenset({name for name, _ in inputs} | {o for n in graph.node for o in n.output if o}),
    )


def _onnx_info(path: Path):
    """``rescompress.export.read_onnx_info`` where it applies (None for a file it does not describe)."""
    try:
        from rescompress.export import read_onnx_info
    except ImportError:
        return None
    try:
        return read_onnx_info(path)
    except RescompressError:
        return None


# ------------------------------------------------------------------------------------------- calibration cache
@dataclass(frozen=True)
class CalibCache:
    """A TensorRT calibration cache: ``TRT-<version>-<Algorithm>`` then one ``tensor: hex(float32)`` a line."""

    path: Path
    version_tag: str
    algorithm: str
    scales: dict[str, float]

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "version_tag": self.version_tag, "algorithm": self.algorithm,
            "tensors": len(self.scales),
        }

    def retagged(self, tensorrt_version: str) -> bytes:
        """The cache with its header naming ``tensorrt_version``: TensorRT skips a cache tagged for another
        version, and the scales (float32 bits, kept exactly) do not depend on it."""
        from rescompress.quantization.trt_cache import cache_text

        number = trt_version_number(tensorrt_version)
        tag = self.version_tag if number is None else str(number)
        return cache_text(self.scales, algorithm=self.algorithm, version_tag=tag).encode("ascii")


def read_calib_cache(path: Path | str) -> CalibCache:
    """Parse a TensorRT calibration cache (the text form written by TensorRT and by the quantize stage)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EnginePreflightError(f"cannot read calibration cache {p}: {exc}") from None
    lines = [ln for ln in lines if ln.strip()]
    header = _CACHE_HEADER.match(lines[0]) if lines else None
    if header is None:
        raise EnginePreflightError(
            f"{p} is not a TensorRT calibration cache (first line must look like TRT-100300-EntropyCalibration2)"
        )
    scales: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        m = _CACHE_LINE.match(line.strip())
        if m is None:
            raise EnginePreflightError(f"calibration cache {p} line {number} is not 'tensor: hex-float': {line!r}")
        scale = struct.unpack(">f", bytes.fromhex(m["hex"]))[0]
        if not math.isfinite(scale) or scale <= 0:
            raise EnginePreflightError(f"calibration cache {p} line {number}: scale {scale} of {m['name'].strip()!r} "
                                       "must be finite and positive")
        scales[m["name"].strip()] = scale
    if not scales:
        raise EnginePreflightError(f"calibration cache {p} lists no tensors")
    return CalibCache(p, header["version"], header["algorithm"], scales)


def calib_cache_candidates(onnx_path: Path | str) -> tuple[Path | None, list[Path]]:
    """Calibration caches beside the ONNX file (files starting with ``TRT-``, named ``<base>*.cache`` or
    ``<base>*calib*``, base = the name up to its first dot) and the one named for this very model, if any:
    ``<stem>.int8.trt.cache`` (what ``rescompress quantize`` writes; stem without ``.onnx``/``.fp32``/
    ``.int8.trt``), ``<stem>.cache`` or ``<stem>.calib.cache``. ``m.fp32.onnx`` must not take
    ``m.pruned.int8.trt.cache``, another model's scales."""
    p = Path(onnx_path)
    base = p.name.split(".")[0]
    found = []
    for cand in sorted(p.parent.glob(f"{base}*")):
        if cand == p or not cand.is_file() or not (cand.suffix == ".cache" or "calib" in cand.name.lower()):
            continue
        try:
            with open(cand, "rb") as f:
                head = f.read(4)
        except OSError:
            continue
        if head == b"TRT-":
            found.append(cand)
    stem = p.name[: -len(".onnx")] if p.name.lower().endswith(".onnx") else p.name
    for suffix in (".fp32", ".int8.trt"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    exact = [c for c in found if c.name in (f"{stem}.int8.trt.cache", f"{stem}.cache", f"{stem}.calib.cache")]
    return (exact[0] if len(exact) == 1 else None), found


def find_calib_cache(onnx_path: Path | str) -> Path | None:
    """The calibration cache named for this model (see :func:`calib_cache_candidates`), else the only one
    beside it; ``None`` when there is none or the choice is ambiguous (then pass ``--calib-cache``)."""
    exact, found = calib_cache_candidates(onnx_path)
    return exact or (found[0] if len(found) == 1 else None)


# ------------------------------------------------------------------------------------------- the checks
@dataclass(frozen=True)
class PreflightReport:
    """The outcome of :func:`preflight`: resolved precision/profiles/shapes, graph facts, errors, warnings."""

    onnx_path: Path
    precision: str
    profiles: tuple[ProfileSpec, ...]
    opset: int
    input_name: str | None
    input_dims: tuple[int | str | None, ...]
    input_chw: tuple[int, ...] | None
    output_name: str | None
    num_classes: int | None
    qdq: QdqFacts
    calib_cache: Path | None
    tensorrt_version: str | None
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    arch: str | None = None
    preprocess: dict | None = None
    qdq_checker: str = "not run"
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "onnx_path": str(self.onnx_path),
            "precision": self.precision,
            "profiles": [p.to_dict() for p in self.profiles],
            "opset": self.opset,
            "input_name": self.input_name,
            "input_dims": list(self.input_dims),
            "input_chw": None if self.input_chw is None else list(self.input_chw),
            "output_name": self.output_name,
            "num_classes": self.num_classes,
            "arch": self.arch,
            "qdq": self.qdq.to_dict(),
            "qdq_checker": self.qdq_checker,
            "calib_cache": None if self.calib_cache is None else str(self.calib_cache),
            "tensorrt_version": self.tensorrt_version,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
        }


def tensorrt_major(version: str | None) -> int | None:
    if not version:
        return None
    m = re.match(r"(\d+)", version)
    return int(m.group(1)) if m else None


def _version_tuple(version: str | None) -> tuple[int, ...]:
    """``"11.4.1.2"`` -> ``(11, 4, 1, 2)``; stops at the first part that is not a number."""
    parts: list[int] = []
    for part in (version or "").split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        parts.append(int(m.group(0)))
    return tuple(parts)


def _resolve_profiles(
    requested: Sequence[ProfileSpec] | None, batch_dim: int | str | None, errors: list[str]
) -> tuple[ProfileSpec, ...]:
    static = batch_dim if isinstance(batch_dim, int) else None
    if requested is None:
        return (ProfileSpec(static, static, static),) if static else (DEFAULT_DYNAMIC_PROFILE,)
    profiles = tuple(requested)
    if static is not None:
        for p in profiles:
            if not (p.min == p.max == static):
                errors.append(
                    f"the ONNX input has a static batch of {static} but profile {p.text} needs a dynamic one; "
                    f"use --batch {static} or re-export with a dynamic batch (rescompress export does)"
                )
                break
    return profiles


def _resolve_chw(facts: OnnxFacts, errors: list[str]) -> tuple[int, ...] | None:
    dims = facts.input_dims
    rest = dims[1:]
    if all(isinstance(d, int) for d in rest):
        return tuple(int(d) for d in rest)  # type: ignore[arg-type]
    declared = facts.declared_chw
    if declared is None and facts.preprocess and facts.preprocess.get("channels") and facts.preprocess.get("size"):
        pre = facts.preprocess
        declared = (int(pre["channels"]), int(pre["size"][0]), int(pre["size"][1]))
    if declared is not None and len(rest) == 3:
        # Fixed dims must agree with what the metadata says; symbolic ones take its value.
        if all(not isinstance(d, int) or d == v for d, v in zip(rest, declared, strict=True)):
            return declared
    errors.append(
        f"input {facts.input_name!r} has non-batch dimensions {list(rest)} that are not fixed; TensorRT profiles "
        f"need C, H, W: re-export with a fixed image size"
    )
    return None


def _run_qdq_checker(path: Path) -> tuple[str, list[str], list[str]]:
    """TensorRT placement rules on the file: (status, blocking violations, notes on layers that build in
    higher precision or unfused). Nodes the file's metadata records as kept float on purpose are fine."""
    import onnx

    from rescompress.quantization.checker import recorded_float_nodes, trt_qdq_findings

    model = onnx.load(str(path))
    findings = trt_qdq_findings(model, allow_float=recorded_float_nodes(model))
    blocking = [f.message for f in findings if f.blocking]
    notes = [f.message for f in findings if not f.blocking]
    return ("failed" if blocking else "passed"), blocking, notes


def trt_version_number(version: str) -> int | None:
    """``"10.3.0"`` -> 100300, ``"8.6.1"`` -> 8601: the number TensorRT writes in a calibration cache header
    (None for a version string that starts with no number)."""
    from rescompress.quantization.trt_cache import trt_version_number as number

    try:
        return number(version)
    except RescompressError:
        return None


def preflight(config: EngineBuildConfig, tensorrt_version: str | None = None) -> PreflightReport:
    """Every check that can be made without TensorRT; version-specific ones when ``tensorrt_version`` is given.

    Never raises for a problem with the file: problems become ``errors`` (the build refuses) or
    ``warnings`` (it goes on). Raises only when the file cannot be read at all.
    """
    facts = inspect_onnx(config.onnx_path)
    errors: list[str] = []
    warnings: list[str] = []
    major = tensorrt_major(tensorrt_version)
    qdq = facts.qdq

    precision = config.precision
    if precision == "auto":
        precision = "int8" if qdq.total else ("fp16" if facts.has_float16 else "fp32")

    # --- outputs: refused here as the build would refuse them, but before the slow build
    from rescompress.engine.metadata import sidecar_path
    from rescompress.fileio import check_writable, ensure_not_input

    sidecar = sidecar_path(config.engine_path)
    for check in (lambda: ensure_not_input(config.engine_path, [config.onnx_path, config.timing_cache,
                                                                config.calib_cache]),
                  lambda: config.timing_cache is not None and ensure_not_input(
                      config.timing_cache, [config.onnx_path, config.calib_cache, config.engine_path, sidecar]),
                  lambda: check_writable(config.engine_path),
                  lambda: check_writable(sidecar),
                  lambda: config.timing_cache is not None and check_writable(config.timing_cache)):
        try:
            check()
        except RescompressError as exc:
            errors.append(str(exc))
    if config.calib_cache is not None and precision != "int8-implicit":
        warnings.append(f"--calib-cache is only read by --precision int8-implicit; a {precision} build ignores it")

    # --- graph shape: one 4-D image input, one output
    if len(facts.inputs) != 1:
        errors.append(f"expected one graph input (images), found {len(facts.inputs)}: "
                      f"{', '.join(n for n, _ in facts.inputs) or 'none'}")
    elif len(facts.input_dims) != 4:
        errors.append(f"input {facts.input_name!r} has shape {list(facts.input_dims)}; an NCHW image batch is needed")
    if len(facts.outputs) != 1:
        errors.append(f"expected one graph output (logits), found {len(facts.outputs)}")

    profiles: tuple[ProfileSpec, ...] = ()
    chw = None
    if len(facts.inputs) == 1 and len(facts.input_dims) == 4:
        profiles = _resolve_profiles(config.profiles, facts.input_dims[0], errors)
        chw = _resolve_chw(facts, errors)

    # --- opset
    if facts.opset < MIN_OPSET:
        errors.append(f"opset {facts.opset} is older than TensorRT's ONNX parser accepts ({MIN_OPSET}); re-export")

    # --- precision vs the file's content
    calib_cache: Path | None = None
    qdq_status = "not run"
    if precision == "int8":
        if qdq.total == 0:
            errors.append(
                "--precision int8 needs a Q/DQ ONNX file (TensorRT builds INT8 strongly typed from "
                "QuantizeLinear/DequantizeLinear nodes), but this file has none; run "
                "`rescompress quantize --target tensorrt` and build its *.int8.trt.onnx"
            )
        else:
            before = len(errors)
            if facts.opset < MIN_QDQ_OPSET:
                errors.append(
                    f"opset {facts.opset} is too old for TensorRT Q/DQ (per-channel scales need opset "
                    f"{MIN_QDQ_OPSET}); re-export and re-quantize at opset >= {MIN_QDQ_OPSET}"
                )
            _check_qdq_form(qdq, errors, warnings)
            if len(errors) == before:
                # Placement is checked once opset and Q/DQ nodes are right; otherwise both would report
                # the same opset, zero points and scales twice.
                qdq_status, violations, notes = _run_qdq_checker(facts.path)
                errors.extend(f"TensorRT Q/DQ placement: {v}" for v in violations)
                if notes:
                    shown = "; ".join(notes[:3]) + (f"; and {len(notes) - 3} more" if len(notes) > 3 else "")
                    warnings.append(f"{len(notes)} layer(s) are not placed as TensorRT's Q/DQ guidance recommends "
                                    f"(they build, but in higher precision, with per-tensor weight scales or "
                                    f"without the Conv+Add fusion): {shown}")
            else:
                qdq_status = "skipped (fix the Q/DQ nodes first)"
    elif qdq.total:
        errors.append(
            f"the file has {qdq.quantize} QuantizeLinear / {qdq.dequantize} DequantizeLinear nodes, which only "
            f"the int8 precision builds; use --precision int8 (or the FP32 ONNX for {precision})"
        )
    if precision == "int8-implicit":
        calib_cache = _check_implicit(config, facts, tensorrt_version, errors, warnings)
    if precision == "fp16" and major is not None and major >= 11 and not facts.has_float16:
        errors.append(
            "TensorRT 11 removed the FP16 builder flag: convert the ONNX to FP16 first (ModelOpt AutoCast: "
            "python -m modelopt.onnx.autocast --onnx_path IN --output_path OUT) and build that file"
        )

    if major is not None and major < 10:
        errors.append(f"TensorRT {tensorrt_version} is too old: build-engine uses TensorRT 10 or 11 (name-based "
                      "tensor API, strongly typed networks); JetPack 6.1 and later ship TensorRT 10")

    # --- DLA (Jetson)
    if config.dla_core is not None:
        if precision == "fp32":
            errors.append("DLA runs only FP16 and INT8; choose --precision int8 or fp16 with --dla-core")
        if any(not p.is_static for p in profiles):
            warnings.append("DLA needs static shapes: with a dynamic batch profile, layers fall back to the GPU; "
                            "use --batch N for a DLA engine")
        if major is not None and (10, 8) <= _version_tuple(tensorrt_version) < (11, 4, 1):
            warnings.append(f"TensorRT {tensorrt_version} has no DLA support on Jetson (10.7 was the last 10.x "
                            "release with DLA, 11.0-11.3 have none; 11.4.1 brought it back for Jetson AGX Orin "
                            "with JetPack 7.2.2 or later)")

    return PreflightReport(
        onnx_path=facts.path,
        precision=precision,
        profiles=profiles,
        opset=facts.opset,
        input_name=facts.input_name,
        input_dims=facts.input_dims,
        input_chw=chw,
        output_name=facts.outputs[0] if len(facts.outputs) == 1 else None,
        num_classes=facts.num_classes,
        qdq=qdq,
        calib_cache=calib_cache,
        tensorrt_version=tensorrt_version,
        errors=tuple(errors),
        warnings=tuple(warnings),
        arch=facts.arch,
        preprocess=facts.preprocess,
        qdq_checker=qdq_status,
    )


def _check_qdq_form(qdq: QdqFacts, errors: list[str], warnings: list[str]) -> None:
    """TensorRT's explicit quantization: signed int8, zero point 0, constant positive scales."""
    unsigned = [t for t in qdq.zero_point_types if t.startswith("uint")]
    if unsigned:
        errors.append(
            f"Q/DQ zero points are {', '.join(unsigned)}: TensorRT needs symmetric signed int8 (this looks like "
            f"the ONNX Runtime artifact); build the *.int8.trt.onnx file"
        )
    if "int32" in qdq.zero_point_types and not unsigned:  # an ORT artifact has both; the above says it
        errors.append(
            "biases are quantized to int32 (DequantizeLinear with int32 zero points), which TensorRT's ONNX parser "
            "does not import; re-quantize with the biases in float (onnxruntime's quantize_static: "
            "extra_options={'QuantizeBias': False}) or use rescompress quantize's *.int8.trt.onnx"
        )
    if qdq.nonzero_zero_points:
        errors.append(f"{qdq.nonzero_zero_points} Q/DQ nodes have a non-zero zero point; TensorRT needs 0")
    if qdq.nonconstant_params:
        errors.append(f"{qdq.nonconstant_params} Q/DQ nodes take a scale or zero point that is not a constant "
                      f"initializer; TensorRT needs build-time constants")
    if qdq.nonpositive_scales:
        errors.append(f"{qdq.nonpositive_scales} Q/DQ nodes have a scale <= 0")
    if qdq.missing_zero_points:
        warnings.append(f"{qdq.missing_zero_points} Q/DQ nodes have no zero point; ONNX then means uint8, "
                        f"which TensorRT does not run as int8: give an int8 zero point of 0")
    if qdq.quantize == 0:
        warnings.append("no QuantizeLinear nodes: activations stay in floating point (weight-only Q/DQ)")


def _check_implicit(
    config: EngineBuildConfig, facts: OnnxFacts, tensorrt_version: str | None, errors: list[str], warnings: list[str]
) -> Path | None:
    major = tensorrt_major(tensorrt_version)
    if major is not None and major >= 11:
        errors.append(
            "--precision int8-implicit needs TensorRT 10: TensorRT 11 removed implicit INT8 calibration; build "
            "the Q/DQ file (*.int8.trt.onnx) with --precision int8"
        )
    elif major == 10:
        warnings.append("implicit INT8 calibration is deprecated since TensorRT 10.1; prefer the Q/DQ file")
    cache_path = config.calib_cache
    if cache_path is None:
        exact, found = calib_cache_candidates(facts.path)
        cache_path = exact or (found[0] if len(found) == 1 else None)
        if cache_path is None and found:
            errors.append(
                f"--precision int8-implicit: {len(found)} calibration caches beside {facts.path.name} "
                f"({', '.join(c.name for c in found[:4])}) and none named for it; pass --calib-cache FILE"
            )
            return None
        if cache_path is not None and exact is None:
            warnings.append(f"using calibration cache {cache_path.name}, the only one beside {facts.path.name}, "
                            "though not named for it; pass --calib-cache to choose explicitly")
    if cache_path is None:
        errors.append(
            f"--precision int8-implicit needs a TensorRT calibration cache and none was found beside "
            f"{facts.path.name}; pass --calib-cache FILE (written by `rescompress quantize --target tensorrt`)"
        )
        return None
    from rescompress.fileio import ensure_not_input

    try:  # the engine must not replace the cache it is built from (found beside the file, or given)
        ensure_not_input(config.engine_path, [cache_path])
    except RescompressError as exc:
        errors.append(str(exc))
    if not Path(cache_path).exists():
        errors.append(f"calibration cache {cache_path} does not exist")
        return None
    try:
        cache = read_calib_cache(cache_path)
    except EnginePreflightError as exc:
        errors.append(str(exc))
        return None
    installed = trt_version_number(tensorrt_version) if tensorrt_version else None
    if installed is not None and cache.version_tag != str(installed):
        warnings.append(
            f"calibration cache header TRT-{cache.version_tag} names another TensorRT than the installed "
            f"{tensorrt_version} ({installed}), which skips such a cache: the build passes it re-tagged "
            f"TRT-{installed} (same scales); for trtexec --calib, quantize again with --trt-version {tensorrt_version}"
        )
    known = [n for n in cache.scales if n in facts.tensor_names]
    unscaled = sorted(facts.activation_names - set(cache.scales))
    if not known:
        errors.append(
            f"calibration cache {cache_path} names none of this graph's tensors; it was made for another model"
        )
    elif len(known) < len(cache.scales) and unscaled:
        # Foreign names and missing ones together: not this graph's cache (a cache TensorRT wrote for this
        # graph may add internal names, but covers every tensor).
        errors.append(
            f"calibration cache {cache_path} does not match this graph: {len(cache.scales) - len(known)} of its "
            f"{len(cache.scales)} tensors are not in the graph and {len(unscaled)} of the graph's tensors have "
            f"no scale (e.g. {unscaled[0]!r}); it was made for another model"
        )
    elif len(known) < len(cache.scales):
        warnings.append(f"{len(cache.scales) - len(known)} of {len(cache.scales)} calibration cache tensors are "
                        f"not in the graph")
    elif unscaled:
        warnings.append(f"{len(unscaled)} of the graph's tensors have no scale in the cache (e.g. {unscaled[0]!r}); "
                        "TensorRT runs the layers that produce them in higher precision")
    return Path(cache_path)


def require_ready(report: PreflightReport) -> None:
    """Raise :class:`EnginePreflightError` (one line) if the preflight found errors."""
    if report.ok:
        return
    more = len(report.errors) - 1
    suffix = f" (and {more} more; run with --check-only to list all)" if more else ""
    raise EnginePreflightError(f"{report.onnx_path} is not ready for an {report.precision} engine: "
                               f"{report.errors[0]}{suffix}")
