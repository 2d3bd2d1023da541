"""A component plan (:class:`~modellego.manifest.ComponentPlan`, the one plan type, also
what files hold): for every conv, linear and BN layer, the channel indices to keep.

An attention layer whose heads can be removed gets ``{"out": [...]}``: the heads it keeps
(its output projection has its own entry, by the columns of the kept heads).

Other per-channel tensors the graph found (a BatchNorm over a concatenation, a layer-scale
parameter, a PReLU weight) get an entry by their qualified name in the same shape,
``{"out": [...]}``: the indices kept along their one non-singleton axis.

Plans are plain data (JSON-friendly lists of indices), so a component can be rebuilt from
its source architecture and replayed or composed without re-running any analysis.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence, TypeVar

import torch

from ..errors import PlanError
from ..manifest import ComponentPlan
from .graph import ChannelGraph, Layout, Segment

T = TypeVar("T")


def layout_positions(layout: Layout, channels: Callable[[Segment], Iterable[tuple[int, T]]]
                     ) -> list[tuple[int, T]]:
    """The features of an axis with ``layout`` that hold the channels ``channels(seg)`` names
    for each run (``(channel relative to the run's start, tag)``, in the order given; a
    channel may be named more than once), each with its tag: a run's channel ``c`` is the
    ``repeat`` features from ``offset + c * repeat`` on."""
    feats: list[tuple[int, T]] = []
    offset = 0
    for seg in layout:
        for c, tag in channels(seg):
            start = offset + c * seg.repeat
            feats.extend((i, tag) for i in range(start, start + seg.repeat))
        offset += seg.size * seg.repeat
    return feats


def _indices(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero().flatten())


def close_ties(graph: ChannelGraph, masks: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """``masks`` with every tie of ``graph`` honoured: a channel of a tied run is kept when
    any channel tied to it is (new tensors; the caller's masks are left alone)."""
    if not graph.ties:
        return masks
    spaces = sorted(masks)
    offset, at = {}, 0
    for s in spaces:
        offset[s] = at
        at += len(masks[s])
    parent = list(range(at))  # union-find over every channel of every space

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in graph.ties:
        for k in range(a.size):
            ra, rb = find(offset[a.space] + a.start + k), find(offset[b.space] + b.start + k)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    flat = torch.cat([masks[s].bool() for s in spaces])
    labels = torch.tensor([find(i) for i in range(at)], dtype=torch.long, device=flat.device)
    kept = torch.zeros(at, dtype=torch.bool, device=flat.device).index_put_(
        (labels,), flat, accumulate=True)
    closed = kept[labels]
    return {s: closed[offset[s]:offset[s] + len(masks[s])].clone() for s in spaces}


def plan_from_masks(graph: ChannelGraph, masks: dict[int, torch.Tensor],
                    output_indices: Sequence[int], *, hint: str = "") -> ComponentPlan:
    """Turn per-space keep masks into a per-module plan; the logits keep ``output_indices``
    in that order. Ties of the graph are closed (see :func:`close_ties`). Raises
    :class:`PlanError` naming the first layer left with no channels, or a space kept whole
    (:attr:`ChannelGraph.frozen_spaces`) that the masks would cut."""
    masks = close_ties(graph, masks)
    for s in graph.frozen_spaces:
        if s != graph.output_space and not bool(masks[s].all()):
            raise PlanError(f"the masks remove channels of a group that must be kept whole "
                            f"({graph.frozen_reasons.get(s, 'frozen')})")

    def kept(space: int) -> tuple[int, ...]:
        if space == graph.output_space:
            return tuple(int(i) for i in output_indices)
        return _indices(masks[space])

    def positions(layout: Layout) -> tuple[int, ...]:
        """The kept features of an axis with ``layout``, in order."""
        def chans(seg: Segment) -> list[tuple[int, None]]:
            if seg.space == graph.output_space:
                return [(c - seg.start, None) for c in kept(seg.space)
                        if seg.start <= c < seg.start + seg.size]
            return [(c, None) for c in _indices(masks[seg.space][seg.start:seg.start + seg.size])]
        return tuple(p for p, _ in layout_positions(layout, chans))

    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for layer in graph.layers:
        if layer.depthwise:
            out = positions(layer.in_layout)
            modules[layer.name] = {"out": out, "in": out}
        else:
            modules[layer.name] = {"out": kept(layer.out_space),
                                   "in": positions(layer.in_layout)}
        for key in ("in", "out"):
            if not modules[layer.name][key]:
                raise PlanError(
                    f"layer {layer.name!r} would keep no {key}put channels; the thresholds "
                    f"prune too much for this task{hint}")
    for name, space in graph.norms.items():
        modules[name] = {"out": kept(space)}
    for name, layout in graph.channel_params.items():
        modules[name] = {"out": positions(layout)}
    for name, layout in graph.group_norms.items():
        modules[name] = {"out": positions(layout)}
    for name, space in graph.attention.items():
        modules[name] = {"out": kept(space)}  # its heads
    return ComponentPlan(modules)


def full_plan(graph: ChannelGraph) -> ComponentPlan:
    """The keep-everything plan (all channels, all outputs in their order)."""
    masks = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    return plan_from_masks(graph, masks, range(graph.space_size[graph.output_space]))
