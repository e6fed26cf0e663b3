"""The sidecar written beside every engine (``<name>.engine.json``) and the checks made before loading one.

A serialized TensorRT engine only runs with the TensorRT version that built it, on a GPU of the same
compute capability (engines are tuned for the exact GPU model; hardware compatibility mode is off here).
TensorRT itself fails on a mismatch with an opaque deserialization error, so the sidecar records what
the engine needs — TensorRT version, GPU name and compute capability, profiles, precision, input and
output names, the source ONNX's SHA-256, the engine's own SHA-256 — and :func:`check_compatibility`
compares it with the machine in plain words. Everything here is pure and runs without TensorRT.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rescompress.engine.profiles import ProfileSpec
from rescompress.errors import RescompressError
from rescompress.fileio import write_text_atomic

SIDECAR_FORMAT = "rescompress.engine"
SIDECAR_VERSION = 1


class EngineMetadataError(RescompressError):
    """The sidecar is missing, unreadable, or does not describe the engine beside it."""


class EngineMismatchError(RescompressError):
    """The engine was built for another TensorRT version or GPU and cannot run here."""


@dataclass(frozen=True)
class BuildEnvironment:
    """Where an engine is built or loaded: TensorRT version and the GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name} ({self.sm})"

    def to_dict(self) -> dict:
        return {
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": list(self.compute_capability),
        }

    @classmethod
    def from_dict(cls, d: dict) -> BuildEnvironment:
        cc = d["compute_capability"]
        return cls(str(d["tensorrt_version"]), str(d["gpu_name"]), (int(cc[0]), int(cc[1])))


