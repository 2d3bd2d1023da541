"""Router fingerprints: what a part needs to be routed to without anyone's training images.

A party may give its model or component but not its training images. Its owner then writes
a *fingerprint* into the file (``modellego fingerprint``, or ``train``/``import``/
``disassemble``/``compress``, which have the images at hand): statistics of the network's
own pooled features on its own training images, a few hundred KB. ``assemble --data-free``
(scaling ``fingerprint``) routes with these alone and reads no dataset.

What a fingerprint holds (per tapped layer ``i``: :func:`fingerprint_taps`):

- the class means and the shrunk tied precision matrix (Ledoit-Wolf) of the layer's pooled
  input, fitted on one half of the owner's images (seeded, every class split in two);
- on the other half, the mean and std of ``log d_i(x)``, where ``d_i`` is the squared
  Mahalanobis distance to the nearest class mean;
- the mean and std of the combined score ``s(x) = mean_i (log d_i(x) - mean_i) / std_i``
  on that half.

The part's routing score of an image is ``log P(S >= s(x))`` with ``S`` normal with those
mean and std: the log of how likely an image of the part's own data is to look at least as
atypical to the part as ``x`` does (a p-value against its own distribution). The assembled
logit of class ``c`` of part ``k`` is ``log softmax_k(route) + log softmax(logits_k)_c``.

Which layers: the first half of the router's taps, skipping the network's first layer
(whose input is the image itself). Low-level statistics tell datasets apart; they are what
a part can say about itself without seeing the other parts' data. Telling two halves of one
dataset apart needs the other part's images (the ``joint`` router); see the assembly results
(docs/results.md) for how far fingerprints get there.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..data.lazy import as_tensor, default_batch, iter_slices, take
from ..data.registry import load_split_for
from ..errors import ModelLegoError
from ..manifest import MAX_FINGERPRINT_DIM, ROUTER_FINGERPRINT_VERSIONS, Manifest, as_manifest
from .scoring import (
    FeatureTap,
    class_distances,
    class_gaussians,
    class_halves,
    tap_layers,
    tap_width,
)

#: training images per class a fingerprint is made from (fewer when a class has fewer)
FINGERPRINT_IMAGES = 1000
#: how many layers spread over the depth the taps are chosen among (as the routers' taps)
FINGERPRINT_SPREAD = 8


def fingerprint_taps(net: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """The layers a fingerprint taps: of :data:`FINGERPRINT_SPREAD` conv/linear layers spread
    over the depth (among those a pass on ``example`` calls; see
    :func:`~modellego.assembly.scoring.tap_layers`), the first half after the first one (the
    whole list if it has one), less those that read more than
    :data:`~modellego.manifest.MAX_FINGERPRINT_DIM` features (a file may not hold their
    precision matrices; a ViT-H's MLP reads 5120); where that leaves none, the first narrow
    enough layer of the spread after the first (or the first). A network with none is
    refused."""
    names = tap_layers(net, FINGERPRINT_SPREAD, example)
    modules = dict(net.named_modules())
    narrow = [n for n in names if tap_width(modules[n], "mean") <= MAX_FINGERPRINT_DIM]
    chosen = names if len(names) == 1 else names[1:1 + max(1, len(names) // 2)]
    later = [n for n in narrow if n != names[0]]  # (the first reads the image itself)
    taps = [n for n in chosen if n in narrow] or later[:1] or narrow[:1]
    if not taps:
        raise ModelLegoError(
            f"no layer of this network can be fingerprinted: each of {len(names)} spread over "
            f"its depth reads more than {MAX_FINGERPRINT_DIM} features, more than a file's "
            "fingerprint may hold; write the file without a fingerprint")
    return taps


def min_distances(f: torch.Tensor, means: torch.Tensor, precision: torch.Tensor
                  ) -> torch.Tensor:
    """``(N,)`` squared Mahalanobis distance of each row of ``f`` to its nearest class mean
    (float64, at least 1e-12 so that its log is finite)."""
    d = class_distances(f.double(), means.double(), precision.double())
    return d.min(1).values.clamp_min(1e-12)


def route_scores(feats: Sequence[torch.Tensor], tensors: Mapping[str, torch.Tensor]
                 ) -> torch.Tensor:
    """``(N,)`` routing score of the images whose tapped features are ``feats``: the log
    upper-tail probability of their combined score under the part's own distribution."""
    stats = tensors["tap_stats"].double()
    z = torch.stack([(min_distances(f, tensors[f"means{i}"], tensors[f"precision{i}"]).log()
                      - stats[0, i]) / stats[1, i] for i, f in enumerate(feats)], 1).mean(1)
    score = tensors["score_stats"].double()
    return torch.special.log_ndtr(-(z - score[0]) / score[1])


def _halves(y: torch.Tensor, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`class_halves`, refusing a class with fewer than 2 images (a half without it
    would give it no Gaussian or no held-out score)."""
    counts = torch.bincount(y, minlength=num_classes)
    if bool((counts < 2).any()):
        c = int((counts < 2).nonzero()[0])
        raise ModelLegoError(f"a fingerprint needs at least 2 training images of every "
                             f"class; output {c} has {int(counts[c])}")
    return class_halves(y, num_classes, seed)


@torch.inference_mode()
def tapped_features(net: nn.Module, taps: Sequence[str], x: Any) -> list[torch.Tensor]:
    """The pooled inputs of ``taps`` over model inputs ``x`` (a tensor or lazy inputs), in
    bounded batches; on the network's device, returned on the CPU."""
    from ..runtime.device import to_device_of

    tap = FeatureTap(net, taps)
    chunks: list[list[torch.Tensor]] = [[] for _ in taps]
    for xb in iter_slices(x, default_batch(tuple(x.shape[1:]))):
        _, feats = tap(to_device_of(xb, net))
        for store, f in zip(chunks, feats):
            store.append(f.float().cpu())
    return [torch.cat(c) for c in chunks]


def make_fingerprint(net: nn.Module, x: Any, y: torch.Tensor, *, seed: int = 0
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The fingerprint of ``net`` from its own training images: model inputs ``x`` (a tensor
    or lazy inputs) whose output indices are ``y``. Returns the manifest's
    ``router_fingerprint`` entry and the tensors to store with :func:`~modellego.save_model`.
    """
    num_classes = int(y.max()) + 1
    taps = fingerprint_taps(net, as_tensor(take(x, torch.arange(min(2, len(y))))))
    net.eval()
    feats = tapped_features(net, taps, x)
    fit, held = _halves(y, num_classes, seed)
    tensors: dict[str, torch.Tensor] = {}
    logs = []
    for i, f in enumerate(feats):
        means, precision = class_gaussians(f[fit], y[fit], num_classes)
        tensors[f"means{i}"], tensors[f"precision{i}"] = means, precision
        logs.append(min_distances(f[held], means, precision).log())
    log_d = torch.stack(logs, 1)
    stats = torch.stack([log_d.mean(0), log_d.std(0).clamp_min(1e-6)])
    z = ((log_d - stats[0]) / stats[1]).mean(1)
    tensors["tap_stats"] = stats.float()
    tensors["score_stats"] = torch.stack([z.mean(), z.std().clamp_min(1e-6)]).float()
    meta = {"version": ROUTER_FINGERPRINT_VERSIONS[-1], "taps": taps,
            "dims": [int(f.shape[1]) for f in feats], "images": int(len(y)), "seed": seed}
    return meta, tensors


class TooFewImages(ModelLegoError):
    """The model's dataset has fewer than two training images of one of its classes."""


def owner_images(manifest: Manifest, *, per_class: int = FINGERPRINT_IMAGES,
                 seed: int = 0, data_dir: str | None = None) -> tuple[Any, torch.Tensor]:
    """Model inputs and output indices of up to ``per_class`` seeded training images of each
    of the model's classes, read from its own dataset (``data_dir``: its root)."""
    from ..data import model_input

    split = load_split_for(manifest.own_dataset, "train", data_dir=data_dir,
                           where="the fingerprinted model")
    gen = torch.Generator().manual_seed(seed)
    picks, ys = [], []
    for i, c in enumerate(manifest.classes):
        pos = (split.labels == c).nonzero().flatten()
        if len(pos) < 2:
            raise TooFewImages(
                f"{manifest.own_dataset.name} has {len(pos)} training images of class {c}; "
                "a fingerprint needs at least 2 of every class the model has")
        picks.append(pos[torch.randperm(len(pos), generator=gen)[:per_class]])
        ys.append(torch.full((len(picks[-1]),), i, dtype=torch.long))
    images = split.images[torch.cat(picks)]
    x = model_input(images, split.info, manifest.input)
    return x, torch.cat(ys)


def fingerprint_model(net: nn.Module, manifest: Manifest | Mapping[str, Any], *,
                      per_class: int = FINGERPRINT_IMAGES, seed: int = 0,
                      data_dir: str | None = None
                      ) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """The manifest with a ``router_fingerprint`` entry, and its tensors, for a model or
    component made from its own training images (see :func:`make_fingerprint`)."""
    manifest = as_manifest(manifest)
    if manifest.kind == "assembly":
        raise ModelLegoError("an assembly has no fingerprint of its own; fingerprint its "
                             "parts, then assemble them")
    if manifest.head:
        raise ModelLegoError("a part with a one-vs-rest head is combined by scaling 'concern', "
                             "which needs no fingerprint")
    x, y = owner_images(manifest, per_class=per_class, seed=seed, data_dir=data_dir)
    meta, tensors = make_fingerprint(net, x, y, seed=seed)
    return manifest.updated(router_fingerprint=meta), tensors


def fingerprinted(net: nn.Module, manifest: Manifest, wanted: bool = True, *,
                  data_dir: Any = None) -> Manifest:
    """What a verb returns for a model it made: the manifest with its router fingerprint
    (see :func:`fingerprint_model`), whose tensors are kept with ``net`` for
    :func:`modellego.save_model`. Unchanged when not ``wanted`` and for a one-vs-rest module
    (scaling ``concern`` combines it without one)."""
    from ..files import attach_fingerprint

    if not wanted or manifest.head:
        return manifest
    try:
        new, tensors = fingerprint_model(net, manifest, data_dir=data_dir)
    except TooFewImages as exc:  # the model is fine; only data-free routing is not offered
        warnings.warn(f"no router fingerprint written: {exc}; assemble this file with a "
                      "scaling that calibrates on its data", stacklevel=2)
        return manifest
    attach_fingerprint(net, tensors)
    return new

