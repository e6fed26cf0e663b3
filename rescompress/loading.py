"""Load a user's model file, whatever form it takes, without letting the file run code.

:func:`load_model` accepts a torchvision-style ResNet state_dict (bare, wrapped in ``{"state_dict": ...}``
and similar, with ``module.`` / ``_orig_mod.`` prefixes, in a ``torch.save`` file or a plain safetensors
file), a fully pickled ResNet (``torch.save(model)``), a TorchScript archive, and the project's own
safetensors checkpoint. ``torch.load`` always runs with ``weights_only=True``; pickled modules load through
an allow-list of the torch/torchvision classes a ResNet is made of, entered as a context manager so the
process-wide allow-list is untouched. For state_dicts the architecture (block type, blocks per stage,
ResNeXt groups, width per group, CIFAR-style stem), class count and input channels are inferred from key
names and tensor shapes; smaller widths than the architecture's (a pruned model) are rebuilt from the
stored shapes. Anything else is refused with an :class:`UnsupportedModelError` that says what was found.
"""

from __future__ import annotations

import logging
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from rescompress.errors import RescompressError, UnsupportedModelError
from rescompress.models import (
    CIFAR_ARCHS,
    TORCHVISION_ARCHS,
    CifarResNet,
    Stem,
    build_model,
    outputs_match,
    set_stem,
    stem_candidates,
    stem_of,
)
from rescompress.profile import count_macs, count_params
from rescompress.spec import Preprocess, get_preset

log = logging.getLogger(__name__)

SOURCE_FORMATS = ("state_dict", "pickled_module", "torchscript", "checkpoint", "pickle")

#: Commands that take an ONNX file directly (shown when an .onnx file reaches :func:`load_model`).
ONNX_COMMANDS = ("inspect", "quantize", "evaluate", "benchmark", "gate", "build-engine")

ACCEPTED = (
    "accepted: a torchvision-style ResNet state_dict or pickled ResNet (.pt/.pth), a TorchScript archive, "
    "a safetensors state_dict, or a rescompress checkpoint"
)

# Wrappers written by common training loops; the value under one of these keys is the model.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights", "module")
# Prefixes added by DataParallel/DDP (``module.``), torch.compile (``_orig_mod.``) and Lightning (``model.``).
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")

# The classes a pickled torchvision/reference ResNet is made of (found with
# torch.serialization.get_unsafe_globals_in_checkpoint), plus the modules people commonly swap in for the
# head (the layers a checkpoint header can describe: Linear, BatchNorm1d, Dropout, Flatten, Identity and
# plain activations) or the pooling. Allowing a class lets the unpickler create it with ``__new__`` and
# fill its ``__dict__``; none of them runs code from the file.
SAFE_MODULE_CLASSES: tuple[type, ...] = (
    tv_resnet.ResNet,
    tv_resnet.BasicBlock,
    tv_resnet.Bottleneck,
    CifarResNet,
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AvgPool2d,
    nn.Linear,
    nn.Sequential,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.BatchNorm1d,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softmax,
    nn.LogSoftmax,
    nn.DataParallel,  # torch.save(nn.DataParallel(model)); unwrapped to .module after loading
)


def _data_globals() -> list:
    """Plain data that training scripts store beside the weights: an ``argparse.Namespace`` of their
    arguments (timm, the PyTorch ImageNet example) and numpy scalars/arrays (a best accuracy, a metric
    history). Unpickling them builds values; no code from the file runs."""
    import argparse

    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    dtypes = {type(np.dtype(t)) for t in set(np.sctypeDict.values()) if t is not np.object_}
    return [argparse.Namespace, np.dtype, np.ndarray, core.multiarray.scalar, core.multiarray._reconstruct,
            *sorted(dtypes, key=lambda c: c.__name__)]


SAFE_DATA_GLOBALS: tuple = tuple(_data_globals())
_ALLOWED_GLOBALS: tuple = (*SAFE_MODULE_CLASSES, *SAFE_DATA_GLOBALS)  # what the weights-only load accepts

# (block, blocks per stage, groups, width per group) -> torchvision builder name.
_TORCHVISION_TABLE: dict[tuple[str, tuple[int, ...], int, int], str] = {
    ("basic", (2, 2, 2, 2), 1, 64): "resnet18",
    ("basic", (3, 4, 6, 3), 1, 64): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 1, 64): "resnet50",
    ("bottleneck", (3, 4, 23, 3), 1, 64): "resnet101",
    ("bottleneck", (3, 8, 36, 3), 1, 64): "resnet152",
    ("bottleneck", (3, 4, 6, 3), 32, 4): "resnext50_32x4d",
    ("bottleneck", (3, 4, 23, 3), 32, 8): "resnext101_32x8d",
    ("bottleneck", (3, 4, 23, 3), 64, 4): "resnext101_64x4d",
    ("bottleneck", (3, 4, 6, 3), 1, 128): "wide_resnet50_2",
    ("bottleneck", (3, 4, 23, 3), 1, 128): "wide_resnet101_2",
}
_CIFAR_TABLE: dict[int, str] = {3: "resnet20", 5: "resnet32", 9: "resnet56"}
_CIFAR_STEM_WIDTH = 16

_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


