"""The paper's networks for 32×32 inputs, as plain ``nn.Module``s.

* :class:`VGG16` — configuration D (Simonyan & Zisserman 2015) with batch normalisation, the
  CIFAR variant of the original SWA code base (Izmailov et al. 2018).
* :class:`PreResNet` — the pre-activation ResNet (He et al. 2016) of the same code base;
  :func:`PreResNet110` is depth 110.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _check_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")


def _init_conv(conv: nn.Conv2d) -> None:
    """He-style init of the SWA code base: N(0, sqrt(2 / (k·k·out_channels))), bias 0."""
    n = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    conv.weight.data.normal_(0, math.sqrt(2.0 / n))
    if conv.bias is not None:
        conv.bias.data.zero_()


class VGG16(nn.Module):
    """VGG16 (configuration D) for 32×32 inputs.

    Args:
        num_classes: C >= 2.
        batch_norm: BatchNorm2d after every conv (the paper uses it on all runs).

    Shapes: ``(B, 3, 32, 32) -> (B, C)``.
    """

    def __init__(self, num_classes: int = 100, batch_norm: bool = True) -> None:
        super().__init__()
        _check_classes(num_classes)
        if not isinstance(batch_norm, bool):
            raise ValueError(f"batch_norm must be a bool, got {batch_norm!r}")
        layers: list[nn.Module] = []
        channels = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            conv = nn.Conv2d(channels, v, 3, padding=1)
            _init_conv(conv)
            layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm \
                else [conv, nn.ReLU(inplace=True)]
            channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        for m in self.classifier:
            if isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + (x if self.downsample is None else self.downsample(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + (x if self.downsample is None else self.downsample(x))


class PreResNet(nn.Module):
    """Pre-activation ResNet for 32×32 inputs (the SWA code base's ``PreResNet``).

    Depth >= 44 uses bottleneck blocks (expansion 4, (depth − 2)/9 per stage, needs
    depth ≡ 2 mod 9); smaller depths use basic blocks ((depth − 2)/6, depth ≡ 2 mod 6).

    Args:
        depth: e.g. 20, 56, 110, 164.
        num_classes: C >= 2.

    Shapes: ``(B, 3, H, W) -> (B, C)``.
    """

    def __init__(self, depth: int = 110, num_classes: int = 100) -> None:
        super().__init__()
        _check_classes(num_classes)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8:
            raise ValueError(f"depth must be an integer >= 8, got {depth!r}")
        if depth >= 44:
            if (depth - 2) % 9:
                raise ValueError(f"depth must satisfy (depth - 2) % 9 == 0 for depth >= 44 (bottleneck "
                                 f"blocks), got {depth!r}; e.g. 110 or 164")
            block, n = _Bottleneck, (depth - 2) // 9
        else:
            if (depth - 2) % 6:
                raise ValueError(f"depth must satisfy (depth - 2) % 6 == 0 for depth < 44 (basic blocks), "
                                 f"got {depth!r}; e.g. 8, 20 or 32")
            block, n = _BasicBlock, (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 16, n, 1)
        self.layer2 = self._make_layer(block, 32, n, 2)
        self.layer3 = self._make_layer(block, 64, n, 2)
        self.bn = nn.BatchNorm2d(64 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv(m)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


def PreResNet110(num_classes: int = 100) -> PreResNet:  # noqa: N802 - named like the paper's network
    """The paper's PreResNet110."""
    return PreResNet(110, num_classes)
