"""A component plan: for every conv, linear and BN layer, the channel indices to keep.

Plans are plain data (JSON-friendly lists of indices), so a component can be rebuilt from
its source architecture and replayed or composed without re-running any analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import PlanError
from .graph import ChannelGraph


@dataclass(frozen=True)
class ComponentPlan:
    """``modules[name]`` holds ``"out"`` (and for conv/linear ``"in"``) kept indices."""

    modules: dict[str, dict[str, tuple[int, ...]]]

    def to_dict(self) -> dict:
        return {name: {k: list(v) for k, v in spec.items()}
                for name, spec in self.modules.items()}

    @classmethod
    def from_dict(cls, data: dict) -> ComponentPlan:
        try:
            return cls({str(name): {str(k): tuple(int(i) for i in v) for k, v in spec.items()}
                        for name, spec in data.items()})
        except (AttributeError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed component plan ({exc})") from None

    def kept(self, name: str, key: str = "out") -> tuple[int, ...]:
        return self.modules[name][key]

    def compose(self, inner: ComponentPlan) -> ComponentPlan:
        """The plan that applies ``self`` and then ``inner`` (indices relative to ``self``)."""
        out = {}
        for name, spec in self.modules.items():
            sub = inner.modules.get(name)
            out[name] = {k: tuple(v[i] for i in sub[k]) if sub and k in sub else v
                         for k, v in spec.items()}
        return ComponentPlan(out)


def _indices(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero().flatten())


def plan_from_masks(graph: ChannelGraph, masks: dict[int, torch.Tensor],
                    output_indices: Sequence[int], *, hint: str = "") -> ComponentPlan:
    """Turn per-space keep masks into a per-module plan; the logits keep ``output_indices``
    in that order. Raises :class:`PlanError` naming the first layer left with no channels."""
    def kept(space: int) -> tuple[int, ...]:
        if space == graph.output_space:
            return tuple(int(i) for i in output_indices)
        return _indices(masks[space])

    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for layer in graph.layers:
        out = kept(layer.out_space)
        if layer.depthwise:
            modules[layer.name] = {"out": out, "in": out}
        else:
            feats: list[int] = []
            offset = 0
            for seg in layer.in_layout:
                for c in kept(seg.space):
                    start = offset + c * seg.repeat
                    feats.extend(range(start, start + seg.repeat))
                offset += seg.size * seg.repeat
            modules[layer.name] = {"out": out, "in": tuple(feats)}
        for key in ("in", "out"):
            if not modules[layer.name][key]:
                raise PlanError(
                    f"layer {layer.name!r} would keep no {key}put channels; the thresholds "
                    f"prune too much for this task{hint}")
    for name, space in graph.norms.items():
        modules[name] = {"out": kept(space)}
    return ComponentPlan(modules)


def full_plan(graph: ChannelGraph) -> ComponentPlan:
    """The keep-everything plan (all channels, all outputs in their order)."""
    masks = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    return plan_from_masks(graph, masks, range(graph.space_size[graph.output_space]))
