"""Assembly scalings: how the parts' outputs are made comparable and combined.

A scaling is one small class registered in :data:`SCALINGS` (see
:mod:`modellego.assembly.scoring` for the maths of ``logit``, ``feature`` and
``calibrated``). It says whether it reads training images to calibrate, whether it needs
each part's own features (then only a layout that keeps the parts apart can serve it), and
whether it can combine parts that already answer with concern scores (a one-vs-rest head,
:mod:`modellego.surgery.head`); it fits its buffers and combines the parts' outputs.

``concern`` (Pan & Rajan's composition)
    Every part answers one-vs-rest: a part with a one-vs-rest head gives its concern scores
    as they are; a plain part's logits become ``logit_i - logsumexp_{j != i} logit_j`` over
    its own outputs. The assembled output is the concatenated scores, so the argmax is the
    class whose module claims the image most strongly (positive: claimed). Nothing is fitted.
    It is chosen when no scaling is given and some part has a one-vs-rest head.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from ..errors import ModelLegoError
from ..registry import Registry
from ..runtime.device import device_of
from ..runtime.distributed import SINGLE, DistContext, chunk_ranges, gather_chunks
from ..runtime.hooks import forward_pre_hooks, preserved_state
from ..surgery.head import one_vs_rest
from .fingerprint import route_scores
from .parts import Part
from .scoring import (
    GRID,
    GRID_SUFFIX,
    MAX_SUFFIX,
    FeatureTap,
    JointRouterPart,
    Router,
    balancing_weights,
    class_gaussians,
    class_halves,
    fit_joint_router,
    fit_router_weights,
    tap_layer,
    tap_layers,
    tap_width,
)


class AssembledModel(Protocol):
    """What a scaling reads and sets on the assembled model
    (:class:`modellego.assembly.core.AssembledModel`): its body's adapters and parts, its
    routers, which parts carry a head, each part's kept columns and ``scale{k}`` buffers."""

    # read-only members: a scaling reads them (and sets buffers on them), never rebinds them
    @property
    def body(self) -> Any: ...

    @property
    def routers(self) -> nn.ModuleList: ...

    @property
    def heads(self) -> Sequence[bool]: ...

    def part_columns(self, k: int) -> torch.Tensor: ...


class AssemblyConfig(Protocol):
    """The settings a scaling's fit reads (:class:`modellego.assembly.AssemblyConfig`)."""

    @property
    def seed(self) -> int: ...  # read-only: the config is a frozen dataclass

#: per part: its (logits or concern scores, tapped features)
PartOutputs = list[tuple[torch.Tensor, list[torch.Tensor]]]


