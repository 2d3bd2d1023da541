"""Tests for modellego.data: readers, registry, splits, folder datasets."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modellego.data import (
    DEFAULT_FASHION_MNIST_DIR,
    DatasetInfo,
    Split,
    clear_cache,
    dataset_info,
    describe_datasets,
    list_datasets,
    load_split,
    normalize,
    readers,
    register,
)
from modellego.errors import DataError, ModelLegoError
from subproc import run_capped

# --------------------------------------------------------------------------- helpers


def _expected_train_val(n: int) -> tuple[list[int], list[int]]:
    """Independent restatement of the documented val carving rule."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    n_val = max(1, n // 10)
    return sorted(perm[: n - n_val]), sorted(perm[n - n_val:])


def _write(path: Path, payload: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def _idx_images(arr: np.ndarray) -> bytes:
    n, h, w = arr.shape
    return struct.pack(">IIII", 2051, n, h, w) + arr.astype(np.uint8).tobytes()


def _idx_labels(arr: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(arr)) + arr.astype(np.uint8).tobytes()


def _write_mnist(directory: Path, gz: bool, n_train: int = 20, n_test: int = 7):
    rng = np.random.default_rng(123)
    data = {
        "train": (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
        "t10k": (rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test)),
    }
    for prefix, (x, y) in data.items():
        _write(directory / f"{prefix}-images-idx3-ubyte", _idx_images(x), gz)
        _write(directory / f"{prefix}-labels-idx1-ubyte", _idx_labels(y), gz)
    return data


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dataset_exact_values(tmp_path: Path, gz: bool) -> None:
    data = _write_mnist(tmp_path, gz)
    x_train, y_train = data["train"]
    x_test, y_test = data["t10k"]
    test = load_split("mnist", "test", data_dir=tmp_path)
    assert test.images.dtype == torch.float32 and test.labels.dtype == torch.int64
    assert test.images.shape == (7, 1, 28, 28)
    expected = torch.from_numpy(x_test.astype(np.uint8)).unsqueeze(1).float() / 255
    assert torch.equal(test.images, expected)
    assert test.labels.tolist() == y_test.tolist()
    assert test.info.name == "mnist" and test.info.class_names == tuple("0123456789")

    train_idx, val_idx = _expected_train_val(20)
    assert len(val_idx) == 2
    for split, idx in (("train", train_idx), ("val", val_idx)):
        s = load_split("mnist", split, data_dir=str(tmp_path))
        assert s.split == split and len(s) == len(idx)
        exp = torch.from_numpy(x_train[idx].astype(np.uint8)).unsqueeze(1).float() / 255
        assert torch.equal(s.images, exp)
        assert s.labels.tolist() == y_train[idx].tolist()


def test_idx_reader_direct(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = _write(tmp_path / "imgs", _idx_images(arr), gz=True)
    images = readers.read_idx_images(path)
    assert images.dtype == torch.uint8 and images.shape == (2, 1, 3, 4)
    assert images[1, 0, 2, 3].item() == 23
    labels = readers.read_idx_labels(_write(tmp_path / "labs", _idx_labels(np.array([7, 1])),
                                            gz=False))
    assert labels.tolist() == [7, 1] and labels.dtype == torch.int64


def test_idx_errors(tmp_path: Path) -> None:
    arr = np.zeros((3, 2, 2), dtype=np.uint8)
    good = _idx_images(arr)
    labels = _write(tmp_path / "labels", _idx_labels(np.array([1, 2, 3])), gz=False)
    with pytest.raises(DataError, match="magic number 2049, expected 2051") as exc:
        readers.read_idx_images(labels)
    assert str(labels) in str(exc.value)

    truncated = _write(tmp_path / "trunc", good[:-1], gz=False)
    with pytest.raises(DataError, match="truncated or corrupt") as exc:
        readers.read_idx_images(truncated)
    assert str(truncated) in str(exc.value) and "requires exactly 28" in str(exc.value)
    with pytest.raises(DataError, match="truncated"):
        readers.read_idx_images(_write(tmp_path / "extra", good + b"\0", gz=False))
    with pytest.raises(DataError, match="ends inside its header"):
        readers.read_idx_images(_write(tmp_path / "hdr", good[:9], gz=False))
    with pytest.raises(DataError, match="only 2 bytes"):
        readers.read_idx_images(_write(tmp_path / "tiny", good[:2], gz=False))
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(gzip.compress(good)[:-8])
    with pytest.raises(DataError, match="not a valid gzip file or is truncated") as exc:
        readers.read_idx_images(bad_gz)
    assert str(bad_gz) in str(exc.value)
    with pytest.raises(DataError, match="cannot read"):
        readers.read_idx_images(tmp_path / "missing")


def test_idx_pair_errors(tmp_path: Path) -> None:
    data = _write_mnist(tmp_path, gz=False)
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_labels(data["t10k"][1][:-1]), gz=False)
    with pytest.raises(DataError, match="holds 7 images but .* holds 6 labels"):
        load_split("mnist", "test", data_dir=tmp_path)
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_labels(np.array([0] * 6 + [12])), False)
    with pytest.raises(DataError, match="contains label 12"):
        load_split("mnist", "test", data_dir=tmp_path)


