"""Core data types: :class:`DatasetInfo`, :class:`Split` and :func:`normalize`."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union, overload

import torch
import torch.nn.functional as F

from modellego.data.lazy import LazyImages, ModelInputs
from modellego.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The valid split names accepted by :func:`modellego.data.load_split`."""


def _float_tuple(value: Any, field: str, where: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{where}: field {field!r} must be a list of numbers, got {value!r}; "
            "fix or regenerate the dataset description"
        ) from exc
    if not all(math.isfinite(v) for v in out):
        raise DataError(
            f"{where}: field {field!r} contains a non-finite number {value!r}; "
            "fix or regenerate the dataset description"
        )
    return out


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset: class names, tensor shape and normalisation.

    ``mean`` and ``std`` are per channel and apply to images already scaled to [0, 1]
    (see :func:`normalize`).
    """

    name: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        where = f"dataset info for {self.name!r}"
        # Coerce sequences to tuples so instances stay hashable and comparable.
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        try:
            shape = tuple(int(v) for v in self.input_shape)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"{where}: input_shape must be three integers (C, H, W), got "
                f"{self.input_shape!r}; fix or regenerate the dataset description"
            ) from exc
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(
                f"{where}: input_shape must be three positive integers (C, H, W), got "
                f"{self.input_shape!r}; fix or regenerate the dataset description"
            )
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "mean", _float_tuple(self.mean, "mean", where))
        object.__setattr__(self, "std", _float_tuple(self.std, "std", where))
        if len(self.mean) != shape[0] or len(self.std) != shape[0]:
            raise DataError(
                f"{where}: mean and std need one value per channel ({shape[0]}), got "
                f"{len(self.mean)} and {len(self.std)}; fix or regenerate the dataset description"
            )
        if any(s <= 0 for s in self.std):
            raise DataError(
                f"{where}: std values must be positive, got {self.std}; "
                "fix or regenerate the dataset description"
            )
        if not self.class_names:
            raise DataError(
                f"{where}: class_names is empty; a dataset needs at least one class"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``class_names``)."""
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly representation (lists instead of tuples)."""
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "input_shape": list(self.input_shape),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetInfo:
        """Inverse of :meth:`to_dict`; raises :class:`DataError` on missing or bad fields."""
        if not isinstance(d, Mapping):
            raise DataError(
                f"dataset info must be a JSON object (dict), got {type(d).__name__}; "
                "fix or regenerate the dataset description"
            )
        fields = ("name", "class_names", "input_shape", "mean", "std")
        missing = [f for f in fields if f not in d]
        if missing:
            raise DataError(
                f"dataset info is missing field(s) {', '.join(missing)} (has: "
                f"{', '.join(sorted(map(str, d))) or 'nothing'}); "
                "fix or regenerate the dataset description"
            )
        names = d["class_names"]
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise DataError(
                f"dataset info for {d['name']!r}: class_names must be a list of strings, "
                f"got {names!r}; fix or regenerate the dataset description"
            )
        return cls(
            name=str(d["name"]),
            class_names=tuple(str(c) for c in names),
            input_shape=d["input_shape"],
            mean=d["mean"],
            std=d["std"],
        )


@dataclass(frozen=True)
class Split:
    """One split of a dataset.

    ``images`` is float32 ``(N, C, H, W)`` in [0, 1] (not normalised), ``labels`` int64
    ``(N,)`` with the dataset's original class ids; for a streamed folder ``images`` is
    :class:`~modellego.data.lazy.LazyImages`, decoded when used. Tensors returned by
    :func:`modellego.data.load_split` are fresh copies, safe to modify.
    """

    images: torch.Tensor | LazyImages
    labels: torch.Tensor
    info: DatasetInfo
    split: str

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.labels.dim() != 1:
            raise ValueError(
                f"Split needs images (N, C, H, W) and labels (N,), got shapes "
                f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"Split has {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, classes: Sequence[int]) -> Split:
        """Keep only samples whose label is in ``classes`` (labels keep their original ids)."""
        n = self.info.num_classes
        ids: list[int] = []
        for c in classes:
            try:
                if isinstance(c, bool):
                    raise TypeError
                cid = operator.index(c)
            except TypeError:
                raise DataError(
                    f"class id {c!r} for dataset {self.info.name!r} is not an integer; "
                    f"pass class ids between 0 and {n - 1}"
                ) from None
            if not 0 <= cid < n:
                raise DataError(
                    f"class id {cid} is out of range for dataset {self.info.name!r} with "
                    f"{n} classes; pass class ids between 0 and {n - 1}"
                )
            ids.append(cid)
        if not ids:
            raise DataError(
                f"no classes given for the subset of dataset {self.info.name!r}; "
                f"pass at least one class id between 0 and {n - 1}"
            )
        mask = torch.isin(self.labels, torch.tensor(ids, dtype=self.labels.dtype))
        return Split(self.images[mask], self.labels[mask], self.info, self.split)


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Return ``(images - mean) / std`` per channel for ``(N, C, H, W)`` or ``(C, H, W)`` input.

    Args:
        images: ``(N, C, H, W)`` or ``(C, H, W)`` images in ``[0, 1]``.
        info: the dataset whose mean and standard deviation apply.

    Returns:
        The normalised images.

    Integer tensors are converted to float32 first (no rescaling: pass values in [0, 1]).
    """
    if images.dim() not in (3, 4):
        raise DataError(
            f"normalize expects images of shape (N, C, H, W) or (C, H, W), got "
            f"{tuple(images.shape)}; add or remove a batch dimension"
        )
    channels = images.shape[-3]
    if channels != len(info.mean):
        raise DataError(
            f"normalize: images have {channels} channel(s) but dataset {info.name!r} has "
            f"{len(info.mean)}; use images from the same dataset as the model"
        )
    if not images.is_floating_point():
        images = images.to(torch.float32)
    mean = torch.tensor(info.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean) / std


