"""TensorRT calibration cache (legacy implicit-INT8 path of TensorRT 10) written from a QuantPlan.

Text format as TensorRT's calibrators write it: a header line ``TRT-<version>-EntropyCalibration2``,
then one ``tensor_name: <hex>`` line per tensor, where ``<hex>`` is the big-endian IEEE-754 float32 of
the scale ``amax / 127``. ``<version>`` is TensorRT's integer version (``NV_TENSORRT_VERSION``,
major*10000 + minor*100 + patch for TensorRT 10); TensorRT skips a cache whose header names another
version, so ``build-engine`` re-tags the cache for the TensorRT it runs (the scales do not depend on it).
Tensor names are the FP32 ONNX graph's tensor names, which the ONNX parser keeps. Not exercised against
a real TensorRT here (none can run on these machines); the format is checked by a round-trip parse.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

from rescompress.errors import RescompressError
from rescompress.fileio import write_text_atomic

ALGORITHM = "EntropyCalibration2"
DEFAULT_TRT_VERSION = "10.0.0"


def version_parts(version: str) -> tuple[int, int, int] | None:
    """``"10.3.0.26"`` -> (10, 3, 0); a pre-release ``"10.0.0b6"`` -> (10, 0, 0); None if it starts with no
    number."""
    m = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if m is None:
        return None
    major, minor, patch = (int(g) if g else 0 for g in m.groups())
    return major, minor, patch


def default_trt_version() -> str:
    """The installed TensorRT's version (a cache made here is then read by it), else ``DEFAULT_TRT_VERSION``."""
    from rescompress.engine.tensorrt import installed_tensorrt_version

    parts = version_parts(installed_tensorrt_version() or "")
    return ".".join(map(str, parts)) if parts else DEFAULT_TRT_VERSION


def trt_version_number(version: str) -> int:
    """``"10.3.0"`` -> 100300 (``"8.6.1"`` -> 8601, TensorRT 8's numbering), as cache headers write it."""
    parts = version_parts(version)
    if parts is None:
        raise RescompressError(f"TensorRT version must look like 10.3.0, got {version!r}")
    major, minor, patch = parts
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def scale_hex(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def cache_text(scales: dict[str, float], trt_version: str = DEFAULT_TRT_VERSION, algorithm: str = ALGORITHM,
               version_tag: str | None = None) -> str:
    """The cache file's text; ``version_tag`` (the header's number as found in a file) overrides
    ``trt_version``."""
    lines = [f"TRT-{version_tag or trt_version_number(trt_version)}-{algorithm}"]
    for name, s in scales.items():
        if not (math.isfinite(s) and s > 0):
            raise RescompressError(f"tensor {name!r} has an invalid scale {s}; recalibrate")
        lines.append(f"{name}: {scale_hex(s)}")
    return "\n".join(lines) + "\n"


def write_cache(path: Path | str, scales: dict[str, float], trt_version: str = DEFAULT_TRT_VERSION) -> Path:
    return write_text_atomic(path, cache_text(scales, trt_version))


def parse_cache(text: str) -> tuple[str, dict[str, float]]:
    """Header line and ``tensor -> scale`` from a cache's text."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("TRT-"):
        raise RescompressError("not a TensorRT calibration cache (no TRT-<version>-<algorithm> header)")
    scales = {}
    for ln in lines[1:]:
        name, sep, hexval = ln.rpartition(": ")
        if not sep:
            raise RescompressError(f"bad calibration cache line: {ln!r}")
        scales[name] = struct.unpack(">f", bytes.fromhex(hexval.strip()))[0]
    return lines[0], scales
