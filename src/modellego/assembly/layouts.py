"""Assembly layouts: how the parts' networks are laid out in the assembled model.

A layout is one small class registered in :data:`LAYOUTS`. It builds the *body* (the module
that returns one ``(outputs, features)`` pair per part), says whether the parts' own
features reach the scaling (only then can a feature-based scaling such as ``calibrated``
serve it), whether it accepts parts with a head, and whether the body is the parts
themselves (else Base is measured on the parts when the assembly is made).

``parallel``: each part on its own adapted input (any architectures, no zero FLOPs);
``padded``: the paper's widened block-diagonal network (:mod:`.padded`); ``union``:
components of one source merged by the union of their channels (:mod:`.union`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ModelLegoError
from ..registry import Registry
from .adapters import InputAdapter
from .parts import Part
from .scalings import Scaling
from .scoring import FeatureTap

#: per part: its (logits or concern scores, tapped features)
PartOutputs = list[tuple[torch.Tensor, list[torch.Tensor]]]


class ParallelBody(nn.Module):
    """Each part on its own adapted input; no FLOPs are spent on zero blocks."""

    def __init__(self, adapters: Sequence[InputAdapter], nets: Sequence[nn.Module],
                 taps: Sequence[Sequence[str]] | None = None) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        self.parts = nn.ModuleList(FeatureTap(n, t) for n, t in zip(nets, taps)) if taps \
            else nn.ModuleList(nets)
        self.tapped = bool(taps)

    def forward(self, x: torch.Tensor) -> PartOutputs:
        outs = []
        for adapter, part in zip(self.adapters, self.parts):
            out = part(adapter(x))
            outs.append(out if self.tapped else (out, []))
        return outs


class Layout:
    """The ``parallel`` layout; the other layouts override what differs."""

    name = "parallel"
    #: each part's own features reach the scaling (feature-based scalings need this)
    features = True
    #: parts with a head (one-vs-rest modules) can be laid out
    accepts_heads = True
    #: the body's per-part outputs are the parts' own (else Base is measured at assembly)
    body_is_parts = True

    def check(self, scaling: Scaling) -> None:
        """Refuse a scaling this layout cannot serve."""
        if scaling.needs_features and not self.features:
            raise ModelLegoError(f"`scaling` {scaling.name} needs each part's own features; "
                                 f"use `layout` parallel, or another `scaling` with "
                                 f"`layout` {self.name}")

    def check_parts(self, parts: Sequence[Part]) -> None:
        """Refuse parts this layout cannot lay out."""
        for k, p in enumerate(parts):
            if p.entry.head and not self.accepts_heads:
                raise ModelLegoError(f"part {k} has a {p.entry.head} head, which layout "
                                     f"{self.name!r} cannot widen or merge; use layout "
                                     "'parallel'")

    def spec(self, parts: Sequence[Part]) -> dict[str, Any] | None:
        """What the manifest records to rebuild the body (its ``"union"`` entry)."""
        return None

    def body(self, adapters: list[InputAdapter], parts: Sequence[Part],
             taps: list[list[str]] | None, spec: dict[str, Any] | None, *,
             weights: bool) -> nn.Module:
        """The body; ``weights=False``: an empty structure to load a state dict into."""
        return ParallelBody(adapters, [p.net for p in parts], taps)


class Padded(Layout):
    name = "padded"
    features = False
    accepts_heads = False

    def body(self, adapters, parts, taps, spec, *, weights):
        from .padded import PaddedBody

        return PaddedBody(adapters, parts)


class Union(Layout):
    name = "union"
    features = False
    accepts_heads = False
    body_is_parts = False

    def spec(self, parts):
        from .union import union_spec

        return union_spec(parts)

    def body(self, adapters, parts, taps, spec, *, weights):
        from ..files import load_model
        from .union import UnionBody, union_net

        source = load_model(spec["source"]["file"])[0] if weights else None
        return UnionBody(adapters[0], union_net(spec, source), [p.num_outputs
                                                                for p in parts])


#: every assembly layout, by name, in the order the CLI lists them
LAYOUT_REGISTRY: Registry[Layout] = Registry("layout")
for _layout in (Layout(), Padded(), Union()):
    LAYOUT_REGISTRY.register(_layout.name, _layout)


def get_layout(name: str) -> Layout:
    """The layout registered as ``name``; a one-line error lists the known ones."""
    return LAYOUT_REGISTRY.get(name)
