"""TensorRT engine building: profiles, TensorRT-free preflight, sidecar metadata, and the (guarded) build.

Importing this package never imports TensorRT; only :func:`build_engine` and :func:`load_engine` do, and
they raise :class:`TensorRTNotAvailable` with an install hint where it is missing. The preflight
(:func:`preflight`) and sidecar checks (:func:`check_compatibility`) are pure and run anywhere.
"""

from rescompress.engine.metadata import (
    BuildEnvironment,
    Compatibility,
    EngineMetadata,
    EngineMetadataError,
    EngineMismatchError,
    check_compatibility,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from rescompress.engine.preflight import (
    PRECISIONS,
    EngineBuildConfig,
    EnginePreflightError,
    PreflightReport,
    find_calib_cache,
    inspect_onnx,
    preflight,
    read_calib_cache,
    require_ready,
)
from rescompress.engine.profiles import (
    ProfileError,
    ProfileSpec,
    choose_profile,
    parse_profile,
    parse_profiles,
    plan_batches,
)
from rescompress.engine.tensorrt import (
    INSTALL_HINT,
    EngineBuildError,
    EngineResult,
    LoadedEngine,
    TensorRTNotAvailable,
    build_engine,
    import_tensorrt,
    installed_tensorrt_version,
    load_engine,
    tensorrt_available,
)

__all__ = [
    "INSTALL_HINT", "PRECISIONS", "BuildEnvironment", "Compatibility", "EngineBuildConfig", "EngineBuildError",
    "EngineMetadata", "EngineMetadataError", "EngineMismatchError", "EnginePreflightError", "EngineResult",
    "LoadedEngine", "PreflightReport", "ProfileError", "ProfileSpec", "TensorRTNotAvailable", "build_engine",
    "check_compatibility", "choose_profile", "find_calib_cache", "import_tensorrt", "inspect_onnx",
    "installed_tensorrt_version", "load_engine", "parse_profile", "parse_profiles", "plan_batches", "preflight",
    "read_calib_cache", "read_sidecar", "require_ready", "sidecar_path", "tensorrt_available", "write_sidecar",
]
