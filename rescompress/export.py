"""FP32 ONNX export with preprocessing metadata and an ONNX Runtime parity check, and reading it back.

:func:`export_onnx` traces an eval-mode model with the TorchScript exporter (``dynamo=False``: still present
in torch 2.14, fast, and it yields a plain Conv/Relu/Add/GlobalAveragePool/Flatten/Gemm graph for ResNets),
names the input ``input`` (dynamic batch ``batch``) and the output ``logits``, removes the ``Identity``
nodes the exporter leaves for de-duplicated constants, runs shape inference and the ONNX checker, and
records the tool version, architecture, class count and preprocessing in ``metadata_props``. Every export
is run once in ONNX Runtime and compared with torch on a probe batch; if they disagree nothing is written.
:func:`read_onnx_info` recovers input size, channels, classes and preprocessing from any classifier ONNX
file: from that metadata when the file was made here, else from the graph's shapes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rescompress import __version__
from rescompress.errors import RescompressError, UsageError
from rescompress.fileio import atomic_path, ensure_not_input
from rescompress.spec import Preprocess

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
MIN_OPSET = 17
# The highest opset torch 2.14's TorchScript exporter writes (it warns and emits opset-20 ops beyond it).
MAX_OPSET = 20
META_PREFIX = "rescompress."
PARITY_RTOL = 1e-5
PARITY_MIN_AGREEMENT = 100.0
# ORT may be this many times further from the float64 result than torch's float32 result is.
PARITY_NOISE_FACTOR = 2.0
# Beyond this, torch's own distance from float64 is not rounding noise (e.g. a model that is not deterministic).
PARITY_NOISE_CAP = 1e-3
PROBE_BATCH = 8

# Warnings the legacy exporter always emits in torch >= 2.9; choosing it is deliberate (see module doc).
_KNOWN_EXPORT_WARNINGS = (
    r"You are using the legacy TorchScript-based ONNX export",
    r"The feature will be removed\. Please remove usage of this function",
)


class ExportError(RescompressError):
    """The model cannot be exported, or the exported file does not reproduce the model."""


@dataclass(frozen=True)
class ParityReport:
    """ONNX Runtime (CPU) logits vs torch logits on one probe batch.

    ``max_rel_diff`` is ``max|ort - torch| / max|torch|`` (relative to the logit scale); ``top1_agreement``
    is in percent. Parity passes with full top-1 agreement and ``max_rel_diff <= rtol``. Deep models at
    large inputs can differ by more than ``rtol`` through float32 rounding alone (torchvision resnet50 at
    224x224 with real BN statistics: torch's own float32 result is 1.5e-5 from the exact one). So when
    ``rtol`` is exceeded the model is also run in float64: ``torch_fp64_rel_error`` and
    ``ort_fp64_rel_error`` are each float32 result's distance from that exact reference, and parity still
    passes when ONNX Runtime is within ``noise_factor`` times torch's own rounding error (itself at most
    ``PARITY_NOISE_CAP``: more than that is not rounding).
    """

    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float
    probe_shape: tuple[int, ...]
    rtol: float = PARITY_RTOL
    min_agreement: float = PARITY_MIN_AGREEMENT
    torch_fp64_rel_error: float | None = None
    ort_fp64_rel_error: float | None = None
    noise_factor: float = PARITY_NOISE_FACTOR

    @property
    def within_float32_noise(self) -> bool:
        if self.torch_fp64_rel_error is None or self.ort_fp64_rel_error is None:
            return False
        if self.torch_fp64_rel_error > PARITY_NOISE_CAP:
            return False
        return self.ort_fp64_rel_error <= self.noise_factor * self.torch_fp64_rel_error

    @property
    def passed(self) -> bool:
        if self.top1_agreement < self.min_agreement:
            return False
        return self.max_rel_diff <= self.rtol or self.within_float32_noise

    def to_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "top1_agreement": self.top1_agreement,
            "probe_shape": list(self.probe_shape),
            "rtol": self.rtol,
            "min_agreement": self.min_agreement,
            "torch_fp64_rel_error": self.torch_fp64_rel_error,
            "ort_fp64_rel_error": self.ort_fp64_rel_error,
            "noise_factor": self.noise_factor,
            "passed": self.passed,
        }


@dataclass(frozen=True)
class ExportResult:
    path: Path
    parity: ParityReport | None
    opset: int = MIN_OPSET
    op_counts: dict[str, int] = field(default_factory=dict)
    size_bytes: int = 0

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "opset": self.opset,
            "size_bytes": self.size_bytes,
            "op_counts": dict(self.op_counts),
            "parity": self.parity.to_dict() if self.parity is not None else None,
        }


@dataclass(frozen=True)
class OnnxInfo:
    """What a classifier ONNX file expects and produces. ``input_size`` is (H, W), ``None`` if dynamic."""

    path: Path
    num_classes: int
    in_channels: int
    input_size: tuple[int, int] | None
    preprocess: Preprocess | None
    arch: str | None
    input_name: str
    output_name: str
    opset: int | None = None
    tool_version: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "input_size": list(self.input_size) if self.input_size else None,
            "preprocess": self.preprocess.to_dict() if self.preprocess else None,
            "arch": self.arch,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "opset": self.opset,
            "tool_version": self.tool_version,
        }


# ---------------------------------------------------------------------------------------------- export
def export_onnx(
    model: nn.Module,
    preprocess: Preprocess,
    path: Path | str,
    *,
    arch: str,
    num_classes: int,
    opset: int = MIN_OPSET,
    check_parity: bool = True,
    probe: torch.Tensor | None = None,
    source: Path | str | None = None,
    folded: bool | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> ExportResult:
    """Export ``model`` (eval mode) to an FP32 ONNX file at ``path``; see the module docstring.

    ``probe`` (default: a seeded random normal batch of 8 at ``preprocess.input_shape``) drives both the
    trace and the parity check. ``source`` is the model's own file, which ``path`` must not be.
    ``folded`` is recorded in the metadata when given.
    """
    import onnx

    path = Path(path)
    ensure_not_input(path, [source])
    if opset < MIN_OPSET:
        raise UsageError(f"opset {opset} is too old; use --opset {MIN_OPSET} or newer")
    if opset > MAX_OPSET:
        raise UsageError(f"opset {opset} is newer than the exporter supports; use --opset {MAX_OPSET} or older")
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        raise ExportError(f"model is in training mode ({training[0]}); call model.eval() before exporting")
    if probe is None:
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(preprocess.input_shape(PROBE_BATCH), generator=gen)
    probe = probe.detach().float()
    expected = preprocess.input_shape(probe.shape[0])
    if tuple(probe.shape) != expected:
        raise ExportError(f"probe batch has shape {tuple(probe.shape)}, the preprocessing says {expected}")

    with torch.no_grad():
        try:
            reference = model(probe)
        except Exception as exc:
            raise ExportError(
                f"the model does not run on input {expected} ({type(exc).__name__}); check --input-size and "
                "--channels"
            ) from exc
    if reference.dim() != 2 or reference.shape[1] != num_classes:
        raise ExportError(
            f"the model produces {tuple(reference.shape)} for a batch of {probe.shape[0]}, expected "
            f"({probe.shape[0]}, {num_classes}) logits"
        )

    proto = _trace_to_onnx(model, probe, opset)
    _remove_identity_nodes(proto.graph)
    _refuse_training_batchnorm(proto.graph)
    metadata = {
        "version": __version__,
        "arch": arch,
        "num_classes": str(num_classes),
        **preprocess_metadata(preprocess),
        "precision": "fp32",
    }
    if folded is not None:  # torch's exporter fuses eval-mode BatchNorm itself: the graph says what it holds
        metadata["folded"] = "1" if folded or not any(n.op_type == "BatchNormalization" for n in proto.graph.node) \
            else "0"
    metadata.update(extra_metadata or {})
    set_metadata(proto, metadata)
    proto.doc_string = f"FP32 {arch} exported by rescompress {__version__}"
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ExportError(f"the exported graph fails onnx.checker: {first}") from exc
    data = proto.SerializeToString()

    parity = None
    if check_parity:
        parity = onnx_parity(data, probe, reference.detach().numpy(), model=model)
        if not parity.passed:
            noise = (
                f", ORT {parity.ort_fp64_rel_error:.3g} vs torch {parity.torch_fp64_rel_error:.3g} from float64"
                if parity.ort_fp64_rel_error is not None and parity.torch_fp64_rel_error is not None
                else ""
            )
            raise ExportError(
                f"ONNX Runtime output differs from torch (max relative diff {parity.max_rel_diff:.3g} > "
                f"{parity.rtol:g}{noise}; top-1 agreement {parity.top1_agreement:.2f}%); nothing written"
            )

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return ExportResult(
        path=path,
        parity=parity,
        opset=opset,
        op_counts=dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
        size_bytes=len(data),
    )


def onnx_parity(
    model_bytes: bytes | str | Path,
    probe: torch.Tensor,
    reference: np.ndarray,
    model: nn.Module | None = None,
) -> ParityReport:
    """Run ``probe`` through ONNX Runtime (CPU) and compare with torch's ``reference`` logits.

    With ``model`` given and the plain tolerance exceeded, both results are also measured against a
    float64 run of ``model`` (see :class:`ParityReport`).
    """
    out = ort_logits(model_bytes, probe)
    parity = compare_to_reference(reference, out, tuple(probe.shape))
    if parity.passed or model is None:
        return parity
    exact = float64_logits(model, probe)
    if exact is None:
        return parity
    scale = float(np.abs(exact).max()) or 1.0
    return replace(
        parity,
        torch_fp64_rel_error=float(np.abs(np.asarray(reference, np.float64) - exact).max()) / scale,
        ort_fp64_rel_error=float(np.abs(np.asarray(out, np.float64) - exact).max()) / scale,
    )


def ort_logits(model_bytes: bytes | str | Path, probe: torch.Tensor | np.ndarray) -> np.ndarray:
    return _first_output(_check_session(model_bytes), probe)


def _check_session(model_bytes: bytes | str | Path, log_level: int = 3):
    """A CPU session for the checks in this module."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Intra-op spinning off: this check runs beside other work on shared cores (DESIGN decision 6).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = log_level
    src = model_bytes if isinstance(model_bytes, bytes) else str(model_bytes)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _first_output(session, probe: torch.Tensor | np.ndarray) -> np.ndarray:
    x = probe.numpy() if isinstance(probe, torch.Tensor) else probe
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