def _map_chunks(fn: Callable, x: torch.Tensor, dist: DistContext, chunk: int = 64
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``fn(x) -> (logits, [features])`` computed in fixed chunks of ``x``, chunk ``i`` on rank
    ``i % world_size``, gathered in chunk order: the same tensors for any number of ranks."""
    ranges = chunk_ranges(len(x), chunk)
    mine, dims = [], None
    for j, (start, stop) in enumerate(ranges):
        if not dist.owns(j):
            continue
        logits, feats = fn(x[start:stop])
        outs = [logits, *feats]
        dims = [t.shape[1] for t in outs]
        mine.append(torch.cat([t.double() for t in outs], 1).flatten())
    if dims is None:  # a rank without chunks still needs the widths to unpack the others
        logits, feats = fn(x[:1])
        dims = [t.shape[1] for t in (logits, *feats)]
    width = sum(dims)
    parts = gather_chunks(mine, [(stop - start) * width for start, stop in ranges], dist)
    full = torch.cat([p.view(-1, width) for p in parts]).float()
    cols = list(torch.split(full, dims, 1))
    return cols[0], cols[1:]


def _tap_map_sizes(net: nn.Module, names: Sequence[str], shape: Sequence[int]
                   ) -> dict[str, tuple[int, int]]:
    """``(H, W)`` of the map each of the conv layers ``names`` of ``net`` reads, for one
    input of ``shape`` (``(1, 1)`` for a linear layer); one forward pass of zeros."""
    modules = dict(net.named_modules())
    sizes = {n: (1, 1) for n in names}

    def make(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if isinstance(module, nn.Conv2d) and args[0].dim() == 4:
                sizes[name] = (int(args[0].shape[2]), int(args[0].shape[3]))
        return hook

    x = torch.zeros(1, *shape, device=device_of(net))
    with preserved_state(net), forward_pre_hooks([(modules[n], make(n)) for n in names]), \
            torch.inference_mode():
        net.eval()
        net(x)
    return sizes


def _last_layer(net: nn.Module) -> str:
    names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return names[-1]


def _tap_dims(net: nn.Module, taps: Sequence[str]) -> list[int]:
    modules = dict(net.named_modules())
    return [tap_width(module, how) for _, how, module in (tap_layer(modules, t) for t in taps)]


class Scaling:
    """Logits as they are (``none``); the other scalings override what differs."""

    name = "none"
    #: reads training images of every part to fit (``False``: no images are read)
    calibrates = False
    #: needs each part's own tapped features and a router per part
    needs_features = False
    #: can combine parts that answer with concern scores (a one-vs-rest head)
    accepts_heads = True

    def check_parts(self, parts: Sequence[Part]) -> None:
        """Refuse parts this scaling cannot combine."""
        for k, p in enumerate(parts):
            if p.entry.head and not self.accepts_heads:
                raise ModelLegoError(
                    f"part {k} has a {p.entry.head} head (a pan-rajan module): it answers with "
                    f"concern scores, which scaling {self.name!r} cannot combine; use scaling "
                    "'concern' (or give none)")

    def taps(self, parts: Sequence[Part], max_taps: int) -> list[list[str]] | None:
        """Per part, the layers whose inputs its router reads (``None``: no features)."""
        if not self.needs_features:
            return None
        return [tap_layers(p.net, max_taps, torch.zeros(2, *p.entry.input.shape))
                for p in parts]

    def routers(self, parts: Sequence[Part], taps: Sequence[Sequence[str]] | None
                ) -> list[nn.Module] | None:
        """The per-part routers the assembled model holds (``None``: none)."""
        return None

    def fit(self, model: AssembledModel, parts: Sequence[Part],
            data: list[tuple[torch.Tensor, torch.Tensor]], config: AssemblyConfig,
            taps: list[list[str]] | None, dist: DistContext = SINGLE) -> dict[str, Any]:
        """Set ``model``'s buffers from calibration ``data`` (per part: images in the
        assembly's input contract and their output indices); returns a summary."""
        return {"scaling": self.name}

    def combine(self, model: AssembledModel, outs: PartOutputs) -> torch.Tensor:
        """The assembled outputs from the body's per-part outputs."""
        return torch.cat([logits[:, model.part_columns(k)] * getattr(model, f"scale{k}")
                          for k, (logits, _) in enumerate(outs)], 1)


def _adapter(adapters: Sequence[nn.Module], k: int) -> nn.Module:
    """Part ``k``'s input adapter: its own, or the one a union body shares among its parts
    (they are cut from one source and read the same input)."""
    return adapters[k] if len(adapters) > 1 else adapters[0]


def route_then_classify(model: AssembledModel, outs: PartOutputs, routes: torch.Tensor
                        ) -> torch.Tensor:
    """The routers' combination: the assembled logit of kept output ``c`` of part ``k`` is
    ``log softmax_k(routes) + log softmax(logits_k)_c`` (``routes``: ``(B, parts)``)."""
    log_route = torch.log_softmax(routes, 1)
    return torch.cat([torch.log_softmax(logits, 1)[:, model.part_columns(k)]
                      + log_route[:, k:k + 1] for k, (logits, _) in enumerate(outs)], 1)


class LogitScaling(Scaling):
    """Each output divided by its class's mean winning logit (the public code's rule)."""

    name = "logit"
    calibrates = True
    accepts_heads = False

    @torch.inference_mode()
    def fit(self, model, parts, data, config, taps, dist=SINGLE):
        adapters = model.body.adapters
        mags = []
        for k, (part, (x, y)) in enumerate(zip(parts, data)):
            net = part.net
            tap, adapter = FeatureTap(net, [_last_layer(net)]), _adapter(adapters, k)
            logits, feats = _map_chunks(lambda xb, t=tap, a=adapter: t(a(xb)), x, dist)
            mags.append(float(feats[0].abs().mean()))
            getattr(model, f"scale{k}").copy_(self.scales(logits, y, model.part_columns(k)))
        self.rescale(model, mags)
        return {"scaling": self.name, "feature_magnitudes": mags}

    def scales(self, logits: torch.Tensor, y: torch.Tensor, cols: torch.Tensor
               ) -> torch.Tensor:
        """One factor per kept output of one part, from its calibration logits."""
        scale = torch.ones(len(cols))
        pred = logits.argmax(1)
        for j, col in enumerate(cols.tolist()):
            ok = (y == col) & (pred == col)
            win = logits[ok, col]
            if len(win) and float(win.mean()) > 0:
                scale[j] = 1.0 / float(win.mean())
        return scale

    def rescale(self, model: AssembledModel, magnitudes: list[float]) -> None:
        """Adjust the fitted factors once every part's feature magnitude is known."""


class FeatureScaling(LogitScaling):
    """One factor per part: mean over parts of the last layer's input magnitude over its own
    (the paper's rule, at the last layer)."""

    name = "feature"

    def scales(self, logits, y, cols):
        return torch.ones(len(cols))

    def rescale(self, model, magnitudes):
        avg = sum(magnitudes) / len(magnitudes)
        for k, m in enumerate(magnitudes):
            getattr(model, f"scale{k}").fill_(avg / m if m > 0 else 1.0)


class Calibrated(Scaling):
    """Route by per-part typicality scores, then classify (ours; see ``scoring``)."""

    name = "calibrated"
    calibrates = True
    needs_features = True
    accepts_heads = False

    def routers(self, parts, taps):
        return [Router(_tap_dims(p.net, taps[k]), p.num_outputs) for k, p in enumerate(parts)]

    @torch.inference_mode()
    def fit(self, model, parts, data, config, taps, dist=SINGLE):
        adapters = model.body.adapters
        # Gaussians on one half of each part's images, router on the other half
        # split every class in two, so that each class has fitting images (else NaN means)
        halves = [class_halves(y, int(y.max()) + 1, config.seed) for _, y in data]
        for k, (router, (x, y)) in enumerate(zip(model.routers, data)):
            fit_idx = halves[k][0]
            part = model.body.parts[k]
            _, feats = _map_chunks(lambda xb, p=part, a=adapters[k]: p(a(xb)), x[fit_idx], dist)
            for i, f in enumerate(feats):
                means, prec = class_gaussians(f, y[fit_idx], parts[k].num_outputs)
                getattr(router, f"means{i}").copy_(means)
                getattr(router, f"precision{i}").copy_(prec)
        route_x = torch.cat([x[h[1]] for (x, _), h in zip(data, halves)])
        owner = torch.cat([torch.full((len(h[1]),), k, dtype=torch.long)
                           for k, h in enumerate(halves)])
        zs = []
        for k, router in enumerate(model.routers):
            part = model.body.parts[k]
            logits, feats = _map_chunks(lambda xb, p=part, a=adapters[k]: p(a(xb)), route_x,
                                        dist)
            z = router.scores(logits, feats)
            router.z_mean.copy_(z.mean(0))
            router.z_std.copy_(feature_spread(z))
            zs.append((z - router.z_mean) / router.z_std)
        w, b = fit_router_weights(zs, owner)
        for k, router in enumerate(model.routers):
            router.weight.copy_(w[k])
            router.bias.fill_(float(b[k]))
        routed = torch.stack([(z * w[k]).sum(1) + b[k] for k, z in enumerate(zs)], 1).argmax(1)
        return {"scaling": self.name,
                "router_fit_accuracy": float((routed == owner).double().mean()), "taps": taps}

    def combine(self, model, outs):
        routes = torch.stack([model.routers[k](logits, feats)
                              for k, (logits, feats) in enumerate(outs)], 1)
        return route_then_classify(model, outs, routes)


#: the ridge penalties the ``joint`` router chooses among (per weight, on standardised features)
JOINT_L2 = (1e-4, 1e-3, 1e-2, 1e-1)
#: a feature is standardised by its spread over the calibration images, but by no less than
#: this share of its root mean square: a feature that is constant up to float rounding (a
#: channel after a BatchNorm whose input does not vary) would otherwise be rounding noise
#: scaled up a million-fold, and the routes would change with the kernels' summation order
#: (another machine, thread count or an ONNX runtime: 0.1 on a random MobileNet-V2 assembly)
SPREAD_FLOOR = 1e-2


def feature_spread(f: torch.Tensor) -> torch.Tensor:
    """Per column of ``f`` (rows: images): its standard deviation, floored at
    :data:`SPREAD_FLOOR` of its root mean square and at 1e-6."""
    floor = (f.double().pow(2).mean(0).sqrt() * SPREAD_FLOOR).clamp_min(1e-6)
    return torch.maximum(f.double().std(0), floor).to(f.dtype)


class Joint(Calibrated):
    """Route with one linear router over the pooled tapped features of *every* part (a
    multinomial logistic regression on the calibration images of all parts), then classify
    with the owning part; its ridge penalty is chosen on a held-out half of those images."""

    name = "joint"

    def taps(self, parts, max_taps):
        # each tapped conv's input averaged, maximised and averaged over a 2x2 grid of its
        # positions (where a pattern is, not only how much of it: +0.2 pp balanced on the FM
        # halves, case a, for the maximum, +0.56 pp more for the grid); a map too small for
        # them gives no duplicate numbers (the maximum of one position is its mean)
        taps = super().taps(parts, max_taps) or []
        out = []
        for names, part in zip(taps, parts):
            sizes = _tap_map_sizes(part.net, names, part.entry.input.shape)
            out.append(names + [n + MAX_SUFFIX for n in names if sizes[n][0] * sizes[n][1] > 1]
                       + [n + GRID_SUFFIX for n in names if min(sizes[n]) >= GRID])
        return out

    def routers(self, parts, taps):
        dims = [_tap_dims(p.net, taps[k]) for k, p in enumerate(parts)]
        total = sum(sum(d) for d in dims)
        return [JointRouterPart(d, total) for d in dims]

    @torch.inference_mode()
    def fit(self, model, parts, data, config, taps, dist=SINGLE):
        adapters = model.body.adapters
        x = torch.cat([xk for xk, _ in data])
        owner = torch.cat([torch.full((len(xk),), k, dtype=torch.long)
                           for k, (xk, _) in enumerate(data)])
        # every assembled class weighs the same, however many calibration images it has
        # (else a part with 1000 images per class outvotes one with 130)
        offsets = torch.tensor([0] + [p.num_outputs for p in parts]).cumsum(0)
        groups = torch.cat([yk.long() + offsets[k] for k, (_, yk) in enumerate(data)])
        weights = balancing_weights(groups)
        feats = []
        for k, router in enumerate(model.routers):
            part = model.body.parts[k]
            _, f = _map_chunks(lambda xb, p=part, a=adapters[k]: p(a(xb)), x, dist)
            f = torch.cat(f, 1)
            router.feat_mean.copy_(f.mean(0))
            router.feat_std.copy_(feature_spread(f))
            feats.append((f - router.feat_mean) / router.feat_std)
        z = torch.cat(feats, 1)
        # choose the penalty on one half of every part's images (seeded), then fit on all;
        # held-out routing accuracy weighted the same way (the mean over assembled classes)
        perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(config.seed))
        fit_idx, held = perm[::2], perm[1::2]
        held_w = balancing_weights(groups[held])
        held_acc = {}
        for l2 in JOINT_L2:
            w, b = fit_joint_router(z[fit_idx], owner[fit_idx], l2,
                                    weights=balancing_weights(groups[fit_idx]))
            routed = (z[held].double() @ w.T + b).argmax(1)
            held_acc[l2] = float(((routed == owner[held]).double() * held_w).mean())
        best = max(JOINT_L2, key=lambda v: (held_acc[v], v))  # ties: the stronger penalty
        w, b = fit_joint_router(z, owner, best, weights=weights)
        for k, router in enumerate(model.routers):
            router.weight.copy_(w[k])
            router.bias.fill_(float(b[k]))
        routed = (z.double() @ w.T + b).argmax(1)
        return {"scaling": self.name, "taps": taps, "l2": best, "class_balanced": True,
                "held_out_routing_accuracy": {str(k): v for k, v in held_acc.items()},
                "router_fit_accuracy": float((routed == owner).double().mean()),
                "router_weights": int(w.numel() + b.numel()), "fit_images": len(z)}

    def combine(self, model, outs):
        z = torch.cat([router.standardised(feats)
                       for router, (_, feats) in zip(model.routers, outs)], 1)
        routes = torch.stack([z @ router.weight + router.bias for router in model.routers], 1)
        return route_then_classify(model, outs, routes)