@dataclass(frozen=True)
class ResNetSpec:
    """The structure of a ResNet as read from its state_dict keys and shapes.

    ``family`` is ``"torchvision"`` (four stages; torchvision's 7x7 stem and max-pool unless ``stem`` says
    otherwise) or ``"cifar"`` (3x3 stem, three stages). ``arch`` is the matching builder name when the
    structure is a known one, else ``None``.
    """

    family: str
    block: str  # "basic" | "bottleneck"
    layers: tuple[int, ...]
    groups: int
    width_per_group: int
    num_classes: int
    in_channels: int
    arch: str | None
    stem: Stem = Stem()  # torchvision family only

    @property
    def name(self) -> str:
        """The builder name, or a descriptive name for a structure no builder is named after."""
        if self.arch is not None:
            return self.arch
        if self.family == "cifar":
            return f"cifar_resnet{6 * self.layers[0] + 2}" if len(set(self.layers)) == 1 else (
                f"cifar_resnet_{'-'.join(map(str, self.layers))}"
            )
        return f"resnet_{self.block}_{'-'.join(map(str, self.layers))}_g{self.groups}w{self.width_per_group}"

    def to_dict(self) -> dict:
        return {
            "family": self.family, "block": self.block, "layers": list(self.layers), "groups": self.groups,
            "width_per_group": self.width_per_group, "num_classes": self.num_classes,
            "in_channels": self.in_channels, "arch": self.arch,
            "stem": self.stem.to_dict() if self.family == "torchvision" else None,
        }


@dataclass
class LoadedModel:
    """A loaded model and what is known about it.

    Not frozen: it carries a mutable ``nn.Module`` anyway, and later stages may swap in a transformed one.
    """

    module: nn.Module
    arch: str
    num_classes: int
    in_channels: int
    preprocess: Preprocess
    source_format: str
    path: Path
    params: int
    macs: int
    pruned: bool = False
    spec: ResNetSpec | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "source_format": self.source_format,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "preprocess": self.preprocess.to_dict(),
            "params": self.params,
            "macs": self.macs,
            "pruned": self.pruned,
            "spec": self.spec.to_dict() if self.spec is not None else None,
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------------------ entry points
def is_onnx_path(path: Path | str) -> bool:
    """True for an ``.onnx`` file name, or a file whose first bytes look like an ONNX ModelProto."""
    p = Path(path)
    if p.suffix.lower() == ".onnx":
        return True
    head = _head(p, 2)
    # ModelProto starts with field 1 (ir_version, varint): tag byte 0x08. No torch/safetensors file does.
    if head[:1] != b"\x08" or not p.is_file():
        return False
    try:
        import onnx

        onnx.load(str(p), load_external_data=False)
    except Exception:
        return False
    return True


def load_model(
    path: Path | str,
    arch: str | None = None,
    trust_pickle: bool = False,
    *,
    input_size: int | tuple[int, int] | None = None,
) -> LoadedModel:
    """Load any accepted model file as an eval-mode CPU module with its architecture and input spec.

    ``arch`` overrides the inferred architecture (an arch the weights do not fit is an error).
    ``trust_pickle`` allows an arbitrary pickle (it can run code) after a warning. ``input_size``
    replaces the default preprocessing's input size, square (an int) or (height, width); MACs are counted
    at that size.
    """
    p = Path(path)
    _check_file(p)
    if is_onnx_path(p):
        raise UnsupportedModelError(
            f"{p} is an ONNX model; this step needs a PyTorch model. Commands that take ONNX files: "
            f"{', '.join(ONNX_COMMANDS)}"
        )
    if arch is not None and arch not in CIFAR_ARCHS and arch not in TORCHVISION_ARCHS:
        raise UnsupportedModelError(
            f"unknown --arch {arch!r}; known: {', '.join((*CIFAR_ARCHS, *TORCHVISION_ARCHS))}"
        )
    kind = _sniff(p)
    if kind == "safetensors":
        loaded = _load_safetensors(p, arch)
    elif kind == "torchscript":
        loaded = _load_torchscript(p, arch)
    else:
        loaded = _load_torch_pickle(p, arch, trust_pickle)
    return _finish(loaded, input_size)


# ------------------------------------------------------------------------------------------ file checks
def _head(p: Path, n: int) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _check_file(p: Path) -> None:
    if not p.exists():
        raise UnsupportedModelError(f"model file {p} does not exist")
    if p.is_dir():
        raise UnsupportedModelError(f"{p} is a directory; pass a model file (.pt, .pth, .safetensors, .onnx)")
    try:
        size = p.stat().st_size
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise UnsupportedModelError(f"cannot read {p}: {exc.strerror or exc}") from None
    if size == 0:
        raise UnsupportedModelError(f"{p} is empty (0 bytes); re-save or re-copy the model file")


def _sniff(p: Path) -> str:
    """``safetensors`` | ``torchscript`` | ``torch_zip`` | ``torch_legacy``; raises for anything else."""
    head = _head(p, 16)
    size = p.stat().st_size
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            raise UnsupportedModelError(
                f"{p} is truncated or corrupt (its zip archive cannot be read); re-save or re-copy it"
            ) from None
        # torch.jit.save writes code/ and constants.pkl beside data.pkl; torch.save writes neither.
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            raise UnsupportedModelError(f"{p} is a zip archive but not a PyTorch file (no data.pkl); {ACCEPTED}")
        return "torch_zip"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + header_len <= size:
            return "safetensors"
        if head[8:9] == b"{":
            raise UnsupportedModelError(f"{p} is a truncated safetensors file; re-save or re-copy it")
    if head[:1] == b"\x80":  # pickle protocol 2+: torch's legacy (non-zip) format or a plain pickle
        return "torch_legacy"
    raise UnsupportedModelError(f"{p} is not a PyTorch model file (it starts with {head[:8]!r}); {ACCEPTED}")


# ------------------------------------------------------------------------------------------ loaders
@dataclass
class _Partial:
    """What a format-specific loader found, before preprocessing and counts are filled in."""

    module: nn.Module
    arch: str
    num_classes: int
    in_channels: int
    source_format: str
    path: Path
    preprocess: Preprocess | None = None
    pruned: bool = False
    spec: ResNetSpec | None = None
    notes: list[str] = field(default_factory=list)


