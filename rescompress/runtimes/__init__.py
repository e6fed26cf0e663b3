"""One way to run a model whatever executes it: the ``Runner`` protocol, its options, and a runtime table.

A runner takes a float32 NCHW batch and returns float32 logits ``(N, num_classes)``; it also carries a
:class:`RunnerInfo` (class count, input channels/size, preprocessing, threads, runtime settings) so that
measurement code never needs to know which runtime it talks to. ``make_runner`` picks the runtime from
the table :data:`RUNTIMES` (name -> ``"module:factory"``, imported lazily so that ``--help`` and torch-only
use never import onnxruntime or openvino). Adding a runtime is one line in that table plus a module whose
factory has the signature ``create(model, options: RunnerOptions) -> Runner``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rescompress.errors import RescompressError, UsageError
from rescompress.spec import Preprocess

# Runtime name -> "module:factory". The factory is called as factory(model, options).
RUNTIMES: dict[str, str] = {
    "torch": "rescompress.runtimes.torch_runner:create",
    "onnxruntime": "rescompress.runtimes.onnxruntime_runner:create",
    "openvino": "rescompress.runtimes.openvino_runner:create",
    "tensorrt": "rescompress.runtimes:_tensorrt_factory",
}

# What ``runtime="auto"`` picks for a file, by suffix; anything else (a .pt, .pth, .safetensors file, a
# LoadedModel or an nn.Module) runs in torch.
AUTO_RUNTIME_BY_SUFFIX: dict[str, str] = {
    ".onnx": "onnxruntime",
    ".engine": "tensorrt",
    ".plan": "tensorrt",
}
AUTO_DEFAULT_RUNTIME = "torch"


@dataclass(frozen=True)
class RunnerInfo:
    """What a runner knows about the model it runs; ``None`` where the model does not say."""

    runtime: str
    source: str  # the file path, or "<module>" for an in-memory model
    num_classes: int | None
    in_channels: int | None
    input_size: tuple[int, int] | None  # fixed spatial size (ONNX with static H/W); None = any size
    preprocess: Preprocess | None  # recorded default preprocessing, if any
    arch: str | None = None
    threads: int | None = None  # None: the runtime's default
    settings: dict[str, Any] = field(default_factory=dict)  # runtime-specific (spinning, providers, ...)

    @classmethod
    def from_onnx(
        cls, runtime: str, path: Path, meta: Any, threads: int | None, settings: dict[str, Any]
    ) -> RunnerInfo:
        """Info for a runner of an ONNX file, from its ``OnnxInfo`` (``export.read_onnx_info``)."""
        return cls(
            runtime=runtime,
            source=str(path),
            num_classes=meta.num_classes,
            in_channels=meta.in_channels,
            input_size=tuple(meta.input_size) if meta.input_size else None,
            preprocess=meta.preprocess,
            arch=meta.arch,
            threads=threads,
            settings=settings,
        )

    def input_shape(self, batch: int, preprocess: Preprocess | None = None) -> tuple[int, int, int, int]:
        """The NCHW shape of a ``batch``-image input (fixed size first, then the given/recorded preprocessing)."""
        pre = preprocess or self.preprocess
        if self.input_size is not None:
            hw = self.input_size
        elif pre is not None:
            hw = pre.size
        else:
            raise RescompressError(f"{self.source}: the input size is unknown; pass --preset or --input-size")
        channels = self.in_channels or (pre.channels if pre is not None else None)
        if channels is None:
            raise RescompressError(f"{self.source}: the input channel count is unknown; pass --channels")
        return (batch, channels, hw[0], hw[1])

    def to_dict(self) -> dict:
        return {
            "runtime": self.runtime,
            "source": self.source,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "input_size": list(self.input_size) if self.input_size else None,
            "preprocess": self.preprocess.to_dict() if self.preprocess else None,
            "arch": self.arch,
            "threads": self.threads,
            "settings": dict(self.settings),
        }


@runtime_checkable
class Runner(Protocol):
    """Runs one model: float32 NCHW batch in, float32 logits ``(N, num_classes)`` out."""

    name: str
    info: RunnerInfo

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def max_threads() -> int:
    """The most intra-op threads accepted: far more than any machine benefits from, far fewer than the tens
    of thousands that made ONNX Runtime hang and torch fail to load its libraries."""
    import os

    return max(64, 8 * (os.cpu_count() or 1))


def check_threads(threads: int | None) -> None:
    """Refuse a thread count below 1 or above :func:`max_threads` (a usage error)."""
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be a positive integer, got {threads}")
    if threads > max_threads():
        raise UsageError(f"--threads {threads} is more than this machine can use (at most {max_threads()})")


@dataclass(frozen=True)
class RunnerOptions:
    """Options for every runtime; each factory reads the ones that concern it.

    ``spinning`` is ONNX Runtime's intra-/inter-op thread spinning: off by default because, when
    several runners are timed interleaved, one session's spinning threads steal the cores from the next.
    """

    threads: int | None = None
    spinning: bool = False
    device: str = "cpu"  # "cpu" | "cuda"
    arch: str | None = None  # torch files: architecture override for load_model
    trust_pickle: bool = False  # torch files: allow arbitrary pickles
    optimized_model_path: Path | str | None = None  # onnxruntime: write the optimized graph here

    def __post_init__(self) -> None:
        check_threads(self.threads)
        if self.device not in ("cpu", "cuda"):
            raise RescompressError(f"device must be 'cpu' or 'cuda', got {self.device!r}")


def runtime_names() -> tuple[str, ...]:
    return ("auto", *RUNTIMES)


def is_path_like(model: object) -> bool:
    return isinstance(model, str | Path)


def resolve_runtime(model: object, runtime: str = "auto") -> str:
    """The runtime that ``make_runner`` would use for ``model``."""
    if runtime != "auto":
        if runtime not in RUNTIMES:
            raise UsageError(f"unknown runtime {runtime!r}; choose one of: {', '.join(runtime_names())}")
        return runtime
    if is_path_like(model):
        return AUTO_RUNTIME_BY_SUFFIX.get(Path(model).suffix.lower(), AUTO_DEFAULT_RUNTIME)
    return AUTO_DEFAULT_RUNTIME


def make_runner(model: Any, runtime: str = "auto", threads: int | None = None, **options: Any) -> Runner:
    """A runner for ``model``: a file path, a ``LoadedModel`` or an ``nn.Module``.

    ``runtime="auto"`` runs ``.onnx`` files in ONNX Runtime and everything else in torch. Further keyword
    options are the fields of :class:`RunnerOptions` (``spinning``, ``device``, ``arch``, ``trust_pickle``,
    ``optimized_model_path``).
    """
    name = resolve_runtime(model, runtime)
    if is_path_like(model) and not Path(model).exists():
        raise RescompressError(f"model file {model} does not exist")
    if name in ("onnxruntime", "openvino") and is_path_like(model):
        from rescompress.loading import is_onnx_path

        if not is_onnx_path(model):
            raise UsageError(f"--runtime {name} runs ONNX files and {Path(model).name} is not one; use --runtime "
                             "torch, or `rescompress export` it first")
    opts = RunnerOptions(threads=threads, **options)
    module_name, _, attr = RUNTIMES[name].partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(model, opts)


def runner_info(runner: Any) -> RunnerInfo:
    """``runner.info``, or an all-unknown ``RunnerInfo`` for a runner that does not carry one."""
    info = getattr(runner, "info", None)
    if isinstance(info, RunnerInfo):
        return info
    return RunnerInfo(str(getattr(runner, "name", type(runner).__name__)), f"<{type(runner).__name__}>",
                      None, None, None, None)


def _tensorrt_factory(model: Any, options: RunnerOptions) -> Runner:
    # The TensorRT runner's own factory takes (model, threads); threads do not apply on a GPU.
    from rescompress.runtimes.tensorrt_runner import make_tensorrt_runner

    return make_tensorrt_runner(model, options.threads)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def classifier_outputs(logits: np.ndarray, source: str) -> np.ndarray:
    """Check that a model's output is a (N, classes) float array and return it as float32."""
    out = np.asarray(logits)
    if out.ndim != 2:
        raise RescompressError(
            f"{source} is not a classifier: its output has shape {tuple(out.shape)}, expected (batch, classes)"
        )
    return out.astype(np.float32, copy=False)


def __getattr__(name: str) -> Any:
    # ort_session_options lives with the ORT runner; importing it lazily keeps onnxruntime out of
    # ``import rescompress.runtimes`` for torch-only use.
    if name == "ort_session_options":
        from rescompress.runtimes.onnxruntime_runner import ort_session_options

        return ort_session_options
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
