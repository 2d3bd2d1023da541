"""Closed-form reconstruction: re-fit the layers that read removed channels, without training.

Removing a channel takes its contribution out of every layer that reads it. Each such layer
(conv or linear, in the graph's topological order) is re-fitted so that, on training images
of the task, its output matches the *source's* output of the same layer at the kept output
channels -- the layer's own output, before BatchNorm and activation. The inputs are the
component's own activations, computed with the layers already re-fitted upstream, so each fit
corrects what remains of the error above it instead of compounding it. No labels and no
gradients are used.

For a conv with kept inputs ``P'``, kernel ``kh x kw`` and kept outputs ``Q'``, each output
position of each image is one row: the patch it reads, ``x`` (``D = P' kh kw`` values: the
column :func:`torch.nn.functional.unfold` would give, with the conv's stride, padding and
dilation, in the order of ``weight.view(Q', D)``, gathered at the sampled positions only),
and the source's output there, ``y`` (``Q'`` values).
A linear layer has one row per image. With ``X`` the rows and a column of ones appended (the
intercept), every output channel is an independent ridge regression, solved at once::

    [W; b] = argmin ||X W + 1 b - Y||^2 + lam ||W||^2      (the intercept b not penalised)
           = (X1^T X1 + lam R)^-1 X1^T Y,    X1 = [X, 1],  R = diag(1, ..., 1, 0)

``lam = ridge * mean(diag(X^T X))`` (``ridge`` = 1e-4 by default): relative to the average
energy of one input column, so it does not depend on the number of rows or the scale of the
activations; a layer whose inputs are all zero gets ``lam = ridge``.

The intercept goes into the layer's bias; for a bias-free conv whose output only a BatchNorm
reads, it goes into that BN's running mean (``running_mean = source's - b``, the same affine
map without changing the module); a bias-free layer with no such BN is fitted without one.

**Memory.** Only ``X1^T X1`` (``(D+1)^2``) and ``X1^T Y`` (``(D+1) x Q'``) are kept, in
float64, accumulated over batches; a batch's patches are gathered at the sampled positions
only (``rows x D`` floats, never the whole im2col). The source's targets at the kept outputs
are measured in one pass and cached for the sampled positions (float32, about ``max_rows x
Q'`` per layer). When a conv
has more than ``max_rows`` output positions over all images, each image contributes
``ceil(max_rows / images)`` of its positions, drawn uniformly without replacement (a torch
generator seeded with ``seed`` plus the layer's index, drawn batch by batch in order: the
result is deterministic). A layer with more than ``max_features`` columns is left as cut.

**What is left alone.** Layers whose inputs lost no channel (so a keep-everything plan leaves
the component bit-identical), depthwise convs (their outputs read only their own kept
channel) and grouped convs (never pruned). Cost: one source pass, and per re-fitted layer one
component pass stopped at that layer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLegoError, PlanError
from ..runtime.device import to_device_of
from ..runtime.hooks import forward_hooks, forward_pre_hooks, preserved_state
from .graph import ChannelGraph, Layer
from .plan import ComponentPlan

#: the ridge penalty relative to the mean diagonal of ``X^T X``
RIDGE = 1e-4
#: the most rows (image x output position) a layer's fit uses
MAX_ROWS = 32768
#: layers with more columns (inputs x kernel taps, intercept included) are left as cut
MAX_FEATURES = 8192


@dataclass(frozen=True)
class LayerFit:
    """How one layer was re-fitted, and its output error before and after."""

    name: str
    #: rows of the design matrix (image x output position)
    rows: int
    #: its columns, the intercept included
    features: int
    #: the ridge penalty used
    ridge: float
    #: where the intercept went: ``"bias"``, ``"batchnorm"`` (running mean) or ``"none"``
    intercept: str
    #: ``||output - source's||^2 / ||source's||^2`` on the fitted rows, with the cut weights
    #: (on the same, already repaired, inputs) and with the re-fitted ones
    error_before: float
    error_after: float

    def to_dict(self) -> dict:
        return {"name": self.name, "rows": self.rows, "features": self.features,
                "ridge": self.ridge, "intercept": self.intercept,
                "error_before": self.error_before, "error_after": self.error_after}


@dataclass(frozen=True)
class Reconstruction:
    """What :func:`reconstruct_layers` did."""

    images: int
    layers: tuple[LayerFit, ...]
    #: layers that read removed channels but were left as cut, with the reason
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"images": self.images, "layers": [f.to_dict() for f in self.layers],
                "skipped": dict(self.skipped), "seconds": self.seconds}


class _Reached(Exception):
    """Raised by a pre-hook to stop a forward pass at the layer being fitted."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


