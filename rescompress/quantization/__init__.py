"""INT8 quantization: one :class:`QuantPlan` from calibration, per-target Q/DQ placement and emitters.

``quantize_model`` (pipeline) runs the whole stage; ``place``/``emit_qdq`` turn a FP32 ONNX graph and a
plan into the ONNX Runtime (``*.int8.ort.onnx``) and TensorRT (``*.int8.trt.onnx``) files;
``check_trt_qdq`` verifies TensorRT's placement rules; ``trt_cache`` writes the legacy calibration cache.
"""

from rescompress.quantization.checker import check_trt_qdq
from rescompress.quantization.emit import emit_qdq
from rescompress.quantization.placement import Placement, place, prepare_model
from rescompress.quantization.plan import QuantPlan


def __getattr__(name: str):
    # The pipeline pulls in loading/export/data (torch); import it only when asked for.
    if name in ("quantize_model", "QuantizeConfig", "QuantizeResult"):
        from rescompress.quantization import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = [
    "Placement", "QuantPlan", "QuantizeConfig", "QuantizeResult", "check_trt_qdq", "emit_qdq", "place",
    "prepare_model", "quantize_model",
]
