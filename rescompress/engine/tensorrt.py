"""Build and load TensorRT engines from ONNX files (TensorRT 10.x and 11.x Python API, guarded import).

``build_engine(config)`` runs the TensorRT-free preflight, then: ONNX parser into a network (strongly
typed for ``int8``/``fp32`` and FP16 files on TensorRT 11; weakly typed only for TensorRT 10's ``fp16``
flag and ``int8-implicit`` calibration-cache path), one optimization profile per ``--batch`` range,
workspace limit, builder optimization level, optional DLA core and timing cache, then
``build_serialized_network``. The engine is written atomically as ``<stem>.engine`` together with a
sidecar ``<stem>.engine.json`` (see :mod:`rescompress.engine.metadata`), because an engine only runs
with the TensorRT version and GPU that built it; :func:`load_engine` checks that sidecar before
deserializing. Nothing here could be executed on the machines this was written on (no GPU, no
TensorRT): the code follows NVIDIA's documented API, and its tests are marked ``needs_tensorrt``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rescompress import __version__
from rescompress.engine.metadata import (
    BuildEnvironment,
    Compatibility,
    EngineMetadata,
    EngineMismatchError,
    check_compatibility,
    mismatch_message,
    read_sidecar,
    sidecar_path,
)
from rescompress.engine.preflight import (
    EngineBuildConfig,
    PreflightReport,
    preflight,
    read_calib_cache,
    require_ready,
    tensorrt_major,
)
from rescompress.errors import RescompressError
from rescompress.fileio import atomic_path, file_sha256

log = logging.getLogger("rescompress.engine")

INSTALL_HINT = (
    "TensorRT is not installed: on a machine with an NVIDIA GPU run `pip install rescompress[tensorrt]` "
    "(on a Jetson, TensorRT comes with JetPack); `rescompress build-engine --check-only` checks the file "
    "without it"
)


class TensorRTNotAvailable(RescompressError):
    """The tensorrt package, its libraries, or a CUDA GPU is missing."""


class EngineBuildError(RescompressError):
    """TensorRT rejected the network or the build failed."""


# ------------------------------------------------------------------------------------------- environment
def tensorrt_available() -> bool:
    """True if the tensorrt package can be found (its import may still fail on a machine without CUDA)."""
    return importlib.util.find_spec("tensorrt") is not None


def import_tensorrt() -> Any:
    """The tensorrt module, or :class:`TensorRTNotAvailable` with the one-line install hint."""
    if not tensorrt_available():
        raise TensorRTNotAvailable(INSTALL_HINT)
    try:
        return importlib.import_module("tensorrt")
    except Exception as exc:  # the wheel is there but libnvinfer / CUDA libraries (or the driver) are not
        raise TensorRTNotAvailable(f"TensorRT is installed but does not load ({exc}); check the CUDA driver "
                                   f"and that the TensorRT libraries match it") from None


def installed_tensorrt_version() -> str | None:
    """The installed TensorRT version, or None (never raises)."""
    try:
        return str(import_tensorrt().__version__)
    except TensorRTNotAvailable:
        return None


def current_environment(trt: Any, device: int = 0) -> BuildEnvironment:
    """TensorRT version and the GPU (through torch.cuda, which the project depends on anyway)."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTNotAvailable("no CUDA GPU is visible (torch.cuda.is_available() is False); TensorRT "
                                   "needs an NVIDIA GPU and a CUDA build of torch")
    major, minor = torch.cuda.get_device_capability(device)
    return BuildEnvironment(str(trt.__version__), torch.cuda.get_device_name(device), (int(major), int(minor)))


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to Python logging (stderr) and keeps the last error for messages."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.INFO:  # shown with rescompress -v
                log.info("TensorRT: %s", msg)
            else:  # VERBOSE
                log.debug("TensorRT: %s", msg)

    return _Logger()


# ------------------------------------------------------------------------------------------- build
@dataclass(frozen=True)
class EngineResult:
    """What :func:`build_engine` wrote and how."""

    engine_path: Path
    sidecar_path: Path
    metadata: EngineMetadata
    preflight: PreflightReport
    engine_bytes: int
    timing_cache_written: Path | None

    def to_dict(self) -> dict:
        return {
            "engine": str(self.engine_path),
            "sidecar": str(self.sidecar_path),
            "engine_bytes": self.engine_bytes,
            "timing_cache": None if self.timing_cache_written is None else str(self.timing_cache_written),
            "metadata": self.metadata.to_dict(),
            "preflight_warnings": list(self.preflight.warnings),
        }


