"""Image-folder datasets (``folder:PATH``): one sub-folder per class, read with Pillow.

Layouts:

* ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (class sets must match), or
* ``PATH/<class>/*``: each class is split 80/20 into train/test with a seeded (seed 0)
  permutation; every class needs at least 2 images.

Only direct children with extensions png/jpg/jpeg/bmp/gif/webp are read; other files and
hidden entries (starting with ".") are ignored. Every file's header is read once (mode and
size, not pixels). Images become greyscale ("L") if every image is greyscale, else RGB.

Size: when every image has the same size and no size is asked for, images are used as they
are. Otherwise every image is resized (bilinear) to cover the target size divided by
:data:`~modellego.data.lazy.CROP_RATIO` and centre-cropped to it (the usual evaluation
transform); the target is the size asked for (``--image-size``, or the model's input size
when the folder is read for a model), else a square of the median shorter side, at most
:data:`DEFAULT_MAX_SIZE`. No single image decides the size for all.

Memory: a folder whose decoded images take at most :func:`stream_above` bytes is decoded
once and held as uint8 tensors; a larger one is *streamed*: its splits are
:class:`~modellego.data.lazy.LazyImages`, decoded batch by batch through a DataLoader.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from modellego.data.base import RawData
from modellego.data.lazy import LazyImages, Recipe, open_image, spans
from modellego.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
TEST_FRACTION = 0.2
#: the largest side a mixed-size folder is cut to when no size is asked for
DEFAULT_MAX_SIZE = 224
#: the environment variable bounding (in MB) the decoded size of a folder held in memory
STREAM_ENV = "MODELLEGO_STREAM_ABOVE_MB"


def stream_above() -> int:
    """Bytes of decoded images above which a folder is streamed (``$MODELLEGO_STREAM_ABOVE_MB``,
    default 1024 MB)."""
    text = os.environ.get(STREAM_ENV, "1024")
    try:
        mb = float(text)
    except ValueError:
        raise DataError(f"${STREAM_ENV} is {text!r}; set it to a number of megabytes") from None
    return int(mb * 2**20)


def _class_dirs(root: Path) -> list[Path]:
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise DataError(
            f"cannot list image folder {root}: {exc.strerror or exc}; check the path"
        ) from exc
    dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not dirs:
        raise DataError(
            f"image folder {root} has no class sub-folders; put the images of each class "
            "in their own sub-folder (e.g. PATH/cat/1.png, PATH/dog/2.png)"
        )
    return dirs


def _image_files(class_dir: Path) -> list[Path]:
    files = sorted(
        (p for p in class_dir.iterdir()
         if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.name,
    )
    if not files:
        raise DataError(
            f"class folder {class_dir} contains no images (looked for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
        )
    return files


def _split_per_class(labels: list[int], num_classes: int) -> tuple[list[int], list[int]]:
    """Seeded per-class 80/20 split; returns sorted (train, test) index lists."""
    gen = torch.Generator().manual_seed(0)
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i, lab in enumerate(labels):
        by_class[lab].append(i)
    train: list[int] = []
    test: list[int] = []
    for members in by_class:
        n_test = max(1, int(len(members) * TEST_FRACTION + 0.5))
        perm = torch.randperm(len(members), generator=gen).tolist()
        test += [members[j] for j in perm[:n_test]]
        train += [members[j] for j in perm[n_test:]]
    return sorted(train), sorted(test)


def _header(path: Path) -> tuple[tuple[int, int], bool]:
    """``((H, W), greyscale)`` from the file's header (palette images are decoded to tell)."""
    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path} ({exc}); replace or delete the file") from exc
    if w < 1 or h < 1:
        raise DataError(f"image {path} is {w}x{h} pixels; replace or delete the file")
    if mode == "P":
        return (h, w), open_image(str(path))[1]
    grey = mode.startswith("I;16") or mode in {"1", "L", "LA", "La", "I", "F"}
    return (h, w), grey


@dataclass(frozen=True)
class FolderScan:
    """What the headers of a folder's files say: classes, files and labels per part."""

    class_names: tuple[str, ...]
    files: tuple[tuple[str, ...], ...]
    labels: tuple[tuple[int, ...], ...]
    sizes: frozenset[tuple[int, int]]
    shorter_median: int
    grey: bool
    split_layout: bool


