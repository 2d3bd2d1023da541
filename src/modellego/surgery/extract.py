"""Extraction: a real, physically smaller ``nn.Module`` built from a component plan."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ModelFileError, PlanError
from ..kinds import build_from_manifest
from ..models.attention import keep_heads
from .head import apply_head
from .plan import ComponentPlan
from .trace import attention_leaf


def _idx(indices: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(indices, dtype=torch.long)


def _param(like: torch.Tensor, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.clone(), requires_grad=like.requires_grad)


# The slicers change the module they are given (apply_plan hands them its own deep copy), so
# a subclass keeps its class and forward (timm's Linear, Conv2dSame, norm-act layers).


def _slice_conv(conv: nn.Conv2d, out: tuple[int, ...], inp: tuple[int, ...]) -> nn.Conv2d:
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    if conv.groups > 1 and not depthwise:
        if len(out) != conv.out_channels or len(inp) != conv.in_channels:
            raise PlanError("a grouped conv cannot be pruned; the plan must keep all its channels")
        return conv
    with torch.no_grad():
        w = conv.weight[_idx(out)]
        conv.weight = _param(conv.weight, w if depthwise else w[:, _idx(inp)])
        if conv.bias is not None:
            conv.bias = _param(conv.bias, conv.bias[_idx(out)])
    conv.in_channels, conv.out_channels = len(inp), len(out)
    if depthwise:
        conv.groups = len(out)
    return conv


def _slice_linear(lin: nn.Linear, out: tuple[int, ...], inp: tuple[int, ...]) -> nn.Linear:
    with torch.no_grad():
        lin.weight = _param(lin.weight, lin.weight[_idx(out)][:, _idx(inp)])
        if lin.bias is not None:
            lin.bias = _param(lin.bias, lin.bias[_idx(out)])
    lin.in_features, lin.out_features = len(inp), len(out)
    return lin


def _slice_bn(bn: nn.BatchNorm1d | nn.BatchNorm2d, out: tuple[int, ...]
              ) -> nn.BatchNorm1d | nn.BatchNorm2d:
    """``bn`` with the per-channel parameters and statistics of channels ``out`` (a timm
    norm-act layer stays one, with its activation)."""
    _slice_channels(bn, out)
    bn.num_features = len(out)
    return bn


def _slice_channels(norm: nn.Module, out: tuple[int, ...]) -> None:
    """Keep channels ``out`` of a norm module's own parameters and per-channel buffers."""
    idx = _idx(out)
    with torch.no_grad():
        for name, p in list(norm.named_parameters(recurse=False)):
            setattr(norm, name, _param(p, p[idx]))
        for name, buf in list(norm.named_buffers(recurse=False)):
            if buf is not None and buf.dim() == 1:  # num_batches_tracked is a scalar
                setattr(norm, name, buf[idx].clone())


def _slice_group_norm(name: str, norm: nn.GroupNorm, out: tuple[int, ...]) -> nn.GroupNorm:
    """``norm`` with the groups of channels ``out``, which must be whole groups."""
    size = norm.num_channels // norm.num_groups
    kept = set(out)
    if len(kept) != len(out) or any(g * size + k not in kept for g in {i // size for i in out}
                                    for k in range(size)):
        raise PlanError(f"GroupNorm {name!r} can only lose whole groups of {size} channels")
    _slice_channels(norm, out)
    norm.num_channels, norm.num_groups = len(out), len(out) // size
    return norm


def _slice_tensor(model: nn.Module, name: str, out: tuple[int, ...]) -> None:
    """Slice parameter or buffer ``name`` of ``model`` in place, along its one axis longer
    than 1 (how the channel graph records per-channel tensors)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    t = getattr(owner, attr, None)
    if not isinstance(t, torch.Tensor):
        raise PlanError(f"plan names {name!r}, which the model does not have")
    axes = [d for d, n in enumerate(t.shape) if n > 1]
    if len(axes) != 1:
        raise PlanError(f"plan names {name!r} of shape {list(t.shape)}; only tensors with one "
                        "axis longer than 1 can be sliced")
    with torch.no_grad():
        sliced = t.index_select(axes[0], _idx(out)).clone()
    if isinstance(t, nn.Parameter):
        setattr(owner, attr, nn.Parameter(sliced, requires_grad=t.requires_grad))
    else:
        setattr(owner, attr, sliced)


def _keep_heads(mod: nn.Module, heads: tuple[int, ...]) -> nn.Module:
    """An attention layer with only ``heads``: the layer itself when it keeps them all in
    order, else a :class:`~modellego.models.attention.HeadAttention` over its cut ``qkv``
    (and its ``proj``, which the plan cuts by its own entry)."""
    total = getattr(mod, "num_heads", None)
    if tuple(heads) == tuple(range(total if isinstance(total, int) else -1)):
        return mod
    return keep_heads(mod, heads)


def apply_plan(model: nn.Module, plan: ComponentPlan) -> nn.Module:
    """A new model with every planned layer replaced by its sliced copy (``model`` untouched).

    The new model keeps the source's classes and forward code, so it traces and runs like
    the source; only channel counts differ. A plan entry that names a parameter or buffer
    rather than a module slices that tensor.
    """
    new = copy.deepcopy(model)
    modules = dict(new.named_modules())
    # attention layers first: one is recognised by its uncut q, k, v and output projections
    entries = sorted(plan.modules.items(),
                     key=lambda item: not (item[0] in modules and attention_leaf(modules[item[0]])))
    for name, spec in entries:
        mod = modules.get(name)
        if mod is None:
            try:
                _slice_tensor(new, name, spec["out"])
            except (AttributeError, IndexError, RuntimeError, KeyError) as exc:
                raise PlanError(f"plan does not fit {name!r} ({exc})") from None
            continue
        try:
            repl: nn.Module
            if isinstance(mod, nn.Conv2d):
                repl = _slice_conv(mod, spec["out"], spec["in"])
            elif isinstance(mod, nn.Linear):
                repl = _slice_linear(mod, spec["out"], spec["in"])
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                repl = _slice_bn(mod, spec["out"])
            elif isinstance(mod, nn.GroupNorm):
                repl = _slice_group_norm(name, mod, spec["out"])
            elif attention_leaf(mod):
                repl = _keep_heads(mod, spec["out"])
            else:
                raise PlanError(f"plan names layer {name!r} of type {type(mod).__name__}, "
                                "which cannot be sliced")
        except (IndexError, RuntimeError, KeyError) as exc:
            raise PlanError(f"plan does not fit layer {name!r} ({exc})") from None
        if repl is not mod:  # (the slicers change the copy's own modules in place)
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
