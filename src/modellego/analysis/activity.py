"""Activity peaks and never-active channels: the locating step of Pan & Rajan's modules.

Pan & Rajan (ICSE'22) decompose a classifier into one module per class by removing what the
class never uses. Training-free, on the class's selected training samples: the *activity
profile* of a profiled conv/linear layer is, per class ``c`` and input feature ``f``::

    A_c[f] = max over the selected samples x of class c and over all positions of  a_f(x)

where ``a`` is the tensor the layer reads (for a linear layer after a flatten, ``f`` runs over
the flattened features). Maxima are exact in any order, so the profile is bit for bit the
same however the samples are chunked or shared out over ranks.

Locating, per class: at a layer reading a channel, the channel is *active* when its peak
(the largest ``A_c`` over its features) exceeds ``alpha`` times the largest peak of any
channel of that layer's input (clamped at 0); ``alpha`` is ``alpha_conv`` for conv readers
and ``alpha_linear`` for linear ones (default 0.01 for both). A channel is *never active*
when it is not active at any layer reading it; those are removed. A task keeps the OR of its
classes' active channels; frozen spaces (the image, grouped convs) and spaces no profiled
layer reads stay whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence, cast

import torch
from torch import nn

from ..runtime.device import to_device_of
from ..runtime.distributed import SINGLE, DistContext, gather_chunks
from ..runtime.hooks import forward_pre_hooks, preserved_state
from ..surgery.graph import ChannelGraph
from .locate import LocateConfig, profiled_layers, union_of_class_masks
from .passes import ClassProfile, ProfilePass


@dataclass(frozen=True)
class ActivityProfile(ClassProfile):
    """``layers[name][i, f]`` is ``A_c[f]`` for class ``classes[i]`` and input feature ``f``."""


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return cast(nn.Conv2d, module).in_channels  # the profiled layers are convs and linears


@torch.inference_mode()
def activity_chunk(model: nn.Module, layers: Mapping[str, nn.Module], images: torch.Tensor,
                   rows: torch.Tensor, num_rows: int) -> dict[str, torch.Tensor]:
    """One forward pass over ``images``: per layer ``(num_rows, features)`` float64 peaks of
    its input, the samples grouped by ``rows`` (``-inf`` for a layer never called)."""
    peaks = {n: torch.full((num_rows, _width(m)), -torch.inf, dtype=torch.float64)
             for n, m in layers.items()}

    def capture(name: str, module: nn.Module):
        def hook(mod: nn.Module, args: tuple) -> None:
            a = args[0].detach()
            if isinstance(module, nn.Linear):  # (B, ..., F): extra leading dims are positions
                a = a.reshape(a.shape[0], -1, a.shape[-1]).amax(1)
            elif a.dim() > 2:
                a = a.flatten(2).amax(2)
            a = a.double().cpu()  # (peaks are exact in any precision)
            index = rows.view(-1, 1).expand_as(a)
            peaks[name].scatter_reduce_(0, index, a, "amax")  # a layer called twice: max
        return hook

    with preserved_state(model), forward_pre_hooks(
            (mod, capture(name, mod)) for name, mod in layers.items()):
        model.eval()
        model(to_device_of(images, model))
    return peaks


def activity_profile(model: nn.Module, layers: Mapping[str, nn.Module], images: torch.Tensor,
                     labels: torch.Tensor, classes: Sequence[int], *, batch_size: int = 64,
                     dist: DistContext | None = None) -> ActivityProfile:
    """Per class, the peak of every input feature of every layer in ``layers`` (module doc).

    ``labels`` are class ids, all in ``classes``. Chunks of ``batch_size`` samples; under
    ``dist`` chunk ``i`` runs on rank ``i % world_size`` and each round's peaks are gathered,
    so every rank returns the single-process profile. Hooks are removed and the model's mode
    restored even if the model raises.
    """
    dist = dist or SINGLE
    rounds = ProfilePass(labels, classes, batch_size=batch_size, dist=dist)
    classes, rows = rounds.classes, rounds.rows
    widths = {n: _width(m) for n, m in layers.items()}
    total = sum(widths.values())
    peaks = {n: torch.full((len(classes), w), -torch.inf, dtype=torch.float64)
             for n, w in widths.items()}
    t0 = time.perf_counter()
    for rnd in rounds.rounds():
        mine = []
        if rnd.mine is not None:
            a, b = rnd.mine
            present = rnd.present[rnd.rank]
            local = torch.searchsorted(present, rows[a:b])
            chunk = activity_chunk(model, layers, images[a:b], local, len(present))
            mine.append(torch.cat([chunk[n] for n in layers], 1).reshape(-1))
        sizes = [len(p) * total for p in rnd.present]
        for p, flat in zip(rnd.present, gather_chunks(mine, sizes, dist)):
            flat = flat.view(len(p), total)
            offset = 0
            for n in layers:
                block = flat[:, offset:offset + widths[n]]
                peaks[n][p] = torch.maximum(peaks[n][p], block)
                offset += widths[n]
    return ActivityProfile(classes, peaks, rounds.samples(), time.perf_counter() - t0)


def active_class_masks(graph: ChannelGraph, profile: ActivityProfile, c: int,
                       config: LocateConfig, output_index: int | None = None
                       ) -> dict[int, torch.Tensor]:
    """The channels of every space active for class ``c`` (module doc); spaces no profiled
    layer reads are all marked (they are never removed), frozen spaces not filled in. The
    logit ``output_index``, if given, is marked in the output space."""
    masks = {s: torch.zeros(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    read: set[int] = set()
    for layer in profiled_layers(graph):
        peak = profile.for_class(layer.name, c)
        alpha = config.alpha_conv if layer.kind == "conv" else config.alpha_linear
        limit = alpha * peak.max().clamp_min(0)
        offset = 0
        for seg in layer.in_layout:
            block = peak[offset:offset + seg.size * seg.repeat].view(seg.size, seg.repeat)
            offset += seg.size * seg.repeat
            masks[seg.space][seg.start:seg.start + seg.size] |= block.amax(1) > limit
            read.add(seg.space)
    for s in masks:
        if s not in read and s != graph.output_space:
            masks[s][:] = True
    if output_index is not None:
        masks[graph.output_space][output_index] = True
    return masks


def active_locate(graph: ChannelGraph, profile: ActivityProfile, classes: Sequence[int],
                  config: LocateConfig) -> dict[int, torch.Tensor]:
    """The task's keep-mask of every space: the OR of its classes' active channels."""
    config.validate()
    return union_of_class_masks(graph, classes,
                                lambda c: active_class_masks(graph, profile, c, config))
