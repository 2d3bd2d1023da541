"""A small GoogLeNet-style network whose Inception blocks concatenate four branches."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model, scaled


def _cbr(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Inception(nn.Module):
    """Branches: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | 3x3 max pool -> 1x1, concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int,
                 pool: int) -> None:
        super().__init__()
        self.branch1 = _cbr(cin, c1, 1)
        self.branch2 = nn.Sequential(_cbr(cin, c3r, 1), _cbr(c3r, c3, 3))
        self.branch3 = nn.Sequential(_cbr(cin, c5r, 1), _cbr(c5r, c5, 3), _cbr(c5, c5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), _cbr(cin, pool, 1))
        self.out_channels = c1 + c3 + c5 + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


# GoogLeNet's inception 3a, 3b, (pool), 4a, 4b, (pool), 5a
_BLOCKS: list[tuple[int, ...] | str] = [
    (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), "M",
    (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), "M",
    (256, 160, 320, 32, 128, 128)]


class InceptionNet(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, input_size: int,
                 width: float) -> None:
        super().__init__()
        cin = scaled(192, width)
        self.stem = _cbr(in_channels, cin, 3)
        blocks: list[nn.Module] = []
        for spec in _BLOCKS:
            if isinstance(spec, str):  # "M"
                blocks.append(nn.MaxPool2d(3, stride=2, padding=1))
                continue
            block = Inception(cin, *(scaled(c, width) for c in spec))
            blocks.append(block)
            cin = block.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


@register_model("googlenet", family="inception",
                description="small GoogLeNet-style net, Inception blocks concatenate 4 branches")
def googlenet(**kwargs) -> nn.Module:
    return InceptionNet(**kwargs)
