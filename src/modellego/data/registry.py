"""Dataset registry, split carving, caching and the public loading functions.

Registered names: see :func:`list_datasets`. In addition, ``folder:PATH`` loads an image
folder with one sub-folder per class (see :mod:`modellego.data.folder`).

Splits: ``"test"`` is the official test set. ``"train"`` and ``"val"`` are carved from the
official training data: a ``torch.Generator`` seeded with 0 permutes the training indices,
the last 10% (rounded down, at least 1) become ``"val"`` and the rest ``"train"``; both
keep the original sample order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from modellego.data.base import SPLITS, DatasetInfo, Entry, RawData, Split, entry_of
from modellego.data.fingerprint import differences, split_fingerprint
from modellego.data.folder import load_folder
from modellego.data.lazy import LazyImages, spans
from modellego.data.roots import DATA_ENV, DataRoots, env_folder
from modellego.errors import DataError, ModelLegoWarning

#: where datasets' files are: one folder, a folder per dataset, or ``None`` (defaults)
DataDir = Union[str, Path, DataRoots, None]

FOLDER_PREFIX = "folder:"
FOLDER_DESCRIPTION = (
    "your own images: one sub-folder per class under PATH (or PATH/train and PATH/test), "
    "png/jpg/jpeg/bmp/gif/webp"
)
VAL_FRACTION = 0.1

Loader = Callable[[Path | None], RawData]
#: a folder's target image size (H, W), or ``None`` for its own
Size = Union[tuple[int, int], None]
#: how many training images of a streamed folder its mean and std are estimated on
STAT_SAMPLE = 2048
InfoFn = Callable[[Path | None], DatasetInfo]


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: ``load(data_dir)`` parses it; ``info(data_dir)`` is cheap."""

    name: str
    description: str
    load: Loader
    info: InfoFn | None = None  # None: derived from the loaded data (mean/std of "train")
    default_dir: Path | None = None
    uses_data_dir: bool = True


_REGISTRY: dict[str, DatasetEntry] = {}


