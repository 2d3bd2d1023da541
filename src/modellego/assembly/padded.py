"""Alignment padding (the paper's layout): parts of one architecture become one wider network.

Every channel space of the widened network holds part 0's channels, then part 1's, and so
on. Every conv/linear weight is block-diagonal over the parts (zero blocks between them),
BN parameters and statistics are concatenated, depthwise convs concatenate their filters.
The image is shared (the first conv's filters are stacked) when every part reads it the same
way; otherwise each part's adapted image is stacked along channels and the first conv is
block-diagonal too. The logits are ``[logits_0; logits_1; ...]``, exactly the parts' own.
"""

from __future__ import annotations

import copy
from typing import Sequence, cast

import torch
from torch import nn

from ..errors import ModelLegoError
from ..surgery.graph import ChannelGraph, Layer, build_channel_graph
from .adapters import InputAdapter
from .parts import Part


def _same_adapters(adapters: Sequence[InputAdapter]) -> bool:
    a0 = adapters[0]
    return all(a.channels == a0.channels and a.size == a0.size
               and a.normalisation == a0.normalisation for a in adapters[1:])


def _check_compatible(parts: Sequence[Part], graphs: Sequence[ChannelGraph]) -> None:
    names = {p.entry.architecture.name for p in parts}
    if len(names) != 1:
        raise ModelLegoError(f"`layout` padded needs parts of one architecture, got "
                             f"{', '.join(sorted(names))}; use `layout` parallel")
    g0 = graphs[0]
    for k, g in enumerate(graphs[1:], 1):
        if [lay.name for lay in g.layers] != [lay.name for lay in g0.layers] or any(
                len(a.in_layout) != len(b.in_layout) or
                any(x.repeat != y.repeat for x, y in zip(a.in_layout, b.in_layout))
                for a, b in zip(g.layers, g0.layers)):
            raise ModelLegoError(f"`layout` padded: part {k} does not have the layer "
                                 "structure of part 0 (same architecture, other input size?); "
                                 "use `layout` parallel")
        if parts[k].entry.input.shape[1:] != parts[0].entry.input.shape[1:]:
            raise ModelLegoError("`layout` padded needs parts with one input size; use "
                                 "`layout` parallel")
        if any(lay.frozen for lay in g.layers):
            raise ModelLegoError("`layout` padded does not support grouped convolutions")
    if not all(g.plain for g in graphs):
        raise ModelLegoError("`layout` padded needs plain channel layouts (no channel slices, "
                             "shuffles, ties or per-channel parameters); use `layout` parallel")


def _offsets(sizes: Sequence[int], shared: bool) -> tuple[list[int], int]:
    if shared:
        return [0] * len(sizes), sizes[0]
    offs, total = [], 0
    for s in sizes:
        offs.append(total)
        total += s
    return offs, total


def _layer_maps(layers: Sequence[Layer], graphs: Sequence[ChannelGraph], shared_input: bool
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], int, int]:
    """Per part: new indices of its input features and output channels, and the new sizes."""
    k_parts = len(layers)
    in_maps: list[list[int]] = [[] for _ in range(k_parts)]
    new_offset = 0
    for seg_i in range(len(layers[0].in_layout)):
        segs = [lay.in_layout[seg_i] for lay in layers]
        shared = shared_input and segs[0].space in graphs[0].input_spaces
        offs, total = _offsets([s.size for s in segs], shared)
        rep = segs[0].repeat
        for k, seg in enumerate(segs):
            for c in range(seg.size):
                base = new_offset + (offs[k] + c) * rep
                in_maps[k].extend(range(base, base + rep))
        new_offset += total * rep
    out_sizes = [_out_size(lay) for lay in layers]
    if layers[0].depthwise:
        out_maps = in_maps
        out_total = new_offset
    else:
        offs, out_total = _offsets(out_sizes, False)
        out_maps = [list(range(o, o + n)) for o, n in zip(offs, out_sizes)]
    return ([torch.tensor(m) for m in in_maps], [torch.tensor(m) for m in out_maps],
            new_offset, out_total)


