"""The TensorRT runtime behind the common ``Runner`` protocol: float32 NCHW batch in, float32 logits out.

It uses TensorRT 10/11's named-tensor API (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``) with torch CUDA tensors as device buffers and a torch CUDA stream, so no pycuda
or cuda-python is needed. A batch is split across the engine's optimization profiles
(:func:`rescompress.engine.profiles.plan_batches`): each chunk runs under the profile whose ``opt`` is
closest, and a batch larger than every profile's ``max`` runs in several chunks. Timings through
``run`` include the host-to-device and device-to-host copies, as for every other runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rescompress.engine.profiles import ProfileSpec, plan_batches
from rescompress.errors import RescompressError


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dtype not in table:
        raise RescompressError(
            f"engine I/O type {dtype} is not supported by the runner (float32, float16, bfloat16 or int32 only)"
        )
    return table[dtype]


class TensorRTRunner:
    """Run a serialized engine (path or :class:`~rescompress.engine.tensorrt.LoadedEngine`) on one GPU."""

    name = "tensorrt"

    def __init__(self, engine: Path | str | Any, device: int = 0, check_sidecar: bool = True) -> None:
        import torch

        from rescompress.engine.tensorrt import LoadedEngine, import_tensorrt, load_engine

        self._trt = import_tensorrt()
        loaded = engine if isinstance(engine, LoadedEngine) else load_engine(
            engine, check_sidecar=check_sidecar, device=device
        )
        self.loaded = loaded
        self._torch = torch
        self._device = torch.device("cuda", device)
        eng = loaded.engine
        trt = self._trt
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RescompressError(
                f"the runner needs an engine with one input and one output, got {inputs} -> {outputs}"
            )
        self.input_name, self.output_name = inputs[0], outputs[0]
        self._in_dtype = _torch_dtype(trt, eng.get_tensor_dtype(self.input_name))
        self._out_dtype = _torch_dtype(trt, eng.get_tensor_dtype(self.output_name))
        self.profiles = tuple(self._profile(eng, i) for i in range(eng.num_optimization_profiles))
        self.input_chw = tuple(int(d) for d in tuple(eng.get_tensor_profile_shape(self.input_name, 0)[0])[1:])
        self.info = _runner_info(loaded, self.input_chw, self.profiles, device)
        with torch.cuda.device(self._device):
            self._stream = torch.cuda.Stream(self._device)
            self._context = eng.create_execution_context()
        if self._context is None:
            raise RescompressError("TensorRT could not create an execution context (out of GPU memory?)")
        self._active_profile = 0

    def _profile(self, eng: Any, index: int) -> ProfileSpec:
        lo, opt, hi = eng.get_tensor_profile_shape(self.input_name, index)
        return ProfileSpec(int(lo[0]), int(opt[0]), int(hi[0]))

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_chw:
            raise RescompressError(
                f"the engine expects input [N, {', '.join(map(str, self.input_chw))}], got {list(x.shape)}"
            )
        chunks = [self._run_chunk(x[a:b], profile) for a, b, profile in plan_batches(self.profiles, x.shape[0])]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)

    def _run_chunk(self, x: np.ndarray, profile: int) -> np.ndarray:
        torch = self._torch
        ctx = self._context
        handle = self._stream.cuda_stream
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            if profile != self._active_profile:
                if not ctx.set_optimization_profile_async(profile, handle):
                    raise RescompressError(f"TensorRT could not switch to optimization profile {profile}")
                self._active_profile = profile
            inp = torch.from_numpy(x).to(self._device).to(self._in_dtype).contiguous()
            if not ctx.set_input_shape(self.input_name, tuple(inp.shape)):
                raise RescompressError(f"TensorRT refused input shape {list(inp.shape)}")
            out = torch.empty(tuple(ctx.get_tensor_shape(self.output_name)), dtype=self._out_dtype,
                              device=self._device)
            ctx.set_tensor_address(self.input_name, inp.data_ptr())
            ctx.set_tensor_address(self.output_name, out.data_ptr())
            if not ctx.execute_async_v3(handle):
                raise RescompressError("TensorRT execution failed (execute_async_v3 returned False)")
            result = out.float().cpu()  # the copy on this stream waits for the kernels before it
        self._stream.synchronize()
        return result.numpy()


def _runner_info(loaded: Any, chw: tuple[int, ...], profiles: tuple[ProfileSpec, ...], device: int) -> Any:
    """The common ``RunnerInfo``, filled from the engine and its sidecar (class count, preprocessing, arch)."""
    from rescompress.runtimes import RunnerInfo
    from rescompress.spec import Preprocess

    meta = loaded.metadata
    preprocess = None
    if meta is not None and meta.preprocess:
        try:
            preprocess = Preprocess.from_dict(meta.preprocess)
        except (KeyError, TypeError, ValueError, RescompressError):
            preprocess = None  # an unreadable record only costs the default preprocessing
    settings: dict[str, Any] = {"device": f"cuda:{device}", "profiles": [p.text for p in profiles]}
    if meta is not None:
        settings.update(precision=meta.precision, tensorrt_version=meta.environment.tensorrt_version,
                        gpu=meta.environment.gpu_name)
    return RunnerInfo(
        runtime="tensorrt",
        source=str(loaded.path),
        num_classes=None if meta is None else meta.num_classes,
        in_channels=int(chw[0]) if chw else None,
        input_size=(int(chw[1]), int(chw[2])) if len(chw) == 3 else None,
        preprocess=preprocess,
        arch=None if meta is None else meta.arch,
        threads=None,
        settings=settings,
    )


def make_tensorrt_runner(model: Path | str | Any, threads: int | None = None) -> TensorRTRunner:
    """Factory for the runtimes registry (``threads`` does not apply to a GPU runtime).

    ``model`` is a serialized engine (``.engine``/``.plan`` with its sidecar) or a ``LoadedEngine``; a torch
    model or an ONNX file must first go through ``rescompress build-engine``.
    """
    from rescompress.engine.tensorrt import LoadedEngine

    if not isinstance(model, str | Path | LoadedEngine):
        raise RescompressError("the tensorrt runtime runs engine files; build one with `rescompress build-engine`")
    if isinstance(model, str | Path) and Path(model).suffix.lower() == ".onnx":
        raise RescompressError(
            f"{model} is an ONNX file; build an engine first: rescompress build-engine {model}"
        )
    return TensorRTRunner(model)
