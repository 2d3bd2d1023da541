"""Low-level readers for IDX (MNIST-style), CIFAR binary files and scikit-learn digits.

Nothing here unpickles data: CIFAR is read from the *binary* distribution only.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np
import torch

from modellego.errors import DataError

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension

CIFAR_PIXELS = 3 * 32 * 32


#: Largest payload one dataset file may announce (header counts times record size), checked
#: before anything is read: 16x Fashion-MNIST's training images, 10x CIFAR-100's train.bin.
MAX_FILE_BYTES = 1 << 30
#: Largest class-names file read (one short name per line).
MAX_NAMES_BYTES = 1 << 20
_CHUNK = 1 << 20


def _cannot_read(path: Path, exc: OSError) -> DataError:
    return DataError(
        f"cannot read {path}: {exc.strerror or exc}; check the path and its permissions"
    )


def _bad_gzip(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"{path} is not a valid gzip file or is truncated ({exc}); "
        "re-download or reinstall the file"
    )


def _open(path: Path) -> BinaryIO:
    """``path`` opened for reading, through a gunzipping stream for ``*.gz``."""
    try:  # the caller closes the stream; a GzipFile opened by name closes its file too
        if path.suffix == ".gz":
            return cast(BinaryIO, gzip.open(path, "rb"))
        return open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise _cannot_read(path, exc) from exc


def _read_exactly(stream: BinaryIO, path: Path, n: int) -> bytes:
    """Up to ``n`` bytes of ``stream`` (fewer only at its end), read in chunks, so that a
    short file never costs more memory than it holds; read errors become DataError."""
    parts: list[bytes] = []
    left = n
    try:
        while left > 0:
            chunk = stream.read(min(left, _CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        if isinstance(stream, gzip.GzipFile):
            raise _bad_gzip(path, exc) from exc
        raise _cannot_read(path, exc) from exc
    except (EOFError, zlib.error) as exc:
        raise _bad_gzip(path, exc) from exc
    return b"".join(parts)


def read_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """Read a file, transparently gunzipping ``*.gz``; errors become :class:`DataError`.

    At most ``limit`` bytes (after gunzipping) are accepted; a longer file is refused
    before more than ``limit + 1`` bytes are held in memory.
    """
    with _open(path) as stream:
        data = _read_exactly(stream, path, limit + 1)
    if len(data) > limit:
        raise DataError(
            f"{path} holds more than {limit:,} bytes (after gunzipping), more than any "
            "dataset file modellego reads; check that it is the right file"
        )
    return data


def _read_idx(path: Path, magic: int, kind: str) -> np.ndarray:
    """Check the header (magic number, dimensions, announced size) before reading the
    payload, then read exactly the announced number of bytes and refuse more or fewer:
    a corrupt or crafted file (a gzip bomb) costs at most the size its header announces."""
    fix = "the file is truncated or corrupt; re-download or reinstall it"
    with _open(path) as stream:
        head = _read_exactly(stream, path, 4)
        if len(head) < 4:
            raise DataError(f"IDX {kind} file {path} is only {len(head)} bytes long; {fix}")
        found = int.from_bytes(head, "big")
        if found != magic:
            raise DataError(
                f"{path} is not an IDX {kind} file: magic number {found}, expected {magic} "
                "(images 2051, labels 2049); check that images and labels files are not "
                f"swapped, otherwise {fix}"
            )
        ndim = head[3]
        dims_raw = _read_exactly(stream, path, 4 * ndim)
        if len(dims_raw) < 4 * ndim:
            raise DataError(f"IDX {kind} file {path} ends inside its header; {fix}")
        dims = [int(v) for v in np.frombuffer(dims_raw, dtype=">u4", count=ndim)]
        if any(v == 0 for v in dims[1:]):
            raise DataError(f"IDX {kind} file {path} declares an empty dimension {dims}; {fix}")
        header = 4 + 4 * ndim
        size = math.prod(dims)
        if size > MAX_FILE_BYTES:
            raise DataError(
                f"IDX {kind} file {path} announces shape {dims}, {size:,} bytes of data, more "
                f"than the {MAX_FILE_BYTES:,} modellego reads from one file; {fix}"
            )
        data = _read_exactly(stream, path, size)
        extra = _read_exactly(stream, path, 1)
    if len(data) != size or extra:
        found_size = f"{header + len(data):,}" if not extra else f"more than {header + size:,}"
        raise DataError(
            f"IDX {kind} file {path} has {found_size} bytes but its header (shape {dims}) "
            f"requires exactly {header + size}; {fix}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def read_idx_images(path: Path) -> torch.Tensor:
    """Read an IDX3 image file into a uint8 tensor of shape ``(N, 1, H, W)``."""
    arr = _read_idx(Path(path), IDX_IMAGES_MAGIC, "images")
    return torch.from_numpy(arr.copy()).unsqueeze(1)


def read_idx_labels(path: Path) -> torch.Tensor:
    """Read an IDX1 label file into an int64 tensor of shape ``(N,)``."""
    arr = _read_idx(Path(path), IDX_LABELS_MAGIC, "labels")
    return torch.from_numpy(arr.astype(np.int64))


def check_labels(labels: torch.Tensor, num_classes: int, path: Path, dataset: str) -> None:
    """Raise :class:`DataError` if any label is outside ``0..num_classes-1``."""
    if labels.numel() and int(labels.max()) >= num_classes:
        raise DataError(
            f"{path} contains label {int(labels.max())}, but {dataset} has {num_classes} "
            f"classes (0..{num_classes - 1}); the file is corrupt or from another dataset"
        )


def find_file(directory: Path, base: str) -> Path | None:
    """Return ``directory/base`` or its ``.gz`` (also the ``.idx`` spelling) if present."""
    names = [base, base + ".gz"]
    if "-idx" in base:
        dotted = base.replace("-idx", ".idx")
        names += [dotted, dotted + ".gz"]
    for name in names:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int, dataset: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read matching IDX image and label files, checking counts and label range."""
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; the files do not belong together, reinstall them"
        )
    if images.shape[0] == 0:
        raise DataError(f"{images_path} contains no images; re-download or reinstall it")
    check_labels(labels, num_classes, labels_path, dataset)
    return images, labels