def _out_size(layer: Layer) -> int:
    m = layer.module
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def widen(nets: Sequence[nn.Module], graphs: Sequence[ChannelGraph], shared_input: bool
          ) -> nn.Module:
    """One network computing every part at once (block-diagonal weights)."""
    wide = copy.deepcopy(nets[0])
    modules = dict(wide.named_modules())
    space_maps: dict[int, list[torch.Tensor]] = {}
    for i, layer0 in enumerate(graphs[0].layers):
        layers = [g.layers[i] for g in graphs]
        in_maps, out_maps, n_in, n_out = _layer_maps(layers, graphs, shared_input)
        space_maps[layer0.out_space] = out_maps
        mods = [lay.module for lay in layers]
        new: nn.Conv2d | nn.Linear
        if isinstance(mods[0], nn.Conv2d):
            c0 = mods[0]
            groups = n_out if layer0.depthwise else 1
            # a Conv2d keeps its geometry as pairs; torch's stubs type it tuple[int, ...]
            pair = tuple[int, int]
            new = nn.Conv2d(n_in, n_out, cast(pair, c0.kernel_size),
                            stride=cast(pair, c0.stride),
                            padding=cast("str | tuple[int, int]", c0.padding),
                            dilation=cast(pair, c0.dilation), groups=groups,
                            bias=c0.bias is not None)
        else:
            new = nn.Linear(n_in, n_out, bias=mods[0].bias is not None)
        with torch.no_grad():
            new.weight.zero_()
            for m, im, om in zip(mods, in_maps, out_maps):
                if layer0.depthwise:
                    new.weight[om] = m.weight
                else:
                    new.weight[om[:, None], im[None, :]] = m.weight
                if m.bias is not None:
                    if new.bias is None:
                        raise ModelLegoError(f"`layout` padded: {layer0.name} has a bias in "
                                             "some parts but not in part 0")
                    new.bias[om] = m.bias
        _set(wide, modules, layer0.name, new)
    for name, space in graphs[0].norms.items():
        # graph.norms holds only BatchNorm2d layers, and every part has the same layers
        bns = [cast(nn.BatchNorm2d, dict(n.named_modules())[name]) for n in nets]
        maps = space_maps.get(space)
        if maps is None:  # BN directly on the input image: stacked like the input
            raise ModelLegoError(f"`layout` padded: BatchNorm {name} reads the input image")
        total = sum(b.num_features for b in bns)
        bn = nn.BatchNorm2d(total, eps=bns[0].eps, momentum=bns[0].momentum)
        mean, var = _running_stats(bn, name)
        with torch.no_grad():
            for b, om in zip(bns, maps):
                b_mean, b_var = _running_stats(b, name)
                bn.weight[om] = b.weight
                bn.bias[om] = b.bias
                mean[om] = b_mean
                var[om] = b_var
        _set(wide, modules, name, bn)
    return wide.eval()


def _running_stats(bn: nn.BatchNorm2d, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ModelLegoError(f"`layout` padded: BatchNorm {name} keeps no running statistics "
                             "(track_running_stats=False)")
    return bn.running_mean, bn.running_var


def _set(root: nn.Module, modules: dict[str, nn.Module], name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(modules[parent_name] if parent_name else root, attr, new)


class PaddedBody(nn.Module):
    """The widened network behind the input adapter(s); splits its logits per part."""

    def __init__(self, adapters: Sequence[InputAdapter], parts: Sequence[Part]) -> None:
        super().__init__()
        nets = [p.net for p in parts]
        graphs = [build_channel_graph(p.net, p.entry.input.shape) for p in parts]
        _check_compatible(parts, graphs)
        self.shared_input = _same_adapters(adapters)
        self.adapters = nn.ModuleList(adapters)
        self.net = widen(nets, graphs, self.shared_input)
        self.splits = [p.num_outputs for p in parts]

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        if self.shared_input:
            z = self.adapters[0](x)
        else:
            z = torch.cat([a(x) for a in self.adapters], 1)
        logits = self.net(z)
        return [(piece, []) for piece in torch.split(logits, self.splits, 1)]
