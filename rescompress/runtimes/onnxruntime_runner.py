"""The ONNX Runtime runtime: one ``InferenceSession`` per model, spinning off, all graph optimizations.

Thread spinning is off by default for both intra- and inter-op pools (``session.intra_op.allow_spinning``
= "0"): when runners are timed interleaved on a few cores, a spinning pool keeps burning the cores after
its own run and slows whichever runner comes next (block spreads of 140% seen here, 7-25% without).
``optimized_model_path`` makes ORT write the graph after its fusions, which is how the INT8 stages check
that QLinearConv & co. were really chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rescompress.errors import RescompressError
from rescompress.runtimes import RunnerInfo, RunnerOptions, classifier_outputs, first_line, is_path_like

SPIN_INTRA = "session.intra_op.allow_spinning"
SPIN_INTER = "session.inter_op.allow_spinning"


def ort_session_options(
    threads: int | None = None, spinning: bool = False, optimized_model_path: Path | str | None = None
):
    """``SessionOptions`` with the thread count (if given), spinning on/off and ``ORT_ENABLE_ALL``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1  # sequential execution: the inter-op pool would only add threads
    so.add_session_config_entry(SPIN_INTRA, "1" if spinning else "0")
    so.add_session_config_entry(SPIN_INTER, "1" if spinning else "0")
    so.log_severity_level = 3  # errors only: ORT's warnings would mix into the CLI's stderr
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return so


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RescompressError(
                "device cuda requested but this onnxruntime has no CUDAExecutionProvider "
                "(install onnxruntime-gpu on a machine with CUDA)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def read_model_info(path: Path):
    """The file's ``OnnxInfo`` (class count, channels, size, preprocessing) via the export module."""
    from rescompress.export import read_onnx_info

    return read_onnx_info(path)


class OrtRunner:
    """Runs an ONNX file in one ``InferenceSession``; input and output names come from the graph."""

    def __init__(self, session, info: RunnerInfo, input_name: str, output_name: str,
                 fixed_batch: int | None = None) -> None:
        self.name = "onnxruntime"
        self.info = info
        self.session = session
        self.input_name = input_name
        self.output_name = output_name
        self.fixed_batch = fixed_batch  # the file only takes batches of this size: others run in chunks

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        n = self.fixed_batch
        if n is None or len(x) == n:
            (out,) = self.session.run([self.output_name], {self.input_name: x})
            return classifier_outputs(out, self.info.source)
        outs = []
        for i in range(0, len(x), n):
            chunk = x[i : i + n]
            if len(chunk) < n:  # zero-pad the last chunk; the padding rows are dropped
                chunk = np.concatenate([chunk, np.zeros((n - len(chunk), *x.shape[1:]), np.float32)])
            outs.append(self.session.run([self.output_name], {self.input_name: chunk})[0][: len(x) - i])
        return classifier_outputs(np.concatenate(outs), self.info.source)


def create(model: Any, options: RunnerOptions) -> OrtRunner:
    """Factory for the ``onnxruntime`` entry of the runtime table."""
    import onnxruntime as ort

    if not is_path_like(model):
        raise RescompressError("the onnxruntime runtime runs an .onnx file; export the model first")
    path = Path(model)
    meta = read_model_info(path)
    so = ort_session_options(options.threads, options.spinning, options.optimized_model_path)
    providers = providers_for(options.device)
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as exc:  # ORT's own message names the unsupported node or the bad graph
        raise RescompressError(f"onnxruntime cannot load {path}: {first_line(exc)}") from exc
    fixed, chunked = None, None
    if isinstance(session.get_inputs()[0].shape[0], int):
        # Exported with a fixed batch: run a dynamic-batch copy (checked equal), or, when the graph depends
        # on its batch size, the file itself in chunks of that size.
        import onnx

        from rescompress.export import dynamic_batch_copy

        try:
            dynamic, fixed = dynamic_batch_copy(onnx.load(str(path)), str(path))
        except RescompressError:
            fixed = chunked = int(session.get_inputs()[0].shape[0])
        else:
            if fixed is not None:
                session = ort.InferenceSession(dynamic.SerializeToString(), sess_options=so, providers=providers)
    info = RunnerInfo.from_onnx(
        "onnxruntime",
        path,
        meta,
        options.threads,
        {
            "providers": session.get_providers(),
            "intra_op_spinning": options.spinning,
            "inter_op_spinning": options.spinning,
            "graph_optimization": "all",
            "optimized_model_path": str(options.optimized_model_path) if options.optimized_model_path else None,
            "fixed_batch_in_file": fixed,
            "fixed_batch_handling": None if fixed is None else (
                "sequential calls of the fixed batch (its graph depends on it)" if chunked
                else "dynamic-batch copy, checked equal at load"),
        },
    )
    return OrtRunner(session, info, meta.input_name, meta.output_name, fixed_batch=chunked)