@dataclass(frozen=True)
class EngineMetadata:
    """What an engine needs to run and where it came from (the sidecar's content)."""

    environment: BuildEnvironment
    precision: str
    profiles: tuple[ProfileSpec, ...]
    input_name: str
    input_chw: tuple[int, ...]
    output_name: str
    onnx_path: str
    onnx_sha256: str
    engine_sha256: str
    tool_version: str
    built_at: str
    build_seconds: float
    num_classes: int | None = None
    arch: str | None = None
    preprocess: dict | None = None
    workspace_mib: int | None = None
    optimization_level: int | None = None
    dla_core: int | None = None
    hardware_compatibility: str = "none"
    timing_cache: str | None = None
    calib_cache: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format": SIDECAR_FORMAT,
            "format_version": SIDECAR_VERSION,
            **self.environment.to_dict(),
            "precision": self.precision,
            "profiles": [p.to_dict() for p in self.profiles],
            "input_name": self.input_name,
            "input_chw": list(self.input_chw),
            "output_name": self.output_name,
            "num_classes": self.num_classes,
            "arch": self.arch,
            "preprocess": self.preprocess,
            "onnx_path": self.onnx_path,
            "onnx_sha256": self.onnx_sha256,
            "engine_sha256": self.engine_sha256,
            "tool_version": self.tool_version,
            "built_at": self.built_at,
            "build_seconds": self.build_seconds,
            "workspace_mib": self.workspace_mib,
            "optimization_level": self.optimization_level,
            "dla_core": self.dla_core,
            "hardware_compatibility": self.hardware_compatibility,
            "timing_cache": self.timing_cache,
            "calib_cache": self.calib_cache,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict) -> EngineMetadata:
        if d.get("format") != SIDECAR_FORMAT:
            raise EngineMetadataError(f"not a rescompress engine sidecar (format {d.get('format')!r})")
        if int(d.get("format_version", 0)) > SIDECAR_VERSION:
            raise EngineMetadataError(
                f"engine sidecar format {d.get('format_version')} is newer than this tool understands "
                f"({SIDECAR_VERSION}); upgrade rescompress"
            )
        try:
            return cls(
                environment=BuildEnvironment.from_dict(d),
                precision=str(d["precision"]),
                profiles=tuple(ProfileSpec.from_dict(p) for p in d["profiles"]),
                input_name=str(d["input_name"]),
                input_chw=tuple(int(v) for v in d["input_chw"]),
                output_name=str(d["output_name"]),
                onnx_path=str(d["onnx_path"]),
                onnx_sha256=str(d["onnx_sha256"]),
                engine_sha256=str(d["engine_sha256"]),
                tool_version=str(d["tool_version"]),
                built_at=str(d["built_at"]),
                build_seconds=float(d["build_seconds"]),
                num_classes=None if d.get("num_classes") is None else int(d["num_classes"]),
                arch=d.get("arch"),
                preprocess=d.get("preprocess"),
                workspace_mib=d.get("workspace_mib"),
                optimization_level=d.get("optimization_level"),
                dla_core=d.get("dla_core"),
                hardware_compatibility=str(d.get("hardware_compatibility", "none")),
                timing_cache=d.get("timing_cache"),
                calib_cache=d.get("calib_cache"),
                extra=dict(d.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise EngineMetadataError(
                f"engine sidecar is incomplete or malformed ({exc!r}); rebuild the engine"
            ) from None


def sidecar_path(engine_path: Path | str) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def write_sidecar(path: Path | str, meta: EngineMetadata) -> Path:
    """Write ``meta`` as JSON to ``path`` (atomically)."""
    return write_text_atomic(path, json.dumps(meta.to_dict(), indent=2) + "\n")


def read_sidecar(engine_path: Path | str) -> EngineMetadata:
    """The metadata recorded beside ``engine_path``; a clear error if it is missing or unreadable."""
    side = sidecar_path(engine_path)
    if not side.exists():
        raise EngineMetadataError(
            f"{side} is missing: without it the engine's TensorRT version and GPU cannot be checked; "
            f"rebuild with `rescompress build-engine`"
        )
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineMetadataError(f"cannot read engine sidecar {side}: {exc}") from None
    if not isinstance(data, dict):
        raise EngineMetadataError(f"engine sidecar {side} is not a JSON object")
    return EngineMetadata.from_dict(data)


@dataclass(frozen=True)
class Compatibility:
    """The result of comparing an engine's build environment with the machine that wants to run it."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"ok": self.ok, "errors": list(self.errors), "warnings": list(self.warnings)}


def check_compatibility(meta: EngineMetadata, here: BuildEnvironment) -> Compatibility:
    """Can an engine described by ``meta`` run in environment ``here``?

    A different TensorRT version or compute capability is an error (TensorRT refuses such engines unless
    they were built version- or hardware-compatible, which these are not). A different GPU model with the
    same compute capability loads, but the tactics were timed on another chip: a warning.
    """
    errors: list[str] = []
    warnings: list[str] = []
    built = meta.environment
    if built.tensorrt_version != here.tensorrt_version:
        errors.append(f"built with TensorRT {built.tensorrt_version}, this machine has {here.tensorrt_version}")
    if meta.hardware_compatibility == "none" and built.compute_capability != here.compute_capability:
        errors.append(f"built for {built.gpu_name} ({built.sm}), this GPU is {here.gpu_name} ({here.sm})")
    elif built.gpu_name != here.gpu_name:
        warnings.append(
            f"built on {built.gpu_name}, running on {here.gpu_name}: it loads, but its kernels were timed on "
            f"the other GPU; rebuild here for best speed"
        )
    return Compatibility(tuple(errors), tuple(warnings))


def mismatch_message(engine_path: Path | str, meta: EngineMetadata, compat: Compatibility) -> str:
    """One line that says why the engine cannot run here and what to do."""
    source = meta.onnx_path or "the source ONNX"
    return (
        f"engine {engine_path} cannot run here: {'; '.join(compat.errors)}. Engines are not portable across "
        f"TensorRT versions or GPUs; rebuild it on this machine: rescompress build-engine {source}"
    )


def profiles_text(profiles: Sequence[ProfileSpec]) -> str:
    return ",".join(p.text for p in profiles)