def convert_images(x: torch.Tensor, channels: int, size: Sequence[int]) -> torch.Tensor:
    """Convert ``[0, 1]`` images to ``channels`` (grey -> RGB repeats, RGB -> grey averages)
    and ``size`` (bilinear). The same rule is used for data and inside assembly adapters."""
    c = x.shape[1]
    if c != channels:
        if c == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise DataError(f"cannot convert {c}-channel images to {channels} channels "
                            "(only grey <-> RGB conversions are defined)")
    if tuple(x.shape[2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x


class Typed(Protocol):
    """A typed manifest entry (:mod:`modellego.manifest`'s ``DatasetSpec``,
    ``InputContract``): the data layer sits below the manifest and reads its JSON."""

    def to_dict(self) -> dict[str, Any]: ...


#: a manifest's entry, typed or as JSON data
Entry = Union[Typed, Mapping[str, Any]]
#: what a network reads: a manifest's ``input`` entry, or ``None`` (the dataset's own)
Contract = Optional[Entry]


def entry_of(entry: Entry) -> Mapping[str, Any]:
    """A manifest's entry as JSON data."""
    return entry if isinstance(entry, Mapping) else entry.to_dict()


def reads_as_dataset(info: DatasetInfo, contract: Contract) -> bool:
    """Whether a network with input ``contract`` reads dataset ``info``'s images exactly as
    the dataset normalises them (same shape, mean and std; no contract counts as yes)."""
    if contract is None:
        return True
    contract = entry_of(contract)
    return (tuple(int(v) for v in contract["shape"]) == tuple(info.input_shape)
            and tuple(float(v) for v in contract["mean"]) == tuple(info.mean)
            and tuple(float(v) for v in contract["std"]) == tuple(info.std))


@overload
def model_input(images: torch.Tensor, info: DatasetInfo,
                contract: Contract = None) -> torch.Tensor: ...
@overload
def model_input(images: LazyImages, info: DatasetInfo,
                contract: Contract = None) -> ModelInputs: ...
@overload
def model_input(images: torch.Tensor | LazyImages, info: DatasetInfo,
                contract: Contract = None) -> torch.Tensor | ModelInputs: ...
def model_input(images: torch.Tensor | LazyImages, info: DatasetInfo,
                contract: Contract = None) -> torch.Tensor | ModelInputs:
    """``[0, 1]`` images of dataset ``info`` as a network with input ``contract`` (its
    manifest's ``input``: shape, mean, std) reads them: converted to its channels and size
    when they differ (see :func:`convert_images`), then normalised with its mean and std.
    Without a contract, or one equal to the dataset's, this is :func:`normalize`. Lazy
    images (a streamed folder) give lazy :class:`~modellego.data.lazy.ModelInputs`,
    converted batch by batch when indexed."""
    if contract is not None:
        contract = entry_of(contract)
    if isinstance(images, LazyImages):
        shape = contract["shape"] if contract is not None else images.shape[1:]
        return ModelInputs(images, shape, functools.partial(model_input, info=info,
                                                            contract=contract))
    if contract is None or reads_as_dataset(info, contract):
        return normalize(images, info)
    shape = tuple(int(v) for v in contract["shape"])
    mean = tuple(float(v) for v in contract["mean"])
    std = tuple(float(v) for v in contract["std"])
    if images.dim() != 4:
        raise DataError(f"model_input expects images of shape (N, C, H, W), got "
                        f"{tuple(images.shape)}")
    if not images.is_floating_point():
        images = images.to(torch.float32)
    x = convert_images(images, shape[0], shape[1:])
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class RawData:
    """Parsed dataset as read from disk (internal): official train and test parts.

    Images are uint8 (scaled by 1/255 on use) or float32 already in [0, 1], shaped
    ``(N, C, H, W)``; labels are int64.
    """

    train_images: torch.Tensor | LazyImages
    train_labels: torch.Tensor
    test_images: torch.Tensor | LazyImages
    test_labels: torch.Tensor
    class_names: tuple[str, ...]