def read_cifar_file(path: Path, label_bytes: int, label_index: int, num_classes: int,
                    dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a CIFAR binary batch: records of ``label_bytes`` label bytes + 3072 CHW pixels.

    Returns uint8 images ``(N, 3, 32, 32)`` and int64 labels taken from byte ``label_index``.
    """
    record = label_bytes + CIFAR_PIXELS
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _cannot_read(path, exc) from exc
    if size == 0 or size % record:
        raise DataError(
            f"{path} has {size} bytes, which is not a positive multiple of the "
            f"{record}-byte {dataset} record ({label_bytes} label byte(s) + {CIFAR_PIXELS} "
            "pixel bytes); the file is truncated or not the CIFAR *binary* version. "
            "Re-download the binary version of the dataset"
        )
    if size > MAX_FILE_BYTES:
        raise DataError(
            f"{path} has {size:,} bytes, more than the {MAX_FILE_BYTES:,} modellego reads "
            f"from one file (a {dataset} batch file holds at most 50,000 records of {record} "
            "bytes); check that it is the right file and re-download the binary version"
        )
    with _open(path) as stream:
        data = _read_exactly(stream, path, size)
        extra = _read_exactly(stream, path, 1)
    if len(data) != size or extra:
        raise DataError(f"{path} changed size while it was read; read it again when it is "
                        "complete")
    arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    labels = torch.from_numpy(arr[:, label_index].astype(np.int64))
    images = torch.from_numpy(arr[:, label_bytes:].reshape(-1, 3, 32, 32).copy())
    check_labels(labels, num_classes, path, dataset)
    return images, labels


def read_names_file(path: Path, num_classes: int) -> tuple[str, ...]:
    """Read one class name per non-blank line; the count must equal ``num_classes``."""
    raw = read_bytes(path, MAX_NAMES_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"class-names file {path} is not UTF-8 text ({exc}); fix or delete the file"
        ) from exc
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != num_classes:
        raise DataError(
            f"class-names file {path} lists {len(names)} names but the dataset has "
            f"{num_classes} classes; fix the file (one name per line) or delete it to use "
            "default names"
        )
    return names


def locate_dir(data_dir: Path | None, subdir: str, required: Sequence[str], dataset: str,
               hint: str) -> Path:
    """Return ``data_dir`` or ``data_dir/subdir``, whichever holds all ``required`` files."""
    if data_dir is None:
        raise DataError(
            f"dataset {dataset!r} needs a data directory and none was given; "
            f"pass `data_dir` ({hint})"
        )
    if not data_dir.is_dir():
        raise DataError(
            f"data directory {data_dir} for dataset {dataset!r} does not exist or is not a "
            f"directory; pass `data_dir` ({hint})"
        )
    candidates = [data_dir, data_dir / subdir]
    for cand in candidates:
        if all((cand / f).is_file() for f in required):
            return cand
    raise DataError(
        f"dataset {dataset!r}: files {', '.join(required)} not found in "
        f"{' or '.join(str(c) for c in candidates)}; pass `data_dir` ({hint})"
    )


def load_digits_arrays(size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits scaled to [0, 1] and resized to ``size`` x ``size``.

    Returns float32 images ``(1797, 1, size, size)`` and int64 labels.
    """
    from sklearn.datasets import load_digits  # local import: sklearn is slow to import

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    images = torch.nn.functional.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False
    ).clamp_(0.0, 1.0)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return images.contiguous(), labels
