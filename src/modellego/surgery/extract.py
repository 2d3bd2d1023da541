"""Extraction: a real, physically smaller ``nn.Module`` built from a component plan."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from ..errors import ModelFileError, PlanError
from ..kinds import build_from_manifest
from .head import apply_head
from .plan import ComponentPlan


def _idx(indices: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(indices, dtype=torch.long)


def _slice_conv(conv: nn.Conv2d, out: tuple[int, ...], inp: tuple[int, ...]) -> nn.Conv2d:
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    if conv.groups > 1 and not depthwise:
        if len(out) != conv.out_channels or len(inp) != conv.in_channels:
            raise PlanError("a grouped conv cannot be pruned; the plan must keep all its channels")
        return conv
    groups = len(out) if depthwise else 1
    # _ConvNd types these as tuple[int, ...]; a Conv2d always holds 2-tuples
    pair = tuple[int, int]
    new = nn.Conv2d(len(inp), len(out), cast(pair, conv.kernel_size),
                    stride=cast(pair, conv.stride),
                    padding=cast("str | tuple[int, int]", conv.padding),
                    dilation=cast(pair, conv.dilation), groups=groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    with torch.no_grad():
        w = conv.weight[_idx(out)]
        new.weight.copy_(w if depthwise else w[:, _idx(inp)])
        if conv.bias is not None:
            # built with bias=True just above, so the new conv has one too
            cast(torch.Tensor, new.bias).copy_(conv.bias[_idx(out)])
    return new


def _slice_linear(lin: nn.Linear, out: tuple[int, ...], inp: tuple[int, ...]) -> nn.Linear:
    new = nn.Linear(len(inp), len(out), bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(lin.weight[_idx(out)][:, _idx(inp)])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[_idx(out)])
    return new


def _slice_bn(bn: nn.BatchNorm2d, out: tuple[int, ...]) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(out), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats)
    idx = _idx(out)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[idx])
            new.bias.copy_(bn.bias[idx])
        if bn.track_running_stats:
            # BatchNorm registers these buffers exactly when track_running_stats is set
            # (both modules have it), so neither side is None here
            cast(torch.Tensor, new.running_mean).copy_(cast(torch.Tensor, bn.running_mean)[idx])
            cast(torch.Tensor, new.running_var).copy_(cast(torch.Tensor, bn.running_var)[idx])
            cast(torch.Tensor, new.num_batches_tracked).copy_(
                cast(torch.Tensor, bn.num_batches_tracked))
    return new


def apply_plan(model: nn.Module, plan: ComponentPlan) -> nn.Module:
    """A new model with every planned layer replaced by its sliced copy (``model`` untouched).

    The new model keeps the source's classes and forward code, so it traces and runs like
    the source; only channel counts differ.
    """
    new = copy.deepcopy(model)
    modules = dict(new.named_modules())
    for name, spec in plan.modules.items():
        mod = modules.get(name)
        if mod is None:
            raise PlanError(f"plan names layer {name!r}, which the model does not have")
        try:
            repl: nn.Module
            if isinstance(mod, nn.Conv2d):
                repl = _slice_conv(mod, spec["out"], spec["in"])
            elif isinstance(mod, nn.Linear):
                repl = _slice_linear(mod, spec["out"], spec["in"])
            elif isinstance(mod, nn.BatchNorm2d):
                repl = _slice_bn(mod, spec["out"])
            else:
                raise PlanError(f"plan names layer {name!r} of type {type(mod).__name__}, "
                                "which cannot be sliced")
        except (IndexError, RuntimeError, KeyError) as exc:
            raise PlanError(f"plan does not fit layer {name!r} ({exc})") from None
        repl.train(mod.training)  # fresh modules start in train mode; keep the source's
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else new
        setattr(parent, attr, repl)
    return new


def build_component(manifest: Mapping[str, Any]) -> nn.Module:
    source = dict(manifest)
    source["kind"] = "model"
    if "plan" not in manifest:
        raise ModelFileError("component manifest has no plan")
    net = apply_plan(build_from_manifest(source), ComponentPlan.from_dict(manifest["plan"]))
    # a Pan & Rajan module answers with concern scores (see modellego.surgery.head)
    return apply_head(net, manifest.get("head"), len(manifest.get("classes", ())))


@torch.no_grad()
def compensate_removed_inputs(component: nn.Module, plan: ComponentPlan,
                              means: dict[str, torch.Tensor],
                              bn_after: dict[str, str | None]) -> list[str]:
    """Fold the average contribution of every removed input into the layer's bias.

    ``means[name]`` is the source's ``(Q, P)`` mean signed contribution per output position.
    The shift goes into the layer's bias or, for a bias-free conv followed only by a
    BatchNorm, into that BN's running mean (the same thing, without changing the module
    structure). Returns the names of the layers it changed.
    """
    modules = dict(component.named_modules())
    changed = []
    for name, mean in means.items():
        spec = plan.modules.get(name)
        if spec is None:
            continue
        removed = torch.ones(mean.shape[1], dtype=torch.bool)
        removed[_idx(spec["in"])] = False
        if not removed.any():
            continue
        delta = mean[_idx(spec["out"])][:, removed].sum(1).float()
        layer = modules[name]
        if layer.bias is not None:
            layer.bias += delta
        elif bn_after.get(name) and modules[bn_after[name]].track_running_stats:
            modules[bn_after[name]].running_mean -= delta
        else:
            continue
        changed.append(name)
    return changed
