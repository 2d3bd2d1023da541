"""The sample bookkeeping every profile pass shares: class rows and chunk rounds.

A profile accumulates per-class statistics over a set of samples. Each sample's class id is
mapped to its *row* (the position of its class in ``classes``). The samples are cut into
global chunks of ``batch_size`` consecutive samples; chunk ``i`` is computed by rank
``i % world_size``, so the chunks go in *rounds* of ``world_size``: in each round every rank
computes at most one chunk, then the round's results are exchanged and folded in chunk
order. A single process walks the very same chunks one round (= one chunk) at a time, which
is why the folded float64 sums are bit for bit the same for any number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import ModelLegoError
from ..runtime.distributed import SINGLE, DistContext, chunk_ranges


@dataclass(frozen=True)
class Round:
    """One round of chunks: ``chunks[r]`` is computed by rank ``r``; ``present[r]`` are the
    sorted profile rows that occur in it."""

    chunks: tuple[tuple[int, int], ...]
    present: tuple[torch.Tensor, ...]
    rank: int

    @property
    def mine(self) -> tuple[int, int] | None:
        """This rank's chunk ``(start, stop)``, or ``None`` when the round has none for it."""
        return self.chunks[self.rank] if self.rank < len(self.chunks) else None


class ProfilePass:
    """The rows of ``labels`` among ``classes`` and the rounds of a pass over them.

    Raises :class:`ModelLegoError` when a label is not one of ``classes``.
    """

    def __init__(self, labels: torch.Tensor, classes: Sequence[int], *, batch_size: int,
                 dist: DistContext | None = None) -> None:
        self.dist = dist or SINGLE
        self.classes = tuple(int(c) for c in classes)
        self.rows = class_rows(labels, self.classes)
        self.chunks = chunk_ranges(len(labels), batch_size)

    def rounds(self) -> Iterator[Round]:
        """The rounds in order (one chunk each for a single process)."""
        w = self.dist.world_size
        for first in range(0, len(self.chunks), w):
            chunks = tuple(self.chunks[first:first + w])
            present = tuple(torch.unique(self.rows[a:b]) for a, b in chunks)
            yield Round(chunks, present, self.dist.rank)

    def samples(self) -> dict[int, int]:
        """How many samples each class has."""
        counts = torch.bincount(self.rows, minlength=len(self.classes))
        return {c: int(counts[i]) for i, c in enumerate(self.classes)}


def class_rows(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """``rows[i]``: the position of ``labels[i]`` in ``classes`` (a class listed twice: its
    last position). Every label must be one of ``classes``."""
    classes = tuple(int(c) for c in classes)
    labels = labels.long()
    known = torch.tensor(classes, dtype=torch.long)
    inside = torch.isin(labels, known)
    if not bool(inside.all()):
        bad = sorted({int(v) for v in labels[~inside]})
        raise ModelLegoError(f"profile labels must all be among the profiled classes "
                             f"{list(classes)}; found label(s) {bad[:5]}")
    if not classes:
        return labels.new_zeros(0)
    if min(classes) < 0:
        raise ModelLegoError(f"class ids are >= 0, got classes {list(classes)}")
    # every label is a listed class now, so a table up to the largest class suffices
    row = torch.full((max(classes) + 1,), -1, dtype=torch.long)
    row[known] = torch.arange(len(classes))
    return row[labels]


@dataclass(frozen=True)
class ClassProfile:
    """Per-class statistics of the profiled layers: ``layers[name][i]`` belongs to class
    ``classes[i]``, made from ``samples[c]`` samples of class ``c`` in ``seconds``. What the
    statistic is depends on the method (a subclass says)."""

    classes: tuple[int, ...]
    layers: dict[str, torch.Tensor]
    samples: dict[int, int]
    seconds: float

    def for_class(self, layer: str, c: int) -> torch.Tensor:
        return self.layers[layer][self.classes.index(c)]
