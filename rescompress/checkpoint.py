"""The project's own model file: safetensors weights plus an architecture header, loadable with no pickle.

A checkpoint stores the architecture name, class count, input channels and preprocessing in the
safetensors metadata, and the state_dict as tensors. Pruned models need no separate width table: the
tensor shapes *are* the widths, and :func:`load_state_dict_resizing` rebuilds every Conv/BN/Linear whose
stored shape differs from the freshly built architecture. A per-layer width summary is still written to
the header for people and tools that read it. A BN-folded model (``folded`` in the header) is stored as
it runs: convs carry a bias and the folded BatchNorms are ``nn.Identity``; :func:`load_checkpoint` gives
the rebuilt architecture that same structure before loading the weights. A torchvision ResNet whose stem
differs from torchvision's (e.g. 3x3 stride 1 without the max-pool, for small images) has it recorded as
``stem``, and a classifier head other than one ``Linear`` (e.g. ``Sequential(Linear, ReLU, Dropout,
Linear)``) as ``head``; both are rebuilt the same way. Every save is checked by loading the written file
and comparing its outputs with the module's: a structure the header cannot describe is refused, never
written as a file that loads as another model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rescompress import __version__
from rescompress.errors import RescompressError, UnsupportedModelError
from rescompress.fileio import atomic_path
from rescompress.folding import count_batchnorm
from rescompress.models import ARCH_NAMES, Stem, build_model, outputs_match, stem_of
from rescompress.spec import Preprocess

FORMAT_NAME = "rescompress.checkpoint"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class CheckpointHeader:
    arch: str
    num_classes: int
    in_channels: int
    preprocess: Preprocess | None
    pruned: bool = False
    extra: dict | None = None
    folded: bool = False
    stem: Stem | None = None  # recorded only when it is not torchvision's
    head: tuple[dict, ...] | None = None  # the layers of an ``fc`` that is not a single biased Linear
    structure: dict | None = None  # block, layers, groups, width of a ResNet no builder is named after

    def to_metadata(self, widths: dict[str, int]) -> dict[str, str]:
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "arch": self.arch,
            "num_classes": str(self.num_classes),
            "in_channels": str(self.in_channels),
            "pruned": "1" if self.pruned else "0",
            "folded": "1" if self.folded else "0",
            "widths": json.dumps(widths, sort_keys=True),
        }
        if self.preprocess is not None:
            meta["preprocess"] = self.preprocess.to_json()
        if self.extra:
            meta["extra"] = json.dumps(self.extra, sort_keys=True)
        if self.stem is not None and not self.stem.standard:
            meta["stem"] = json.dumps(self.stem.to_dict(), sort_keys=True)
        if self.head:
            meta["head"] = json.dumps(list(self.head))
        if self.structure:
            meta["structure"] = json.dumps(self.structure, sort_keys=True)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> CheckpointHeader:
        pre = meta.get("preprocess")
        return cls(
            arch=meta["arch"],
            num_classes=int(meta["num_classes"]),
            in_channels=int(meta["in_channels"]),
            preprocess=Preprocess.from_dict(json.loads(pre)) if pre else None,
            pruned=meta.get("pruned") == "1",
            extra=json.loads(meta["extra"]) if meta.get("extra") else None,
            folded=meta.get("folded") == "1",
            stem=Stem.from_dict(json.loads(meta["stem"])) if meta.get("stem") else None,
            head=tuple(json.loads(meta["head"])) if meta.get("head") else None,
            structure=json.loads(meta["structure"]) if meta.get("structure") else None,
        )


def layer_widths(module: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d and output features of every Linear, by module name."""
    widths = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            widths[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            widths[name] = m.out_features
    return widths


# Classifier-head layers a header can describe: constructor arguments read from the module's attributes.
_HEAD_LAYERS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features")),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "Dropout": (nn.Dropout, ("p",)),
    "Identity": (nn.Identity, ()),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "ReLU": (nn.ReLU, ()),
    "ReLU6": (nn.ReLU6, ()),
    "GELU": (nn.GELU, ("approximate",)),
    "SiLU": (nn.SiLU, ()),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
    "Sigmoid": (nn.Sigmoid, ()),
    "Tanh": (nn.Tanh, ()),
    "Softmax": (nn.Softmax, ("dim",)),
    "LogSoftmax": (nn.LogSoftmax, ("dim",)),
}


