"""What the machine can do: library versions, CPU features that decide INT8 speed, accelerators."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
from pathlib import Path

LIBRARIES = ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "tensorrt", "torch_pruning", "numpy")


def library_status(name: str) -> tuple[str | None, str | None]:
    """(version, None) when ``name`` imports; (None, why) when it is installed but fails to import (a
    TensorRT wheel without its CUDA libraries); (None, None) when it is not installed."""
    try:
        mod = importlib.import_module(name)
    except Exception as exc:
        try:
            installed = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            installed = False
        why = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        return None, (why if installed else None)
    return str(getattr(mod, "__version__", "unknown")), None


def library_version(name: str) -> str | None:
    return library_status(name)[0]


def library_versions() -> dict[str, str | None]:
    """Importable versions (``None`` where a library is not installed or does not import)."""
    return {name: library_version(name) for name in LIBRARIES}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> dict[str, object]:
    """The CPU features that decide INT8 and FP32 kernel speed on x86 (and the model name)."""
    flags = cpu_flags()
    return {
        "model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


def int8_cpu_paths(features: dict[str, object]) -> list[str]:
    """The x86 INT8 instruction paths present, fastest first (what decides INT8 speed on CPU)."""
    paths = []
    if features.get("amx_int8"):
        paths.append("AMX-INT8")
    if features.get("avx512_vnni"):
        paths.append("AVX-512 VNNI")
    if features.get("avx_vnni"):
        paths.append("AVX-VNNI")
    if features.get("avx512f"):
        paths.append("AVX-512")
    if features.get("avx2"):
        paths.append("AVX2")
    return paths


def torch_runtime() -> dict[str, object]:
    """torch's thread counts and CUDA device (``None`` fields where torch or CUDA is absent)."""
    try:
        import torch
    except Exception:
        return {"threads": None, "interop_threads": None, "cuda_available": False, "cuda_device": None,
                "cuda_version": None}
    cuda = bool(torch.cuda.is_available())
    return {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_version": torch.version.cuda,
    }


def onnxruntime_providers() -> list[str] | None:
    """ONNX Runtime's available execution providers (``None`` if onnxruntime is not installed)."""
    try:
        import onnxruntime
    except Exception:
        return None
    return list(onnxruntime.get_available_providers())


def openvino_devices() -> list[str] | None:
    """OpenVINO's devices (``None`` if openvino is not installed)."""
    try:
        import openvino
    except Exception:
        return None
    try:
        return list(openvino.Core().available_devices)
    except Exception:
        return []


def machine_report() -> dict[str, object]:
    """Everything ``rescompress doctor`` shows: versions, CPU, INT8 paths, threads, accelerators."""
    features = cpu_features()
    statuses = {name: library_status(name) for name in LIBRARIES}  # one import attempt per library
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {name: version for name, (version, _) in statuses.items()},
        "library_import_errors": {name: why for name, (_, why) in statuses.items() if why is not None},
        "cpu": features,
        "int8_cpu_paths": int8_cpu_paths(features),
        "torch": torch_runtime(),
        "onnxruntime_providers": onnxruntime_providers(),
        "openvino_devices": openvino_devices(),
    }
