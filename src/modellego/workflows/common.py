"""What the file-level verbs share, written once: the task's data (training images of the
task's classes, validation and test images, calibration images of all the model's classes,
each checked against the model's data fingerprint). The kind check and the provenance
record are in :mod:`modellego.provenance`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..data import (
    Inputs,
    LazyImages,
    Split,
    as_tensor,
    dataset_info,
    dataset_info_for,
    load_split_for,
    model_input,
)
from ..data.base import Contract
from ..errors import ModelLegoError
from ..evaluation import check_dataset_matches
from ..manifest import Manifest
from ..training import check_classes


def own_classes(manifest: Manifest, classes: Sequence[int] | None, num_classes: int,
                *, param: str = "`classes`") -> tuple[int, ...]:
    """``classes`` (default: all of the model's) checked against the dataset and the model."""
    own = list(manifest.classes)
    chosen = tuple(own) if classes is None else tuple(int(c) for c in classes)
    check_classes(chosen, num_classes, param)
    missing = [c for c in chosen if c not in own]
    if missing:
        raise ModelLegoError(f"{param} {missing} are not classes of this model; it "
                             f"classifies {own}")
    return chosen


#: for a streamed folder, how many training images per sample wanted are drawn per class to
#: select the samples from (the selection pass reads ``4 * samples_per_class`` images of
#: each class, not the whole split)
STREAMED_POOL_FACTOR = 4


@dataclass(frozen=True)
class TaskData:
    """Normalised images for a task on a model's own dataset (training split only)."""

    info: Any
    classes: tuple[int, ...]
    #: the train split restricted to the task's classes (normalised images, class ids);
    #: lazy inputs for a streamed folder
    images: Inputs
    labels: torch.Tensor
    #: calibration images of all the model's classes, or ``None``
    calibration: torch.Tensor | None = None
    #: where ``images[i]`` is among the task's training images (``None``: at ``i``)
    positions: torch.Tensor | None = None
    #: the images per class drawn for a streamed folder (``None``: all of them)
    pool: int | None = None

    def split_positions(self, indices: Sequence[int]) -> list[int]:
        """Positions among the task's training images (the train split restricted to the
        task's classes, as provenance records samples) of positions ``indices`` in
        :attr:`images`."""
        if self.positions is None:
            return [int(i) for i in indices]
        return [int(self.positions[i]) for i in indices]


def sample_calibration_images(split: Split, count: int, seed: int = 0,
                              contract: Contract = None) -> torch.Tensor:
    """``count`` images of ``split`` (all of them if fewer), in a seeded order, as a network
    with input ``contract`` reads them (default: normalised as the dataset's)."""
    order = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))
    return as_tensor(model_input(split.images[order[:count]], split.info, contract),
                     "the calibration images")


def seeded_pool(labels: torch.Tensor, classes: Sequence[int], pool: int, seed: int = 0
           ) -> torch.Tensor:
    """Sorted positions of at most ``pool`` images of each of ``classes``, drawn with a
    seeded permutation per class."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in classes:
        pos = (labels == c).nonzero().flatten()
        picks.append(pos[torch.randperm(len(pos), generator=gen)[:pool]])
    return torch.cat(picks).sort().values if picks else labels.new_zeros(0)


def task_data(manifest: Manifest, classes: Sequence[int] | None, *,
              data_dir: str | None = None, calibration: int = 0,
              what: str = "disassembly", param: str = "`classes`",
              every_class: bool = True, streamed_pool: int | None = None) -> TaskData:
    """The training images of ``classes`` (default: all the model's) on the model's dataset,
    with every check a profile needs: the classes are the model's, the dataset is the one
    the model was made for, and every class has training images. ``calibration`` > 0 also
    draws that many seeded training images of all the model's classes. ``every_class=False``
    skips the check that every class has training images (for work that profiles none).
    ``streamed_pool``: for a streamed folder, only that many seeded training images per
    class are taken (so that picking a few samples per class does not read the whole
    split); in-memory datasets keep them all."""
    dataset = manifest.own_dataset.name
    info = dataset_info_for(manifest.own_dataset, data_dir=data_dir)
    chosen = own_classes(manifest, classes, info.num_classes, param=param)
    check_dataset_matches(manifest, dataset, info)  # e.g. a folder whose images changed
    train = load_split_for(manifest.own_dataset, "train", data_dir=data_dir)
    calib = None
    if calibration:
        calib = sample_calibration_images(train.subset(manifest.classes), calibration,
                                          contract=manifest.input)
    train = train.subset(chosen)
    empty = [c for c in chosen if every_class and not (train.labels == c).any()]
    if empty:
        names = ", ".join(f"{c} ({train.info.class_names[c]})" for c in empty)
        raise ModelLegoError(f"{param}: class {names} has no images in the train split of "
                             f"{dataset!r}, and {what} profiles each class on its "
                             "training images; add images of that class or choose other "
                             "classes")
    positions, pool = None, None
    if streamed_pool is not None and isinstance(train.images, LazyImages):
        pool = streamed_pool
        positions = seeded_pool(train.labels, chosen, pool)
        train = Split(train.images[positions], train.labels[positions], train.info, "train")
    return TaskData(train.info, chosen, model_input(train.images, train.info, manifest.input),
                    train.labels, calib, positions, pool)


def split_images(manifest: Manifest, split: str, classes: Sequence[int], *,
                 data_dir: str | None = None) -> tuple[Inputs, torch.Tensor]:
    """Images (as the model reads them: see :func:`modellego.data.model_input`; lazy for a
    streamed folder) and labels of ``classes`` from ``split`` of the model's dataset."""
    part = load_split_for(manifest.own_dataset, split, data_dir=data_dir).subset(classes)
    return model_input(part.images, part.info, manifest.input), part.labels


def check_own_dataset(manifest: Manifest, dataset: str | None,
                      data_dir: str | None = None) -> None:
    """Refuse a ``--dataset`` other than the model's own (class ids are dataset-specific)."""
    if dataset is None:
        return
    own = manifest.own_dataset.name
    # dataset_info, not only the name: a folder's own problems are reported first
    if dataset_info(dataset, data_dir=data_dir).name != own:
        raise ModelLegoError(f"`dataset` {dataset}: the model classifies {own!r}; pass "
                             f"`dataset` {own}")
