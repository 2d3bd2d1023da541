"""FRAT (CNN LEGO v1): critical channels from gradients of the predicted-class probability.

For a sample ``x`` with predicted class ``k`` (the top logit) and ``P_k(x)`` its softmax
probability, the *gradient profile* of a profiled conv/linear layer is, per class ``c``::

    G_c[f] = sum over the selected samples x of class c of  sum over space of
             max(dP_k(x) / dA[f](x), 0)

where ``A`` is the tensor the layer reads (its input feature map; for a linear layer that
reads a flattened map, ``f`` runs over the flattened features). The gradient is clamped at 0
elementwise, before the spatial sum. The softmax is taken in float64 (confident samples have
``1 - P_k`` far below float32's resolution) and all sums are float64.

Locating, per class and per layer: the input features of a flattened map are summed back to
their channels, the channel scores are min-max rescaled over the layer's input (no epsilon:
gradients of confident samples are tiny) and a channel is *critical* when its score exceeds
``alpha_conv`` (inputs of conv layers) or ``alpha_linear`` (inputs of linear layers). A
channel of a space is kept when it is critical for any layer reading it; a task keeps the
OR of its classes; frozen spaces stay whole. Keeping a kernel ``(q, p)`` when both ``p`` and
``q`` are critical is exactly keeping the critical channels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence, cast

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..runtime.device import to_device_of
from ..runtime.distributed import SINGLE, DistContext, gather_chunks
from ..runtime.hooks import forward_pre_hooks, preserved_state
from ..surgery.graph import ChannelGraph, Layer
from .locate import LocateConfig, profiled_layers, union_of_class_masks
from .passes import ClassProfile, ProfilePass


@dataclass(frozen=True)
class GradientProfile(ClassProfile):
    """``layers[name][i, f]`` is ``G_c[f]`` for class ``classes[i]`` and input feature ``f``."""


def gradient_chunk(model: nn.Module, layers: Mapping[str, nn.Module], images: torch.Tensor,
                   rows: torch.Tensor, num_rows: int) -> dict[str, torch.Tensor]:
    """One forward and backward pass over ``images``: per layer ``(num_rows, features)``
    float64 sums of the clamped input gradients, the samples grouped by ``rows``."""
    captured: dict[str, tuple[torch.Tensor, int]] = {}

    def capture(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            captured[name] = (args[0], args[0]._version)
        return hook

    # so every activation joins the graph
    x = to_device_of(images.detach(), model).clone().requires_grad_(True)
    with preserved_state(model), forward_pre_hooks(
            (mod, capture(name)) for name, mod in layers.items()):
        model.eval()
        torch.set_grad_enabled(True)
        logits = model(x)
        names = [n for n in layers if n in captured]
        for n in names:
            tensor, version = captured[n]
            if tensor._version != version:
                raise UnsupportedModelError(
                    f"layer {n!r}: its input is modified in place later in forward(), so its "
                    "gradient is not defined; use out-of-place operations (e.g. "
                    "ReLU(inplace=False)) after that point")
        top = torch.softmax(logits.double(), 1).amax(1)
        grads = torch.autograd.grad(top.sum(), [captured[n][0] for n in names],
                                    allow_unused=True)
    out = {}
    for n, g in zip(names, grads):
        a = captured[n][0]
        g = torch.zeros_like(a) if g is None else g
        g = g.detach().clamp_min(0).double()
        if isinstance(layers[n], nn.Linear):  # features last, positions or tokens between
            g = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1).cpu()
        else:  # (N, C, H, W)
            g = (g.sum(tuple(range(2, g.dim()))) if g.dim() > 2 else g).cpu()
        out[n] = g.new_zeros((num_rows, g.shape[1])).index_add_(0, rows, g)
    return out


def gradient_profile(model: nn.Module, layers: Mapping[str, nn.Module], images: torch.Tensor,
                     labels: torch.Tensor, classes: Sequence[int], *, batch_size: int = 64,
                     dist: DistContext | None = None) -> GradientProfile:
    """FRAT's per-class gradient sums for every layer in ``layers`` (see the module doc).

    ``labels`` are class ids, all in ``classes``. Chunks of ``batch_size`` samples are added
    in chunk order; under ``dist`` chunk ``i`` runs on rank ``i % world_size`` and each
    round's results are gathered, so every rank gets the single-process bits. Hooks are
    removed and the model's modes and grad mode restored even if the model raises; no
    parameter's ``.grad`` is touched.
    """
    dist = dist or SINGLE
    rounds = ProfilePass(labels, classes, batch_size=batch_size, dist=dist)
    classes, rows = rounds.classes, rounds.rows
    # the profiled layers are convs and linears
    widths = {n: (m.in_features if isinstance(m, nn.Linear) else cast(nn.Conv2d, m).in_channels)
              for n, m in layers.items()}
    total = sum(widths.values())
    totals = {n: torch.zeros((len(classes), w), dtype=torch.float64)
              for n, w in widths.items()}
    t0 = time.perf_counter()
    for rnd in rounds.rounds():
        mine: list[torch.Tensor] = []
        if rnd.mine is not None:
            a, b = rnd.mine
            present = rnd.present[rnd.rank]
            local = torch.searchsorted(present, rows[a:b])
            sums = gradient_chunk(model, layers, images[a:b], local, len(present))
            flat = [sums[n] if n in sums else torch.zeros(len(present), widths[n],
                                                          dtype=torch.float64)
                    for n in layers]
            mine.append(torch.cat(flat, 1).reshape(-1))
        sizes = [len(p) * total for p in rnd.present]
        for p, gathered in zip(rnd.present, gather_chunks(mine, sizes, dist)):
            rows_p = gathered.view(len(p), total)
            offset = 0
            for n in layers:
                totals[n].index_add_(0, p, rows_p[:, offset:offset + widths[n]])
                offset += widths[n]
    seconds = time.perf_counter() - t0
    return GradientProfile(classes, totals, rounds.samples(), seconds)


def channel_scores(layer: Layer, features: torch.Tensor) -> list[torch.Tensor]:
    """Per segment of the layer's input layout, the per-channel sums of ``features``."""
    out, offset = [], 0
    for seg in layer.in_layout:
        block = features[offset:offset + seg.size * seg.repeat]
        offset += seg.size * seg.repeat
        out.append(block.view(seg.size, seg.repeat).sum(1))
    return out


