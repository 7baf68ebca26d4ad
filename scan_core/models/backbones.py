"""Backbones: images (B, C, H, W) float -> features (B, out_dim).

Three families, all randomly initialised (nothing is downloaded at run time):

* :class:`SmallCNNBackbone` for 28x28 grayscale on CPU,
* :class:`ResNetCifarBackbone`, the ResNet-18 "CIFAR variant" of the SCAN/SimCLR code
  (3x3 stride-1 stem, no max-pool), for small images,
* torchvision ResNet-18/50 with the classifier removed, for large images.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock


class Backbone(nn.Module):
    """Base of all backbones: ``forward`` maps images to ``(B, out_dim)`` features."""

    out_dim: int


class SmallCNNBackbone(Backbone):
    """A small VGG-style CNN for 28x28-ish images that trains in minutes on a CPU.

    Three stages of two 3x3 conv-BN-ReLU layers (widths ``w, 2w, 4w``), max-pooling between stages,
    global average pooling at the end.

    Args:
        in_channels: Image channels (1 or 3).
        width: Channels of the first stage.

    Shapes:
        input ``(B, in_channels, H, W)`` with ``H, W >= 8``; output ``(B, 4 * width)``.
    """

    def __init__(self, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        w = width
        self.features = nn.Sequential(
            *block(in_channels, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            *block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class ResNetCifarBackbone(Backbone):
    """ResNet-18, CIFAR variant (He et al. 2016; as in the SimCLR and SCAN code for 32x32 images).

    The ImageNet stem (7x7 stride-2 conv + max-pool) is replaced by a 3x3 stride-1 conv, so small
    images keep their resolution through the first stage.

    Shapes:
        input ``(B, in_channels, H, W)``; output ``(B, 512)``.
    """

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()  # type: ignore[assignment]
        net.fc = nn.Identity()  # type: ignore[assignment]
        self.net = net
        self.out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TorchvisionResNetBackbone(Backbone):
    """torchvision ResNet-18 or ResNet-50 (random init) without its classifier.

    Shapes:
        input ``(B, in_channels, H, W)``, ideally H, W >= 96; output ``(B, 512)`` for
        ResNet-18, ``(B, 2048)`` for ResNet-50.
    """

    def __init__(self, depth: int = 18, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in (18, 50):
            raise ValueError(f"depth must be 18 or 50, got {depth}")
        net = resnet18(weights=None) if depth == 18 else resnet50(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.out_dim = 512 if isinstance(net.layer1[0], BasicBlock) else 2048
        net.fc = nn.Identity()  # type: ignore[assignment]
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_backbone(name: str, in_channels: int) -> Backbone:
    """Build a backbone by name: ``small_cnn``, ``resnet18_cifar``, ``resnet18`` or ``resnet50``.

    The returned module has an ``out_dim`` attribute with its feature size.
    """
    if name == "small_cnn":
        return SmallCNNBackbone(in_channels)
    if name == "resnet18_cifar":
        return ResNetCifarBackbone(in_channels)
    if name == "resnet18":
        return TorchvisionResNetBackbone(18, in_channels)
    if name == "resnet50":
        return TorchvisionResNetBackbone(50, in_channels)
    raise ValueError(
        f"Unknown backbone '{name}': choose small_cnn, resnet18_cifar, resnet18 or resnet50."
    )
