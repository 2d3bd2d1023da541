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
only (``rows x D`` floats, never the whole im2col); while a layer has no more rows than
columns, the rows themselves are kept and the fit solved in its dual form. The source's
targets (every output channel) are measured in one pass and cached for the sampled positions
(float32, about ``max_rows x Q`` per layer; :class:`SourceTargets` shares them among the
candidates of a search, within a quarter of ``max_memory``). When a conv
has more than ``max_rows`` output positions over all images, each image contributes
``ceil(max_rows / images)`` of its positions, drawn uniformly without replacement (a torch
generator seeded with ``seed`` plus the layer's index, drawn batch by batch in order: the
result is deterministic). A layer with more than ``max_features`` columns is left as cut.

**What is left alone.** Layers whose inputs lost no channel (so a keep-everything plan leaves
the component bit-identical), depthwise convs (their outputs read only their own kept
channel) and grouped convs (never pruned). Cost: one source pass (none with a cache that
holds it), and one component pass through the traced graph, node by node over all the
images (see :func:`reconstruct_layers`; else one component pass per re-fitted layer).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..data.lazy import max_memory
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


def _used_taps(conv: nn.Conv2d, height: int, width: int) -> list[tuple[int, int]]:
    """The kernel taps ``(u, v)`` of ``conv`` that read inside an input of ``height x
    width`` at some output position: the others read only padding (a 3x3 conv on a 1x1 map
    reads its centre alone), so their columns of the design matrix are zero."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if isinstance(conv.padding, str):
        ph, pw = ((dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2) if conv.padding == "same" \
            else (0, 0)
    else:
        ph, pw = conv.padding[0], conv.padding[1]
    out_h = height if conv.padding == "same" else (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = width if conv.padding == "same" else (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def inside(k: int, size: int, out: int, stride: int, pad: int, dil: int) -> bool:
        return any(0 <= i * stride - pad + k * dil < size for i in range(out))

    rows = [u for u in range(kh) if inside(u, height, out_h, sh, ph, dh)]
    cols = [v for v in range(kw) if inside(v, width, out_w, sw, pw, dw)]
    return [(u, v) for u in rows for v in cols]


def _conv_rows(conv: nn.Conv2d, x: torch.Tensor, pos: torch.Tensor,
               taps: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """The patches ``conv`` reads at output positions ``pos`` (``(B, k)`` flat indices into
    its output map) of each image of ``x``, one row each, ordered as ``weight.view(Q, -1)``
    (input channel, then kernel row, then kernel column): im2col at those positions only.
    ``taps``: only these kernel taps (in their order within each channel)."""
    x = _padded(conv, x)
    b, c, hp, wp = x.shape
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    taps = taps if taps is not None else [(u, v) for u in range(kh) for v in range(kw)]
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    top, left = (pos // wo) * sh, (pos % wo) * sw  # the patch's corner in the padded input
    flat = x.flatten(2)
    cols = [flat.gather(2, ((top + u * dh) * wp + left + v * dw)[:, None, :].expand(b, c, -1))
            for u, v in taps]
    return torch.stack(cols, 3).permute(0, 2, 1, 3).reshape(-1, c * len(taps))


#: column blocks of the symmetric ``X^T X`` products: only the blocks on and above the
#: diagonal are multiplied (about 60 % of the multiply-adds at 2,000 columns and more)
GRAM_BLOCK = 384


class _Normal:
    """Accumulates ``X1^T X1``, ``X1^T Y`` and ``||Y||^2`` in float64. ``columns``: how many
    columns the full design matrix has when only ``d`` of them (the others all zero) are
    accumulated; the ridge is relative to the mean over all of them.

    ``X^T X`` is summed in column blocks of :data:`GRAM_BLOCK`, the blocks on and above the
    diagonal only, and mirrored when read; the intercept's column of ones is kept as the
    column sums of ``X`` and ``Y`` and a row count, not concatenated to every batch.

    While there are no more rows than columns, the rows themselves are kept instead and the
    fit is solved in its dual form, ``W = Xc^T (Xc Xc^T + lam I)^-1 Yc`` on the centred
    rows (the intercept, unpenalised, is ``mean(Y) - mean(X) W``): the same solution as the
    normal equations, at the cost of the rows' count cubed instead of the columns'."""

    def __init__(self, d: int, q: int, intercept: bool, columns: int | None = None) -> None:
        self.d, self.q, self.intercept = d, q, intercept
        self.columns = d if columns is None else columns
        self._upper: torch.Tensor | None = None  # X^T X, blocks on and above the diagonal
        self._xty: torch.Tensor | None = None
        self._xsum: torch.Tensor | None = None
        self._ysum: torch.Tensor | None = None
        self._system: tuple[torch.Tensor, torch.Tensor] | None = None
        self.xs: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.yy = 0.0
        self.rows = 0

    @property
    def features(self) -> int:
        return self.d + int(self.intercept)

    @property
    def xtx(self) -> torch.Tensor | None:
        """``X1^T X1`` (the intercept's column last), once the rows outnumber the columns."""
        return None if self._upper is None else self._normal()[0]

    @property
    def xty(self) -> torch.Tensor | None:
        """``X1^T Y``, once the rows outnumber the columns."""
        return None if self._upper is None else self._normal()[1]

    def _normal(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._system is None:
            upper = cast(torch.Tensor, self._upper)
            gram = torch.triu(upper) + torch.triu(upper, 1).T
            xty = cast(torch.Tensor, self._xty)
            if self.intercept:
                xsum = cast(torch.Tensor, self._xsum)
                # every row is in the sums once they exist (the kept ones moved in)
                n = torch.full((1, 1), float(self.rows), dtype=torch.float64,
                               device=gram.device)
                gram = torch.cat([torch.cat([gram, xsum[:, None]], 1),
                                  torch.cat([xsum[None], n], 1)])
                xty = torch.cat([xty, cast(torch.Tensor, self._ysum)[None]])
            self._system = (gram, xty)
        return self._system

    def _with_ones(self, x: torch.Tensor) -> torch.Tensor:
        if not self.intercept:
            return x
        return torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], 1)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.yy += float((y * y).sum())
        self.rows += len(x)
        if self._upper is None and self.rows <= self.features:
            self.xs.append(x)
            self.ys.append(y)
            return
        if self._upper is None:  # past as many rows as columns: the normal equations
            f64, dev = torch.float64, x.device
            self._upper = torch.zeros(self.d, self.d, dtype=f64, device=dev)
            self._xty = torch.zeros(self.d, self.q, dtype=f64, device=dev)
            self._xsum = torch.zeros(self.d, dtype=f64, device=dev)
            self._ysum = torch.zeros(self.q, dtype=f64, device=dev)
            for kx, ky in zip(self.xs, self.ys):
                self._accumulate(kx, ky)
            self.xs, self.ys = [], []
        self._accumulate(x, y)

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if cast(torch.Tensor, self._upper).device != x.device:  # the sums stay on the
            # network's device
            self._upper, self._xty, self._xsum, self._ysum = (
                cast(torch.Tensor, t).to(x.device)
                for t in (self._upper, self._xty, self._xsum, self._ysum))
        upper = cast(torch.Tensor, self._upper)
        for a in range(0, self.d, GRAM_BLOCK):
            b = min(self.d, a + GRAM_BLOCK)
            upper[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])
        cast(torch.Tensor, self._xty).addmm_(x.T, y)
        cast(torch.Tensor, self._xsum).add_(x.sum(0))
        cast(torch.Tensor, self._ysum).add_(y.sum(0))
        self._system = None

    def _ridge(self, squares: float, ridge: float) -> float:
        mean = squares / self.columns if self.columns else 0.0
        return ridge * mean if mean > 0 else ridge

    def solve(self, ridge: float) -> tuple[torch.Tensor, float]:
        if self._upper is None:
            return self._solve_dual(ridge)
        xtx, xty = self._normal()
        lam = self._ridge(float(xtx.diagonal()[:self.d].sum()), ridge)
        penalty = torch.ones(xtx.shape[0], dtype=torch.float64, device=xtx.device)
        if self.intercept:
            penalty[-1] = 0.0
        return torch.linalg.solve(xtx + lam * torch.diag(penalty), xty), lam

    def _solve_dual(self, ridge: float) -> tuple[torch.Tensor, float]:
        x, y = torch.cat(self.xs), torch.cat(self.ys)
        lam = self._ridge(float((x * x).sum()), ridge)
        xm = x.mean(0, keepdim=True) if self.intercept else torch.zeros_like(x[:1])
        ym = y.mean(0, keepdim=True) if self.intercept else torch.zeros_like(y[:1])
        xc, yc = x - xm, y - ym
        gram = xc @ xc.T + lam * torch.eye(len(x), dtype=torch.float64, device=x.device)
        w = xc.T @ torch.linalg.solve(gram, yc)
        if self.intercept:
            w = torch.cat([w, ym - xm @ w])
        return w, lam

    def error(self, w: torch.Tensor) -> float:
        """``||X1 w - Y||^2 / ||Y||^2`` on the rows."""
        if self._upper is None:
            x, y = torch.cat(self.xs), torch.cat(self.ys)
            sq = float(((self._with_ones(x) @ w.to(x.device)) - y).pow(2).sum())
        else:
            xtx, xty = self._normal()
            sq = float((w * (xtx @ w)).sum() - 2 * (w * xty).sum()) + self.yy
        return max(sq, 0.0) / self.yy if self.yy > 0 else 0.0