@torch.no_grad()
def float64_logits(model: nn.Module, probe: torch.Tensor) -> np.ndarray | None:
    """Logits of a float64 copy of ``model`` (the exact answer float32 runs approximate); ``None`` if the
    model cannot run in float64."""
    try:
        exact = copy.deepcopy(model).double()(probe.double())
    except Exception:
        return None
    return exact.numpy() if isinstance(exact, torch.Tensor) else None


def compare_to_reference(
    reference: np.ndarray, candidate: np.ndarray, probe_shape: tuple[int, ...]
) -> ParityReport:
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ExportError(f"ONNX output shape {cand.shape} differs from torch output shape {ref.shape}")
    max_abs = float(np.abs(cand - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    if ref.ndim == 2:
        from rescompress.measure.agreement import top1_agreement

        agreement = top1_agreement(ref, cand)
    else:
        agreement = float((ref.argmax(-1) == cand.argmax(-1)).mean() * 100.0) if ref.size else 100.0
    return ParityReport(
        max_abs_diff=max_abs,
        max_rel_diff=max_abs / scale if scale > 0 else max_abs,
        top1_agreement=agreement,
        probe_shape=tuple(int(s) for s in probe_shape),
    )


@contextlib.contextmanager
def _quiet_stdout():
    """Keep torch's C++ exporter off file descriptor 1: when an export fails it prints its whole IR graph
    there, which would break ``--json`` output and bury the one-line error. With RESCOMPRESS_DEBUG=1 the
    graph goes to stderr instead."""
    sys.stdout.flush()
    saved = os.dup(1)
    sink = os.open(os.devnull, os.O_WRONLY) if not os.environ.get("RESCOMPRESS_DEBUG") else os.dup(2)
    try:
        os.dup2(sink, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(sink)


def _trace_to_onnx(model: nn.Module, probe: torch.Tensor, opset: int):
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings(), _quiet_stdout():
        for pattern in _KNOWN_EXPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=DeprecationWarning)
        try:
            torch.onnx.export(
                model,
                (probe,),
                buf,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
                opset_version=opset,
                do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
            )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"torch.onnx.export failed: {first}") from exc
    return onnx.load_from_string(buf.getvalue())


def _remove_identity_nodes(graph) -> None:
    """Drop Identity nodes, pointing their consumers at the Identity's input.

    The TorchScript exporter de-duplicates equal constants (e.g. the all-zero biases of folded BNs) and
    references the shared one through Identity nodes; consumers can read the initializer directly.
    """
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            src = node.input[0]
            rename[node.output[0]] = rename.get(src, src)
        else:
            keep.append(node)
    if not rename:
        return
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    dropped = set(rename)
    kept_info = [vi for vi in graph.value_info if vi.name not in dropped]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)


