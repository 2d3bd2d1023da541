"""Sample selection and the per-class relative-contribution profile of every layer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, cast

import torch
from torch import nn

from ..data.lazy import Inputs, default_batch, iter_batches, streamed
from ..errors import ModelLegoError
from ..runtime.device import to_device_of
from ..runtime.distributed import SINGLE, DistContext, chunk_ranges, gather_chunks
from ..runtime.hooks import forward_hooks, preserved_state
from ..terminal import Progress
from .contribution import layer_class_sums
from .passes import ClassProfile, ProfilePass


@dataclass(frozen=True)
class SampleSelection:
    """The training samples chosen for each class: the ``k`` most confidently correct ones.

    ``indices[c]`` are positions in the split the selection was made from, best first;
    ``scores[c]`` the matching true-class softmax probabilities (empty when no selection
    pass ran, see :func:`take_every_sample`). ``correct_only``: only correctly classified
    samples were eligible.
    """

    classes: tuple[int, ...]
    k: int
    indices: dict[int, tuple[int, ...]]
    scores: dict[int, tuple[float, ...]]
    correct_only: bool = False

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "k": self.k,
                "indices": {str(c): list(v) for c, v in self.indices.items()},
                "scores": {str(c): list(v) for c, v in self.scores.items()},
                "correct_only": self.correct_only}

    def all_indices(self) -> torch.Tensor:
        return torch.tensor([i for c in self.classes for i in self.indices[c]],
                            dtype=torch.long)


def take_every_sample(labels: torch.Tensor, classes: Sequence[int], k: int
                      ) -> SampleSelection | None:
    """When no class has more than ``k`` samples, every sample is selected whatever the
    model says: the selection (in position order, no scores) without a forward pass.
    ``None`` when some class has more (or none)."""
    indices: dict[int, tuple[int, ...]] = {}
    for c in classes:
        pos = (labels == c).nonzero().flatten()
        if len(pos) == 0 or len(pos) > k:
            return None
        indices[int(c)] = tuple(int(v) for v in pos)
    return SampleSelection(tuple(int(c) for c in classes), k, indices,
                           {c: () for c in indices})


@torch.inference_mode()
def select_samples(model: nn.Module, images: Inputs, labels: torch.Tensor,
                   classes: Sequence[int], output_classes: Sequence[int], *, k: int = 50,
                   batch_size: int | None = None, dist: DistContext | None = None,
                   correct_only: bool = False) -> SampleSelection:
    """For each class in ``classes``, the ``k`` samples with the highest true-class probability.

    ``images`` are normalised model inputs, ``labels`` class ids; ``output_classes[i]`` is
    the class id of output ``i``. Ties are broken by sample index (lower first).
    ``correct_only``: only samples whose top output (first on ties) is their class are
    eligible; a class may then get fewer than ``k``, and one with none is refused.

    The probabilities are computed class by class in batches of ``batch_size`` samples
    (default: :func:`~modellego.data.lazy.default_batch` of the image shape);
    under ``dist`` batch ``j`` (counted over all classes) runs on rank ``j % world_size``
    and the probabilities are gathered, so every rank returns the same selection, equal to
    the single-process one.
    """
    if k < 1:
        raise ModelLegoError(f"`samples_per_class` must be >= 1, got {k}")
    dist = dist or SINGLE
    batch_size = batch_size or default_batch(images.shape[1:])
    output_classes = list(output_classes)
    positions, cols = [], []
    for c in classes:
        pos = (labels == c).nonzero().flatten()
        if len(pos) == 0:
            raise ModelLegoError(f"class {c} has no training samples to select from")
        positions.append(pos)
        cols.append(output_classes.index(c))
    batches = [(i, start, stop) for i, pos in enumerate(positions)
               for start, stop in chunk_ranges(len(pos), batch_size)]
    mine, mine_ok = [], []
    owned = [(i, start, stop) for j, (i, start, stop) in enumerate(batches) if dist.owns(j)]
    with preserved_state(model):
        model.eval()
        xs = iter_batches(images, [positions[i][start:stop] for i, start, stop in owned])
        with Progress(len(owned), f"sample selection over {sum(map(len, positions))} images",
                      enabled=streamed(images)) as bar:
            for (i, _, _), x in zip(owned, xs):
                logits = model(to_device_of(x, model)).double().cpu()
                mine.append(torch.softmax(logits, 1)[:, cols[i]])
                mine_ok.append((logits.argmax(1) == cols[i]).double())
                bar.update(1)
    sizes = [stop - start for _, start, stop in batches]
    per_class: list[list[torch.Tensor]] = [[] for _ in positions]
    for (i, _, _), pr in zip(batches, gather_chunks(mine, sizes, dist)):
        per_class[i].append(pr)
    if correct_only:
        ok_class: list[list[torch.Tensor]] = [[] for _ in positions]
        for (i, _, _), ok in zip(batches, gather_chunks(mine_ok, sizes, dist)):
            ok_class[i].append(ok)
    indices, scores = {}, {}
    for i, c in enumerate(classes):
        p = torch.cat(per_class[i])
        order = torch.sort(-p, stable=True).indices
        if correct_only:
            order = order[torch.cat(ok_class[i])[order] > 0]
            if len(order) == 0:
                raise ModelLegoError(
                    f"class {c}: none of its {len(p)} training samples is classified "
                    "correctly by the model, and only correctly classified samples may be "
                    "selected (`method` contribution-2022); choose other classes or another "
                    "method")
        order = order[:k]
        indices[int(c)] = tuple(int(v) for v in positions[i][order])
        scores[int(c)] = tuple(float(v) for v in p[order])
    return SampleSelection(tuple(int(c) for c in classes), k, indices, scores, correct_only)


@dataclass(frozen=True)
class ContributionProfile(ClassProfile):
    """``layers[name][i]`` is ``S_c[q, p]`` for class ``classes[i]``: the summed positive
    relative contribution of input ``p`` to output ``q`` over the class's samples."""

    #: per layer ``(Q, P)``: signed contribution of input p to output q, per output position,
    #: averaged over all profiled samples (used to compensate removed inputs in the bias)
    means: dict[str, torch.Tensor] = field(default_factory=dict)