def _strongly_typed(precision: str, major: int) -> bool:
    # The weakly typed builder flags (FP16, INT8 + calibrator) exist only up to TensorRT 10.
    if major >= 11:
        return True
    return precision in ("int8", "fp32")


def _network_flags(trt: Any, strongly_typed: bool) -> int:
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if strongly_typed and hasattr(creation, "STRONGLY_TYPED"):
        # Required on 10.x; accepted and ignored on 11.x, where every network is strongly typed.
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return flags


def _cache_calibrator(trt: Any, cache_bytes: bytes, algorithm: str, batch: int) -> Any:
    """A TensorRT 10 calibrator that only replays a cache: it has no data, so every scale must be cached."""
    bases = {
        "EntropyCalibration2": "IInt8EntropyCalibrator2",
        "EntropyCalibration": "IInt8EntropyCalibrator",
        "MinMaxCalibration": "IInt8MinMaxCalibrator",
    }
    base = getattr(trt, bases.get(algorithm, "IInt8EntropyCalibrator2"))

    class _CacheCalibrator(base):
        def __init__(self) -> None:
            base.__init__(self)

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names):  # no data: TensorRT must take every scale from the cache
            return None

        def read_calibration_cache(self) -> bytes:
            return cache_bytes

        def write_calibration_cache(self, cache) -> None:
            return None

    return _CacheCalibrator()


def _configure(
    trt: Any, builder: Any, network: Any, config: EngineBuildConfig, report: PreflightReport
) -> tuple[Any, list[Any]]:
    """The builder config, and the Python objects (calibrator, profiles) that must outlive the build."""
    major = tensorrt_major(str(trt.__version__)) or 10
    bconf = builder.create_builder_config()
    if config.workspace_mib is not None:
        bconf.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_mib) << 20)
    bconf.builder_optimization_level = int(config.optimization_level)
    if hasattr(trt, "HardwareCompatibilityLevel"):
        # Off on purpose: the sidecar promises "this GPU's compute capability only".
        bconf.hardware_compatibility_level = trt.HardwareCompatibilityLevel.NONE

    input_name = network.get_input(0).name
    keep_alive: list[Any] = []
    for spec in report.profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, *spec.shapes(report.input_chw or ()))
        if bconf.add_optimization_profile(profile) < 0:
            raise EngineBuildError(f"TensorRT rejected batch profile {spec.text} for input {input_name!r}")
        keep_alive.append(profile)

    if report.precision == "fp16" and major < 11:
        bconf.set_flag(trt.BuilderFlag.FP16)
    if report.precision == "int8-implicit" and report.calib_cache is not None:
        cache = read_calib_cache(report.calib_cache)
        bconf.set_flag(trt.BuilderFlag.INT8)
        calibrator = _cache_calibrator(trt, cache.retagged(str(trt.__version__)), cache.algorithm,
                                       report.profiles[0].opt)
        bconf.int8_calibrator = calibrator
        # Dynamic shapes need a calibration profile even when the cache makes calibration a no-op.
        bconf.set_calibration_profile(keep_alive[0])
        keep_alive.append(calibrator)
    if config.dla_core is not None:
        bconf.default_device_type = trt.DeviceType.DLA
        bconf.DLA_core = int(config.dla_core)
        bconf.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    return bconf, keep_alive


def _load_timing_cache(bconf: Any, path: Path | None) -> Any:
    if path is None:
        return None
    data = path.read_bytes() if path.exists() else b""
    cache = bconf.create_timing_cache(data)
    # ignore_mismatch=False: a cache from another GPU or TensorRT version is ignored rather than trusted.
    # (A blob TensorRT cannot read at all may come back as no cache object: start a fresh one then too.)
    if cache is None or not bconf.set_timing_cache(cache, False):
        log.warning("timing cache %s does not match this GPU/TensorRT; starting a fresh one", path)
        cache = bconf.create_timing_cache(b"")
        bconf.set_timing_cache(cache, False)
    return cache


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so weights stored as external data next to the ONNX are found.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].strip().splitlines()[0] if errors else "unknown parser error"
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}: {first}")
    return parser


