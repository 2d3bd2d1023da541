"""Input contracts: one image format for the assembled model, adapted per part explicitly."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.base import convert_images
from ..errors import ModelLegoError

__all__ = ["InputAdapter", "contract_shape", "convert_images"]


def contract_shape(inputs: Sequence[dict[str, Any]]) -> tuple[int, int, int]:
    """The assembled input shape: the most channels and the largest size among the parts."""
    shapes = [tuple(int(v) for v in inp["shape"]) for inp in inputs]
    return (max(s[0] for s in shapes), max(s[1] for s in shapes), max(s[2] for s in shapes))


class InputAdapter(nn.Module):
    """Turns contract images (``[0, 1]``) into one part's normalised input."""

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor
    #: buffers whose values come from the manifest (the part's input contract): a model
    #: file must hold exactly these values (checked by :func:`modellego.files.open_model`)
    fixed_buffers = ("mean", "std")

    def __init__(self, contract: Sequence[int], part_input: dict[str, Any]) -> None:
        super().__init__()
        shape = [int(v) for v in part_input["shape"]]
        c_in = int(contract[0])
        if c_in != shape[0] and 1 not in (c_in, shape[0]):
            raise ModelLegoError(f"a part expects {shape[0]} input channels, the assembly "
                                 f"provides {c_in}; only grey <-> RGB conversions are defined")
        self.channels = shape[0]
        self.size = (shape[1], shape[2])
        self.resize = tuple(contract[1:]) != self.size
        self.expand = c_in == 1 and shape[0] > 1
        self.reduce = c_in > 1 and shape[0] == 1
        # the values as float32 numbers, also when built on the meta device (no data there)
        self.normalisation = tuple(
            tuple(torch.tensor(part_input[k], dtype=torch.float32, device="cpu").tolist())
            for k in ("mean", "std"))
        self.register_buffer("mean", torch.tensor(part_input["mean"],
                                                  dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(part_input["std"],
                                                 dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expand:
            x = x.expand(-1, self.channels, -1, -1)
        if self.reduce:
            x = x.mean(1, keepdim=True)
        if self.resize:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def describe(self) -> str:
        steps = []
        if self.expand:
            steps.append(f"grey -> {self.channels} channels")
        if self.reduce:
            steps.append("RGB -> grey (mean)")
        if self.resize:
            steps.append(f"resize to {self.size[0]}x{self.size[1]}")
        steps.append("normalise")
        return ", ".join(steps)
