"""A root per dataset (``--data NAME=PATH``, ``MODELLEGO_DATA``) and data checked against the
fingerprint a model file records: MNIST read as Fashion-MNIST is refused, two roots work."""

from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli
from modellego.data import (
    DataFingerprintWarning,
    DataRoots,
    clear_cache,
    dataset_fingerprint,
    load_split,
    load_split_for,
    roots_from,
)
from modellego.data.fingerprint import SAMPLE, differences, split_fingerprint
from modellego.errors import DataError
from modellego.io import read_manifest

ROOT = Path(__file__).resolve().parents[1]
OLD_MODEL = ROOT / "tests" / "data" / "v0_1_0" / "model.safetensors"


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def write_idx(directory: Path, seed: int, n_train: int = 120, n_test: int = 40) -> Path:
    """An IDX dataset (MNIST's file names, gzipped) of class-dependent random images."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 64, (n, 28, 28)) + (labels * 19)[:, None, None]
        (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(
            struct.pack(">IIII", 2051, n, 28, 28) + images.astype(np.uint8).tobytes()))
        (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(
            struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes()))
    return directory


def write_cifar10(directory: Path, per_batch: int = 30, seed: int = 0) -> Path:
    root = directory / "cifar-10-batches-bin"
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = np.arange(per_batch) % 10
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        (root / name).write_bytes(b"".join(bytes([int(lab)]) + px.tobytes()
                                           for lab, px in zip(labels, pixels)))
    return directory


def write_cifar100(directory: Path, n_train: int = 150, n_test: int = 50, seed: int = 1
                   ) -> Path:
    root = directory / "cifar-100-binary"
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train.bin", n_train), ("test.bin", n_test)):
        fine = np.arange(n) % 5  # classes 0-4 only: the part trained on them
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        (root / name).write_bytes(b"".join(bytes([0, int(f)]) + px.tobytes()
                                           for f, px in zip(fine, pixels)))
    return directory


def cli_ok(argv: list) -> str:
    code, out, err = run_cli([str(a) for a in argv])
    assert code == 0, err
    return out


def train(arch_args: list, out: Path) -> Path:
    cli_ok(["train", "lenet5", *arch_args, "--epochs", "1", "--width", "0.25", "--quiet",
            "--out", out])
    return out


# --------------------------------------------------------------------------- fingerprints


def test_split_fingerprint_counts_and_hashes(tmp_path: Path):
    write_idx(tmp_path / "a", seed=1)
    split = load_split("mnist", "test", data_dir=tmp_path / "a")
    fp = split_fingerprint(split)
    assert fp["n"] == 40 and fp["class_counts"] == [4] * 10
    assert fp == split_fingerprint(split)  # deterministic
    other = load_split("mnist", "test", data_dir=write_idx(tmp_path / "b", seed=2))
    assert split_fingerprint(other)["sha256"] != fp["sha256"]
    assert differences(fp, split_fingerprint(other)).startswith("other labels or images")
    assert differences(fp, {**fp, "n": 41}) == "41 images where the model's data had 40"
    assert differences(fp, fp) == ""
    assert SAMPLE == 64


def test_train_records_the_fingerprint_of_every_split(tmp_path: Path):
    data = write_idx(tmp_path / "mnist", seed=3)
    model = train(["--dataset", "mnist", "--data-dir", data], tmp_path / "m.safetensors")
    recorded = read_manifest(model)["dataset"]["fingerprint"]
    assert recorded == dataset_fingerprint("mnist", data_dir=data)
    assert set(recorded) == {"train", "val", "test"} and recorded["test"]["n"] == 40


def test_load_split_for_refuses_other_data_and_warns_without_fingerprint(tmp_path: Path):
    good, bad = write_idx(tmp_path / "good", seed=4), write_idx(tmp_path / "bad", seed=5)
    spec = {"name": "mnist", "fingerprint": dataset_fingerprint("mnist", data_dir=good)}
    assert len(load_split_for(spec, "train", data_dir=good)) == len(
        load_split("mnist", "train", data_dir=good))
    with pytest.raises(DataError) as exc:
        load_split_for(spec, "test", data_dir=bad)
    assert str(exc.value) == (
        f"the data at {bad.resolve()} is not the mnist the model was made on: its test split "
        "has other labels or images (SHA-256 of the labels and a sample of images differs); "
        "pass the right folder (`data` mnist=PATH), or `allow_data_mismatch` to go on")
    allowed = DataRoots({"mnist": str(bad)}, allow_mismatch=True)
    assert len(load_split_for(spec, "test", data_dir=allowed)) == 40
    with pytest.warns(DataFingerprintWarning, match="records no fingerprint of its mnist"):
        load_split_for({"name": "mnist"}, "test", data_dir=bad, where="an old model")


# --------------------------------------------------------------------------- roots


def test_roots_precedence_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    env = tmp_path / "env"
    write_idx(env / "mnist", seed=6)
    explicit = write_idx(tmp_path / "explicit", seed=7)
    monkeypatch.setenv("MODELLEGO_DATA", str(env))
    from_env = load_split("mnist", "test")  # $MODELLEGO_DATA/mnist
    assert split_fingerprint(from_env) == split_fingerprint(
        load_split("mnist", "test", data_dir=env / "mnist"))
    roots = DataRoots({"mnist": str(explicit)}, default=str(env / "mnist"))
    assert roots.folder("mnist") == explicit and roots.folder("cifar10") == env / "mnist"
    assert DataRoots().folder("mnist") == env / "mnist"
    monkeypatch.delenv("MODELLEGO_DATA")
    assert DataRoots().folder("mnist") is None
    with pytest.raises(DataError, match="'mnist' needs a data directory.*MODELLEGO_DATA"):
        load_split("mnist", "test", data_dir=DataRoots())


def test_roots_from_the_command_line():
    assert roots_from(None, "/x") == "/x"  # a single --data-dir stays a plain folder
    assert roots_from(["MNIST=/a", "cifar10=/b"], None) == DataRoots(
        {"mnist": "/a", "cifar10": "/b"})
    assert roots_from(None, None, True) == DataRoots(allow_mismatch=True)
    with pytest.raises(DataError, match="write NAME=PATH"):
        roots_from(["mnist"], None)
    with pytest.raises(DataError, match="two folders for 'mnist'"):
        roots_from(["mnist=/a", "mnist=/b"], None)


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def mnist_and_fashion(tmp_path_factory):
    """A model trained on (IDX) MNIST and one on (IDX) Fashion-MNIST, each recording its
    data's fingerprint, with the two folders."""
    tmp = tmp_path_factory.mktemp("roots")
    mnist, fashion = write_idx(tmp / "mnist", seed=10), write_idx(tmp / "fm", seed=11)
    m = train(["--dataset", "mnist", "--data", f"mnist={mnist}"], tmp / "mnist.safetensors")
    f = train(["--dataset", "fashion-mnist", "--data-dir", fashion], tmp / "fm.safetensors")
    return tmp, mnist, fashion, m, f