def rescale(v: torch.Tensor) -> torch.Tensor:
    """``(v - min) / (max - min)``; all zeros when ``v`` is constant."""
    lo, hi = v.min(), v.max()
    return (v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)


def frat_class_masks(graph: ChannelGraph, profile: GradientProfile, c: int,
                     config: LocateConfig, output_index: int | None = None
                     ) -> dict[int, torch.Tensor]:
    """The critical channels of every space for class ``c`` (frozen spaces not filled in);
    the logit ``output_index``, if given, is marked in the output space."""
    masks = {s: torch.zeros(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    if output_index is not None:
        masks[graph.output_space][output_index] = True
    for layer in profiled_layers(graph):
        parts = channel_scores(layer, profile.for_class(layer.name, c))
        alpha = config.alpha_conv if layer.kind == "conv" else config.alpha_linear
        critical = rescale(torch.cat(parts)) > alpha
        offset = 0
        for seg, part in zip(layer.in_layout, parts):
            masks[seg.space][seg.start:seg.start + seg.size] |= \
                critical[offset:offset + len(part)]
            offset += len(part)
    return masks


def frat_locate(graph: ChannelGraph, profile: GradientProfile, classes: Sequence[int],
                config: LocateConfig) -> dict[int, torch.Tensor]:
    """The task's keep-mask of every space: the OR of its classes' critical channels."""
    config.validate()
    return union_of_class_masks(graph, classes,
                                lambda c: frat_class_masks(graph, profile, c, config))