def scan_folder(root: Path) -> FolderScan:
    """Read the class folders and every file's header (see the module docstring)."""
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist or is not a directory; use folder:PATH with "
            "PATH a directory holding one sub-folder of images per class"
        )
    split_layout = (root / "train").is_dir() and (root / "test").is_dir()
    parts = [root / "train", root / "test"] if split_layout else [root]
    class_lists = [[d.name for d in _class_dirs(p)] for p in parts]
    class_names = tuple(class_lists[0])
    if split_layout and class_lists[0] != class_lists[1]:
        only_train = sorted(set(class_lists[0]) - set(class_lists[1]))
        only_test = sorted(set(class_lists[1]) - set(class_lists[0]))
        raise DataError(
            f"image folder {root}: train/ and test/ have different class sub-folders "
            f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'}); "
            "make both hold the same classes"
        )
    files: list[tuple[str, ...]] = []
    labels: list[tuple[int, ...]] = []
    sizes: set[tuple[int, int]] = set()
    shorter: list[int] = []
    all_grey = True
    for part in parts:
        part_files: list[str] = []
        part_labels: list[int] = []
        for label, name in enumerate(class_names):
            found = _image_files(part / name)
            if not split_layout and len(found) < 2:
                raise DataError(
                    f"class folder {part / name} has only 1 image; the automatic 80/20 "
                    "train/test split needs at least 2 per class: add images, or use "
                    "PATH/train/<class> and PATH/test/<class> sub-folders"
                )
            for f in found:
                size, grey = _header(f)
                all_grey = all_grey and grey
                sizes.add(size)
                shorter.append(min(size))
                part_files.append(str(f))
                part_labels.append(label)
        files.append(tuple(part_files))
        labels.append(tuple(part_labels))
    return FolderScan(class_names, tuple(files), tuple(labels), frozenset(sizes),
                      int(statistics.median_low(shorter)), all_grey, split_layout)


def recipe_for(scan: FolderScan, size: tuple[int, int] | None) -> Recipe:
    """How the folder's files are decoded for a target ``size`` (``None``: its own)."""
    mode = "L" if scan.grey else "RGB"
    if size is None:
        if len(scan.sizes) == 1:
            return Recipe(mode, next(iter(scan.sizes)), crop=False)
        side = min(scan.shorter_median, DEFAULT_MAX_SIZE)
        return Recipe(mode, (side, side), crop=True)
    size = (int(size[0]), int(size[1]))
    if min(size) < 1:
        raise DataError(f"image size {list(size)} must be positive")
    return Recipe(mode, size, crop=scan.sizes != {size})


def load_folder(root: Path, size: tuple[int, int] | None = None) -> RawData:
    """Read an image-folder dataset rooted at ``root`` (see the module docstring) for a
    target ``size`` (H, W), or the folder's own (``None``)."""
    scan = scan_folder(root)
    recipe = recipe_for(scan, size)
    if scan.split_layout:
        (train_files, test_files), (train_labels, test_labels) = scan.files, scan.labels
    else:
        all_labels = list(scan.labels[0])
        train_idx, test_idx = _split_per_class(all_labels, len(scan.class_names))
        train_files = tuple(scan.files[0][i] for i in train_idx)
        test_files = tuple(scan.files[0][i] for i in test_idx)
        train_labels = tuple(all_labels[i] for i in train_idx)
        test_labels = tuple(all_labels[i] for i in test_idx)
    train = LazyImages(train_files, recipe)
    test = LazyImages(test_files, recipe)
    tr_lab = torch.tensor(train_labels, dtype=torch.int64)
    te_lab = torch.tensor(test_labels, dtype=torch.int64)
    if train.nbytes() // 4 + test.nbytes() // 4 > stream_above():
        return RawData(train, tr_lab, test, te_lab, scan.class_names)
    return RawData(_decode_uint8(train), tr_lab, _decode_uint8(test), te_lab, scan.class_names)


def _decode_uint8(images: LazyImages) -> torch.Tensor:
    chunks = spans(len(images), 256)
    if not chunks:
        return torch.zeros((0, *images.shape[1:]), dtype=torch.uint8)
    return torch.cat(list(images.uint8_batches(chunks)))