def _flat_positions(out: torch.Tensor, conv: bool) -> int:
    """How many output positions one image of ``out`` has: a conv's ``H x W``; a linear's
    product of the axes between the batch and its features (1 for a 2-D input)."""
    return out.shape[2] * out.shape[3] if conv else math.prod(out.shape[1:-1])


def _target_rows(out: torch.Tensor, conv: bool, pos: torch.Tensor | None) -> torch.Tensor:
    """``out`` (all its channels) at positions ``pos`` of each image, one row each: a
    conv's channels lie on dim 1, a linear's on the last dim (a linear over a channel-last
    map or the tokens of a sequence has one row per position)."""
    if conv:
        q = out.shape[1]
        return out.flatten(2).gather(2, cast(torch.Tensor, pos)[:, None, :].expand(-1, q, -1)) \
            .transpose(1, 2).reshape(-1, q)
    return _linear_rows(out, pos)


def _linear_rows(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """A linear layer's rows: ``x`` itself for a 2-D input, else its feature vectors (the
    last axis) at the flat positions ``pos`` of the axes in between."""
    if x.dim() == 2:
        return x
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    pos = cast(torch.Tensor, pos)
    return flat.gather(1, pos[:, :, None].expand(-1, -1, flat.shape[2])).reshape(-1, flat.shape[2])


class SourceTargets:
    """The source's outputs of each fitted layer at its sampled rows (every output
    channel), measured in one source pass and shared by every candidate that is fitted on
    the same images: a search re-fits many candidates of one source, and what the source
    does on the fit images does not depend on the candidate.

    Positions are drawn per layer from a generator seeded with ``seed`` plus the layer's
    index, batch by batch (as each call without a cache draws them), so a cached run and an
    uncached one fit on the same rows. At most ``budget`` bytes are kept; beyond that the
    targets are measured again for each call."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = max_memory() // 4 if budget is None else budget
        self.key: tuple | None = None
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.positions: dict[str, list[torch.Tensor | None]] = {}
        self.bytes = 0

    def targets(self, source: nn.Module, images: torch.Tensor, layers: list[Layer],
                index: dict[str, int], *, batch_size: int, max_rows: int, seed: int
                ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor | None]]]:
        """Per layer of ``layers``: its per-batch target rows (all channels) and positions."""
        key = (id(source), id(images), len(images), batch_size, max_rows, seed)
        if key != self.key:
            self.key, self.rows, self.positions, self.bytes = key, {}, {}, 0
        missing = [lay for lay in layers if lay.name not in self.rows]
        if missing:
            rows, positions = _source_pass(source, images, missing, index,
                                           batch_size=batch_size, max_rows=max_rows, seed=seed)
            size = sum(t.numel() * t.element_size() for ts in rows.values() for t in ts)
            if self.bytes + size > self.budget:
                found = {lay.name: self.rows[lay.name] for lay in layers
                         if lay.name in self.rows}
                where = {lay.name: self.positions[lay.name] for lay in layers
                         if lay.name in self.positions}
                return {**found, **rows}, {**where, **positions}
            self.rows.update(rows)
            self.positions.update(positions)
            self.bytes += size
        return ({lay.name: self.rows[lay.name] for lay in layers},
                {lay.name: self.positions[lay.name] for lay in layers})


def _source_pass(source: nn.Module, images: torch.Tensor, layers: list[Layer],
                 index: dict[str, int], *, batch_size: int, max_rows: int, seed: int
                 ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor | None]]]:
    """One pass of ``source`` over ``images`` recording each of ``layers``' output rows."""
    n = len(images)
    src_mods = dict(source.named_modules())
    targets: dict[str, list[torch.Tensor]] = {lay.name: [] for lay in layers}
    positions: dict[str, list[torch.Tensor | None]] = {lay.name: [] for lay in layers}
    gens = {lay.name: torch.Generator().manual_seed(seed + index[lay.name]) for lay in layers}
    names = {id(src_mods[lay.name]): lay.name for lay in layers}

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        name = names[id(module)]
        conv = isinstance(module, nn.Conv2d)
        pos = None
        if conv or out.dim() > 2:
            pos = _positions(len(out), _flat_positions(out, conv), n, gens[name],
                             max_rows).to(out.device)
        positions[name].append(pos)
        targets[name].append(_target_rows(out, conv, pos))

    with preserved_state(source):
        source.eval()
        with forward_hooks([src_mods[lay.name] for lay in layers], record):
            for s in range(0, n, batch_size):
                source(to_device_of(images[s:s + batch_size], source))
    return targets, positions


@torch.no_grad()
def reconstruct_layers(component: nn.Module, source: nn.Module, graph: ChannelGraph,
                       plan: ComponentPlan, images: torch.Tensor, *, ridge: float = RIDGE,
                       max_rows: int = MAX_ROWS, max_features: int = MAX_FEATURES,
                       batch_size: int = 250, seed: int = 0,
                       cache: SourceTargets | None = None,
                       staged: bool = True) -> Reconstruction:
    """Re-fit, in place, every layer of ``component`` that reads channels ``plan`` removed.

    ``component`` is ``apply_plan(source, plan)`` (before any head), ``graph`` the channel
    graph of ``source`` and ``images`` normalised training images of the task. See the
    module's docstring for what is fitted. The models' train/eval flags are restored (the
    passes run in eval mode); ``source`` is not changed. ``cache``: the source's targets
    kept from an earlier call on the same ``source`` and ``images`` (see
    :class:`SourceTargets`). ``staged``: run the component once through the traced graph,
    node by node over all the images, re-fitting each layer when its inputs are complete
    (falls back to one component pass per layer when the live activations of all images
    would not fit in half of :func:`~modellego.data.lazy.max_memory`, or the traced
    graph does not reproduce the component's own forward); both give the same fits.

    >>> from modellego.surgery.extract import apply_plan
    >>> net = apply_plan(model, plan).eval()
    >>> fits = reconstruct_layers(net, model, graph, plan, x_train[:1000])
    >>> fits.images
    1000
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
    skipped, fitted = {}, []
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
    if not fitted:
        return Reconstruction(n, (), skipped, time.perf_counter() - t0)

    # the source's outputs of every fitted layer (all channels) at the positions sampled
    cache = cache if cache is not None else SourceTargets()
    full, positions = cache.targets(source, images, fitted, index, batch_size=batch_size,
                                    max_rows=max_rows, seed=seed)
    keep = {lay.name: torch.tensor(plan.kept(lay.name), dtype=torch.long) for lay in fitted}
    job = _Job(component, src_mods, comp_mods, images, batch_size, ridge, keep, full,
               positions)
    with preserved_state(source), preserved_state(component):
        source.eval()
        component.eval()
        fits = None
        if staged and _staged_fits(graph, len(images)):
            saved = [(t, t.detach().clone()) for lay in fitted
                     for t in _refitted_tensors(comp_mods, lay)]
            try:
                fits = _refit_staged(graph, fitted, job)
            except _NotStaged:  # back to the layers as cut
                for t, copy in saved:
                    t.detach().copy_(copy)
                fits = None
        if fits is None:
            fits = [_refit(lay, job, _inputs_by_passes(lay, job)) for lay in fitted]
    return Reconstruction(n, tuple(fits), skipped, time.perf_counter() - t0)


@dataclass
class _Job:
    """What every layer's fit of one :func:`reconstruct_layers` call reads."""

    component: nn.Module
    src_mods: dict[str, nn.Module]
    comp_mods: dict[str, nn.Module]
    images: torch.Tensor
    batch_size: int
    ridge: float
    keep: dict[str, torch.Tensor]
    targets: dict[str, list[torch.Tensor]]
    positions: dict[str, list[torch.Tensor | None]]


class _NotStaged(Exception):
    """The traced graph cannot run the component: fit layer by layer instead."""


def _refitted_tensors(mods: dict[str, nn.Module], lay: Layer) -> list[torch.Tensor]:
    """What :func:`_refit` may change on ``lay``: its weight, bias and its BN's mean."""
    mod = mods[lay.name]
    out = [cast(torch.Tensor, mod.weight)]
    if getattr(mod, "bias", None) is not None:
        out.append(cast(torch.Tensor, mod.bias))
    bn = mods.get(lay.bn_after) if lay.bn_after else None
    if isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None:
        out.append(bn.running_mean)
    return out


def _inputs_by_passes(lay: Layer, job: _Job):
    """The component's input to ``lay``, batch by batch: one pass each, stopped there."""
    mod = job.comp_mods[lay.name]

    def stop(module: nn.Module, args: tuple) -> None:
        raise _Reached(args[0])

    with forward_pre_hooks([(mod, stop)]):
        for s in range(0, len(job.images), job.batch_size):
            try:
                job.component(to_device_of(job.images[s:s + job.batch_size], job.component))
            except _Reached as reached:
                yield reached.value
            else:
                raise ModelLegoError(f"layer {lay.name!r} did not run in the component's "
                                     "forward pass")


def _last_uses(nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, int]:
    """Per node, the position in ``nodes`` of the last node that reads it."""
    last = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last[arg] = i
    return last


def _staged_fits(graph: ChannelGraph, images: int) -> bool:
    """Whether the live activations of a staged pass over ``images`` fit in half of
    :func:`~modellego.data.lazy.max_memory`: the peak over the traced graph's schedule of
    the values still to be read, per example (ShapeProp's shapes, at the source's widths,
    an upper bound for a component), times the images."""
    from .trace import BATCH, tensor_bytes
    nodes = list(graph.graph_module.graph.nodes)
    last = _last_uses(nodes)
    live, peak = 0, 0
    sizes = {}
    for i, node in enumerate(nodes):
        sizes[node] = tensor_bytes(node.meta.get("tensor_meta")) // BATCH
        live += sizes[node]
        peak = max(peak, live)
        for arg in node.all_input_nodes:
            if last.get(arg) == i:
                live -= sizes[arg]
    return peak * images <= max_memory() // 2


def _pick(env: dict[torch.fx.Node, list], b: int) -> Callable[[torch.fx.Node], Any]:
    """The value of a node for batch ``b``."""
    def value(node: torch.fx.Node) -> Any:
        return env[node][b]
    return value


def _refit_staged(graph: ChannelGraph, fitted: list[Layer], job: _Job) -> list[LayerFit]:
    """Run ``job.component`` once through ``graph``'s traced graph, every node over all
    batches before the next, and re-fit each layer of ``fitted`` when it is reached (its
    inputs then come from the layers already re-fitted upstream, as in a pass stopped at
    it). Raises :class:`_NotStaged` where the traced graph cannot run the component, or its
    outputs differ from the component's own forward on the first batch."""
    gm = graph.graph_module
    nodes = list(gm.graph.nodes)
    if sum(node.op == "placeholder" for node in nodes) != 1:
        raise _NotStaged
    calls = Counter(node.target for node in nodes if node.op == "call_module")
    if any(calls[lay.name] != 1 for lay in fitted):  # each fitted layer called once
        raise _NotStaged
    by_name = {lay.name: lay for lay in fitted}
    last = _last_uses(nodes)
    batches = [to_device_of(job.images[s:s + job.batch_size], job.component)
               for s in range(0, len(job.images), job.batch_size)]
    env: dict[torch.fx.Node, list] = {}
    fits: dict[str, LayerFit] = {}
    result = None

    def attr(target: str):
        for root in (job.component, gm):
            obj = root
            try:
                for part in target.split("."):
                    obj = getattr(obj, part)
                return obj
            except AttributeError:
                continue
        raise _NotStaged

    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            env[node] = batches
        elif node.op == "get_attr":
            env[node] = [attr(str(node.target))] * len(batches)
        elif node.op == "output":
            result = [torch.fx.node.map_arg(node.args[0], _pick(env, b))
                      for b in range(len(batches))]
        else:
            if node.op == "call_module" and node.target in by_name:
                lay = by_name[str(node.target)]
                first = node.args[0]
                if not isinstance(first, torch.fx.Node) or len(node.args) != 1 or node.kwargs:
                    raise _NotStaged
                fits[lay.name] = _refit(lay, job, iter(env[first]))
            values = []
            for b in range(len(batches)):
                args = cast(tuple, torch.fx.node.map_arg(node.args, _pick(env, b)))
                kwargs = cast(dict, torch.fx.node.map_arg(node.kwargs, _pick(env, b)))
                try:
                    if node.op == "call_module":
                        mod = job.comp_mods.get(str(node.target))
                        if mod is None:
                            raise _NotStaged
                        values.append(mod(*args, **kwargs))
                    elif node.op == "call_function":
                        values.append(cast(Callable, node.target)(*args, **kwargs))
                    else:  # call_method
                        values.append(getattr(args[0], str(node.target))(*args[1:], **kwargs))
                except _NotStaged:
                    raise
                except Exception:
                    raise _NotStaged from None
            env[node] = values
        for arg in node.all_input_nodes:
            if last.get(arg) == i:
                del env[arg]
    if result is None or not isinstance(result[0], torch.Tensor):
        raise _NotStaged
    # the traced graph must be the component's own forward: compare on the first batch
    with torch.no_grad():
        own = job.component(batches[0])
    if not isinstance(own, torch.Tensor) or own.shape != result[0].shape or \
            not torch.allclose(own, result[0], rtol=1e-4, atol=1e-5):
        raise _NotStaged
    return [fits[lay.name] for lay in fitted]


def _refit(lay: Layer, job: _Job, inputs) -> LayerFit:
    """Re-fit ``lay`` of the component on ``inputs`` (its input, batch by batch)."""
    comp_mods, src_mods = job.comp_mods, job.src_mods
    keep = job.keep[lay.name]
    mod = cast("nn.Conv2d | nn.Linear", comp_mods[lay.name])
    q = mod.weight.shape[0]
    d = mod.weight[0].numel()
    bn = comp_mods.get(lay.bn_after) if lay.bn_after else None
    where = "none"
    if mod.bias is not None:
        where = "bias"
    elif isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
        where = "batchnorm"
    normal: _Normal | None = None
    # a conv's taps that read only padding give zero columns: left out of the products
    # (their weights come out 0, as the full ridge solve would give them)
    columns = torch.arange(d)
    taps = None
    for b, x in enumerate(inputs):
        pos = job.positions[lay.name][b]
        y = job.targets[lay.name][b]
        if normal is None:
            if isinstance(mod, nn.Conv2d):
                kw = mod.kernel_size[1]
                taps = _used_taps(mod, x.shape[2], x.shape[3])
                used = torch.tensor([u * kw + v for u, v in taps], dtype=torch.long)
                per = mod.kernel_size[0] * kw
                columns = (torch.arange(mod.weight.shape[1])[:, None] * per + used).flatten()
            normal = _Normal(len(columns), q, where != "none", columns=d)
        rows = _conv_rows(mod, x, cast(torch.Tensor, pos), taps) \
            if isinstance(mod, nn.Conv2d) else _linear_rows(x, pos)
        normal.add(rows, y[:, keep.to(y.device)])
    if normal is None:
        raise ModelLegoError(f"layer {lay.name!r} received no inputs to fit on")
    # the layer as cut: its weights and its intercept, where the source's output is the
    # reference (for a BN fold: the shift of the component BN's mean from the source BN's)
    full = mod.weight.reshape(q, d).T.double()
    current = full[columns.to(full.device)]
    source_mean = None
    if where == "bias":
        current = torch.cat([current, cast(torch.Tensor, mod.bias).double()[None]])
    elif where == "batchnorm":
        bn_name = cast(str, lay.bn_after)
        source_mean = cast(torch.Tensor, src_mods[bn_name].running_mean)[keep].double()
        shift = source_mean - cast(torch.Tensor, comp_mods[bn_name].running_mean).double()
        current = torch.cat([current, shift[None]])
    before = normal.error(current)
    w, lam = normal.solve(job.ridge)
    after = normal.error(w)
    k = len(columns)
    weights = torch.zeros_like(full)
    weights[columns.to(full.device)] = w[:k]
    mod.weight.copy_(weights.T.reshape(mod.weight.shape))
    if where == "bias":
        cast(torch.Tensor, mod.bias).copy_(w[k])
    elif source_mean is not None:
        cast(torch.Tensor, cast(nn.BatchNorm2d, bn).running_mean).copy_(source_mean - w[k])
    return LayerFit(lay.name, normal.rows, d + int(where != "none"), lam, where, before, after)
