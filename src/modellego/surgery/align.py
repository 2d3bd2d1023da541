"""Channel alignment: pad a network's channel counts to multiples of ``k`` with channels that
change nothing, for runtimes whose fast kernels need aligned counts.

A component keeps odd numbers of channels (27, 29, 59, 113, ...). onnxruntime's CPU
convolutions use a blocked layout (NCHWc, 8 or 16 channels per block) only when the channel
counts fit it; otherwise they fall back to im2col + GEMM with layout changes around them, and a
network with fewer FLOPs can run no faster than its source (benchmarks/latency.py, 2026-12-07,
batch 32: the 50 % compressions of the shipped VGG-16 and ResNet-18 ran at 0.91-0.98x their
sources' speed unpadded and 1.55-1.72x padded; the FM VGG-16 {0, 1, 2} default component at
2.1x unpadded and 4.4x padded, with 7.7x fewer FLOPs).

Padding uses the channel graph and the extraction's own slicers: every free space (not the
input, not the logits, not frozen, not tied) of ``n`` channels gets ``(-n) % k`` copies of its
channel 0, laid out by the same plan machinery as any component (so residual adds,
concatenations, flattens and per-channel parameters stay consistent), and every conv or linear
layer's weights for the copied input positions are zeroed. The copies therefore carry values
that nothing reads: the padded network computes the same function. It is checked: on seeded
random inputs its outputs must equal the network's within float rounding, or the network is
returned unpadded with the reason. (Code that cuts channels at a fixed number, such as timm's
GhostNet ``cat([x1, cheap(x1)])[:, :out_chs]``, is a no-op on the source and on a component
and a cut once the widths grow: such a network does not run padded and is left as it is.)

Checked on random components of every zoo architecture (tests) and of torchvision's
ConvNeXt-T, EfficientNet-B0, MobileNet-V3-S, DenseNet-121, RegNetY-400MF, ShuffleNet-V2,
SqueezeNet and ResNeXt-50 and timm's ConvNeXt-atto, MobileNet-V3, EfficientNet-B0 and
RegNetY-002 at 64 px: all padded, and their ONNX exports equal the unpadded networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import ModelLegoError, exception_line
from .extract import apply_plan
from .graph import ChannelGraph, Layout, build_channel_graph
from .plan import ComponentPlan, layout_positions


@dataclass(frozen=True)
class Alignment:
    """What :func:`align_channels` did: the multiple, how many channel groups (spaces) it
    padded and with how many channels in all, or why it left the network as it was."""

    multiple: int
    spaces_padded: int
    channels_added: int
    reason: str = ""


def _indices(graph: ChannelGraph, multiple: int) -> dict[int, list[tuple[int, bool]]]:
    """Per root space: its channels as ``(source channel, is a padding copy)``."""
    tied = {graph.find(seg.space) for pair in graph.ties for seg in pair}
    fixed = {graph.find(s) for s in graph.frozen_spaces | graph.input_spaces} | tied
    fixed.add(graph.find(graph.output_space))
    # (an attention layer's heads: a copied head would attend twice)
    fixed |= {graph.find(s) for s in graph.attention.values()}
    # (a GroupNorm's channels: a copy would change its group's statistics)
    fixed |= {graph.find(seg.space) for layout in graph.group_norms.values() for seg in layout}
    out = {}
    for s in graph.spaces():
        n = graph.space_size[s]
        extra = 0 if s in fixed else (-n) % multiple
        out[s] = [(c, False) for c in range(n)] + [(0, True)] * extra
    return out


def _padded_plan(graph: ChannelGraph, chans: dict[int, list[tuple[int, bool]]]
                 ) -> tuple[ComponentPlan, dict[str, list[int]]]:
    """The plan laying every space out as ``chans`` says, and per conv/linear layer the input
    positions that are padding copies (their weights are zeroed)."""

    def positions(layout: Layout) -> list[tuple[int, bool]]:
        return layout_positions(layout, lambda seg: (
            (c - seg.start, copy) for c, copy in chans[graph.find(seg.space)]
            if seg.start <= c < seg.start + seg.size))

    def kept(space: int) -> tuple[int, ...]:
        return tuple(c for c, _ in chans[graph.find(space)])

    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    zero: dict[str, list[int]] = {}
    for layer in graph.layers:
        inp = positions(layer.in_layout)
        idx = tuple(i for i, _ in inp)
        if layer.depthwise:
            modules[layer.name] = {"out": idx, "in": idx}
            continue
        modules[layer.name] = {"out": kept(layer.out_space), "in": idx}
        zero[layer.name] = [p for p, (_, copy) in enumerate(inp) if copy]
    for name, space in graph.norms.items():
        modules[name] = {"out": kept(space)}
    for name, layout in graph.channel_params.items():
        modules[name] = {"out": tuple(i for i, _ in positions(layout))}
    return ComponentPlan(modules), zero


@torch.no_grad()
def align_channels(model: nn.Module, input_shape: Sequence[int], multiple: int = 8
                   ) -> tuple[nn.Module, Alignment]:
    """``model`` with every free channel count padded to a multiple of ``multiple`` by
    channels that change nothing (see the module docstring), and what was done. ``model``
    itself is left untouched; it is returned as it is when nothing needs padding or the graph
    engine cannot follow it (the reason says which)."""
    if multiple < 1:
        raise ModelLegoError(f"`align` must be at least 1, got {multiple}")
    if multiple == 1:
        return model, Alignment(1, 0, 0, "not asked for")
    try:
        graph = build_channel_graph(model, tuple(input_shape))
    except ModelLegoError as exc:
        return model, Alignment(multiple, 0, 0, f"the graph engine cannot follow it ({exc})")
    chans = _indices(graph, multiple)
    added = {s: sum(copy for _, copy in v) for s, v in chans.items()}
    if not any(added.values()):
        return model, Alignment(multiple, 0, 0, "every channel count is aligned already")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, *input_shape, generator=gen)
    was = model.training
    model.eval()
    try:
        want = model(x)
    finally:
        model.train(was)
    try:  # a network whose code sizes channels by fixed numbers the graph did not see
        plan, zero = _padded_plan(graph, chans)
        padded = apply_plan(model, plan).eval()
        modules = dict(padded.named_modules())
        for name, cols in zero.items():
            if cols:
                modules[name].weight[:, torch.tensor(cols, dtype=torch.long)] = 0.0
        got = padded(x)
    except (RuntimeError, ValueError, IndexError, ModelLegoError) as exc:
        return model, Alignment(multiple, 0, 0, f"the padded network does not run "
                                                f"({exception_line(exc, 200)}); left as it was")
    tolerance = 1e-5 * max(1.0, float(want.abs().max()))
    if got.shape != want.shape or not float((got - want).abs().max()) <= tolerance:
        return model, Alignment(multiple, 0, 0, "padding changed its outputs (left as it was)")
    return padded, Alignment(multiple, sum(1 for v in added.values() if v),
                             int(sum(added.values())))