def _load_safetensors(p: Path, arch: str | None) -> _Partial:
    from safetensors import SafetensorError, safe_open

    from rescompress.checkpoint import load_checkpoint, read_header

    header = read_header(p)
    if header is not None:
        if arch is not None and arch != header.arch:
            raise UnsupportedModelError(
                f"{p} is a rescompress checkpoint of {header.arch}, not {arch}; drop --arch"
            )
        module, header = load_checkpoint(p)
        part = _Partial(
            module, header.arch, header.num_classes, header.in_channels, "checkpoint", p,
            preprocess=header.preprocess, pruned=header.pruned,
        )
        if getattr(header, "folded", False):
            part.notes.append("BatchNorm folded into the convolutions")
        if header.stem is not None and not header.stem.standard:
            part.notes.append(f"stem: {header.stem.describe()}")
        return part
    try:
        with safe_open(str(p), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{p} is a corrupt or truncated safetensors file ({exc})") from None
    return _from_state(state, arch, "state_dict", p)


def _load_torch_pickle(p: Path, arch: str | None, trust_pickle: bool) -> _Partial:
    obj, trusted = _torch_load_safe(p, trust_pickle)
    module, state = _unwrap(obj, p)
    if module is not None:
        return _from_module(module, p, arch, "pickle" if trusted else "pickled_module")
    return _from_state(state, arch, "pickle" if trusted else "state_dict", p)


def _from_state(state: dict[str, torch.Tensor], arch: str | None, source: str, p: Path) -> _Partial:
    state, prefix_note = select_resnet(state, str(p))
    state, head_note = plain_head(state)
    module, spec, pruned = build_from_state_dict(state, arch, what=str(p))
    part = _from_spec(module, spec, pruned, source, p, arch)
    part.notes += [n for n in (prefix_note, head_note) if n]
    if spec.family == "torchvision" and not spec.stem.standard:
        part.notes.append(f"conv1 is {spec.stem.kernel}x{spec.stem.kernel}, and a state_dict does not record the "
                          f"stem's stride or max-pool: assumed a {spec.stem.describe()} (the usual small-image "
                          "variant); if that is wrong, save the whole module or a TorchScript archive instead")
    return part


def _torch_load_safe(p: Path, trust_pickle: bool) -> tuple[object, bool]:
    """``torch.load`` with ``weights_only=True`` and the ResNet allow-list: (object, needed trust).

    Only when that load is refused for an unknown global and ``trust_pickle`` is set does the full
    unpickler run.
    """
    try:
        # torch warns about pickle protocols and deprecations on users' files; our errors say what matters.
        with torch.serialization.safe_globals(list(_ALLOWED_GLOBALS)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True), False
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        reason = _describe_load_failure(p, exc)
        if not reason.startswith("refused"):
            raise UnsupportedModelError(f"{p}: {reason}") from None
        if not trust_pickle:
            raise UnsupportedModelError(
                f"{p}: {reason}; it is not a plain ResNet or state_dict. If you trust the file, pass "
                "--trust-pickle (a pickle can run code on this machine)"
            ) from None
        log.warning("%s: %s; loading it with weights_only=False (--trust-pickle): code in the file can run",
                    p, reason)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=False), True
    except Exception as exc:
        raise UnsupportedModelError(
            f"{p}: the trusted pickle load failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


def _describe_load_failure(p: Path, exc: Exception) -> str:
    text = str(exc)
    m = _REFUSED_GLOBAL.search(text) or _UNSUPPORTED_GLOBAL.search(text)
    if m:
        return f"refused to unpickle {m.group(1)} (not on the allow-list of ResNet classes)"
    if "WeightsUnpickler" in text or "weights_only" in text.lower():
        found = unsafe_globals(p)
        if found:
            return f"refused to unpickle {', '.join(found[:4])} (not on the allow-list of ResNet classes)"
        if "persistent_load" in text:
            return ("refused by the weights-only unpickler: a whole module in torch's legacy (pre-1.6) format "
                    "stores source code; re-save it with torch.save(model.state_dict())")
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n\n")[0].strip()
        return f"refused by the weights-only unpickler ({detail or type(exc).__name__})"
    if "central directory" in text or "failed reading zip" in text or isinstance(exc, EOFError):
        return "the file is truncated or corrupt; re-save or re-copy it"
    if "magic number" in text or "invalid load key" in text:
        return f"not a PyTorch file ({text.splitlines()[0]}); {ACCEPTED}"
    return f"cannot be read by torch.load: {type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# Globals every torch.save file references and weights_only allows by default.
_DEFAULT_SAFE_GLOBAL = re.compile(
    r"^((__builtin__|builtins)\.set|torch\._utils\._rebuild_\w+|torch\.\w*Storage|torch\.storage\.\w+|torch\.nn\.parameter\.Parameter|"
    r"torch\._tensor\._rebuild_\w+|collections\.OrderedDict|torch\.(float|half|bfloat16|int|long|bool|uint8|"
    r"int8|int16|int32|int64|float16|float32|float64|double|Size|device|dtype))$"
)


def unsafe_globals(path: Path | str) -> list[str]:
    """Importable names a pickle in ``path`` refers to that the loader would refuse (without running it).

    Reads the opcode stream only (``pickletools``), so it is safe on a malicious file.
    """
    p = Path(path)
    try:
        if zipfile.is_zipfile(p):
            names = set(torch.serialization.get_unsafe_globals_in_checkpoint(p))
        else:
            names = _scan_pickle_globals(p)
    except Exception:
        return []
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _ALLOWED_GLOBALS}
    return sorted(n for n in names if n not in allowed and not _DEFAULT_SAFE_GLOBAL.match(n))