def build_engine(config: EngineBuildConfig) -> EngineResult:
    """Preflight, build with TensorRT, write ``<stem>.engine`` and its sidecar atomically."""
    engine_path = config.engine_path
    trt = import_tensorrt()
    env = current_environment(trt)
    report = preflight(config, tensorrt_version=env.tensorrt_version)
    require_ready(report)
    for w in report.warnings:
        log.warning("%s", w)

    major = tensorrt_major(env.tensorrt_version) or 10
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, _strongly_typed(report.precision, major)))
    parser = _parse(trt, network, logger, config.onnx_path)
    bconf, keep_alive = _configure(trt, builder, network, config, report)
    _load_timing_cache(bconf, config.timing_cache)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, bconf)
    seconds = time.perf_counter() - started
    if serialized is None:
        reason = logger.errors[-1] if logger.errors else "see the TensorRT log (rescompress -v)"
        raise EngineBuildError(f"TensorRT could not build an engine from {config.onnx_path}: {reason}")
    del parser, keep_alive  # the parser holds the ONNX weights the network referenced; they are in the plan now

    timing_written = None
    if config.timing_cache is not None:
        with atomic_path(config.timing_cache) as tmp:
            tmp.write_bytes(memoryview(bconf.get_timing_cache().serialize()))
        timing_written = config.timing_cache

    side = sidecar_path(engine_path)
    with atomic_path(engine_path) as tmp_engine:
        tmp_engine.write_bytes(memoryview(serialized))
        meta = EngineMetadata(
            environment=env,
            precision=report.precision,
            profiles=report.profiles,
            input_name=network.get_input(0).name,
            input_chw=tuple(report.input_chw or ()),
            output_name=network.get_output(0).name,
            onnx_path=str(config.onnx_path),
            onnx_sha256=file_sha256(config.onnx_path),
            engine_sha256=file_sha256(tmp_engine),
            tool_version=__version__,
            built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            build_seconds=round(seconds, 3),
            num_classes=report.num_classes,
            arch=report.arch,
            preprocess=report.preprocess,
            workspace_mib=config.workspace_mib,
            optimization_level=config.optimization_level,
            dla_core=config.dla_core,
            timing_cache=None if config.timing_cache is None else str(config.timing_cache),
            calib_cache=None if report.calib_cache is None else str(report.calib_cache),
        )
        # Sidecar first (inner context renames first): an engine never appears without its description.
        with atomic_path(side) as tmp_side:
            tmp_side.write_text(json.dumps(meta.to_dict(), indent=2) + "\n", encoding="utf-8")
        size = tmp_engine.stat().st_size
    return EngineResult(engine_path, side, meta, report, size, timing_written)


# ------------------------------------------------------------------------------------------- load
@dataclass
class LoadedEngine:
    """A deserialized engine with the runtime that owns it and its sidecar metadata."""

    engine: Any
    runtime: Any
    metadata: EngineMetadata | None
    compatibility: Compatibility | None
    path: Path

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "metadata": None if self.metadata is None else self.metadata.to_dict(),
            "compatibility": None if self.compatibility is None else self.compatibility.to_dict(),
        }


def verify_engine_file(engine_path: Path | str, meta: EngineMetadata) -> None:
    """Refuse a sidecar that describes another engine (the file was rebuilt or replaced without it)."""
    actual = file_sha256(engine_path)
    if actual != meta.engine_sha256:
        raise EngineMismatchError(
            f"{sidecar_path(engine_path)} describes another engine (SHA-256 differs from {engine_path}); "
            f"rebuild with `rescompress build-engine {meta.onnx_path}`"
        )


def load_engine(path: Path | str, *, check_sidecar: bool = True, device: int = 0) -> LoadedEngine:
    """Deserialize an engine after checking its sidecar against this machine's TensorRT and GPU.

    ``check_sidecar=False`` loads an engine without a sidecar (e.g. built by trtexec); TensorRT then
    decides on its own and its error is passed on.
    """
    p = Path(path)
    if not p.exists():
        raise RescompressError(f"engine file {p} does not exist")
    meta = compat = None
    if check_sidecar:
        meta = read_sidecar(p)
        verify_engine_file(p, meta)
    trt = import_tensorrt()
    env = current_environment(trt, device)
    if meta is not None:
        compat = check_compatibility(meta, env)
        if not compat.ok:
            raise EngineMismatchError(mismatch_message(p, meta, compat))
        for w in compat.warnings:
            log.warning("%s", w)
    logger = _make_logger(trt)
    runtime = trt.Runtime(logger)
    if meta is not None and meta.dla_core is not None:
        # A DLA engine runs on the core the runtime names; it must be set before deserializing.
        runtime.DLA_core = int(meta.dla_core)
    engine = runtime.deserialize_cuda_engine(p.read_bytes())
    if engine is None:
        reason = logger.errors[-1] if logger.errors else "not a TensorRT engine, or built elsewhere"
        raise EngineMismatchError(f"TensorRT could not load {p}: {reason}")
    return LoadedEngine(engine=engine, runtime=runtime, metadata=meta, compatibility=compat, path=p)
