"""Model builders: the reference CIFAR-style ResNets and torchvision's ResNet family by name.

The reference ResNet-20/32/56 (He et al. 2016, section 4.2) reuse torchvision's ``BasicBlock`` so that
their state_dict keys (``conv1``, ``bn1``, ``layerN.i.conv1``, ``downsample.0`` ...) look like every other
torchvision ResNet and every stage treats them alike. Downsampling uses a 1x1 conv + BN ("option B"),
which keeps the graph a plain torchvision graph (no padding lambdas) and exports cleanly to ONNX.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.resnet import BasicBlock, conv1x1, conv3x3

from rescompress.errors import RescompressError, UsageError


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stem, three stages of ``depth`` BasicBlocks (16/32/64 channels)."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.inplanes = 16
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_layer(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each block so every block starts as identity (trains faster).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(3, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(5, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(9, num_classes, in_channels)


CIFAR_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
}

TORCHVISION_ARCHS: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)

ARCH_NAMES: tuple[str, ...] = tuple(CIFAR_ARCHS) + TORCHVISION_ARCHS


@dataclass(frozen=True)
class Stem:
    """The stem of a torchvision-style ResNet: ``conv1``'s square kernel, stride and padding, and whether
    the 3x3 stride-2 max-pool follows it.

    torchvision's is 7x7 stride 2 with the max-pool. Models trained on small images (CIFAR-sized) often
    replace it with a 3x3 stride-1 convolution and drop the max-pool; the state_dict keeps only the kernel
    size, so files that do not record the rest get that assumption (:func:`stem_candidates`' first).
    """

    kernel: int = 7
    stride: int = 2
    padding: int = 3
    maxpool: bool = True

    @property
    def standard(self) -> bool:
        return self == Stem()

    def describe(self) -> str:
        k = self.kernel
        return f"{k}x{k} stride-{self.stride} stem {'with' if self.maxpool else 'without'} max-pool"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Stem:
        return cls(int(d["kernel"]), int(d["stride"]), int(d["padding"]), bool(d["maxpool"]))


def stem_candidates(kernel: int) -> list[Stem]:
    """Stems a ``kernel``-sized ``conv1`` may belong to, the likeliest first (state_dicts store no stride)."""
    if kernel == 7:
        return [Stem()]
    pad = kernel // 2
    return [Stem(kernel, 1, pad, False), Stem(kernel, 1, pad, True), Stem(kernel, 2, pad, True),
            Stem(kernel, 2, pad, False)]


def stem_of(model: nn.Module) -> Stem | None:
    """The stem of a torchvision-style ResNet module; ``None`` for other modules or an unusual stem."""
    conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if not isinstance(conv, nn.Conv2d) or pool is None:
        return None
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    if isinstance(p, str) or len({*k}) != 1 or len({*s}) != 1 or len({*p}) != 1 or conv.dilation != (1, 1):
        return None
    if isinstance(pool, nn.Identity):
        maxpool = False
    elif isinstance(pool, nn.MaxPool2d) and _pair(pool.kernel_size) == (3, 3) and _pair(pool.stride) == (2, 2) \
            and _pair(pool.padding) == (1, 1) and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode:
        maxpool = True
    else:
        return None
    return Stem(k[0], s[0], p[0], maxpool)


def outputs_match(ref: torch.Tensor, got: torch.Tensor) -> bool:
    """Whether two modules' outputs on the same input are the same computation (float32 rounding apart)."""
    return (isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor) and ref.shape == got.shape
            and torch.allclose(ref, got, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max()))))


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, tuple | list) else (v, v)


def set_stem(model: nn.Module, stem: Stem, in_channels: int) -> nn.Module:
    """Give a freshly built torchvision ResNet ``stem`` (a new, untrained ``conv1``; the max-pool or none)."""
    model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, kernel_size=stem.kernel, stride=stem.stride,
                            padding=stem.padding, bias=False)
    model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem.maxpool else nn.Identity()
    return model


def build_model(arch: str, num_classes: int = 1000, in_channels: int = 3, stem: Stem | None = None) -> nn.Module:
    """Build an untrained model by architecture name (see ``ARCH_NAMES``); ``stem`` replaces torchvision's."""
    if arch in CIFAR_ARCHS:
        if stem is not None and not stem.standard:
            raise RescompressError(f"{arch} has a fixed 3x3 stem; a stem cannot be given")
        return CIFAR_ARCHS[arch](num_classes=num_classes, in_channels=in_channels)
    if arch in TORCHVISION_ARCHS:
        model = getattr(tv_resnet, arch)(weights=None, num_classes=num_classes)
        if in_channels != 3 or (stem is not None and not stem.standard):
            set_stem(model, stem or Stem(), in_channels)
        return model
    raise UsageError(f"unknown architecture {arch!r}; known: {', '.join(ARCH_NAMES)}")
