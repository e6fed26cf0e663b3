"""The torch runtime: runs an ``nn.Module`` (or a model file through ``load_model``) in inference mode.

The module is put in eval mode and run under ``torch.inference_mode`` (on CUDA with TensorFloat-32
off). ``threads`` calls ``torch.set_num_threads`` only when given, because that setting is process-wide
and would otherwise change the thread count of every other torch user in the process.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rescompress.errors import RescompressError
from rescompress.runtimes import RunnerInfo, RunnerOptions, classifier_outputs, is_path_like


def module_io(module: nn.Module) -> tuple[int | None, int | None]:
    """(input channels of the first Conv2d, output features of the last Linear) of a plain module."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return (convs[0].in_channels if convs else None, linears[-1].out_features if linears else None)


@contextmanager
def _strict_fp32(device: torch.device):
    """On CUDA, turn TensorFloat-32 off for the call: the FP32 baseline must be FP32, not 10-bit mantissas.

    cuDNN convolutions use TF32 by default on Ampere and newer GPUs, which moves logits by ~1e-3 relative;
    the flags are process-wide, so they are restored afterwards.
    """
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class TorchRunner:
    """Runs a module on CPU (or CUDA) and returns float32 numpy logits."""

    def __init__(self, module: nn.Module, info: RunnerInfo, device: str = "cpu") -> None:
        self.name = "torch"
        self.info = info
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.inference_mode(), _strict_fp32(self.device):
            out = self.module(x)
        if not isinstance(out, torch.Tensor):
            raise RescompressError(f"{self.info.source} returned {type(out).__name__}, expected a logits tensor")
        return classifier_outputs(out.float().cpu().numpy(), self.info.source)


def create(model: Any, options: RunnerOptions) -> TorchRunner:
    """Factory for the ``torch`` entry of the runtime table."""
    if options.device == "cuda" and not torch.cuda.is_available():
        raise RescompressError("device cuda requested but torch sees no CUDA device")
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    settings = {"device": options.device, "inference_mode": True}
    if options.device == "cuda":
        settings["tf32"] = False
    if is_path_like(model):
        path = Path(model)
        if path.suffix.lower() == ".onnx":
            raise RescompressError(f"{path} is an ONNX file; the torch runtime runs .pt/.safetensors models")
        from rescompress.loading import load_model

        model = load_model(path, arch=options.arch, trust_pickle=options.trust_pickle)
    if isinstance(model, nn.Module):
        in_channels, num_classes = module_io(model)
        info = RunnerInfo(
            "torch", "<module>", num_classes, in_channels, None, None, None, options.threads, settings
        )
        return TorchRunner(model, info, options.device)
    if hasattr(model, "module") and isinstance(model.module, nn.Module):  # a LoadedModel
        info = RunnerInfo(
            "torch", str(model.path), model.num_classes, model.in_channels, None, model.preprocess,
            model.arch, options.threads, settings,
        )
        return TorchRunner(model.module, info, options.device)
    raise RescompressError(
        f"the torch runtime runs an nn.Module, a LoadedModel or a model file, not {type(model).__name__}"
    )
