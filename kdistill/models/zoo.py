"""Built-in models: MLP, 1-D CNN, small 2-D CNN, CIFAR-style ResNet (width/depth knobs).

Every builder takes `input_shape` (without batch) and `num_classes` plus its own knobs, so a config only
names what it changes. Outputs are logits (B, num_classes).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from kdistill.errors import ConfigError


class MLP(nn.Sequential):
    """Flatten -> [Linear -> ReLU (-> Dropout)] * len(hidden) -> Linear."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 256),
                 dropout: float = 0.0):
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(math.prod(input_shape))
        for i, h in enumerate(hidden):
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


def _conv_block(conv: type, c_in: int, c_out: int, k: int, stride: int) -> nn.Sequential:
    bn = nn.BatchNorm1d if conv is nn.Conv1d else nn.BatchNorm2d
    return nn.Sequential(conv(c_in, c_out, k, stride=stride, padding=k // 2, bias=False), bn(c_out), nn.ReLU())


class CNN1d(nn.Module):
    """1-D CNN for sequences (B, L) or (B, C, L): conv blocks (stride 2 after the first) -> linear head."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 64, depth: int = 4,
                 kernel_size: int = 5):
        super().__init__()
        if len(input_shape) == 1:
            c_in, length = 1, input_shape[0]
        elif len(input_shape) == 2:
            c_in, length = input_shape
        else:
            raise ConfigError(f"cnn1d needs inputs (L) or (C, L), got {tuple(input_shape)}",
                              where="model.name", fix="use cnn2d or mlp for images")
        blocks = []
        for i in range(depth):
            blocks.append(_conv_block(nn.Conv1d, c_in if i == 0 else channels, channels, kernel_size,
                                      1 if i == 0 else 2))
            if i:
                length = (length + 2 * (kernel_size // 2) - kernel_size) // 2 + 1
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.head(self.flatten(self.features(x)))


class CNN2d(nn.Module):
    """Small 2-D CNN: conv blocks with max-pool between them -> global average pool -> linear head."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64, 128)):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"cnn2d needs image inputs (C, H, W), got {tuple(input_shape)}", where="model.name")
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for i, c in enumerate(channels):
            layers.append(_conv_block(nn.Conv2d, c_in, c, 3, 1))
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016): depth = 6n + 2, three stages of width w, 2w, 4w."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 20, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"resnet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), got {depth}",
                              where="model.kwargs.depth")
        if len(input_shape) != 3:
            raise ConfigError(f"resnet needs image inputs (C, H, W), got {tuple(input_shape)}", where="model.name")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        stages, c_in = [], width
        for i, mult in enumerate((1, 2, 4)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c_in, width * mult, 2 if (j == 0 and i > 0) else 1))
                c_in = width * mult
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(self.pool(x).flatten(1))