def register(name: str, description: str, *, info: InfoFn | None = None,
             default_dir: Path | None = None, uses_data_dir: bool = True
             ) -> Callable[[Loader], Loader]:
    """Decorator registering a loader ``f(data_dir) -> RawData`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} is already registered; choose another name")
    if ":" in name or name != name.strip().lower():
        raise ValueError(f"dataset name {name!r} must be lower-case without ':' or spaces")

    def decorator(load: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered; choose another name")
        _REGISTRY[name] = DatasetEntry(name, description, load, info, default_dir,
                                       uses_data_dir)
        return load

    return decorator


def list_datasets() -> list[str]:
    """Registered dataset names (sorted). ``folder:PATH`` is also accepted (a pattern).

    Returns:
        The names, sorted.
    """
    return sorted(_REGISTRY)


def describe_datasets() -> list[tuple[str, str]]:
    """``(name, one-line description)`` for every dataset, plus the ``folder:PATH`` pattern."""
    rows = [(n, _REGISTRY[n].description) for n in list_datasets()]
    return rows + [(FOLDER_PREFIX + "PATH", FOLDER_DESCRIPTION)]


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Loaded:
    raw: RawData
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    info: DatasetInfo


_CACHE: dict[tuple[str, str, str], _Loaded] = {}


def clear_cache() -> None:
    """Forget all parsed datasets (e.g. after files on disk changed)."""
    _CACHE.clear()


def _unknown(name: str) -> DataError:
    return DataError(
        f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}, or "
        f"{FOLDER_PREFIX}PATH for a directory with one sub-folder of images per class"
    )


def _image_size(size: Any) -> Size:
    if size is None:
        return None
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise DataError(f"image size {size!r} must be two integers (height, width)") from None
    if h < 1 or w < 1 or h > 8192 or w > 8192:
        raise DataError(f"image size {[h, w]} must lie between 1 and 8192 pixels a side")
    return h, w


def _resolve(name: str, data_dir: DataDir, size: Size = None
             ) -> tuple[str, DatasetEntry, Path | None]:
    """Map a user-given name to (canonical name, entry, resolved data directory); a
    ``size`` is for ``folder:PATH`` datasets only."""
    if not isinstance(name, str):
        raise _unknown(repr(name))
    stripped = name.strip()
    if stripped.lower().startswith(FOLDER_PREFIX):
        raw_path = stripped[len(FOLDER_PREFIX):].strip()
        if not raw_path:
            raise DataError(
                f"dataset {name!r} has an empty path; write {FOLDER_PREFIX}PATH with PATH a "
                "directory holding one sub-folder of images per class"
            )
        root = Path(raw_path).expanduser().resolve()
        canonical = FOLDER_PREFIX + str(root)
        size = _image_size(size)
        folder = DatasetEntry(canonical, FOLDER_DESCRIPTION,
                              lambda _d: load_folder(root, size), uses_data_dir=False)
        return canonical, folder, None
    entry = _REGISTRY.get(stripped.lower())
    if entry is None:
        raise _unknown(name)
    if size is not None:
        raise DataError(f"an image size is for folder:PATH datasets; {entry.name!r} has its "
                        "own: leave the image size out")
    if not entry.uses_data_dir:
        return entry.name, entry, None
    if isinstance(data_dir, DataRoots):
        given = data_dir.folder(entry.name)
    else:
        given = Path(data_dir) if data_dir is not None else env_folder(entry.name)
    directory = given if given is not None else entry.default_dir
    return entry.name, entry, None if directory is None else directory.expanduser().resolve()


def _no_folder(name: str) -> DataError:
    return DataError(
        f"dataset {name!r} needs a data directory and none was given: pass `data` "
        f"{name}=PATH (or `data_dir` PATH when it is the only dataset), or set {DATA_ENV} to a "
        f"folder holding a sub-folder {name}")


def _carve_val(n: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if n < 2:
        raise DataError(
            f"dataset {name!r} has only {n} training sample(s); at least 2 are needed to "
            "carve out a validation split: add more training data"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_val = max(1, int(n * VAL_FRACTION))
    return perm[: n - n_val].sort().values, perm[n - n_val:].sort().values


def _channel_stats(images: torch.Tensor | LazyImages
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if isinstance(images, LazyImages):  # a seeded sample, decoded a batch at a time
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        return _streamed_stats(images[pick[:STAT_SAMPLE].sort().values])
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    means, stds = [], []
    for c in range(images.shape[1]):
        x = images[:, c].to(torch.float64) / scale
        means.append(round(float(x.mean()), 6))
        std = float(x.std(unbiased=False))
        stds.append(round(std, 6) if std > 1e-6 else 1.0)  # constant images: no scaling
    return tuple(means), tuple(stds)


def _streamed_stats(images: LazyImages, batch: int = 128
                    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of lazy images, merged batch by batch (Chan
    et al.'s pairwise update: as exact as one pass over all of them in float64)."""
    n, mean, m2 = 0, None, None
    for x in images.uint8_batches(spans(len(images), batch)):
        x = x.to(torch.float64).div_(255.0).transpose(0, 1).flatten(1)  # (C, pixels)
        k = x.shape[1]
        bm = x.mean(1)
        bm2 = ((x - bm[:, None]) ** 2).sum(1)
        if mean is None or m2 is None:
            n, mean, m2 = k, bm, bm2
            continue
        delta = bm - mean
        total = n + k
        mean = mean + delta * (k / total)
        m2 = m2 + bm2 + delta ** 2 * (n * k / total)
        n = total
    assert mean is not None and m2 is not None  # a split has images (checked on load)
    means = tuple(round(float(v), 6) for v in mean)
    stds = tuple(round(float(s), 6) if s > 1e-6 else 1.0 for s in (m2 / n).sqrt().tolist())
    return means, stds