def test_mnist_beside_fashion_mnist_with_two_roots_assembles(mnist_and_fashion):
    tmp, mnist, fashion, m, f = mnist_and_fashion
    out = tmp / "both.safetensors"
    text = cli_ok(["assemble", m, f, "--out", out, "--scaling", "logit",
                   "--data", f"mnist={mnist}", "--data", f"fashion-mnist={fashion}"])
    assert "20 outputs" in text
    labels = read_manifest(out)["labels"]
    assert {lab["dataset"] for lab in labels} == {"mnist", "fashion-mnist"}
    # the parts carry their data's fingerprints into the assembly
    parts = read_manifest(out)["parts"]
    assert [p["dataset"]["fingerprint"] == read_manifest(src)["dataset"]["fingerprint"]
            for p, src in zip(parts, (m, f))] == [True, True]


def test_one_folder_for_two_datasets_is_refused(mnist_and_fashion):
    tmp, mnist, _, m, f = mnist_and_fashion
    out = tmp / "bad.safetensors"
    code, _, err = run_cli(["assemble", str(m), str(f), "--out", str(out), "--data-dir",
                            str(mnist)])
    assert code == 2 and not out.exists()
    assert err == ("modellego assemble: error: --data-dir names one folder, but this reads 2 "
                   "datasets from folders (fashion-mnist, mnist); give each its own: --data "
                   "fashion-mnist=PATH --data mnist=PATH\n")


