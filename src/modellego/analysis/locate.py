"""Component locating: from a class logit backwards along the channel graph to the input.

For each layer, the relevant outputs (mask ``m``) select the rows of the layer's normalised
contribution matrix; an input channel is kept when enough relevant outputs depend on it.
Two scoring rules are offered:

``count`` (the paper's): kernel ``(q, p)`` is relevant when its min-max normalised
    contribution exceeds ``alpha``; ``u[p]`` counts relevant outputs that have relevant
    kernel ``(q, p)``; input ``p`` is kept when the min-max normalised ``u`` exceeds ``beta``.
``mass``: ``u[p]`` sums the contribution *shares* ``S[q,p] / sum_p S[q,p]`` of the relevant
    outputs, and inputs are kept, largest first, until they hold a fraction ``1 - beta`` of the
    total. It keeps what carries the signal rather than what is touched often, which matters
    in narrow nets where most channels touch every output a little.

The count rule normalises over the inputs ``p`` either by min-max (``normalize="minmax"``,
the paper's) or un-centred, dividing by the maximum (``"max"``, the ICLR'23 contribution
paradigm); the mass rule works on shares and needs no normalisation.

Channels coupled by residual adds form one space, read and written by several layers, so the
walk repeats until no mask grows (a fixed point); masks only ever grow, so it ends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from ..errors import ModelLegoError
from ..surgery.graph import ChannelGraph, Layer
from ..surgery.plan import close_ties
from .contribution import minmax_normalize
from .profile import ContributionProfile

RULES = ("count", "mass")
NORMALIZATIONS = ("minmax", "max")


@dataclass(frozen=True)
class LocateConfig:
    """Thresholds of component locating (defaults from the public Model LEGO code)."""

    alpha_conv: float = 0.3
    beta_conv: float = 0.2
    alpha_linear: float = 0.4
    beta_linear: float = 0.3
    rule: str = "count"
    max_rounds: int = 20
    #: per-layer beta overrides ``((layer name, beta), ...)``, set by the refining search
    layer_beta: tuple[tuple[str, float], ...] = ()
    #: count rule: ``"minmax"`` (the paper's) or ``"max"`` (divide by the maximum over p)
    normalize: str = "minmax"
    #: locate the task as one class (its classes' profiles summed, every task logit the
    #: output to serve) instead of the OR of its classes' masks: a channel that one class
    #: of many needs a little may go (the default's search tries both on multi-class tasks)
    task_level: bool = False

    def validate(self) -> None:
        for name in ("alpha_conv", "beta_conv", "alpha_linear", "beta_linear"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                flag = "--" + name.replace("_", "-")
                raise ModelLegoError(f"{flag} must lie in [0, 1], got {v}")
        for name, v in self.layer_beta:
            if not 0.0 <= v <= 1.0:
                raise ModelLegoError(f"beta of layer {name!r} must lie in [0, 1], got {v}")
        if self.rule not in RULES:
            raise ModelLegoError(f"unknown locating rule {self.rule!r}; use one of {RULES}")
        if self.normalize not in NORMALIZATIONS:
            raise ModelLegoError(f"unknown normalisation {self.normalize!r}; use one of "
                                 f"{NORMALIZATIONS}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_beta"] = dict(self.layer_beta)
        if not self.task_level:  # as files recorded it before the field existed
            del d["task_level"]
        return d


def profiled_layers(graph: ChannelGraph) -> list[Layer]:
    """Layers whose contributions drive locating (depthwise and grouped convs pass masks on)."""
    return [lay for lay in graph.layers if not (lay.depthwise or lay.frozen)]


def layer_heads(graph: ChannelGraph, layer: Layer) -> int:
    """``head_dim`` when ``layer`` is an attention layer's output projection (it reads the
    heads, each as one channel of ``head_dim`` features), else 0."""
    spaces = {graph.find(s) for s in graph.attention.values()}
    if len(layer.in_layout) == 1 and graph.find(layer.in_layout[0].space) in spaces:
        return layer.in_layout[0].repeat
    return 0


def max_normalize(S: torch.Tensor, dim: int = -1, eps: float = 1e-5) -> torch.Tensor:
    """``S / (max + eps)`` with the max taken over ``dim`` (un-centred normalisation)."""
    return S / (S.amax(dim=dim, keepdim=True) + eps)


def _needed_inputs(S: torch.Tensor, out_mask: torch.Tensor, alpha: float, beta: float,
                   rule: str, normalize: str = "minmax") -> torch.Tensor:
    """Boolean mask over the layer's input features for the relevant outputs ``out_mask``."""
    S = S[out_mask]
    if rule == "count":
        norm = minmax_normalize if normalize == "minmax" else max_normalize
        relevant = norm(S, dim=1) > alpha
        u = relevant.sum(0).double()
        if bool((u == u[0]).all()) and u[0] > 0:
            # every input counts as often (few inputs, as an attention layer's heads): all
            # are needed alike, where min-max would make every one 0
            return torch.ones_like(u, dtype=torch.bool)
        return norm(u, dim=0) > beta
    share = S / S.sum(1, keepdim=True).clamp_min(1e-300)
    u = share.sum(0)
    order = torch.sort(-u, stable=True).indices
    cum = torch.cumsum(u[order], 0)
    need_count = int((cum < (1.0 - beta) * cum[-1]).sum()) + 1
    keep = torch.zeros_like(u, dtype=torch.bool)
    keep[order[:need_count]] = True
    keep &= u > 0
    if not keep.any() and len(u):
        # no input contributes at all (a dead branch: an SE squeeze after a ReLU that never
        # fires); one input is kept, the first of the largest, so that the layer still
        # exists: its contribution is zero, so the component computes what the masked
        # source does
        keep[order[0]] = True
    return keep