def _get_loaded(name: str, data_dir: DataDir, size: Size = None) -> _Loaded:
    canonical, entry, directory = _resolve(name, data_dir, size)
    key = (canonical, "" if directory is None else str(directory), str(_image_size(size)))
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    if directory is None and entry.uses_data_dir:
        raise _no_folder(canonical)
    raw = entry.load(directory)
    train_idx, val_idx = _carve_val(int(raw.train_labels.numel()), canonical)
    if entry.info is not None:
        info = entry.info(directory)
        shape = tuple(int(s) for s in raw.train_images.shape[1:])
        if shape != info.input_shape or len(raw.class_names) != info.num_classes:
            raise DataError(
                f"dataset {canonical!r} in {directory}: images have shape {shape} but "
                f"{info.input_shape} was expected; the files belong to another dataset"
            )
    else:
        mean, std = _channel_stats(raw.train_images[train_idx]
                                   if isinstance(raw.train_images, LazyImages)
                                   else raw.train_images.index_select(0, train_idx))
        shape = tuple(int(s) for s in raw.train_images.shape[1:])
        info = DatasetInfo(canonical, raw.class_names, shape, mean, std)  # type: ignore[arg-type]
    loaded = _Loaded(raw, train_idx, val_idx, info)
    _CACHE[key] = loaded
    return loaded


def dataset_info(name: str, *, data_dir: DataDir = None, image_size: Size = None
                 ) -> DatasetInfo:
    """Describe dataset ``name`` (a registered name or ``folder:PATH``, read at
    ``image_size`` (H, W) or its own size: see :mod:`modellego.data.folder`).

    Cheap for registered datasets (CIFAR reads only the class-names file); ``folder:PATH``
    reads the headers once and the images (or a sample of them) to compute mean/std, then
    caches them.
    """
    _, entry, directory = _resolve(name, data_dir, image_size)
    if entry.info is not None:
        return entry.info(directory)
    return _get_loaded(name, data_dir, image_size).info


def _as_float(images: torch.Tensor | LazyImages, idx: torch.Tensor | None
              ) -> torch.Tensor | LazyImages:
    if isinstance(images, LazyImages):  # decoded when used
        return images if idx is None else images[idx]
    x = images if idx is None else images.index_select(0, idx)
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.clone() if idx is None else x.to(torch.float32)


def load_split(name: str, split: str, *, data_dir: DataDir = None,
               image_size: Size = None) -> Split:
    """Load ``split`` ("train", "val" or "test") of dataset ``name``.

    Args:
        name: a dataset name, or ``folder:PATH``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        data_dir: where the dataset's files are.
        image_size: the size a folder's images are read at.

    Returns:
        The :class:`~modellego.data.Split`: images in ``[0, 1]``, labels and the dataset's
        description.

    ``name`` is a registered name (:func:`list_datasets`) or ``folder:PATH`` (read at
    ``image_size``, see :func:`dataset_info`). Parsed files are cached per (name, data
    directory, size); the returned tensors are fresh copies. A streamed folder's split holds
    :class:`~modellego.data.lazy.LazyImages`, decoded when used.
    """
    _resolve(name, data_dir, image_size)  # unknown names are reported before unknown splits
    if split not in SPLITS:
        raise DataError(
            f"unknown split {split!r} for dataset {name!r}; valid splits: {', '.join(SPLITS)}"
        )
    loaded = _get_loaded(name, data_dir, image_size)
    raw = loaded.raw
    if split == "test":
        images, labels = _as_float(raw.test_images, None), raw.test_labels.clone()
    else:
        idx = loaded.train_idx if split == "train" else loaded.val_idx
        images, labels = _as_float(raw.train_images, idx), raw.train_labels.index_select(0, idx)
    return Split(images, labels, loaded.info, split)


def uses_folder(name: str) -> bool:
    """Whether dataset ``name`` is read from a folder the user may give (not built in, not
    a ``folder:PATH`` that names its own)."""
    _, entry, _ = _resolve(name, DataRoots(default="."))
    return entry.uses_data_dir