def constants_to_initializers(m) -> None:
    """Make every constant a node reads an initializer of its own (in place).

    Exporters write some weights as ``Constant`` nodes, and PyTorch's TorchScript exporter writes a weight
    equal to another (e.g. the zero biases of folded BatchNorms) as an ``Identity`` of the first one. The
    placement quantizes initializers per layer, so both become plain initializers; a copy keeps each
    layer's weight its own (unlike :func:`_remove_identity_nodes`, which the exporter uses to share one).
    """
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in m.graph.initializer}
    kept = []
    for n in m.graph.node:
        if n.op_type == "Identity" and n.input and n.input[0] in inits and n.output[0] not in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
        elif (n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"
              and n.output[0] not in inits):
            t = numpy_helper.from_array(numpy_helper.to_array(n.attribute[0].t), n.output[0])
        else:
            kept.append(n)
            continue
        m.graph.initializer.append(t)
        inits[t.name] = t
    if len(kept) != len(m.graph.node):
        del m.graph.node[:]
        m.graph.node.extend(kept)


def _refuse_training_batchnorm(graph) -> None:
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            for attr in node.attribute:
                if attr.name == "training_mode" and attr.i == 1:
                    raise ExportError(f"exported graph has a training-mode BatchNormalization ({node.name})")


def preprocess_metadata(preprocess: Preprocess) -> dict[str, str]:
    """The ``rescompress.*`` metadata entries that record a file's preprocessing."""
    return {
        "preprocess": preprocess.to_json(),
        "preset": preprocess.preset,
        "mean": json.dumps(list(preprocess.mean_per_channel)),
        "std": json.dumps(list(preprocess.std_per_channel)),
        "input_size": json.dumps(list(preprocess.size)),
        "channels": str(preprocess.channels),
    }