class FingerprintRouter(nn.Module):
    """Part ``k``'s data-free router: its fingerprint's tensors as buffers (see
    :mod:`modellego.assembly.fingerprint`)."""

    def __init__(self, dims: Sequence[int], num_classes: int) -> None:
        super().__init__()
        for i, d in enumerate(dims):
            self.register_buffer(f"means{i}", torch.zeros(num_classes, d))
            self.register_buffer(f"precision{i}", torch.zeros(d, d))
        self.register_buffer("tap_stats", torch.ones(2, len(dims)))
        self.register_buffer("score_stats", torch.ones(2))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return route_scores(feats, dict(self.named_buffers()))


class FingerprintScaling(Scaling):
    """Route with each part's own fingerprint, reading no images (``assemble --data-free``):
    the log p-value of how atypical an image is for a part against its own training images,
    normalised over the parts; then classify with the owning part."""

    name = "fingerprint"
    needs_features = True
    accepts_heads = False

    def check_parts(self, parts):
        super().check_parts(parts)
        for k, p in enumerate(parts):
            if p.fingerprint is None:
                where = p.entry.file or f"part {k}"
                raise ModelLegoError(
                    f"{where} carries no router fingerprint, so it cannot be routed to "
                    "without its training data; its owner can add one with the modellego "
                    "fingerprint command, or route with a scaling that calibrates on the "
                    "parts' training data")

    def taps(self, parts: Sequence[Part], max_taps: int) -> list[list[str]]:
        return [list((p.fingerprint_spec or {})["taps"]) for p in parts]

    def routers(self, parts, taps):
        return [FingerprintRouter(_tap_dims(p.net, taps[k]), p.num_outputs)
                for k, p in enumerate(parts)]

    @torch.inference_mode()
    def fit(self, model, parts, data, config, taps, dist=SINGLE):
        for router, p in zip(model.routers, parts):
            for name, buf in router.named_buffers():
                buf.copy_(p.fingerprint[name])
        return {"scaling": self.name, "data_free": True, "taps": taps,
                "fingerprint_images": [int(p.fingerprint_spec["images"]) for p in parts]}

    def combine(self, model, outs):
        routes = torch.stack([router(feats) for router, (_, feats) in zip(model.routers, outs)],
                             1)
        return route_then_classify(model, outs, routes)


