"""Making parts comparable without training their weights (parameter scaling).

``none``
    Logits as they are.
``logit`` (the public Model LEGO code's rule)
    Each output is divided by the mean winning logit of its class on correctly classified
    training samples.
``feature`` (the paper's rule, at the last layer)
    Each part's logits are multiplied by (mean over parts of m) / m_k, where m_k is the mean
    magnitude of the features part k's classifier reads, on its own training samples.
``calibrated`` (ours)
    Every part also reports how *typical* an image is for it: Mahalanobis distances of the
    image's pooled features at several depths to the part's class means (tied covariance,
    Ledoit-Wolf shrinkage), plus the log-sum-exp of its logits. A few scalars per part (a
    weight per score and a bias) are fitted by logistic regression on training images of all
    parts to predict which part owns an image. The assembled logit of class i of part k is
    ``log p(part k | x) + log softmax(logits_k)_i``, so the argmax first routes and then
    classifies. Low-level statistics (early layers) tell datasets apart; class-conditional
    distances (late layers) tell class sets of one dataset apart. No network weight changes.
``joint`` (ours)
    One linear router reads the pooled, standardised tapped features of *every* part: a
    multinomial logistic regression (ridge penalty chosen on held-out calibration images)
    predicts the owning part; combined as ``calibrated`` is.

Each rule is a class in :mod:`modellego.assembly.scalings` (with ``concern``, Pan & Rajan's
composition of one-vs-rest modules); this module holds their building blocks.
"""

from __future__ import annotations

from typing import Mapping, Sequence, cast

import torch
from torch import nn

from ..errors import ModelLegoError


def tap_layers(net: nn.Module, max_taps: int, example: torch.Tensor | None = None
               ) -> list[str]:
    """Up to ``max_taps`` conv/linear layers spread over the depth, always with the last one,
    among those that run as modules: with ``example`` (a small batch of model inputs, two
    or more) the ones a forward pass on it calls on one row per image; always without the
    projections an ``nn.MultiheadAttention`` holds but applies as functions (its
    ``out_proj``), which no hook on them would ever see."""
    names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    inside = {f"{n}.{c}" if n else c for n, m in net.named_modules()
              if isinstance(m, nn.MultiheadAttention) for c, _ in m.named_modules() if c}
    names = [n for n in names if n not in inside]
    if example is not None:
        ran = called_layers(net, example)
        names = [n for n in names if n in ran]
    if len(names) <= max_taps:
        return names
    step = (len(names) - 1) / (max_taps - 1)
    return [names[round(i * step)] for i in range(max_taps)]