def layers_to_refit(graph: ChannelGraph, plan: ComponentPlan) -> list[Layer]:
    """The layers of ``graph`` (topological order) whose inputs ``plan`` removes, except
    depthwise and grouped convs."""
    out = []
    for lay in graph.layers:
        if lay.depthwise or lay.frozen:
            continue
        spec = plan.modules.get(lay.name)
        if spec is None:
            raise PlanError(f"the plan has no entry for layer {lay.name!r}")
        total = lay.module.in_channels if isinstance(lay.module, nn.Conv2d) \
            else lay.module.in_features
        if len(spec["in"]) < total:
            out.append(lay)
    return out


def _positions(rows: int, total: int, images: int, gen: torch.Generator,
               max_rows: int) -> torch.Tensor:
    """``(rows, k)`` output positions for a batch of ``rows`` images of ``total`` positions."""
    k = min(total, math.ceil(max_rows / images))
    if k == total:
        return torch.arange(total).expand(rows, total)
    return torch.rand(rows, total, generator=gen).argsort(1)[:, :k]


def _padded(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` zero-padded as ``conv`` pads it (``"same"`` splits odd padding as torch does:
    the extra row and column go to the bottom and right)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x
        pads = []
        for dim in (1, 0):  # F.pad lists the last dimension first
            total = conv.dilation[dim] * (conv.kernel_size[dim] - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)
    ph, pw = conv.padding[0], conv.padding[1]
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def _conv_rows(conv: nn.Conv2d, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The patches ``conv`` reads at output positions ``pos`` (``(B, k)`` flat indices into
    its output map) of each image of ``x``, one row each, ordered as ``weight.view(Q, -1)``
    (input channel, then kernel row, then kernel column): im2col at those positions only."""
    x = _padded(conv, x)
    b, c, hp, wp = x.shape
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    top, left = (pos // wo) * sh, (pos % wo) * sw  # the patch's corner in the padded input
    flat = x.flatten(2)
    taps = [flat.gather(2, ((top + u * dh) * wp + left + v * dw)[:, None, :].expand(b, c, -1))
            for u in range(kh) for v in range(kw)]
    return torch.stack(taps, 3).permute(0, 2, 1, 3).reshape(-1, c * kh * kw)


class _Normal:
    """Accumulates ``X1^T X1``, ``X1^T Y`` and ``||Y||^2`` in float64."""

    def __init__(self, d: int, q: int, intercept: bool) -> None:
        n = d + int(intercept)
        self.d, self.intercept = d, intercept
        self.xtx = torch.zeros(n, n, dtype=torch.float64)
        self.xty = torch.zeros(n, q, dtype=torch.float64)
        self.yy = 0.0
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        if self.xtx.device != x.device:  # the sums stay on the network's device
            self.xtx, self.xty = self.xtx.to(x.device), self.xty.to(x.device)
        if self.intercept:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], 1)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yy += float((y * y).sum())
        self.rows += len(x)

    def solve(self, ridge: float) -> tuple[torch.Tensor, float]:
        mean = float(self.xtx.diagonal()[:self.d].mean()) if self.d else 0.0
        lam = ridge * mean if mean > 0 else ridge
        penalty = torch.ones(self.xtx.shape[0], dtype=torch.float64)
        if self.intercept:
            penalty[-1] = 0.0
        return torch.linalg.solve(self.xtx + lam * torch.diag(penalty), self.xty), lam

    def error(self, w: torch.Tensor) -> float:
        """``||X1 w - Y||^2 / ||Y||^2`` from the accumulated products."""
        sq = float((w * (self.xtx @ w)).sum() - 2 * (w * self.xty).sum()) + self.yy
        return max(sq, 0.0) / self.yy if self.yy > 0 else 0.0


@torch.no_grad()
def reconstruct_layers(component: nn.Module, source: nn.Module, graph: ChannelGraph,
                       plan: ComponentPlan, images: torch.Tensor, *, ridge: float = RIDGE,
                       max_rows: int = MAX_ROWS, max_features: int = MAX_FEATURES,
                       batch_size: int = 250, seed: int = 0) -> Reconstruction:
    """Re-fit, in place, every layer of ``component`` that reads channels ``plan`` removed.

    ``component`` is ``apply_plan(source, plan)`` (before any head), ``graph`` the channel
    graph of ``source`` and ``images`` normalised training images of the task. See the
    module's docstring for what is fitted. The models' train/eval flags are restored (the
    passes run in eval mode); ``source`` is not changed.

    >>> net = apply_plan(model, plan).eval()
    >>> fits = reconstruct_layers(net, model, graph, plan, x_train[:1000])
    """
    if ridge <= 0:
        raise ModelLegoError(f"`ridge` must be > 0, got {ridge}")
    if max_rows < 1:
        raise ModelLegoError(f"`max_rows` must be >= 1, got {max_rows}")
    t0 = time.perf_counter()
    n = len(images)
    todo = layers_to_refit(graph, plan)
    if not todo or n == 0:
        return Reconstruction(n, (), {}, time.perf_counter() - t0)
    src_mods, comp_mods = dict(source.named_modules()), dict(component.named_modules())
    index = {lay.name: i for i, lay in enumerate(graph.layers)}
    fits, skipped, fitted = [], {}, []
    for lay in todo:
        mod = comp_mods.get(lay.name)
        spec = plan.modules[lay.name]
        expected = (len(spec["out"]), len(spec["in"]))
        weight = getattr(mod, "weight", None)
        found = None if weight is None else (weight.shape[0], weight.shape[1])
        if weight is None or found != expected:
            raise PlanError(f"component layer {lay.name!r} has (outputs, inputs) {found}, the "
                            f"plan {expected}; pass the component apply_plan made from it")
        taps = weight[0, 0].numel()
        if expected[1] * taps + 1 > max_features:
            skipped[lay.name] = (f"{expected[1] * taps + 1} columns, above `max_features` "
                                 f"{max_features}")
            continue
        fitted.append(lay)

    # the source's outputs at the kept channels (and the positions sampled), in one pass
    targets: dict[str, list[torch.Tensor]] = {lay.name: [] for lay in fitted}
    positions: dict[str, list[torch.Tensor]] = {lay.name: [] for lay in fitted}
    gens = {lay.name: torch.Generator().manual_seed(seed + index[lay.name]) for lay in fitted}
    keep = {lay.name: torch.tensor(plan.kept(lay.name), dtype=torch.long) for lay in fitted}
    names = {id(src_mods[lay.name]): lay.name for lay in fitted}

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        name = names[id(module)]
        y = out[:, keep[name]]
        if y.dim() == 4:
            pos = _positions(len(y), y.shape[2] * y.shape[3], n, gens[name],
                             max_rows).to(y.device)
            positions[name].append(pos)
            y = y.flatten(2).gather(2, pos[:, None, :].expand(-1, y.shape[1], -1)) \
                .transpose(1, 2).reshape(-1, y.shape[1])
        targets[name].append(y)

    with preserved_state(source), preserved_state(component):
        source.eval()
        component.eval()
        with forward_hooks([src_mods[lay.name] for lay in fitted], record):
            for s in range(0, n, batch_size):
                source(to_device_of(images[s:s + batch_size], source))
        for lay in fitted:
            fits.append(_refit(lay, component, comp_mods, src_mods, images, keep[lay.name],
                               targets.pop(lay.name), positions.pop(lay.name), batch_size,
                               ridge))
    return Reconstruction(n, tuple(fits), skipped, time.perf_counter() - t0)


def _refit(lay: Layer, component: nn.Module, comp_mods: dict[str, nn.Module],
           src_mods: dict[str, nn.Module], images: torch.Tensor, keep: torch.Tensor,
           ys: list[torch.Tensor], pos: list[torch.Tensor], batch_size: int,
           ridge: float) -> LayerFit:
    mod = cast("nn.Conv2d | nn.Linear", comp_mods[lay.name])
    q = mod.weight.shape[0]
    d = mod.weight[0].numel()
    bn = comp_mods.get(lay.bn_after) if lay.bn_after else None
    where = "none"
    if mod.bias is not None:
        where = "bias"
    elif isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
        where = "batchnorm"
    normal = _Normal(d, q, where != "none")

    def stop(module: nn.Module, args: tuple) -> None:
        raise _Reached(args[0])

    with forward_pre_hooks([(mod, stop)]):
        for b, s in enumerate(range(0, len(images), batch_size)):
            try:
                component(to_device_of(images[s:s + batch_size], component))
            except _Reached as reached:
                x = reached.value
            else:
                raise ModelLegoError(f"layer {lay.name!r} did not run in the component's "
                                     "forward pass")
            rows = _conv_rows(mod, x, pos[b]) if isinstance(mod, nn.Conv2d) else x
            normal.add(rows, ys[b])
    # the layer as cut: its weights and its intercept, where the source's output is the
    # reference (for a BN fold: the shift of the component BN's mean from the source BN's)
    current = mod.weight.reshape(q, d).T.double()
    source_mean = None
    if where == "bias":
        current = torch.cat([current, cast(torch.Tensor, mod.bias).double()[None]])
    elif where == "batchnorm":
        bn_name = cast(str, lay.bn_after)
        source_mean = cast(torch.Tensor, src_mods[bn_name].running_mean)[keep].double()
        shift = source_mean - cast(torch.Tensor, comp_mods[bn_name].running_mean).double()
        current = torch.cat([current, shift[None]])
    before = normal.error(current)
    w, lam = normal.solve(ridge)
    after = normal.error(w)
    mod.weight.copy_(w[:d].T.reshape(mod.weight.shape))
    if where == "bias":
        cast(torch.Tensor, mod.bias).copy_(w[d])
    elif source_mean is not None:
        cast(torch.Tensor, cast(nn.BatchNorm2d, bn).running_mean).copy_(source_mean - w[d])
    return LayerFit(lay.name, normal.rows, normal.xtx.shape[0], lam, where, before, after)
