"""Small model definitions shared by the demo, the benchmarks and the tests.

``resnet50`` is the standard torchvision layout (Bottleneck blocks [3, 4, 6, 3]) defined here so
that CPU machines without torchvision can run it; ``width`` scales every layer for quick runs.
"""

from __future__ import annotations

from torch import Tensor, nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, norm=nn.BatchNorm2d):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = norm(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride, bias=False), norm(out)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), width: int = 64, num_classes: int = 1000,
                 in_channels: int = 3, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inplanes = [], width
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(inplanes, planes, 2 if (b == 0 and i > 0) else 1, norm))
                inplanes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(num_classes: int = 1000, width: int = 64, norm=nn.BatchNorm2d) -> ResNet:
    """ResNet-50 (torchvision's layout); ``width=64`` is the real model."""
    return ResNet((3, 4, 6, 3), width, num_classes, norm=norm)


def small_resnet(num_classes: int = 10, width: int = 8, in_channels: int = 3,
                 norm=nn.BatchNorm2d) -> ResNet:
    """A small bottleneck ResNet ([1, 1, 1, 1] blocks) for CPU tests and measurements."""
    return ResNet((1, 1, 1, 1), width, num_classes, in_channels, norm=norm)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks and a linear head, for 8x8 to 32x32 images."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16,
                 norm=nn.BatchNorm2d, dropout: float = 0.0):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), norm(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), norm(2 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), norm(4 * w), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