#: ``emit(layer, rows, sums, mean)``: one call of a profiled layer on one chunk; ``rows`` are
#: the (sorted) profile rows present in the chunk, ``sums[i]`` the clamped contributions of
#: the samples of row ``rows[i]`` summed, ``mean`` the signed contributions summed over the
#: chunk's samples and divided by the layer's number of output positions.
ChunkEmit = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]


def profile_chunk(model: nn.Module, layers: Mapping[str, nn.Module], images: torch.Tensor,
                  rows: torch.Tensor, emit: ChunkEmit, cache: dict | None = None) -> None:
    """One forward pass of ``images`` (one chunk); ``emit`` receives each layer call's sums.

    ``rows`` are the samples' profile rows (class positions). Only the rows present in the
    chunk get sums (``len(rows.unique()) * Q * P`` per layer call, not one ``Q * P`` tensor
    per profiled class); see :func:`~modellego.analysis.contribution.layer_class_sums`.
    ``cache``: kept by the caller over the chunks of one pass (the weights do not change),
    it holds the weight layouts each layer derives.
    """
    present = torch.unique(rows)
    local = torch.searchsorted(present, rows)
    names = {id(m): n for n, m in layers.items()}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        name = names[id(module)]
        sums, signed = layer_class_sums(inputs[0], module, local, len(present), name=name,
                                        cache=cache)
        positions = output.numel() // (output.shape[0] * sums.shape[1])
        emit(name, present, sums, signed / positions)

    with preserved_state(model), forward_hooks(layers.values(), hook), torch.inference_mode():
        model.eval()
        model(to_device_of(images, model))