def test_mnist_read_as_fashion_mnist_is_refused(mnist_and_fashion):
    tmp, mnist, _, m, f = mnist_and_fashion
    out = tmp / "wrong.safetensors"
    code, _, err = run_cli(["assemble", str(m), str(f), "--out", str(out), "--scaling",
                            "logit", "--data", f"mnist={mnist}", "--data",
                            f"fashion-mnist={mnist}"])
    assert code == 2 and not out.exists() and err.count("\n") == 1
    assert err.startswith(f"modellego assemble: error: the data at {mnist.resolve()} is not "
                          "the fashion-mnist part 1 was made on: its train split has other "
                          "labels or images")
    assert err.rstrip().endswith("pass the right folder (--data fashion-mnist=PATH), or "
                                 "--allow-data-mismatch to go on")
    code, _, err = run_cli(["evaluate", str(f), "--data-dir", str(mnist), "--no-latency"])
    assert code == 2 and "is not the fashion-mnist the model was made on" in err
    code, out_text, err = run_cli(["evaluate", str(f), "--data-dir", str(mnist),
                                   "--no-latency", "--allow-data-mismatch"])
    assert code == 0, err


def test_components_carry_the_fingerprint_and_check_it(mnist_and_fashion):
    tmp, mnist, fashion, _, f = mnist_and_fashion
    comp = tmp / "fm-01.safetensors"
    cli_ok(["disassemble", f, "--classes", "0,1", "--samples-per-class", "5", "--rule",
            "mass", "--out", comp, "--data-dir", fashion])
    assert read_manifest(comp)["dataset"]["fingerprint"] == \
        read_manifest(f)["dataset"]["fingerprint"]
    code, _, err = run_cli(["evaluate", str(comp), "--data-dir", str(mnist), "--no-latency"])
    assert code == 2 and "is not the fashion-mnist the model was made on" in err


def test_files_without_a_fingerprint_still_work_with_a_warning():
    code, out, err = run_cli(["evaluate", str(OLD_MODEL), "--no-latency"])
    assert code == 0, err
    assert err == ("modellego: warning: the model records no fingerprint of its digits data "
                   "(written by modellego 0.1.0), so the data given cannot be checked "
                   "against it\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the library warns on every such read
        with pytest.raises(DataFingerprintWarning):
            load_split_for({"name": "digits"}, "test", where="another old model")


def test_cifar10_and_cifar100_parts_from_two_roots_assemble(tmp_path: Path):
    c10, c100 = write_cifar10(tmp_path / "c10"), write_cifar100(tmp_path / "c100")
    a = train(["--dataset", "cifar10", "--classes", "0-4", "--data", f"cifar10={c10}"],
              tmp_path / "c10.safetensors")
    b = train(["--dataset", "cifar100", "--classes", "0-4", "--data", f"cifar100={c100}"],
              tmp_path / "c100.safetensors")
    out = tmp_path / "c10+c100.safetensors"
    text = cli_ok(["assemble", a, b, "--out", out, "--scaling", "logit", "--data",
                   f"cifar10={c10}", "--data", f"cifar100={c100}"])
    assert "10 outputs" in text
    result = cli_ok(["evaluate", out, "--json", "--no-latency", "--data", f"cifar10={c10}",
                     "--data", f"cifar100={c100}"])
    assert '"cifar100:0"' in result and '"cifar10:4"' in result