class Concern(Scaling):
    """Pan & Rajan's composition: every part's one-vs-rest scores, the highest wins."""

    name = "concern"

    def check_parts(self, parts):
        for k, p in enumerate(parts):
            if not p.entry.head and p.num_outputs < 2:
                raise ModelLegoError(f"part {k} has a single output, so it has no one-vs-rest "
                                     "score; use another scaling")

    def combine(self, model, outs):
        pieces = []
        for k, (out, _) in enumerate(outs):
            scores = out if model.heads[k] else one_vs_rest(out, out.shape[1])
            pieces.append(scores[:, model.part_columns(k)])
        return torch.cat(pieces, 1)


#: every assembly scaling, by name, in the order the CLI lists them
SCALING_REGISTRY: Registry[Scaling] = Registry("scaling")
for _scaling in (Scaling(), LogitScaling(), FeatureScaling(), Calibrated(), Joint(),
                 FingerprintScaling(), Concern()):
    SCALING_REGISTRY.register(_scaling.name, _scaling)


def get_scaling(name: str) -> Scaling:
    """The scaling registered as ``name``; a one-line error lists the known ones."""
    return SCALING_REGISTRY.get(name)


def default_scaling(parts: Sequence[Part]) -> str:
    """The scaling used when none is given: ``concern`` when some part carries a one-vs-rest
    head (its outputs are concern scores), else ``joint`` (the best router measured: see the
    assembly tables of docs/results.md)."""
    return "concern" if any(p.entry.head for p in parts) else "joint"
