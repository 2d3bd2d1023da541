"""Image-folder datasets (``folder:PATH``): one sub-folder per class, read with Pillow.

Layouts:

* ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (class sets must match), or
* ``PATH/<class>/*``: each class is split 80/20 into train/test with a seeded (seed 0)
  permutation; every class needs at least 2 images.

Only direct children with extensions png/jpg/jpeg/bmp/gif/webp are read; other files and
hidden entries (starting with ".") are ignored. Images become greyscale ("L") if every
image is greyscale, else RGB, and are resized (bilinear) to the size of the first image
in sorted order unless all sizes agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modellego.data.base import RawData
from modellego.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
TEST_FRACTION = 0.2


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


def _open(path: Path) -> tuple[Image.Image, bool]:
    """Load one image; return it converted to L or RGB and whether it is greyscale."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16"):  # 16-bit greyscale: keep the high byte
                arr16 = np.asarray(im).astype(np.uint16)
                return Image.fromarray((arr16 >> 8).astype(np.uint8)), True
            if im.mode in _GREY_MODES:
                return im.convert("L"), True
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot read image {path} ({exc}); replace or delete the file"
        ) from exc
    if im.mode == "P":  # palette images with a grey palette count as greyscale
        arr = np.asarray(rgb)
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
            return rgb.convert("L"), True
    return rgb, False


def _stack(images: list[Image.Image], grey: bool, size: tuple[int, int]) -> torch.Tensor:
    mode = "L" if grey else "RGB"
    arrays = []
    for im in images:
        if im.mode != mode:
            im = im.convert(mode)
        if im.size != size:
            im = im.resize(size, Image.Resampling.BILINEAR)
        arrays.append(np.asarray(im, dtype=np.uint8))
    arr = np.stack(arrays)
    arr = arr[:, None] if grey else arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


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


def load_folder(root: Path) -> RawData:
    """Read an image-folder dataset rooted at ``root`` (see module docstring)."""
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

    images: list[Image.Image] = []
    labels: list[int] = []
    counts: list[int] = []
    all_grey = True
    for part in parts:
        start = len(images)
        for label, name in enumerate(class_names):
            files = _image_files(part / name)
            if not split_layout and len(files) < 2:
                raise DataError(
                    f"class folder {part / name} has only 1 image; the automatic 80/20 "
                    "train/test split needs at least 2 per class: add images, or use "
                    "PATH/train/<class> and PATH/test/<class> sub-folders"
                )
            for f in files:
                im, grey = _open(f)
                all_grey = all_grey and grey
                images.append(im)
                labels.append(label)
        counts.append(len(images) - start)

    sizes = {im.size for im in images}
    size = images[0].size if len(sizes) > 1 else next(iter(sizes))
    pixels = _stack(images, all_grey, size)
    label_t = torch.tensor(labels, dtype=torch.int64)
    if split_layout:
        n_train = counts[0]
        return RawData(pixels[:n_train], label_t[:n_train], pixels[n_train:],
                       label_t[n_train:], class_names)
    train_idx, test_idx = _split_per_class(labels, len(class_names))
    tr = torch.tensor(train_idx, dtype=torch.int64)
    te = torch.tensor(test_idx, dtype=torch.int64)
    return RawData(pixels[tr], label_t[tr], pixels[te], label_t[te], class_names)