def head_spec(module: nn.Module) -> tuple[dict, ...] | None:
    """The layers of ``module.fc`` when it is not one biased Linear (``None`` then); raises for a head
    with a layer a header cannot describe."""
    fc = getattr(module, "fc", None)
    if fc is None or (type(fc) is nn.Linear and fc.bias is not None):
        return None
    layers = list(fc) if type(fc) is nn.Sequential else [fc]
    out = []
    for i, layer in enumerate(layers):
        kind = type(layer).__name__
        if kind not in _HEAD_LAYERS or type(layer) is not _HEAD_LAYERS[kind][0]:
            where = f"fc.{i}" if type(fc) is nn.Sequential else "fc"
            raise UnsupportedModelError(
                f"the classifier head holds a {type(layer).__qualname__} ({where}), which a checkpoint cannot "
                f"describe; supported: {', '.join(_HEAD_LAYERS)}"
            )
        args = {a: getattr(layer, a) for a in _HEAD_LAYERS[kind][1]}
        if kind == "Linear":
            args["bias"] = layer.bias is not None
        out.append({"type": kind, "args": args, "sequential": type(fc) is nn.Sequential})
    return tuple(out)


def build_head(spec: tuple[dict, ...]) -> nn.Module:
    """The ``fc`` module :func:`head_spec` described."""
    layers = [_HEAD_LAYERS[d["type"]][0](**d["args"]) for d in spec]
    return nn.Sequential(*layers) if spec[0].get("sequential", True) else layers[0]


def save_checkpoint(module: nn.Module, path: Path | str, header: CheckpointHeader) -> Path:
    """Write ``module``'s state_dict and ``header`` to ``path`` atomically (safetensors format).

    The stem and the classifier head are read from ``module`` itself, so a modified one is recorded
    whoever builds the header. The written file is loaded back and must compute what ``module`` does
    (:func:`_check_reloads`); otherwise nothing is written and the difference is named.
    """
    if isinstance(module, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            "a TorchScript archive that does not rebuild as an eager torchvision-style ResNet cannot be pruned, "
            "folded or saved as a checkpoint; use the eager model (its state_dict or a rescompress checkpoint)"
        )
    # A model without BatchNorm layers was folded (e.g. a folded checkpoint pruned again).
    folded = header.folded or count_batchnorm(module) == 0
    header = replace(header, stem=stem_of(module), head=head_spec(module), structure=_structure(module, header),
                     folded=folded)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header.to_metadata(layer_widths(module)))
        _sort_header(tmp)
        _check_reloads(module, tmp, header)
    return Path(path)


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place (same length: only the order changes).

    safetensors writes the header's keys in hash-map order, which differs from run to run; sorted, the same
    model and header give the same bytes every time (files can be compared and cached by hash).
    """
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        head = json.loads(raw)
        if isinstance(head.get("__metadata__"), dict):
            head["__metadata__"] = dict(sorted(head["__metadata__"].items()))
        text = json.dumps(head, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # cannot happen for the same keys and values; keep the file as written then
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def _structure(module: nn.Module, header: CheckpointHeader) -> dict | None:
    """For an architecture without a builder name (e.g. a [1, 1, 1, 1] basic-block ResNet): its structure
    as read from the weights, enough to build it again."""
    if header.arch in ARCH_NAMES:
        return None
    from rescompress.loading import infer_resnet_spec

    try:
        spec = infer_resnet_spec(module.state_dict(), header.arch)
    except UnsupportedModelError:
        raise UnsupportedModelError(
            f"a {header.arch} model is not a torchvision-style ResNet that a rescompress checkpoint can rebuild; "
            "`rescompress export` writes it as ONNX (folding BatchNorm too)"
        ) from None
    return {"family": spec.family, "block": spec.block, "layers": list(spec.layers), "groups": spec.groups,
            "width_per_group": spec.width_per_group}


def _build(header: CheckpointHeader) -> nn.Module:
    if header.structure is None:
        return build_model(header.arch, header.num_classes, header.in_channels, stem=header.stem)
    from rescompress.loading import ResNetSpec, build_from_spec

    st = header.structure
    return build_from_spec(ResNetSpec(st["family"], st["block"], tuple(st["layers"]), int(st["groups"]),
                                      int(st["width_per_group"]), header.num_classes, header.in_channels, None,
                                      header.stem or Stem()))


def check_saveable(module: nn.Module, header: CheckpointHeader) -> None:
    """Raise now if ``module`` could not be saved with ``header`` (before hours of pruning and fine-tuning)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rescompress-") as d:
        save_checkpoint(module, Path(d) / "probe.safetensors", header)