@torch.no_grad()
def called_layers(net: nn.Module, example: torch.Tensor) -> set[str]:
    """The conv/linear modules of ``net`` that a forward pass on ``example`` calls on a
    tensor with one row per image of ``example`` (in eval mode; the modes are restored)."""
    from ..runtime.device import to_device_of
    from ..runtime.hooks import forward_pre_hooks, preserved_state

    ran: set[str] = set()

    def make(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            # a layer that reads one row per image (not a table shared by all images, as
            # Swin-V2's position-bias MLP, nor the windows of an image, as Swin's attention)
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2 and \
                    args[0].shape[0] == len(example):
                ran.add(name)
        return hook

    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with preserved_state(net), forward_pre_hooks([(m, make(n)) for n, m in layers]):
        net.eval()
        net(to_device_of(example, net))
    return ran


def class_distances(f: torch.Tensor, means: torch.Tensor, precision: torch.Tensor
                    ) -> torch.Tensor:
    """``(N, C)`` squared Mahalanobis distances of the rows of ``f`` to each class mean under
    one tied ``precision`` matrix (in the tensors' own dtype)."""
    fp = f @ precision
    return (fp * f).sum(1, keepdim=True) - 2 * fp @ means.T + ((means @ precision) * means).sum(1)


def class_halves(y: torch.Tensor, num_classes: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of the positions of ``y`` (one seeded permutation), every class
    split in two, so that each half holds images of every class that has two or more."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    per_class = [perm[y[perm] == c] for c in range(num_classes)]
    return (torch.cat([p[::2] for p in per_class]), torch.cat([p[1::2] for p in per_class]))


def pooled(x: torch.Tensor, *, channels_last: bool = False, how: str = "mean"
           ) -> torch.Tensor:
    """Global average pooling of a feature map ``(N, C, H, W)`` (``how="max"``: its maximum
    over the positions; ``how="grid"``: its averages over the cells of a 2x2 grid of the
    positions, ``(N, 4C)``, channel-major, as :func:`torch.nn.functional.adaptive_avg_pool2d`
    divides a map); a linear layer's ``(N, F)`` features pass unchanged, and the input
    of a linear layer applied on the last axis of a map (``(N, H, W, C)``, as ConvNeXt's
    MLPs read it; ``channels_last``) is pooled over every axis but the batch and the last."""
    if channels_last:
        if x.dim() == 2:
            return x
        x = x.flatten(1, -2)
        return x.amax(1) if how == "max" else x.mean(1)
    if x.dim() != 4:
        return x
    if how == "grid":
        return nn.functional.adaptive_avg_pool2d(x, GRID).flatten(1)
    return x.amax((2, 3)) if how == "max" else x.mean((2, 3))


#: a tap ``LAYER`` reads the average of that layer's input over its positions (every
#: release); ``LAYER@max`` reads its maximum, ``LAYER@grid`` (a conv's only) its averages
#: over a ``GRID`` x ``GRID`` grid of the positions (the ``joint`` router taps a conv all ways)
MAX_SUFFIX = "@max"
GRID_SUFFIX = "@grid"
GRID = 2
_POOLINGS = ((MAX_SUFFIX, "max"), (GRID_SUFFIX, "grid"))


def tap_layer(modules: Mapping[str, nn.Module], tap: str) -> tuple[str, str, nn.Module]:
    """``(layer name, pooling, module)`` of a tap name; a clear error when the part has no
    such conv/linear layer (a file whose taps do not fit its parts)."""
    layer, how = tap, "mean"
    for suffix, name in _POOLINGS:
        if tap.endswith(suffix):
            layer, how = tap[:-len(suffix)], name
    module = modules.get(layer)
    wanted = nn.Conv2d if how == "grid" else (nn.Conv2d, nn.Linear)
    if not isinstance(module, wanted):
        kind = "conv" if how == "grid" else "conv or linear"
        raise ModelLegoError(f"router tap {tap!r}: the part has no {kind} layer "
                             f"{layer!r}; the file's taps do not fit its parts (write it "
                             "again with `assemble`)")
    return layer, how, module


def tap_width(module: nn.Module, how: str) -> int:
    """How many numbers a tap of ``module`` (a conv or linear layer) pooled ``how`` gives."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels * (GRID * GRID if how == "grid" else 1)
    return cast("nn.Linear", module).in_features


class FeatureTap(nn.Module):
    """Runs a part and returns ``(logits, [pooled input of each tapped layer])``.

    Inputs are captured with forward pre-hooks that live only inside :meth:`forward`.
    """

    def __init__(self, net: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.net = net
        self.layers = list(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        from ..runtime.hooks import forward_pre_hooks

        found: dict[str, torch.Tensor] = {}
        modules = dict(self.net.named_modules())

        def make(name: str, how: str):
            def hook(module: nn.Module, args: tuple) -> None:
                found[name] = pooled(args[0], channels_last=isinstance(module, nn.Linear),
                                     how=how)
            return hook

        taps = [(n, *tap_layer(modules, n)) for n in self.layers]
        with forward_pre_hooks([(module, make(n, how)) for n, _, how, module in taps]):
            logits = self.net(x)
        return logits, [found[n] for n in self.layers]


class Router(nn.Module):
    """Per part: Mahalanobis scores at tapped layers + log-sum-exp -> one routing score."""

    # buffers registered in __init__ (``means{i}``/``precision{i}`` are read by name)
    z_mean: torch.Tensor
    z_std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, dims: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.num_layers = len(dims)
        for i, d in enumerate(dims):
            self.register_buffer(f"means{i}", torch.zeros(num_classes, d))
            self.register_buffer(f"precision{i}", torch.zeros(d, d))
        n = len(dims) + 1
        self.register_buffer("z_mean", torch.zeros(n))
        self.register_buffer("z_std", torch.ones(n))
        self.register_buffer("weight", torch.zeros(n))
        self.register_buffer("bias", torch.zeros(()))

    def scores(self, logits: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """``(B, L + 1)`` raw scores: log-sum-exp, then minus each layer's distance."""
        cols = [torch.logsumexp(logits, 1)]
        for i, f in enumerate(feats):
            d = class_distances(f, getattr(self, f"means{i}"), getattr(self, f"precision{i}"))
            cols.append(-d.min(1).values)
        return torch.stack(cols, 1)

    def forward(self, logits: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        z = (self.scores(logits, feats) - self.z_mean) / self.z_std
        return z @ self.weight + self.bias


class JointRouterPart(nn.Module):
    """Part ``k``'s share of the ``joint`` router: the mean and spread of its own tapped
    features (to standardise them), and its routing weights over the standardised features
    of *every* part (``total`` of them, in part order) plus a bias."""

    feat_mean: torch.Tensor
    feat_std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, dims: Sequence[int], total: int) -> None:
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(sum(dims)))
        self.register_buffer("feat_std", torch.ones(sum(dims)))
        self.register_buffer("weight", torch.zeros(total))
        self.register_buffer("bias", torch.zeros(()))

    def standardised(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """This part's tapped features, concatenated and standardised."""
        return (torch.cat(feats, 1) - self.feat_mean) / self.feat_std


def fit_joint_router(z: torch.Tensor, owner: torch.Tensor, l2: float, *,
                     weights: torch.Tensor | None = None, steps: int = 300
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``softmax(z @ W.T + b)`` predicting ``owner`` from
    standardised features ``z`` ``(N, D)``: the (``weights``-weighted, mean-normalised)
    cross-entropy plus ``l2 * ||W||^2``, L-BFGS in float64. Returns ``W`` ``(parts, D)`` and
    ``b`` ``(parts,)``."""
    with torch.inference_mode(False), torch.enable_grad():
        k = int(owner.max()) + 1
        zz, owner = z.double().clone(), owner.clone()
        sw = torch.ones(len(zz), dtype=torch.float64) if weights is None \
            else weights.double().clone()
        sw = sw / sw.mean()
        w = torch.zeros(k, zz.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            ce = nn.functional.cross_entropy(zz @ w.T + b, owner, reduction="none")
            loss = (ce * sw).mean() + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return w.detach(), b.detach()


def balancing_weights(groups: torch.Tensor) -> torch.Tensor:
    """Per-image weights ``1 / (images in its group)``, scaled to mean 1: every group
    (an assembled class) then weighs the same in a fit, however many images it has."""
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    w = 1.0 / counts.double()[inverse]
    return w / w.mean()


def class_gaussians(feats: torch.Tensor, labels: torch.Tensor, num_classes: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and the shrunk tied precision matrix (Ledoit-Wolf) of ``feats``."""
    from sklearn.covariance import LedoitWolf

    feats = feats.double()
    means = torch.stack([feats[labels == c].mean(0) for c in range(num_classes)])
    centred = feats - means[labels]
    lw = LedoitWolf(assume_centered=True).fit(centred.numpy())
    precision = torch.from_numpy(lw.precision_)
    return means.float(), precision.float()


def fit_router_weights(z: list[torch.Tensor], owner: torch.Tensor, *, l2: float = 1e-3,
                       steps: int = 200) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Fit per-part weights ``w_k`` and biases ``b_k`` of ``r_k = z_k @ w_k + b_k`` so that
    ``softmax_k(r)`` predicts ``owner`` (cross-entropy + a small L2 penalty), with L-BFGS.

    ``z[k]`` is ``(N, n)`` standardised scores of part ``k`` on all N fitting images.
    """
    with torch.inference_mode(False), torch.enable_grad():
        k = len(z)
        n = max(t.shape[1] for t in z)
        # parts may have different numbers of scores: pad with zeros (their weights stay 0)
        zz = torch.stack([nn.functional.pad(t.double().clone(), (0, n - t.shape[1]))
                          for t in z], 1)
        owner = owner.clone()
        w = torch.zeros(k, n, dtype=torch.float64)
        w[:, 0] = 1.0
        w.requires_grad_(True)
        b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            r = (zz * w).sum(2) + b
            loss = nn.functional.cross_entropy(r, owner) + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return [w[i, :t.shape[1]].detach().float() for i, t in enumerate(z)], b.detach().float()