def check_one_folder(names: Sequence[str], data_dir: DataDir) -> None:
    """Refuse a single folder (``data_dir`` a path) for a command that reads several
    datasets from folders: each would read the same files (MNIST read as Fashion-MNIST)."""
    single = data_dir is not None and (not isinstance(data_dir, DataRoots)
                                       or data_dir.default is not None)
    if not single:
        return
    foldered = sorted({n for n in names if uses_folder(n)})
    if len(foldered) > 1:
        raise DataError(
            f"`data_dir` names one folder, but this reads {len(foldered)} datasets from "
            f"folders ({', '.join(foldered)}); give each its own: " +
            " ".join(f"`data` {n}=PATH" for n in foldered))


def load_split_for(dataset: Entry, split: str, *,
                   data_dir: DataDir = None, where: str = "the model") -> Split:
    """Load ``split`` of the dataset a model file names (its manifest's ``dataset`` entry)
    and check it against the fingerprint recorded there.

    A mismatch is a :class:`DataError` ("the data at PATH is not the NAME this model was
    trained on: ...") unless ``data_dir`` is a :class:`DataRoots` with
    ``allow_mismatch``; a manifest without a fingerprint (written by modellego 0.1.0) is
    accepted with a :class:`DataFingerprintWarning`.
    """
    dataset = entry_of(dataset)
    name = dataset["name"]
    loaded = load_split(name, split, data_dir=data_dir, image_size=size_for(dataset))
    expected = (dataset.get("fingerprint") or {}).get(split)
    if expected is None:
        if not dataset.get("fingerprint"):
            warnings.warn(f"{where} records no fingerprint of its {name} data (written by "
                          "modellego 0.1.0), so the data given cannot be checked against it",
                          DataFingerprintWarning, stacklevel=2)
        return loaded
    problem = differences(expected, split_fingerprint(loaded))
    if problem and not (isinstance(data_dir, DataRoots) and data_dir.allow_mismatch):
        canonical, _, directory = _resolve(name, data_dir)
        if canonical.startswith(FOLDER_PREFIX):
            raise DataError(
                f"the images in {canonical[len(FOLDER_PREFIX):]} are not those {where} was "
                f"made on: its {split} split has {problem}; restore them, or "
                "`allow_data_mismatch` to go on")
        at = directory if directory is not None else "built into modellego"
        raise DataError(
            f"the data at {at} is not the {name} {where} was made on: its {split} split has "
            f"{problem}; pass the right folder (`data` {name}=PATH), or "
            "`allow_data_mismatch` to go on")
    return loaded


class DataFingerprintWarning(ModelLegoWarning):
    """The model file records no fingerprint of its data, so the data cannot be checked."""


def dataset_fingerprint(name: str, *, data_dir: DataDir = None, image_size: Size = None
                        ) -> dict[str, Any]:
    """The fingerprint of every split of dataset ``name``, as a manifest records it."""
    return {split: split_fingerprint(load_split(name, split, data_dir=data_dir,
                                                image_size=image_size))
            for split in SPLITS}


def canonical_name(name: str, data_dir: DataDir = None) -> str:
    """The name a dataset is recorded under (``folder:`` paths made absolute), reading no
    file."""
    return _resolve(name, data_dir)[0]


def is_folder(name: str) -> bool:
    """Whether ``name`` is a ``folder:PATH`` dataset (whose image size is chosen)."""
    return isinstance(name, str) and name.strip().lower().startswith(FOLDER_PREFIX)


def size_for(dataset: Entry) -> Size:
    """The image size a model file's dataset entry was read at, for a ``folder:PATH``
    (its ``input_shape``); ``None`` for registered datasets, whose size is their own."""
    dataset = entry_of(dataset)
    if not is_folder(dataset["name"]):
        return None
    shape = dataset["input_shape"]
    return int(shape[1]), int(shape[2])


def dataset_info_for(dataset: Entry, *, data_dir: DataDir = None
                     ) -> DatasetInfo:
    """:func:`dataset_info` of the dataset a model file names, read as it was then."""
    dataset = entry_of(dataset)
    return dataset_info(dataset["name"], data_dir=data_dir, image_size=size_for(dataset))