def _check_reloads(module: nn.Module, path: Path, header: CheckpointHeader) -> None:
    """Raise unless the checkpoint at ``path`` rebuilds a module with ``module``'s outputs."""
    try:
        loaded, _ = load_checkpoint(path)
    except UnsupportedModelError as exc:
        why = str(exc).replace(f"{path}: ", "")  # the temporary file's name means nothing to the user
        raise UnsupportedModelError(f"the model cannot be saved as a {header.arch} checkpoint: {why}") from None
    # The model's own input size when known: some models only run at it (e.g. a fixed AvgPool2d(7)).
    size = header.preprocess.size if header.preprocess is not None else (64, 64)
    probe = torch.randn(1, header.in_channels, *size, generator=torch.Generator().manual_seed(0))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            device = next((t.device for t in module.parameters()), torch.device("cpu"))
            ref = module(probe.to(device)).float().cpu()
            got = loaded(probe)
    except Exception as exc:
        raise UnsupportedModelError(
            f"cannot check that the saved {header.arch} reloads: it fails on a {tuple(probe.shape)} input "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); pass its --input-size"
        ) from None
    finally:
        module.train(was_training)
    if not outputs_match(ref, got):
        mine = {n: f"{type(m).__name__}({m.extra_repr()})" for n, m in module.named_modules() if n}
        theirs = {n: f"{type(m).__name__}({m.extra_repr()})" for n, m in loaded.named_modules() if n}
        differ = [f"{n}: {t}" for n, t in mine.items() if theirs.get(n) != t][:4]
        raise UnsupportedModelError(
            f"the model cannot be saved as a {header.arch} checkpoint: rebuilt from the file it computes something "
            f"else ({'; '.join(differ) if differ else 'same layers, different wiring'})"
        )


def read_header(path: Path | str) -> CheckpointHeader | None:
    """The checkpoint header if ``path`` is a rescompress checkpoint, else ``None`` (never raises)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return None
    if meta.get("format") != FORMAT_NAME:
        return None
    return CheckpointHeader.from_metadata(meta)


def load_checkpoint(path: Path | str) -> tuple[nn.Module, CheckpointHeader]:
    header = read_header(path)
    if header is None:
        raise UnsupportedModelError(f"{path} is not a rescompress checkpoint")
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
    try:
        model = _build(header)
    except RescompressError as exc:
        raise UnsupportedModelError(f"{path}: {exc}") from None
    if header.head:
        model.fc = build_head(header.head)
    if header.folded:
        apply_folded_structure(model, state)
    load_state_dict_resizing(model, state)
    model.eval()
    return model, header


def load_state_dict_resizing(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load ``state`` into ``model``, first rebuilding layers whose stored shapes differ (pruned widths)."""
    for name, m in list(model.named_modules()):
        key = f"{name}.weight" if name else "weight"
        if key not in state:
            continue
        shape = tuple(state[key].shape)
        replacement = _resized_like(m, shape, has_bias=f"{name}.bias" in state)
        if replacement is not None:
            _set_submodule(model, name, replacement)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that resizing cannot explain (e.g. a kernel size)
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc).splitlines()[0])
        raise UnsupportedModelError(f"weights do not match the architecture: {detail}") from None
    if missing or unexpected:
        raise UnsupportedModelError(
            f"weights do not match the architecture: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model


def apply_folded_structure(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Give a freshly built model the structure of a BN-folded one whose weights are in ``state``.

    Every BatchNorm without stored running statistics was folded: it becomes ``nn.Identity``. Every
    Conv/Linear with a stored bias it does not have gets one (its values come from ``state``).
    """
    for name, m in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{prefix}running_mean" not in state:
            _set_submodule(model, name, nn.Identity())
        elif isinstance(m, nn.Conv2d | nn.Linear) and m.bias is None and f"{prefix}bias" in state:
            m.bias = nn.Parameter(torch.zeros_like(state[f"{prefix}bias"]))
    return model


def _resized_like(m: nn.Module, shape: tuple[int, ...], has_bias: bool) -> nn.Module | None:
    if isinstance(m, nn.Conv2d) and shape != tuple(m.weight.shape):
        return nn.Conv2d(
            shape[1] * m.groups, shape[0], m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
            bias=has_bias,
        )
    if isinstance(m, nn.BatchNorm2d) and shape != tuple(m.weight.shape):
        return nn.BatchNorm2d(shape[0], eps=m.eps, momentum=m.momentum)
    if isinstance(m, nn.Linear) and shape != tuple(m.weight.shape):
        return nn.Linear(shape[1], shape[0], bias=has_bias)
    return None


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