def test_idx_wrong_image_size(tmp_path: Path) -> None:
    for prefix, n in (("train", 4), ("t10k", 2)):
        _write(tmp_path / f"{prefix}-images-idx3-ubyte", _idx_images(np.zeros((n, 5, 5))), False)
        _write(tmp_path / f"{prefix}-labels-idx1-ubyte", _idx_labels(np.zeros(n)), False)
    with pytest.raises(DataError, match=r"shape \(1, 5, 5\) but \(1, 28, 28\)"):
        load_split("mnist", "train", data_dir=tmp_path)


def test_missing_files_messages(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_split("fashion-mnist", "train", data_dir=tmp_path)
    msg = str(exc.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg
    assert "t10k-labels-idx1-ubyte" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "pass `data_dir`: a" in msg
    from modellego.cli import cli_message  # the command line names its flag instead

    assert "pass --data-dir: a directory" in cli_message(msg, {"data_dir": "--data-dir"})
    with pytest.raises(DataError, match="does not exist"):
        load_split("fashion-mnist", "train", data_dir=tmp_path / "nope")
    # both ways to give it: a root for the dataset, or the environment's folder of roots
    with pytest.raises(DataError,
                       match="'mnist' needs a data directory.*`data` mnist=PATH.*MODELLEGO_DATA"):
        load_split("mnist", "train")
    assert issubclass(DataError, ModelLegoError)


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(),
                    reason=f"{DEFAULT_FASHION_MNIST_DIR} missing (apt-get install "
                    "dataset-fashion-mnist)")
def test_real_fashion_mnist() -> None:
    sizes = {s: len(load_split("fashion-mnist", s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 54000, "val": 6000, "test": 10000}
    test = load_split("fashion-mnist", "test")
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.labels[0].item() == 9
    assert test.info.class_names[9] == "Ankle boot"
    assert test.images.shape == (10000, 1, 28, 28)
    assert 0.0 <= test.images.min().item() and test.images.max().item() == 1.0
    assert test.info == dataset_info("fashion-mnist")


def test_fashion_mnist_info_is_static() -> None:
    info = dataset_info("fashion-mnist", data_dir="/does/not/exist")
    assert info.class_names == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10
    assert info.mean == (0.2860,) and info.std == (0.3530,)
    assert dataset_info("MNIST").mean == (0.1307,) and dataset_info("mnist").std == (0.3081,)


# --------------------------------------------------------------------------- digits


def test_digits_splits() -> None:
    splits = {s: load_split("digits", s) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 1294, "val": 143, "test": 360}
    for s in splits.values():
        assert s.images.shape[1:] == (1, 28, 28) and s.images.dtype == torch.float32
        assert s.images.min().item() >= 0.0 and s.images.max().item() <= 1.0
    everything = torch.cat([s.images.flatten(1) for s in splits.values()])
    assert torch.unique(everything, dim=0).shape[0] == 1797  # disjoint and covering
    counts = torch.bincount(splits["test"].labels, minlength=10)
    assert counts.sum().item() == 360 and counts.min().item() >= 34 and counts.max() <= 37

    clear_cache()
    again = load_split("digits", "test")
    assert torch.equal(again.images, splits["test"].images)
    assert torch.equal(again.labels, splits["test"].labels)


def test_digits_values_and_stats() -> None:
    images, labels = readers.load_digits_arrays(28)
    assert images.shape == (1797, 1, 28, 28) and labels[:3].tolist() == [0, 1, 2]
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images[:1].astype(np.float32) / 16).unsqueeze(1)
    exp = torch.nn.functional.interpolate(raw, size=(28, 28), mode="bilinear",
                                          align_corners=False)
    assert torch.allclose(images[:1], exp, atol=1e-7)
    train = load_split("digits", "train").images.double()
    info = dataset_info("digits")
    assert info.mean[0] == pytest.approx(train.mean().item(), abs=1e-6)
    assert info.std[0] == pytest.approx(train.std(unbiased=False).item(), abs=1e-6)


# --------------------------------------------------------------------------- CIFAR


def _cifar_records(labels: list[tuple[int, ...]], seed: int) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    rows = [bytes(lab) + px.tobytes() for lab, px in zip(labels, pixels, strict=True)]
    return b"".join(rows), pixels.reshape(-1, 3, 32, 32)


def test_cifar10_binary(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    train_px = []
    for i in range(1, 6):
        payload, px = _cifar_records([(i,), (i + 4,)], seed=i)
        (root / f"data_batch_{i}.bin").write_bytes(payload)
        train_px.append(px)
    payload, test_px = _cifar_records([(3,), (0,), (9,)], seed=99)
    (root / "test_batch.bin").write_bytes(payload)
    names = [f"name{i}" for i in range(10)]
    (root / "batches.meta.txt").write_text("\n".join(names) + "\n\n")

    test = load_split("cifar10", "test", data_dir=tmp_path)
    assert test.labels.tolist() == [3, 0, 9]
    assert torch.equal(test.images, torch.from_numpy(test_px).float() / 255)
    assert test.info.class_names == tuple(names) and test.info.input_shape == (3, 32, 32)
    assert test.info.mean == (0.4914, 0.4822, 0.4465)

    all_px = np.concatenate(train_px)
    all_labels = [lab for i in range(1, 6) for lab in (i, i + 4)]
    train_idx, val_idx = _expected_train_val(10)
    val = load_split("cifar10", "val", data_dir=tmp_path)
    assert val.labels.tolist() == [all_labels[i] for i in val_idx]
    assert torch.equal(val.images, torch.from_numpy(all_px[val_idx]).float() / 255)
    assert len(load_split("cifar10", "train", data_dir=tmp_path)) == len(train_idx) == 9

    # data_dir pointing at the batches directory itself; default names without meta file
    (root / "batches.meta.txt").unlink()
    clear_cache()
    info = dataset_info("cifar10", data_dir=root)
    assert info.class_names[0] == "airplane" and info.class_names[9] == "truck"

    (root / "test_batch.bin").write_bytes(payload[:-1])
    clear_cache()
    with pytest.raises(DataError, match="not a positive multiple of the 3073-byte") as exc:
        load_split("cifar10", "test", data_dir=root)
    assert str(root / "test_batch.bin") in str(exc.value)


def test_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data_batch_1.bin.*cifar-10-batches-bin"):
        load_split("cifar10", "train", data_dir=tmp_path)
    with pytest.raises(DataError, match="needs a data directory"):
        dataset_info("cifar10")


def test_cifar100_binary(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-binary"
    root.mkdir()
    train_payload, _ = _cifar_records([(1, 50), (2, 99), (3, 0), (4, 7)], seed=1)
    test_payload, test_px = _cifar_records([(19, 42), (0, 5)], seed=2)
    (root / "train.bin").write_bytes(train_payload)
    (root / "test.bin").write_bytes(test_payload)

    test = load_split("cifar100", "test", data_dir=tmp_path)
    assert test.labels.tolist() == [42, 5]  # fine labels, not coarse
    assert torch.equal(test.images, torch.from_numpy(test_px).float() / 255)
    assert test.info.num_classes == 100 and test.info.class_names[42] == "class_42"
    assert len(load_split("cifar100", "train", data_dir=tmp_path)) == 3
    assert load_split("cifar100", "val", data_dir=tmp_path).labels.numel() == 1

    names = [f"fine{i}" for i in range(100)]
    (root / "fine_label_names.txt").write_text("\n".join(names))
    assert dataset_info("cifar100", data_dir=root).class_names == tuple(names)
    (root / "fine_label_names.txt").write_text("only\ntwo\n")
    with pytest.raises(DataError, match="lists 2 names but the dataset has 100"):
        dataset_info("cifar100", data_dir=root)
    (root / "fine_label_names.txt").unlink()

    (root / "train.bin").write_bytes(train_payload + b"\0\0\0")
    clear_cache()
    with pytest.raises(DataError, match="3074-byte cifar100 record") as exc:
        load_split("cifar100", "train", data_dir=root)
    assert str(root / "train.bin") in str(exc.value)


# --------------------------------------------------------------------------- folder


def _png(path: Path, value, size=(4, 3), mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_folder_auto_split_greyscale(tmp_path: Path) -> None:
    for cls, base in (("zebra", 100), ("ant", 10)):
        for i in range(5):
            _png(tmp_path / cls / f"{i}.png", base + i)
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    name = f"folder:{tmp_path}"
    splits = {s: load_split(name, s) for s in ("train", "val", "test")}
    info = splits["test"].info
    assert info.class_names == ("ant", "zebra")  # sorted
    assert info.input_shape == (1, 3, 4) and info.name == f"folder:{tmp_path.resolve()}"
    assert {s: len(v) for s, v in splits.items()} == {"train": 7, "val": 1, "test": 2}
    assert sorted(splits["test"].labels.tolist()) == [0, 1]
    seen = []
    for s in splits.values():
        for img, lab in zip(s.images, s.labels, strict=True):
            value = round(img[0, 0, 0].item() * 255)
            assert torch.all(img == value / 255)
            assert (value >= 100) == (lab.item() == 1)
            seen.append(value)
    assert sorted(seen) == [10, 11, 12, 13, 14, 100, 101, 102, 103, 104]
    train = splits["train"].images.double()
    assert info.mean[0] == pytest.approx(train.mean().item(), abs=1e-6)
    assert info.std[0] == pytest.approx(train.std(unbiased=False).item(), abs=1e-6)
    assert dataset_info(name) == info


def test_folder_train_test_layout_rgb(tmp_path: Path) -> None:
    for part, n in (("train", 3), ("test", 2)):
        for i in range(n):
            _png(tmp_path / part / "cat" / f"{i}.png", 20 * i, size=(2, 2))
            # one RGB image, different size: everything becomes RGB 2x2 (bilinear resize)
            mode, value = ("RGB", (255, 0, 10)) if i == 1 else ("L", 50)
            _png(tmp_path / part / "dog" / f"{i}.png", value, size=(5, 5), mode=mode)
    test = load_split(f"folder:{tmp_path}", "test")
    assert test.info.class_names == ("cat", "dog") and test.info.input_shape == (3, 2, 2)
    assert test.labels.tolist() == [0, 0, 1, 1]
    assert torch.all(test.images[1] == 20 / 255)
    assert torch.all(test.images[2] == 50 / 255)
    assert test.images[3, :, 0, 0].mul(255).round().tolist() == [255, 0, 10]
    assert len(load_split(f"folder:{tmp_path}", "train")) == 5
    assert len(load_split(f"folder:{tmp_path}", "val")) == 1


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_split(f"folder:{tmp_path / 'nope'}", "train")
    with pytest.raises(DataError, match="has no class sub-folders"):
        load_split(f"folder:{tmp_path}", "train")
    _png(tmp_path / "a" / "1.png", 1)
    _png(tmp_path / "a" / "2.png", 2)
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="contains no images") as exc:
        load_split(f"folder:{tmp_path}", "train")
    assert str(tmp_path / "b") in str(exc.value)
    (tmp_path / "b" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "b" / "good.png").write_bytes(b"")
    with pytest.raises(DataError, match="cannot read image") as exc:
        load_split(f"folder:{tmp_path}", "train")
    assert str(tmp_path / "b" / "bad.png") in str(exc.value)
    with pytest.raises(DataError, match="empty path"):
        load_split("folder:", "train")

    split_root = tmp_path / "split"
    _png(split_root / "train" / "x" / "1.png", 1)
    _png(split_root / "test" / "y" / "1.png", 1)
    with pytest.raises(DataError, match=r"only in train: \['x'\]; only in test: \['y'\]"):
        load_split(f"folder:{split_root}", "train")

    single = tmp_path / "single"
    _png(single / "only" / "1.png", 1)
    with pytest.raises(DataError, match="has only 1 image"):
        load_split(f"folder:{single}", "train")


# --------------------------------------------------------------------------- API


def test_unknown_name_and_split() -> None:
    with pytest.raises(DataError) as exc:
        load_split("imagenet", "train")
    msg = str(exc.value)
    assert "'imagenet'" in msg and "folder:PATH" in msg
    assert all(n in msg for n in list_datasets())
    with pytest.raises(DataError, match="valid splits: train, val, test"):
        load_split("digits", "validation")
    with pytest.raises(DataError, match="unknown dataset"):
        dataset_info("nope")


def test_listing_and_register() -> None:
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion-mnist", "mnist"]
    rows = describe_datasets()
    assert [r[0] for r in rows] == list_datasets() + ["folder:PATH"]
    assert all(isinstance(d, str) and d and "\n" not in d for _, d in rows)
    with pytest.raises(ValueError, match="already registered"):
        register("digits", "duplicate")


def test_split_subset_and_copies() -> None:
    test = load_split("digits", "test")
    sub = test.subset([3, 1])
    assert set(sub.labels.tolist()) == {1, 3}
    assert len(sub) == int(((test.labels == 1) | (test.labels == 3)).sum())
    assert torch.equal(sub.images, test.images[(test.labels == 1) | (test.labels == 3)])
    assert sub.info == test.info and sub.split == "test"
    with pytest.raises(DataError, match="class id 10 is out of range.*0 and 9"):
        test.subset([1, 10])
    with pytest.raises(DataError, match="out of range"):
        test.subset([-1])
    with pytest.raises(DataError, match="not an integer"):
        test.subset(["1"])  # type: ignore[list-item]
    with pytest.raises(DataError, match="no classes given"):
        test.subset([])
    with pytest.raises(AttributeError):
        test.split = "train"  # type: ignore[misc]
    test.images.zero_()  # returned tensors are copies: the cache is untouched
    assert load_split("digits", "test").images.max().item() > 0


def test_info_roundtrip_and_validation() -> None:
    info = dataset_info("digits")
    d = json.loads(json.dumps(info.to_dict()))
    assert d["input_shape"] == [1, 28, 28] and isinstance(d["class_names"], list)
    assert DatasetInfo.from_dict(d) == info
    with pytest.raises(DataError, match="missing field"):
        DatasetInfo.from_dict({"name": "x"})
    with pytest.raises(DataError, match="one value per channel"):
        DatasetInfo("x", ("a",), (3, 2, 2), (0.5,), (0.2,))
    with pytest.raises(DataError, match="std values must be positive"):
        DatasetInfo("x", ("a",), (1, 2, 2), (0.5,), (0.0,))


def test_normalize() -> None:
    info = DatasetInfo("x", ("a", "b"), (2, 1, 2), (0.5, 0.25), (0.5, 0.25))
    images = torch.tensor([[[[0.5, 1.0]], [[0.25, 0.0]]]])
    out = normalize(images, info)
    assert out.tolist() == [[[[0.0, 1.0]], [[0.0, -1.0]]]]
    assert normalize(images[0], info).shape == (2, 1, 2)
    with pytest.raises(DataError, match="1 channel"):
        normalize(torch.zeros(1, 1, 1, 2), info)
    split = Split(images, torch.tensor([0]), info, "test")
    assert len(split) == 1


# --------------------------------------------------------------------------- hostile files
# Crafted files that used to exhaust memory: each must fail fast with a one-line DataError
# (exit status 2 through the command line) in a process capped at 1.5 GB above its state
# after importing modellego.

_ZEROS_MEMBER = 64 << 20  # one gzip member of 64 MiB of zeros compresses to ~65 KB


@pytest.fixture(scope="module")
def zeros_gzip_member() -> bytes:
    return gzip.compress(b"\0" * _ZEROS_MEMBER, compresslevel=9)


def _bomb(path: Path, head: bytes, member: bytes, unpacked: int = 2 << 30) -> Path:
    """``head`` followed by ``unpacked`` bytes of zeros, as a multi-member gzip file of
    about ``unpacked / 1000`` bytes."""
    with open(path, "wb") as fh:
        fh.write(gzip.compress(head))
        for _ in range(unpacked // _ZEROS_MEMBER):
            fh.write(member)
    return path


def _mnist_dir_with(tmp_path: Path, name: str, write) -> Path:
    """Small valid MNIST files, with ``name`` replaced by what ``write(path)`` creates."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    _write_mnist(folder, gz=True)
    (folder / f"{name}.gz").unlink()
    write(folder / f"{name}.gz")
    return folder


def _train_capped(data_dir: Path, dataset: str, tmp_path: Path) -> str:
    out = tmp_path / "out.safetensors"
    result = run_capped(["train", "simnet", "--dataset", dataset, "--data-dir", data_dir,
                         "--epochs", "1", "--out", out, "--quiet"], timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stdout == ""
    assert result.stderr.startswith("modellego train: error: "), result.stderr[-2000:]
    assert result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert not out.exists()
    return result.stderr


def test_gzip_bomb_with_a_bad_magic_number(tmp_path: Path, zeros_gzip_member: bytes) -> None:
    # 2 MB on disk, 2 GiB of zeros unpacked: the magic number is read first
    folder = _mnist_dir_with(tmp_path, "train-images-idx3-ubyte",
                             lambda p: _bomb(p, b"", zeros_gzip_member))
    assert (folder / "train-images-idx3-ubyte.gz").stat().st_size < 4 << 20
    err = _train_capped(folder, "mnist", tmp_path)
    assert "train-images-idx3-ubyte.gz is not an IDX images file: magic number 0, " \
           "expected 2051" in err


def test_gzip_bomb_after_a_valid_header(tmp_path: Path, zeros_gzip_member: bytes) -> None:
    # a header announcing 20 images, then 2 GiB: exactly the announced bytes are read
    head = struct.pack(">IIII", 2051, 20, 28, 28)
    folder = _mnist_dir_with(tmp_path, "train-images-idx3-ubyte",
                             lambda p: _bomb(p, head, zeros_gzip_member))
    err = _train_capped(folder, "mnist", tmp_path)
    assert (f"has more than {16 + 20 * 28 * 28:,} bytes but its header (shape [20, 28, 28]) "
            f"requires exactly {16 + 20 * 28 * 28}") in err


def test_idx_header_announcing_too_much(tmp_path: Path) -> None:
    head = struct.pack(">IIII", 2051, 0xFFFFFFFF, 28, 28)  # 3.4 TB announced, 16 B present
    folder = _mnist_dir_with(tmp_path, "train-images-idx3-ubyte",
                             lambda p: p.write_bytes(gzip.compress(head)))
    err = _train_capped(folder, "mnist", tmp_path)
    assert (f"announces shape [4294967295, 28, 28], {0xFFFFFFFF * 784:,} bytes of data, more "
            f"than the {readers.MAX_FILE_BYTES:,} modellego reads from one file") in err


@pytest.mark.parametrize("records, words", [
    (None, "which is not a positive multiple of the 3073-byte cifar10 record"),
    (2_800_000, "more than the 1,073,741,824 modellego reads from one file"),
], ids=["8GB-not-a-multiple", "8GB-whole-records"])
def test_huge_sparse_cifar_file(tmp_path: Path, records: int | None, words: str) -> None:
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(2, 6)] + ["test_batch.bin"]:
        (root / name).write_bytes(_cifar_records([(1,)], seed=0)[0])
    size = 8 << 30 if records is None else records * 3073  # both about 8 GB, all holes
    with open(root / "data_batch_1.bin", "wb") as fh:
        fh.truncate(size)
    err = _train_capped(tmp_path, "cifar10", tmp_path)
    assert f"data_batch_1.bin has {size:,} bytes" in err or f"has {size} bytes" in err
    assert words in err
