"""MobileNetV2: depthwise convs and inverted residuals; CIFAR-style strides for small inputs."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model, scaled

# (expansion, channels, repeats, stride) as in the MobileNetV2 paper
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1)]


def _cbr(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_cbr(cin, hidden, 1))
        layers += [_cbr(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:  # fixed at build time, so fx traces a static graph
            return x + self.block(x)
        return self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, input_size: int,
                 width: float) -> None:
        super().__init__()
        small = input_size <= 64
        cin = scaled(32, width)
        layers: list[nn.Module] = [_cbr(in_channels, cin, 3, 1 if small else 2)]
        for idx, (t, c, n, s) in enumerate(_SETTINGS):
            cout = scaled(c, width)
            if small and idx == 1:
                s = 1  # keep resolution on 28-32 px inputs, as CIFAR ports do
            for j in range(n):
                layers.append(InvertedResidual(cin, cout, s if j == 0 else 1, t))
                cin = cout
        last = scaled(1280, width)
        layers.append(_cbr(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model("mobilenet_v2", family="mobilenet",
                description="MobileNetV2 (depthwise convs, inverted residuals)")
def mobilenet_v2(**kwargs) -> nn.Module:
    return MobileNetV2(**kwargs)
