"""Small plain CNNs: LeNet-5 and SimNet."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelLegoError
from .registry import register_model, scaled


class LeNet5(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, input_size: int,
                 width: float) -> None:
        super().__init__()
        c1, c2 = scaled(6, width), scaled(16, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        size = (input_size // 2 - 4) // 2
        if size < 1:
            raise ModelLegoError(f"lenet5 needs input_size >= 12, got {input_size}")
        self.classifier = nn.Sequential(
            nn.Linear(c2 * size * size, scaled(120, width)), nn.ReLU(inplace=True),
            nn.Linear(scaled(120, width), scaled(84, width)), nn.ReLU(inplace=True),
            nn.Linear(scaled(84, width), num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class SimNet(nn.Module):
    """Three conv-BN-ReLU stages with pooling, global average pool, one linear layer."""

    def __init__(self, *, in_channels: int, num_classes: int, input_size: int,
                 width: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for out in (32, 64, 128):
            out = scaled(out, width)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model("lenet5", family="lenet", description="LeNet-5 (ReLU, max pooling)")
def lenet5(**kwargs) -> nn.Module:
    return LeNet5(**kwargs)


@register_model("simnet", family="simnet",
                description="three conv-BN-ReLU-pool stages, global average pool, linear")
def simnet(**kwargs) -> nn.Module:
    return SimNet(**kwargs)
