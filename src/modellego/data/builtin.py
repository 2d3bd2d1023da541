"""Built-in datasets: fashion-mnist, mnist, digits, cifar10 and cifar100.

Importing this module registers them (done by :mod:`modellego.data`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from modellego.data import readers
from modellego.data.base import DatasetInfo, RawData
from modellego.data.registry import InfoFn, register
from modellego.errors import DataError

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                    "Shirt", "Sneaker", "Bag", "Ankle boot")
_DIGIT_CLASSES = tuple(str(i) for i in range(10))
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                    "horse", "ship", "truck")
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR10_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
_CIFAR10_HINT = ("the directory holding the extracted CIFAR-10 *binary* version, "
                 "cifar-10-batches-bin; the Python/pickle version is not supported")
_CIFAR100_FILES = ("train.bin", "test.bin")
_CIFAR100_HINT = ("the directory holding the extracted CIFAR-100 *binary* version, "
                  "cifar-100-binary; the Python/pickle version is not supported")
# Per-channel mean/std of the "digits" train split (verified in tests/test_data.py).
_DIGITS_MEAN, _DIGITS_STD = (0.305115,), (0.324408,)


def _static(name: str, classes: tuple[str, ...], shape: tuple[int, int, int],
            mean: tuple[float, ...], std: tuple[float, ...]) -> InfoFn:
    info = DatasetInfo(name, classes, shape, mean, std)
    return lambda _data_dir: info


def _load_idx(name: str, data_dir: Path, hint: str) -> RawData:
    found = {base: readers.find_file(data_dir, base) for base in _IDX_FILES}
    missing = [base for base, path in found.items() if path is None]
    if missing:
        state = "" if data_dir.is_dir() else " (the directory does not exist)"
        raise DataError(
            f"{name}: missing file(s) in {data_dir}{state}: "
            f"{', '.join(b + '[.gz]' for b in missing)}; {hint}"
        )
    paths = [p for p in found.values() if p is not None]
    train_x, train_y = readers.read_idx_pair(paths[0], paths[1], 10, name)
    test_x, test_y = readers.read_idx_pair(paths[2], paths[3], 10, name)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"{name}: train images in {paths[0]} are {tuple(train_x.shape[2:])} but test "
            f"images in {paths[2]} are {tuple(test_x.shape[2:])}; reinstall the files"
        )
    classes = _FASHION_CLASSES if name == "fashion-mnist" else _DIGIT_CLASSES
    return RawData(train_x, train_y, test_x, test_y, classes)


@register(
    "fashion-mnist",
    "Fashion-MNIST: 28x28 greyscale clothing, 10 classes (IDX files; default "
    f"{DEFAULT_FASHION_MNIST_DIR})",
    info=_static("fashion-mnist", _FASHION_CLASSES, (1, 28, 28), (0.2860,), (0.3530,)),
    default_dir=DEFAULT_FASHION_MNIST_DIR,
)
def _load_fashion_mnist(data_dir: Path | None) -> RawData:
    directory = data_dir if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
    return _load_idx("fashion-mnist", directory, "install with: apt-get install "
                     "dataset-fashion-mnist, or pass `data_dir`: a directory with these files")


@register(
    "mnist",
    "MNIST handwritten digits: 28x28 greyscale, 10 classes (IDX files; needs a data "
    "directory)",
    info=_static("mnist", _DIGIT_CLASSES, (1, 28, 28), (0.1307,), (0.3081,)),
)
def _load_mnist(data_dir: Path | None) -> RawData:
    hint = "pass `data_dir`: a directory with the MNIST IDX files (plain or .gz)"
    if data_dir is None:
        raise DataError(f"dataset 'mnist' needs a data directory and none was given; {hint}")
    return _load_idx("mnist", data_dir, hint)


def _digits_test_indices(labels: torch.Tensor) -> torch.Tensor:
    """Seeded, stratified 20% test sample: every 5th sample of each class's permuted list."""
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))
    grouped = perm[torch.argsort(labels[perm], stable=True)]
    return grouped[0::5].sort().values


@register(
    "digits",
    "scikit-learn's bundled 8x8 digits (1797 images) upscaled to 28x28, 10 classes; "
    "no files needed",
    info=_static("digits", _DIGIT_CLASSES, (1, 28, 28), _DIGITS_MEAN, _DIGITS_STD),
    uses_data_dir=False,
)
def _load_digits(data_dir: Path | None) -> RawData:
    images, labels = readers.load_digits_arrays(28)
    is_test = torch.zeros(labels.numel(), dtype=torch.bool)
    is_test[_digits_test_indices(labels)] = True
    return RawData(images[~is_test], labels[~is_test], images[is_test], labels[is_test],
                   _DIGIT_CLASSES)


def _cifar10_info(data_dir: Path | None) -> DatasetInfo:
    directory = readers.locate_dir(data_dir, "cifar-10-batches-bin", _CIFAR10_FILES,
                                   "cifar10", _CIFAR10_HINT)
    meta = directory / "batches.meta.txt"
    names = readers.read_names_file(meta, 10) if meta.is_file() else _CIFAR10_CLASSES
    return DatasetInfo("cifar10", names, (3, 32, 32), (0.4914, 0.4822, 0.4465),
                       (0.2470, 0.2435, 0.2616))


@register("cifar10", "CIFAR-10 binary version: 32x32 RGB, 10 classes (needs a data directory)",
          info=_cifar10_info)
def _load_cifar10(data_dir: Path | None) -> RawData:
    directory = readers.locate_dir(data_dir, "cifar-10-batches-bin", _CIFAR10_FILES,
                                   "cifar10", _CIFAR10_HINT)
    parts = [readers.read_cifar_file(directory / f, 1, 0, 10, "cifar10")
             for f in _CIFAR10_FILES]
    train_x = torch.cat([p[0] for p in parts[:5]])
    train_y = torch.cat([p[1] for p in parts[:5]])
    return RawData(train_x, train_y, parts[5][0], parts[5][1],
                   _cifar10_info(data_dir).class_names)


def _cifar100_info(data_dir: Path | None) -> DatasetInfo:
    directory = readers.locate_dir(data_dir, "cifar-100-binary", _CIFAR100_FILES,
                                   "cifar100", _CIFAR100_HINT)
    meta = directory / "fine_label_names.txt"
    names = (readers.read_names_file(meta, 100) if meta.is_file()
             else tuple(f"class_{i}" for i in range(100)))
    return DatasetInfo("cifar100", names, (3, 32, 32), (0.5071, 0.4865, 0.4409),
                       (0.2673, 0.2564, 0.2762))


@register("cifar100",
          "CIFAR-100 binary version: 32x32 RGB, 100 fine-label classes (needs a data "
    "directory)",
          info=_cifar100_info)
def _load_cifar100(data_dir: Path | None) -> RawData:
    directory = readers.locate_dir(data_dir, "cifar-100-binary", _CIFAR100_FILES,
                                   "cifar100", _CIFAR100_HINT)
    train_x, train_y = readers.read_cifar_file(directory / "train.bin", 2, 1, 100, "cifar100")
    test_x, test_y = readers.read_cifar_file(directory / "test.bin", 2, 1, 100, "cifar100")
    return RawData(train_x, train_y, test_x, test_y, _cifar100_info(data_dir).class_names)
