"""What the machine can do: library versions, CPU features that decide INT8 speed, accelerators."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path

LIBRARIES = ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "tensorrt", "torch_pruning", "numpy")


def library_version(name: str) -> str | None:
    try:
        mod = importlib.import_module(name)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def library_versions() -> dict[str, str | None]:
    """Installed versions (``None`` where a library is not installed)."""
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