def set_metadata(proto, metadata: dict[str, str]) -> None:
    """Set ``rescompress.<key>`` metadata entries (keys may carry the prefix already)."""
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        full = key if key.startswith(META_PREFIX) else META_PREFIX + key
        if full in existing:
            existing[full].value = value
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = full, value


# ---------------------------------------------------------------------------------------------- reading
def read_onnx_info(path: Path | str, runnable: bool = True) -> OnnxInfo:
    """Input/output contract and preprocessing of a classifier ONNX file (see the module docstring).

    ``runnable`` refuses an input this project cannot feed (not float32); ``inspect`` reads any."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise RescompressError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise RescompressError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from exc
    graph = proto.graph
    meta = {p.key: p.value for p in proto.metadata_props}

    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) < 1:
        raise RescompressError(
            f"{path} is not an image classifier: it has {len(inputs)} inputs and {len(graph.output)} outputs "
            "(expected one NCHW image input and one logits output)"
        )
    if runnable and len(graph.output) > 1:  # which one holds the logits cannot be guessed
        names = ", ".join(o.name for o in graph.output[:4])
        raise RescompressError(
            f"{path} has {len(graph.output)} outputs ({names}); rescompress runs classifiers with one logits "
            "output: export the model with only its logits as output"
        )
    inp, out = inputs[0], graph.output[0]
    in_dims = _dims(inp)
    out_dims = _dims(out)
    if in_dims is None or len(in_dims) != 4:
        raise RescompressError(
            f"{path} is not an image classifier: input {inp.name!r} is "
            f"{'of unknown rank' if in_dims is None else f'{len(in_dims)}-D'}, expected 4-D NCHW"
        )
    if out_dims is None or len(out_dims) != 2:
        raise RescompressError(
            f"{path} is not an image classifier: output {out.name!r} is "
            f"{'of unknown rank' if out_dims is None else f'{len(out_dims)}-D'}, expected 2-D (batch, classes)"
        )

    elem = inp.type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT and runnable:
        kind = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "untyped"
        raise RescompressError(
            f"{path} takes {kind} input {inp.name!r}; rescompress feeds normalized float32 images: export the "
            "model with a float32 input" + (" and its preprocessing outside the graph (--mean/--std, --preset "
                                            "describe it here)" if kind.startswith(("uint", "int")) else "")
        )
    if in_dims[3] in (1, 3) and in_dims[1] not in (1, 3):
        # (N, H, W, C): a TensorFlow/Keras export. Every stage feeds NCHW arrays to the graph.
        shown = ", ".join("?" if d is None else str(d) for d in in_dims)
        raise RescompressError(
            f"{path} takes channels-last input {inp.name!r} ({shown}); rescompress feeds NCHW images: re-export "
            "it with an NCHW input (tf2onnx: --inputs-as-nchw)"
        )

    preprocess = None
    if meta.get(META_PREFIX + "preprocess"):
        try:
            preprocess = Preprocess.from_dict(json.loads(meta[META_PREFIX + "preprocess"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise RescompressError(f"{path} has unreadable preprocessing metadata ({exc})") from exc

    num_classes = out_dims[1] or _int_or_none(meta.get(META_PREFIX + "num_classes")) or _classes_from_graph(graph)
    if num_classes is None:
        raise RescompressError(
            f"{path}: cannot tell the number of classes (dynamic output and no Gemm/MatMul weight found)"
        )
    in_channels = in_dims[1] or (preprocess.channels if preprocess else None) or _channels_from_graph(graph)
    if in_channels is None:
        raise RescompressError(f"{path}: cannot tell the number of input channels (dynamic dim, no Conv found)")
    if in_dims[2] and in_dims[3]:
        input_size: tuple[int, int] | None = (in_dims[2], in_dims[3])
    else:
        input_size = preprocess.size if preprocess else None

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return OnnxInfo(
        path=path,
        num_classes=int(num_classes),
        in_channels=int(in_channels),
        input_size=input_size,
        preprocess=preprocess,
        arch=meta.get(META_PREFIX + "arch"),
        input_name=inp.name,
        output_name=out.name,
        opset=opset,
        tool_version=meta.get(META_PREFIX + "version"),
        metadata=meta,
    )


def _dims(value_info) -> list[int | None] | None:
    """Static dims (``None`` where symbolic/unknown) of a tensor value, ``None`` when the rank is unknown."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _initializer_shapes(graph) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in graph.initializer}


