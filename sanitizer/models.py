"""Models used by the demo, tests and benchmarks: a compact CNN and a CIFAR-style ResNet-18."""

from __future__ import annotations

import torch
from torch import nn


class CompactCNN(nn.Module):
    """A small 3-block CNN; ``penultimate`` features feed a final ``nn.Linear``.

    Example:
        >>> model = CompactCNN(in_channels=1, num_classes=10, width=16)
        >>> model(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(in_channels, width), nn.MaxPool2d(2),
            block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (3x3 stem, no max-pool). ``ResNet((2, 2, 2, 2), width=64)`` is ResNet-18.

    Example:
        >>> model = resnet18(num_classes=10, width=16)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, width: int = 64,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(cin, num_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(torch.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.penultimate(x))


def resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-18 (11M parameters at width 64)."""
    return ResNet((2, 2, 2, 2), num_classes, width, in_channels)


def make_model(name: str, num_classes: int = 10, in_channels: int = 3, width: int | None = None) -> nn.Module:
    """Build a model by name: ``"cnn"`` (CompactCNN) or ``"resnet18"``."""
    if name == "cnn":
        return CompactCNN(in_channels, num_classes, width or 32)
    if name == "resnet18":
        return resnet18(num_classes, width or 64, in_channels)
    raise ValueError(f"unknown model {name!r}: choose 'cnn' or 'resnet18'")