class ClassSums:
    """The running per-class sums of a profile; add chunks' results in chunk order.

    Additions are plain float64 ``+=`` in the order of :meth:`add` calls, so folding the same
    chunk results in the same order gives the same bits wherever they were computed.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.totals: dict[str, torch.Tensor] = {}
        self.signed: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def add(self, name: str, rows: torch.Tensor, sums: torch.Tensor,
            mean: torch.Tensor) -> None:
        if name in self.totals:
            self.signed[name] += mean
        else:
            self.totals[name] = sums.new_zeros((self.num_classes, *sums.shape[1:]))
            self.signed[name] = mean.clone()
        self.totals[name].index_add_(0, rows.to(sums.device), sums)


def contribution_profile(model: nn.Module, layers: Mapping[str, nn.Module], images: Inputs,
                         labels: torch.Tensor, classes: Sequence[int], *,
                         batch_size: int = 64,
                         dist: DistContext | None = None) -> ContributionProfile:
    """Run ``images`` through ``model`` once and accumulate every layer's class contributions.

    ``layers`` maps names to the conv/linear modules to profile; ``labels`` are class ids,
    all of them in ``classes``. Hooks are removed and the model's mode restored even if the
    forward pass raises.

    The samples are cut into chunks of ``batch_size`` consecutive samples and the chunks'
    sums are added in chunk order. Under ``dist`` chunk ``i`` runs on rank
    ``i % world_size``; after each round of ``world_size`` chunks the results are gathered
    and folded in chunk order on every rank, so every rank returns the same profile, bit for
    bit equal to the single-process one. Memory: the statistics (``classes * Q * P`` float64
    per layer) plus one chunk's activations and, when distributed, one round's per-chunk
    sums of one layer at a time.
    """
    dist = dist or SINGLE
    rounds = ProfilePass(labels, classes, batch_size=batch_size, dist=dist)
    classes, rows = rounds.classes, rounds.rows
    sums = ClassSums(len(classes))
    derived: dict = {}  # weight layouts, made once per layer for all chunks

    t0 = time.perf_counter()
    if not dist.distributed:  # fold each layer call as it comes: no buffers
        # a single process computes the one chunk of every round, in order (streamed)
        spans = [cast("tuple[int, int]", rnd.mine) for rnd in rounds.rounds()]
        chunks = iter_batches(images, [range(a, b) for a, b in spans])
        with Progress(len(spans), f"profile of {len(images)} images",
                      enabled=streamed(images)) as bar:
            for (start, stop), x in zip(spans, chunks):
                profile_chunk(model, layers, x, rows[start:stop], sums.add, derived)
                bar.update(1)
    for rnd in rounds.rounds() if dist.distributed else ():
        calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        if rnd.mine is not None:
            start, stop = rnd.mine
            profile_chunk(model, layers, images[start:stop], rows[start:stop],
                          _collector(calls), derived)
        _exchange_round(calls, list(rnd.present), layers, sums, dist)
    seconds = time.perf_counter() - t0
    # accumulated on the network's device; locating reads them on the CPU (no-op there)
    means = {k: (v / max(1, len(images))).cpu() for k, v in sums.signed.items()}
    totals = {k: v.cpu() for k, v in sums.totals.items()}
    return ContributionProfile(classes, totals, rounds.samples(), seconds, means)


def _collector(calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> ChunkEmit:
    def emit(name: str, rows: torch.Tensor, sums: torch.Tensor, mean: torch.Tensor) -> None:
        calls.setdefault(name, []).append((sums, mean))
    return emit


def _exchange_round(calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
                    present: list[torch.Tensor], layers: Mapping[str, nn.Module],
                    sums: ClassSums, dist: DistContext) -> None:
    """Gather one round's chunk results layer by layer and fold them in chunk order.

    Rank ``r`` holds chunk ``r`` of the round (``present[r]`` are its rows; ranks past the
    last chunk hold nothing). Per layer one buffer ``(n_calls, 1 + max_rows, Q, P)`` is
    gathered: slot 0 the signed mean, then the present rows' clamped sums.
    """
    names = list(layers)
    counts = torch.tensor([len(calls.get(n, ())) for n in names], dtype=torch.long)
    all_counts = dist.all_gather(counts)
    width = 1 + max(len(p) for p in present)
    for li, name in enumerate(names):
        n_calls = max(int(c[li]) for c in all_counts)
        if n_calls == 0:
            continue
        # profiled layers are convs and linears: their weight is a tensor
        q, p = cast(torch.Tensor, layers[name].weight).shape[:2]
        buf = torch.zeros((n_calls, width, q, p), dtype=torch.float64)
        for ci, (s, m) in enumerate(calls.pop(name, ())):
            buf[ci, 0] = m
            buf[ci, 1:1 + len(s)] = s
        gathered = dist.all_gather(buf)
        del buf
        with torch.inference_mode():
            for r, rows in enumerate(present):
                for ci in range(int(all_counts[r][li])):
                    sums.add(name, rows, gathered[r][ci, 1:1 + len(rows)], gathered[r][ci, 0])
        del gathered
