"""The OpenVINO runtime (optional extra ``openvino``): reads the ONNX file directly and compiles it for CPU.

OpenVINO runs the FP32 export and both Q/DQ INT8 forms at full speed on x86 (measured here: resnet50
FP32 2.0x faster than ONNX Runtime, and the u8/s8 and s8/s8 Q/DQ files both at INT8 speed), so it is
worth offering beside ONNX Runtime. ``threads`` maps to ``INFERENCE_NUM_THREADS``; the latency hint keeps
one inference on all the allowed cores, which matches how the other runners are timed. Float layers are
pinned to f32 (``INFERENCE_PRECISION_HINT``): the CPU plugin would otherwise pick bf16 on CPUs with bf16
units and change the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rescompress.errors import RescompressError
from rescompress.runtimes import RunnerInfo, RunnerOptions, classifier_outputs, first_line, is_path_like


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise RescompressError(
            "the openvino runtime needs the OpenVINO package: install the openvino extra "
            "(pip install 'rescompress[openvino]' or pip install openvino)"
        ) from None
    return openvino


class OpenVinoRunner:
    """Runs a compiled OpenVINO model through one infer request (reused between calls)."""

    def __init__(self, compiled, info: RunnerInfo) -> None:
        self.name = "openvino"
        self.info = info
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.output = compiled.output(0)

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        result = self.request.infer({0: x})
        # The result views the request's own buffer, which the next infer() overwrites: copy it out.
        return classifier_outputs(np.array(result[self.output], dtype=np.float32, copy=True), self.info.source)


def create(model: Any, options: RunnerOptions) -> OpenVinoRunner:
    """Factory for the ``openvino`` entry of the runtime table."""
    if not is_path_like(model):
        raise RescompressError("the openvino runtime runs an .onnx file; export the model first")
    path = Path(model)
    if path.suffix.lower() != ".onnx":
        raise RescompressError(f"{path}: the openvino runtime reads .onnx files; export the model first")
    if options.device != "cpu":
        raise RescompressError("the openvino runtime here compiles for CPU only; use --runtime onnxruntime for CUDA")
    ov = _import_openvino()
    from rescompress.runtimes.onnxruntime_runner import read_model_info

    meta = read_model_info(path)
    # OpenVINO's CPU plugin runs float layers in bf16 where the CPU has bf16 units (AMX, AVX-512 BF16),
    # which moves FP32 logits by ~0.1 here; pin f32 so accuracy and agreement measure the model, not bf16.
    # Quantized (Q/DQ) layers still run in int8.
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if options.threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(options.threads)
    try:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    except Exception as exc:
        raise RescompressError(f"openvino cannot compile {path}: {first_line(exc)}") from exc
    info = RunnerInfo.from_onnx(
        "openvino", path, meta, options.threads,
        {"device": "CPU", **{k: str(v) for k, v in config.items()}, "version": ov.__version__},
    )
    return OpenVinoRunner(compiled, info)
