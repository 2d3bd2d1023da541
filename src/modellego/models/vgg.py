"""VGG with batch norm, CIFAR-style: pools are skipped once the feature map is 1 pixel wide."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model, scaled

_CFGS = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg: list, *, in_channels: int, num_classes: int, input_size: int,
                 width: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, input_size
        for item in cfg:
            if item == "M":
                if size >= 2:  # a 28-px input reaches 1 px after four pools
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = scaled(item, width)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        hidden = scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Linear(channels * size * size, hidden), nn.ReLU(inplace=True), nn.Dropout(0.3),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(0.3),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register_model("vgg11_bn", family="vgg", description="VGG-11 with batch norm (CIFAR-style head)")
def vgg11_bn(**kwargs) -> nn.Module:
    return VGG(_CFGS["vgg11_bn"], **kwargs)


@register_model("vgg16_bn", family="vgg", description="VGG-16 with batch norm (CIFAR-style head)")
def vgg16_bn(**kwargs) -> nn.Module:
    return VGG(_CFGS["vgg16_bn"], **kwargs)