def _scan_pickle_globals(p: Path, max_pickles: int = 8) -> set[str]:
    import pickletools

    names: set[str] = set()
    with open(p, "rb") as f:
        # The legacy torch format is several pickles back to back (magic, protocol, sys info, object).
        for _ in range(max_pickles):
            strings: list[str] = []
            try:
                for op, arg, _pos in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        names.add(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.add(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:
                break
    return names


def _load_torchscript(p: Path, arch: str | None) -> _Partial:
    """A TorchScript archive: its code is TorchScript (run by torch's interpreter, not Python's pickle).

    A probe forward runs that code once, to check an eager rebuild against it or to read the class count.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load is deprecated in favour of torch.export
            script = torch.jit.load(str(p), map_location="cpu")
    except Exception as exc:
        raise UnsupportedModelError(
            f"{p} looks like a TorchScript archive but torch.jit.load failed: {str(exc).splitlines()[0]}"
        ) from None
    script.eval()
    state, head_note = plain_head(strip_prefixes(dict(script.state_dict())))
    try:
        eager, spec, pruned = build_from_state_dict(state, arch, what=str(p))
    except UnsupportedModelError:
        if arch is not None:
            raise
        eager, spec = None, None
    if eager is not None:
        # Prefer an eager copy (pruning, folding and export need one) when it computes what the archive does.
        # A state_dict does not record the stem's stride or max-pool: the archive's own forward decides.
        stems = [spec.stem] + ([s for s in stem_candidates(spec.stem.kernel) if s != spec.stem]
                               if spec.family == "torchvision" else [])
        first, eager = (eager, pruned), None
        for stem in stems:
            spec = replace(spec, stem=stem)
            try:
                candidate, cand_pruned = first if stem == stems[0] else _load_into(spec, state)
            except _DoesNotFit:
                continue
            if _same_outputs(script, candidate, spec):
                eager, pruned = candidate, cand_pruned
                break
    if eager is not None:
        part = _from_spec(eager, spec, pruned, "torchscript", p, arch)
        part.notes.append("rebuilt as an eager module from the TorchScript weights (outputs checked equal)")
        if head_note:
            part.notes.append(head_note)
        return part
    if spec is not None:
        log.info("TorchScript forward differs from an eager %s; keeping the scripted module", spec.name)
    in_channels = _first_conv_in_channels(state)
    if in_channels is None:
        raise UnsupportedModelError(f"{p}: TorchScript module has no 4-D conv weight; not an image classifier")
    base = _default_preprocess("torchscript", in_channels)
    with torch.no_grad():
        try:
            out = script(torch.zeros(base.input_shape(1)))
        except Exception as exc:
            raise UnsupportedModelError(
                f"{p}: TorchScript module failed on a {tuple(base.input_shape(1))} probe: "
                f"{str(exc).splitlines()[0]}"
            ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise UnsupportedModelError(f"{p}: TorchScript module does not return [N, classes] logits")
    return _Partial(script, arch or "torchscript", int(out.shape[1]), in_channels, "torchscript", p)


def _probe_size(spec: ResNetSpec) -> tuple[int, int]:
    return (32, 32) if spec.family == "cifar" else (64, 64)


def _same_outputs(script: nn.Module, eager: nn.Module, spec: ResNetSpec) -> bool:
    """True when ``eager`` computes what ``script`` does on a random probe."""
    # A private generator: loading a file must not move the caller's global RNG.
    probe = torch.randn(2, spec.in_channels, *_probe_size(spec), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            return outputs_match(script(probe), eager(probe))
    except Exception:
        return False


def _first_conv_in_channels(state: dict[str, torch.Tensor]) -> int | None:
    for v in state.values():
        if isinstance(v, torch.Tensor) and v.ndim == 4:
            return int(v.shape[1])
    return None


# ------------------------------------------------------------------------------------------ unwrapping
def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(obj: object, p: Path) -> tuple[nn.Module | None, dict[str, torch.Tensor]]:
    """(module, {}) for a pickled module, (None, state_dict) for a state_dict, possibly wrapped."""
    for _ in range(4):  # wrappers nest at most a few levels ({"model": {"state_dict": ...}})
        if isinstance(obj, nn.DataParallel):
            obj = obj.module
        if isinstance(obj, nn.Module):
            return obj, {}
        if _is_tensor_dict(obj):
            return None, strip_prefixes(obj)
        if isinstance(obj, dict):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj), None)
            if inner is None:  # e.g. {"ema_state_dict": ..., "epoch": 3}: the one entry that holds weights
                found = [v for v in obj.values() if isinstance(v, nn.Module) or _is_tensor_dict(v)]
                inner = found[0] if len(found) == 1 else None
            if inner is not None:
                obj = inner
                continue
            keys = sorted(str(k) for k in obj)[:8]
            raise UnsupportedModelError(
                f"{p} holds a dict with keys {keys}, neither a state_dict (name -> tensor) nor one wrapped "
                f"under {', '.join(repr(k) for k in WRAPPER_KEYS[:3])}; {ACCEPTED}"
            )
        break
    raise UnsupportedModelError(f"{p} holds a {type(obj).__module__}.{type(obj).__qualname__}; {ACCEPTED}")


_HEAD_KEY = re.compile(r"^fc\.(\d+)\.(weight|bias)$")


def plain_head(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Map a ``fc = Sequential(Dropout, Linear)``-style head onto a plain ``fc`` Linear: (state, note).

    Only when the Sequential holds exactly one parameterized layer, a Linear (one 2-D weight, maybe a bias):
    the parameter-free layers before it (Dropout, Flatten, a ReLU on the non-negative pooled features) do
    nothing at inference. A head with more than one such layer is left as it is (and will not load).
    """
    if "fc.weight" in state:
        return state, None
    head = {k: _HEAD_KEY.match(k) for k in state if k.startswith("fc.")}
    if not head or any(m is None for m in head.values()) or len({m.group(1) for m in head.values()}) != 1:
        return state, None
    index = next(iter(head.values())).group(1)
    weight = state.get(f"fc.{index}.weight")
    if weight is None or weight.ndim != 2:
        return state, None
    out = {}
    for k, v in state.items():
        m = head.get(k)
        out[f"fc.{m.group(2)}" if m is not None else k] = v
    return out, (f"classifier head fc.{index} (the only layer with weights in a Sequential) loaded as a plain fc; "
                 "parameter-free layers around it (e.g. Dropout) are dropped, which is exact at inference unless "
                 "the head ends in an activation such as Softmax (then load the whole module with --trust-pickle)")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` / ``_orig_mod.`` / ``model.`` prefixes that every key shares (repeatedly), and any
    other prefix every key shares when the ResNet's keys sit under it (``net.``, ``backbone.`` ...)."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    prefixes = resnet_prefixes(state)
    if len(prefixes) == 1 and prefixes[0] and all(k.startswith(prefixes[0]) for k in state):
        state = {k[len(prefixes[0]):]: v for k, v in state.items()}
    return state


def resnet_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    """The key prefixes under which a torchvision-style ResNet sits (``""`` for one at the top level)."""
    return sorted(k[: -len("conv1.weight")] for k in state
                  if k.endswith("conv1.weight") and f"{k[: -len('conv1.weight')]}layer1.0.conv1.weight" in state)


def select_resnet(state: dict[str, torch.Tensor], what: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The ResNet's keys when a state_dict also holds other things, e.g. a Lightning module's ``net.*``
    beside its loss's buffers: (state, note). Several ResNets (a teacher and a student) are refused."""
    state = strip_prefixes(state)
    prefixes = resnet_prefixes(state)
    if not prefixes:
        return state, None
    if "" in prefixes:  # the model at the top level, maybe with a copy under a prefix (e.g. "ema.")
        others = tuple(q for q in prefixes if q)
        if not others:
            return state, None
        kept = {k: v for k, v in state.items() if not k.startswith(others)}
        return kept, (f"loaded the top-level ResNet; {len(state) - len(kept)} key(s) of the copy under "
                      f"{', '.join(repr(q) for q in others)} ignored")
    if len(prefixes) > 1:
        raise UnsupportedModelError(
            f"{what} holds {len(prefixes)} ResNets (under {', '.join(repr(q) for q in prefixes[:4])}); save the "
            "state_dict of the one to compress on its own"
        )
    prefix = prefixes[0]
    kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return kept, f"loaded the ResNet under {prefix!r}; {len(state) - len(kept)} other key(s) ignored"


# ------------------------------------------------------------------------------------------ inference
def infer_resnet_spec(state: dict[str, torch.Tensor], what: str = "state_dict") -> ResNetSpec:
    """Read a ResNet's structure from state_dict keys and shapes; raise if it is not a ResNet."""
    state = strip_prefixes(state)
    stem, fc = state.get("conv1.weight"), state.get("fc.weight")
    if fc is None:
        # A replaced head (e.g. fc = Sequential(Dropout, Linear)): its last matrix gives the class count.
        fc = next((v for k, v in reversed(state.items()) if k.startswith("fc.") and k.endswith(".weight")
                   and v.ndim == 2), None)
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if stem is None or stem.ndim != 4 or fc is None or fc.ndim != 2 or not blocks:
        sample = sorted(state)[:6]
        raise UnsupportedModelError(
            f"{what}: the state_dict is not a torchvision-style ResNet (needs conv1.weight, layerN.i.* and "
            f"fc.weight; found {len(state)} keys such as {sample}); pass --arch if it is one"
        )
    stages = sorted(blocks)
    if stages != list(range(1, len(stages) + 1)):
        raise UnsupportedModelError(f"{what}: ResNet stages must be layer1..layerN, found layers {stages}")
    layers = []
    for s in stages:
        idx = sorted(blocks[s])
        if idx != list(range(len(idx))):
            raise UnsupportedModelError(f"{what}: blocks of layer{s} are not numbered 0..n-1: {idx}")
        layers.append(len(idx))
    bottleneck = [f"layer{s}.{i}.conv3.weight" in state for s in stages for i in range(layers[s - 1])]
    if any(bottleneck) and not all(bottleneck):
        raise UnsupportedModelError(f"{what}: mixes basic and bottleneck blocks; not a torchvision ResNet")
    block = "bottleneck" if bottleneck[0] else "basic"
    groups, width = 1, 64
    if block == "bottleneck":
        conv1, conv2 = state["layer1.0.conv1.weight"], state["layer1.0.conv2.weight"]
        # conv2 sees all of conv1's outputs split into groups: weight is [out, in/groups, 3, 3].
        groups = max(1, int(conv1.shape[0]) // int(conv2.shape[1]))
        # torchvision: width = planes * width_per_group / 64 * groups, and planes = 64 in layer1.
        width = int(conv1.shape[0]) // groups
    num_classes, in_channels = int(fc.shape[0]), int(stem.shape[1])
    if len(stages) == 3 and stem.shape[-1] == 3 and block == "basic":
        name = _CIFAR_TABLE.get(layers[0]) if len(set(layers)) == 1 else None
        return ResNetSpec("cifar", block, tuple(layers), 1, 16, num_classes, in_channels, name)
    if len(stages) == 4:
        name = _TORCHVISION_TABLE.get((block, tuple(layers), groups, width))
        stems = stem_candidates(int(stem.shape[-1])) if stem.shape[-1] == stem.shape[-2] else []
        if not stems:
            raise UnsupportedModelError(f"{what}: conv1 has a non-square kernel {tuple(stem.shape[-2:])}")
        return ResNetSpec("torchvision", block, tuple(layers), groups, width, num_classes, in_channels, name,
                          stems[0])
    raise UnsupportedModelError(
        f"{what}: a ResNet with {len(stages)} stages and a {tuple(stem.shape[-2:])} stem is neither torchvision "
        "(4 stages, 7x7 stem) nor CIFAR-style (3 stages, 3x3 stem)"
    )


def spec_for_arch(arch: str, num_classes: int, in_channels: int, stem: Stem = Stem()) -> ResNetSpec:
    """The structure a named architecture has (``stem``: for torchvision ones)."""
    if arch in CIFAR_ARCHS:
        n = next(k for k, v in _CIFAR_TABLE.items() if v == arch)
        return ResNetSpec("cifar", "basic", (n, n, n), 1, 16, num_classes, in_channels, arch)
    for (block, layers, groups, width), name in _TORCHVISION_TABLE.items():
        if name == arch:
            return ResNetSpec("torchvision", block, layers, groups, width, num_classes, in_channels, arch, stem)
    raise UnsupportedModelError(f"unknown architecture {arch!r}")


def build_from_spec(spec: ResNetSpec) -> nn.Module:
    """An untrained module with ``spec``'s structure (standard widths)."""
    if spec.arch is not None:
        return build_model(spec.arch, spec.num_classes, spec.in_channels,
                           stem=spec.stem if spec.family == "torchvision" else None)
    if spec.family == "cifar":
        if len(set(spec.layers)) != 1:
            raise UnsupportedModelError(f"CIFAR-style ResNet with unequal stages {spec.layers} is not supported")
        return CifarResNet(spec.layers[0], spec.num_classes, spec.in_channels)
    block = tv_resnet.Bottleneck if spec.block == "bottleneck" else tv_resnet.BasicBlock
    if block is tv_resnet.BasicBlock and (spec.groups != 1 or spec.width_per_group != 64):
        raise UnsupportedModelError("basic-block ResNets with groups or a non-64 width are not supported")
    model = tv_resnet.ResNet(
        block, list(spec.layers), num_classes=spec.num_classes, groups=spec.groups,
        width_per_group=spec.width_per_group,
    )
    if spec.in_channels != 3 or not spec.stem.standard:
        set_stem(model, spec.stem, spec.in_channels)
    return model


def _candidates(spec: ResNetSpec) -> list[ResNetSpec]:
    """Named architectures with ``spec``'s structure, for a state_dict whose widths match none exactly."""
    out = []
    if spec.family == "cifar":
        name = _CIFAR_TABLE.get(spec.layers[0]) if len(set(spec.layers)) == 1 else None
        if name:
            out.append(spec_for_arch(name, spec.num_classes, spec.in_channels))
    else:
        for (block, layers, groups, width), name in _TORCHVISION_TABLE.items():
            if block == spec.block and layers == spec.layers and groups == spec.groups:
                out.append(ResNetSpec("torchvision", block, layers, groups, width, spec.num_classes,
                                      spec.in_channels, name, spec.stem))
        out.sort(key=lambda s: s.width_per_group)
    return out


def build_from_state_dict(
    state: dict[str, torch.Tensor], arch: str | None = None, what: str = "state_dict"
) -> tuple[nn.Module, ResNetSpec, bool]:
    """Build the module ``state`` belongs to and load it: (module in eval mode, spec, pruned).

    Shapes smaller than the architecture's (pruned channels) are accepted: those layers are rebuilt at
    the stored widths. ``arch`` forces the architecture; weights that do not fit it raise.
    """
    state = strip_prefixes(state)
    if arch is not None:
        fc, stem = state.get("fc.weight"), state.get("conv1.weight")
        if fc is None or stem is None or fc.ndim != 2 or stem.ndim != 4:
            raise UnsupportedModelError(f"{what}: no conv1.weight / fc.weight, so the weights do not fit --arch {arch}")
        try:
            inferred: ResNetSpec | None = infer_resnet_spec(state, what)
        except UnsupportedModelError:
            inferred = None
        specs = [spec_for_arch(arch, int(fc.shape[0]), int(stem.shape[1]),
                               inferred.stem if inferred is not None else Stem())]
    else:
        inferred = infer_resnet_spec(state, what)
        specs = [inferred] if inferred.arch is not None else []
        specs += [s for s in _candidates(inferred) if s.arch != inferred.arch]
        if not specs:
            specs = [inferred]
    errors = []
    for spec in specs:
        try:
            module, pruned = _load_into(spec, state)
        except _DoesNotFit as exc:
            errors.append(f"{spec.name}: {exc}")
            continue
        return module, spec, pruned
    if arch is not None:
        found = f"it looks like {inferred.name}" if inferred is not None else "it is not a torchvision-style ResNet"
        raise UnsupportedModelError(f"{what}: the weights do not fit --arch {arch} ({found}; {errors[0]})")
    raise UnsupportedModelError(
        f"{what}: found a {inferred.block}-block ResNet {list(inferred.layers)} (groups {inferred.groups}, width "
        f"{inferred.width_per_group}) whose weights fit no architecture: {errors[0]}"
    )


class _DoesNotFit(Exception):
    pass


def _load_into(spec: ResNetSpec, state: dict[str, torch.Tensor]) -> tuple[nn.Module, bool]:
    # Build on the meta device: no memory and no random init for weights that are replaced at once.
    with torch.device("meta"):
        model = build_from_spec(spec)
        pruned = _fit_shapes(model, state)
    expected = set(model.state_dict())
    # BatchNorm's step counter is not used at inference; old PyTorch versions and some converters omit it.
    state = {**{k: torch.tensor(0, dtype=torch.long) for k in expected - set(state)
                if k.endswith(".num_batches_tracked")}, **state}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise _DoesNotFit(f"missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")
    for name, t in model.state_dict().items():
        if tuple(t.shape) != tuple(state[name].shape):
            raise _DoesNotFit(f"{name} has shape {tuple(state[name].shape)}, expected {tuple(t.shape)}")
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()},
                          assign=True)
    left = [n for n, t in model.state_dict().items() if t.is_meta]
    if left:
        raise _DoesNotFit(f"tensors not loaded: {left[:4]}")
    model.eval()
    return model, pruned


def _fit_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Rebuild Conv/BN/Linear layers whose stored shape is smaller (pruned), and Linear layers stored
    without a bias; True if a shape changed (the model is pruned).

    A stored dimension larger than the architecture's cannot come from pruning it: that means another
    architecture, so it raises.
    """
    changed = False
    for name, m in list(model.named_modules()):
        w = state.get(f"{name}.weight")
        if w is None or not isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.Linear):
            continue
        want, got = tuple(m.weight.shape), tuple(w.shape)
        bias_dropped = isinstance(m, nn.Linear) and m.bias is not None and f"{name}.bias" not in state
        if want == got and not bias_dropped:  # (a classifier saved without bias is rebuilt without one)
            continue
        if len(want) != len(got) or any(g > e for g, e in zip(got, want, strict=True)):
            raise _DoesNotFit(f"{name}.weight has shape {got}, expected {want} or smaller (pruned)")
        has_bias = f"{name}.bias" in state
        if isinstance(m, nn.Conv2d):
            if got[2:] != want[2:]:
                raise _DoesNotFit(f"{name}.weight has kernel {got[2:]}, expected {want[2:]}")
            new: nn.Module = nn.Conv2d(got[1] * m.groups, got[0], m.kernel_size, m.stride, m.padding,
                                       m.dilation, m.groups, bias=has_bias)
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(got[0], eps=m.eps, momentum=m.momentum)
        else:
            new = nn.Linear(got[1], got[0], bias=has_bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        changed = changed or want != got
    return changed


# ------------------------------------------------------------------------------------------ assembling
def _from_spec(
    module: nn.Module, spec: ResNetSpec, pruned: bool, source: str, p: Path, arch: str | None
) -> _Partial:
    return _Partial(module, arch or spec.name, spec.num_classes, spec.in_channels, source, p,
                    pruned=pruned, spec=spec)


def _from_module(module: nn.Module, p: Path, arch: str | None, source: str) -> _Partial:
    module = module.to("cpu").eval()
    state = module.state_dict()
    try:
        spec: ResNetSpec | None = infer_resnet_spec(state, str(p))
    except UnsupportedModelError:
        spec = None
    if spec is not None and spec.family == "torchvision":
        stem = stem_of(module)
        if stem is None:
            spec = None  # a stem no builder makes: keep the module, but nothing can be rebuilt from a spec
        else:
            spec = replace(spec, stem=stem)
    if spec is not None:
        if arch is not None and spec.arch is not None and spec.arch != arch:
            raise UnsupportedModelError(f"{p} holds a {spec.arch}, not {arch}; drop --arch")
        pruned = _differs_from_standard(spec, state)
        part = _Partial(module, arch or spec.name, spec.num_classes, spec.in_channels, source, p,
                        pruned=pruned, spec=spec)
        if "fc.weight" not in state:
            head = sorted(k for k in state if k.startswith("fc."))
            part.notes.append(f"custom classifier head ({', '.join(head[:4])})")
        return part
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not convs or not linears:
        missing = "Conv2d or Linear layers" if not convs and not linears else ("a Conv2d" if not convs else
                                                                            "a Linear classifier")
        raise UnsupportedModelError(
            f"{p} holds a {type(module).__qualname__} without {missing}; not an image classifier"
            + (" (a feature extractor whose fc is Identity?)" if convs else "")
        )
    return _Partial(module, arch or type(module).__qualname__, linears[-1].out_features, convs[0].in_channels,
                    source, p)


def _differs_from_standard(spec: ResNetSpec, state: dict[str, torch.Tensor]) -> bool:
    """True when some stored shape in the body differs from the (nearest) named architecture's: a pruned
    model. The classifier is left out: its input grows with a custom pooling (e.g. 2x2 positions), not with
    pruning, and a pruned last stage shows in the convolutions already."""
    ref = spec if spec.arch is not None else next(iter(_candidates(spec)), spec)
    with torch.device("meta"):
        standard = build_from_spec(ref).state_dict()
    return any(k in state and tuple(v.shape) != tuple(state[k].shape)
               for k, v in standard.items() if not k.startswith("fc."))


def _default_preprocess(arch_or_family: str, in_channels: int) -> Preprocess:
    if in_channels not in (1, 3):
        raise UnsupportedModelError(
            f"the model takes {in_channels}-channel input; only 1- or 3-channel (grayscale/RGB) images are supported"
        )
    if arch_or_family == "cifar":
        return get_preset("fashion-mnist") if in_channels == 1 else get_preset("cifar")
    return get_preset("imagenet").with_overrides(channels=in_channels)


def _finish(part: _Partial, input_size: int | tuple[int, int] | None) -> LoadedModel:
    spec = part.spec
    small = spec is not None and (spec.family == "cifar" or (spec.stem.stride == 1 and not spec.stem.maxpool))
    # A stride-1 stem without the max-pool is made for small images: CIFAR-sized defaults, not 224x224.
    family = "cifar" if small or part.arch in CIFAR_ARCHS else ""
    pre = part.preprocess or _default_preprocess(family or part.arch, part.in_channels)
    if pre.channels != part.in_channels:
        pre = pre.with_overrides(channels=part.in_channels)
    if input_size is not None:
        pre = pre.with_overrides(size=input_size)
    module = part.module.to("cpu").eval()
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in module.state_dict().values()):
        # Every later stage (calibration, export, ORT parity) works in float32.
        module = module.float()
        part.notes.append("weights converted to float32")
    return LoadedModel(
        module=module,
        arch=part.arch,
        num_classes=part.num_classes,
        in_channels=part.in_channels,
        preprocess=pre,
        source_format=part.source_format,
        path=part.path,
        params=count_params(module),
        macs=model_macs(module, pre.input_shape(1)),
        pruned=part.pruned,
        spec=part.spec,
        notes=tuple(part.notes),
    )


def model_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs at ``input_shape``, by :func:`rescompress.profile.count_macs`'s convention.

    Eager modules run once on the meta device (shapes only, no arithmetic: a 224x224 wide_resnet101_2
    costs nothing instead of seconds); a module that cannot run on meta falls back to a real forward.
    TorchScript modules use torch's op-level FLOP counter.
    """
    if not isinstance(module, torch.jit.ScriptModule):
        try:
            return _meta_macs(module, input_shape)
        except Exception:
            return count_macs(module, input_shape)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            module(torch.zeros(input_shape))
    except Exception as exc:
        raise RescompressError(f"cannot run the model at input shape {tuple(input_shape)}: {exc}") from None
    # The counter reports FLOPs as 2 per multiply-accumulate for conv and matmul.
    return int(counter.get_total_flops()) // 2


# ------------------------------------------------------------------------------------------ ONNX files
@dataclass(frozen=True)
class OnnxSummary:
    """What ``inspect`` reports for an ONNX file: its I/O contract, opset, size and Q/DQ structure."""

    path: Path
    opset: int | None
    ir_version: int
    producer: str
    input_name: str
    input_shape: tuple[int | str | None, ...]
    output_name: str
    output_shape: tuple[int | str | None, ...]
    num_classes: int | None
    in_channels: int | None
    input_size: tuple[int, int] | None
    arch: str | None
    preprocess: Preprocess | None
    params: int
    macs: int | None
    nodes: int
    op_counts: dict[str, int]
    qdq_nodes: int
    metadata: dict[str, str]

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "source_format": "onnx", "opset": self.opset, "ir_version": self.ir_version,
            "producer": self.producer, "input_name": self.input_name, "input_shape": list(self.input_shape),
            "output_name": self.output_name, "output_shape": list(self.output_shape),
            "num_classes": self.num_classes, "in_channels": self.in_channels,
            "input_size": list(self.input_size) if self.input_size else None, "arch": self.arch,
            "preprocess": self.preprocess.to_dict() if self.preprocess else None, "params": self.params,
            "macs": self.macs, "nodes": self.nodes, "op_counts": dict(self.op_counts),
            "qdq_nodes": self.qdq_nodes, "metadata": dict(self.metadata),
        }


def onnx_summary(path: Path | str, input_size: int | tuple[int, int] | None = None) -> OnnxSummary:
    """Read an ONNX classifier's graph (no inference session): shapes, opset, params, MACs, Q/DQ count.

    The I/O contract comes from :func:`rescompress.export.read_onnx_info`. MACs (Conv, Gemm, MatMul) are
    counted on the shape-inferred graph at batch 1 and ``input_size`` (default: the file's size).
    """
    import onnx

    from rescompress.export import read_onnx_info
    from rescompress.profile import count_onnx_params

    p = Path(path)
    _check_file(p)
    info = read_onnx_info(p, runnable=False)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise UnsupportedModelError(f"{p} is not a readable ONNX model ({type(exc).__name__})") from None
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    inp = next(i for i in graph.input if i.name not in inits)
    out = graph.output[0]
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    from rescompress.quantization.stem import stem_kernels

    kernels = stem_kernels(proto)
    params = count_onnx_params(graph, kernels)
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    size = tuple(input_size) if input_size else info.input_size
    macs = _onnx_macs(proto, inp.name, info.in_channels, size) if size else None
    return OnnxSummary(
        path=p, opset=info.opset, ir_version=int(proto.ir_version), producer=proto.producer_name,
        input_name=inp.name, input_shape=_shape(inp), output_name=out.name, output_shape=_shape(out),
        num_classes=info.num_classes, in_channels=info.in_channels, input_size=size, arch=info.arch,
        preprocess=info.preprocess, params=params, macs=macs, nodes=len(graph.node), op_counts=ops,
        qdq_nodes=ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0), metadata=info.metadata,
    )


def _shape(value_info) -> tuple[int | str | None, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)


def _onnx_macs(proto, input_name: str, channels: int, size: tuple[int, int]) -> int | None:
    """Multiply-accumulates of Conv/Gemm/MatMul at batch 1, from ONNX shape inference; None if unknown."""
    import onnx

    from rescompress.quantization.stem import stem_kernels

    kernels = stem_kernels(proto)

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    # Shapes stored at export time would contradict a different input size: infer them afresh.
    del model.graph.value_info[:]
    for vi in model.graph.output:
        vi.type.tensor_type.ClearField("shape")
    for vi in model.graph.input:
        if vi.name == input_name:
            for d, v in zip(vi.type.tensor_type.shape.dim, (1, channels, *size), strict=False):
                d.Clear()
                d.dim_value = v
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return None
    shapes: dict[str, tuple[int, ...]] = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w, y = shapes.get(node.input[1]), shapes.get(node.output[0])
        if w is None or y is None:
            return None
        n_out = 1
        for d in y:
            n_out *= d
        if node.op_type == "Conv":
            k = 1
            for d in w[1:]:  # (in / groups) * kh * kw
                k *= d
            k = kernels.get(node.name, k)  # a space-to-depth stem's zero taps left out
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            k = w[1] if trans_b else w[0]
        else:
            k = w[-2]
        total += n_out * k
    return int(total)


def _meta_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    tensors = {
        name: torch.empty_like(t, device="meta")
        for name, t in (*module.named_parameters(remove_duplicate=False),
                        *module.named_buffers(remove_duplicate=False))
    }
    handles = [
        m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
        for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            torch.func.functional_call(module, tensors, (torch.empty(input_shape, device="meta"),))
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return int(total)