def locate_class(graph: ChannelGraph, profile: ContributionProfile,
                 output_index: int | Sequence[int], profile_class: int | Sequence[int],
                 config: LocateConfig) -> dict[int, torch.Tensor]:
    """Relevant channels of every space for one class; ``output_index`` is its logit.

    Given several logits and several profile classes, the channels of their union taken as
    one class (the classes' contributions summed; ``task_level``)."""
    masks = {s: torch.zeros(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    outputs = [output_index] if isinstance(output_index, int) else list(output_index)
    merged = [profile_class] if isinstance(profile_class, int) else list(profile_class)
    masks[graph.output_space][outputs] = True
    layers = profiled_layers(graph)
    overrides = dict(config.layer_beta)
    for _ in range(config.max_rounds):
        changed = False
        for layer in reversed(layers):
            out_mask = masks[layer.out_space]
            if layer.out_space in graph.frozen_spaces:
                out_mask = torch.ones_like(out_mask)
            if not out_mask.any():
                continue
            S = profile.for_class(layer.name, merged[0])
            for c in merged[1:]:
                S = S + profile.for_class(layer.name, c)
            S = S.reshape(S.shape[0], -1) if S.dim() > 2 else S
            if layer.kind == "conv":
                alpha, beta = config.alpha_conv, config.beta_conv
            else:
                alpha, beta = config.alpha_linear, config.beta_linear
            beta = overrides.get(layer.name, beta)
            heads = layer_heads(graph, layer)
            if heads:  # a head is one unit: its features' contributions summed
                S = S.reshape(S.shape[0], -1, heads).sum(-1)
            need = _needed_inputs(S, out_mask, alpha, beta, config.rule, config.normalize)
            offset = 0
            for seg in layer.in_layout:
                width = seg.size if heads else seg.size * seg.repeat
                block = need[offset:offset + width]
                offset += width
                chans = block if heads else block.view(seg.size, seg.repeat).any(1)
                run = masks[seg.space][seg.start:seg.start + seg.size]  # a view: updated
                grown = chans & ~run
                if grown.any():
                    run |= chans
                    changed = True
        if graph.ties:
            # a run tied to a kept one is kept too (an SE gate multiplying the map it
            # gates): its writers then need their inputs in the next round
            closed = close_ties(graph, masks)
            for s, m in closed.items():
                if not torch.equal(m, masks[s]):
                    masks[s] |= m
                    changed = True
        if not changed:
            break
    return masks


def locate(graph: ChannelGraph, profile: ContributionProfile, classes: Sequence[int],
           output_classes: Sequence[int], config: LocateConfig) -> dict[int, torch.Tensor]:
    """The task's keep-mask of every space: the OR of its classes' masks (with
    ``config.task_level``, the mask of the task located as one class).

    Frozen spaces (the image input, grouped convs) are kept whole.
    """
    config.validate()
    output_classes = list(output_classes)
    total = {s: torch.zeros(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    groups: list[tuple[int | list[int], int | list[int]]] = \
        [([output_classes.index(c) for c in classes], list(classes))] if config.task_level \
        else [(output_classes.index(c), c) for c in classes]
    for outputs, merged in groups:
        masks = locate_class(graph, profile, outputs, merged, config)
        for s in total:
            total[s] |= masks[s]
    for s in graph.frozen_spaces:
        total[s][:] = True
    return total


def union_of_class_masks(graph: ChannelGraph, classes: Sequence[int],
                         class_masks: Callable[[int], dict[int, torch.Tensor]]
                         ) -> dict[int, torch.Tensor]:
    """The task's keep-mask of every space: the OR over ``classes`` of ``class_masks(c)``,
    with frozen spaces (image input, grouped convs) kept whole."""
    total = {s: torch.zeros(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    for c in classes:
        for s, m in class_masks(c).items():
            total[s] |= m
    for s in graph.frozen_spaces:
        total[s][:] = True
    return total
