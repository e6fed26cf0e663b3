"""Model builders: the reference CIFAR-style ResNets and torchvision's ResNet family by name.

The reference ResNet-20/32/56 (He et al. 2016, section 4.2) reuse torchvision's ``BasicBlock`` so that
their state_dict keys (``conv1``, ``bn1``, ``layerN.i.conv1``, ``downsample.0`` ...) look like every other
torchvision ResNet and every stage treats them alike. Downsampling uses a 1x1 conv + BN ("option B"),
which keeps the graph a plain torchvision graph (no padding lambdas) and exports cleanly to ONNX.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.resnet import BasicBlock, conv1x1, conv3x3

from rescompress.errors import RescompressError


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


def build_model(arch: str, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """Build an untrained model by architecture name (see ``ARCH_NAMES``)."""
    if arch in CIFAR_ARCHS:
        return CIFAR_ARCHS[arch](num_classes=num_classes, in_channels=in_channels)
    if arch in TORCHVISION_ARCHS:
        model = getattr(tv_resnet, arch)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return model
    raise RescompressError(f"unknown architecture {arch!r}; known: {', '.join(ARCH_NAMES)}")