def _weight_shape(graph, name: str) -> tuple[int, ...] | None:
    """Shape of an initializer, looking through the DequantizeLinear/Identity that quantized files add."""
    shapes = _initializer_shapes(graph)
    producers = {o: n for n in graph.node for o in n.output}
    for _ in range(4):
        if name in shapes:
            return shapes[name]
        node = producers.get(name)
        if node is None or node.op_type not in ("DequantizeLinear", "Identity", "Cast"):
            return None
        name = node.input[0]
    return None


def _classes_from_graph(graph) -> int | None:
    for node in reversed(list(graph.node)):
        if node.op_type == "Gemm" and len(node.input) >= 2:
            shape = _weight_shape(graph, node.input[1])
            if shape is not None and len(shape) == 2:
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                return shape[0] if trans_b else shape[1]
        if node.op_type == "MatMul" and len(node.input) >= 2:
            shape = _weight_shape(graph, node.input[1])
            if shape is not None and len(shape) >= 2:
                return shape[-1]
    return None


def _channels_from_graph(graph) -> int | None:
    for node in graph.node:
        if node.op_type == "Conv":
            shape = _weight_shape(graph, node.input[1])
            if shape is not None and len(shape) == 4:
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                return shape[1] * group
            return None
    return None


# ------------------------------------------------------------------------------------------ fixed batch
def dynamic_batch_copy(proto, what: str = "the ONNX model"):
    """(model, fixed batch) for a file exported with a fixed batch size: a copy whose batch is dynamic.

    Returns ``(proto, None)`` when the batch is already dynamic. The copy is checked in ONNX Runtime
    against the original on random inputs (at the fixed batch, and per image at other batch sizes); a
    graph that bakes the batch into a Reshape fails that check and is refused with how to re-export.
    """
    import onnx

    inits = {i.name for i in proto.graph.initializer}
    inp = next(i for i in proto.graph.input if i.name not in inits)
    dims = inp.type.tensor_type.shape.dim
    if not dims or not dims[0].HasField("dim_value") or any(not d.HasField("dim_value") for d in dims[1:]):
        return proto, None
    fixed = int(dims[0].dim_value)
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    m_inp = next(i for i in m.graph.input if i.name == inp.name)
    m_inp.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    for out in m.graph.output:
        odims = out.type.tensor_type.shape.dim
        if odims and odims[0].HasField("dim_value") and odims[0].dim_value == fixed:
            odims[0].dim_param = BATCH_DIM
    del m.graph.value_info[:]  # inferred shapes carry the fixed batch; ORT re-infers them
    shape = [int(d.dim_value) for d in dims[1:]]
    x = np.random.default_rng(0).standard_normal((fixed + 1, *shape)).astype(np.float32)
    refuse = (f"{what} has a fixed batch size of {fixed} and its graph depends on it; re-export it with a "
              "dynamic batch, e.g. torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}}) or, with "
              "dynamo=True, dynamic_shapes=({0: torch.export.Dim('batch')},)")
    try:
        ref = ort_logits(proto.SerializeToString(), x[:fixed])
        # log level 4: a graph that cannot take another batch fails here on purpose; ORT need not print it
        copy = _check_session(m.SerializeToString(), log_level=4)
        runs = [(_first_output(copy, x[:n]), n) for n in (fixed, 1, fixed + 1)]
    except Exception:
        raise RescompressError(refuse) from None
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    for got, n in runs:
        k = min(n, fixed)
        if got.shape[0] != n or not np.allclose(got[:k], ref[:k], rtol=1e-4, atol=tol):
            raise RescompressError(refuse)
    return m, fixed
