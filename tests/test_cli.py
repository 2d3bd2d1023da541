"""Tests for the ``modellego`` command line, run in-process through ``cli.main``."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_cli
from modellego import __version__
from modellego.cli import main, parse_classes
from modellego.data import list_datasets, load_split, normalize
from modellego.evaluation import evaluate
from modellego.files import load_model
from modellego.io import read_manifest
from modellego.metrics import count_flops, count_params, predict_logits
from modellego.models import list_models
from subproc import run_capped

TRAIN_ARGS = ["train", "lenet5", "--dataset", "digits", "--epochs", "1", "--width", "0.5",
              "--quiet"]


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("cli") / "x.safetensors"
    code, out, err = run_cli(TRAIN_ARGS + ["--out", str(path)])
    assert code == 0, err
    return path, out


@pytest.fixture(scope="module")
def three_class_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli3") / "three.safetensors"
    code, _, err = run_cli(TRAIN_ARGS + ["--classes", "0-2", "--out", str(path)])
    assert code == 0, err
    return path


# --------------------------------------------------------------------------- listing


def test_list_archs(capsys: pytest.CaptureFixture) -> None:
    assert main(["list-archs"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == list_models()
    assert "LeNet-5" in out


def test_list_archs_pattern(capsys: pytest.CaptureFixture) -> None:
    assert main(["list-archs", "resnet*"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["resnet18", "resnet50"]


def test_list_datasets(capsys: pytest.CaptureFixture) -> None:
    assert main(["list-datasets"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()]
    assert names == list_datasets() + ["folder:PATH"]
    assert "fashion-mnist" in names and "digits" in names


def test_version_subprocess() -> None:
    proc = subprocess.run([sys.executable, "-m", "modellego", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"modellego {__version__}"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "usage: modellego" in capsys.readouterr().err


# --------------------------------------------------------------------------- class lists


@pytest.mark.parametrize("text,expected", [
    ("0,2,4", (0, 2, 4)), ("3-5", (3, 4, 5)), ("7, 1-2 ,0", (7, 1, 2, 0)), ("4", (4,)),
    ("2,", (2,)),
])
def test_parse_classes(text: str, expected: tuple[int, ...]) -> None:
    assert parse_classes(text) == expected


@pytest.mark.parametrize("text", ["a", "5-3", "1-x", ",", ""])
def test_parse_classes_rejects(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_classes(text)


def test_bad_class_list_is_a_usage_error(capsys: pytest.CaptureFixture,
                                         tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tmp_path / "x.safetensors"), "--classes", "9-3"])
    assert exc.value.code == 2
    assert "invalid class list '9-3'" in capsys.readouterr().err


# --------------------------------------------------------------------------- train + evaluate


def test_train_writes_a_model_file(digits_model: tuple[Path, str]) -> None:
    path, out = digits_model
    manifest = read_manifest(path)
    assert manifest["kind"] == "model"
    assert manifest["classes"] == list(range(10))
    assert manifest["class_names"] == [str(i) for i in range(10)]
    assert manifest["dataset"]["name"] == "digits"
    assert manifest["input"]["shape"] == [1, 28, 28]
    assert manifest["architecture"] == {
        "name": "lenet5",
        "kwargs": {"in_channels": 1, "num_classes": 10, "input_size": 28, "width": 0.5}}
    command = manifest["provenance"]["command"]
    assert command.startswith("modellego train lenet5 ")
    assert "--out" in command and str(path) in command
    assert manifest["provenance"]["config"]["epochs"] == 1
    assert len(manifest["provenance"]["history"]) == 1
    acc = manifest["metrics"]["test_accuracy"]
    model, _ = load_model(path)  # the stored figure is the saved network's, on the test split
    assert evaluate(model, manifest, latency=False)["accuracy"] == acc
    assert f"test accuracy {acc:.4f}" in out
    assert f"wrote {path}" in out
    assert list(path.parent.iterdir()) == [path]  # no temp files left behind


def test_evaluate_json(digits_model: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    path, _ = digits_model
    assert main(["evaluate", str(path), "--json", "--no-latency"]) == 0
    result = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert {"accuracy", "per_class", "params", "flops"} <= set(result)
    assert "latency_ms" not in result and "restricted_accuracy" not in result
    manifest = read_manifest(path)
    assert result["accuracy"] == manifest["metrics"]["test_accuracy"]
    assert result["per_class"] == manifest["metrics"]["test_per_class"]
    assert sorted(result["per_class"], key=int) == [str(i) for i in range(10)]
    model, _ = load_model(path)
    assert result["params"] == count_params(model)
    assert result["flops"] == count_flops(model, (1, 28, 28))
    assert result["n"] == len(load_split("digits", "test"))
    assert result["dataset"] == "digits" and result["split"] == "test"
    assert result["classes"] == list(range(10))


def test_evaluate_text_and_latency(digits_model: tuple[Path, str],
                                   capsys: pytest.CaptureFixture) -> None:
    path, _ = digits_model
    assert main(["evaluate", str(path)]) == 0
    out = capsys.readouterr().out
    acc = read_manifest(path)["metrics"]["test_accuracy"]
    assert f"accuracy            {acc:.4f}" in out
    assert "CPU latency" in out and "ms/image" in out
    assert out.count("    class ") == 10


def test_evaluate_restricted_classes(digits_model: tuple[Path, str],
                                     capsys: pytest.CaptureFixture) -> None:
    path, _ = digits_model
    assert main(["evaluate", str(path), "--classes", "0,1", "--json", "--no-latency"]) == 0
    result = json.loads(capsys.readouterr().out)
    test = load_split("digits", "test").subset([0, 1])
    assert result["classes"] == [0, 1]
    assert result["n"] == len(test)
    assert set(result["per_class"]) == {"0", "1"}
    # independent computation: argmax over outputs 0 and 1 only
    model, manifest = load_model(path)
    logits = predict_logits(model, normalize(test.images, test.info))
    expected_restricted = float((logits[:, :2].argmax(1) == test.labels).double().mean())
    expected_full = float((logits.argmax(1) == test.labels).double().mean())
    assert result["restricted_accuracy"] == expected_restricted
    assert result["accuracy"] == expected_full
    assert result["restricted_accuracy"] >= result["accuracy"]


def test_train_on_some_classes(three_class_model: Path, capsys: pytest.CaptureFixture) -> None:
    model, manifest = load_model(three_class_model)
    assert manifest["classes"] == [0, 1, 2]
    assert manifest["class_names"] == ["0", "1", "2"]
    assert manifest["architecture"]["kwargs"]["num_classes"] == 3
    assert manifest["provenance"]["config"]["classes"] == [0, 1, 2]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    assert main(["evaluate", str(three_class_model), "--json", "--no-latency"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["per_class"]) == {"0", "1", "2"}
    assert result["n"] == len(load_split("digits", "test").subset([0, 1, 2]))
    assert result["accuracy"] == manifest["metrics"]["test_accuracy"]


# --------------------------------------------------------------------------- errors


def _assert_error(code: int, out: str, err: str, command: str, *words: str) -> None:
    assert code == 2
    assert out == ""
    assert err.startswith(f"modellego {command}: error: ")
    assert err.count("\n") == 1  # one line, no traceback
    for word in words:
        assert word in err


def test_evaluate_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    _assert_error(*run_cli(["evaluate", str(missing)]), "evaluate", str(missing), "does not exist")


def test_evaluate_pickle_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    _assert_error(*run_cli(["evaluate", str(path)]), "evaluate", "pickle")


def test_evaluate_on_another_dataset(digits_model: tuple[Path, str]) -> None:
    path, _ = digits_model
    _assert_error(*run_cli(["evaluate", str(path), "--dataset", "fashion-mnist", "--no-latency"]),
                  "evaluate", "'digits'", "'fashion-mnist'", "--dataset digits")


def test_evaluate_unknown_dataset(digits_model: tuple[Path, str]) -> None:
    path, _ = digits_model
    _assert_error(*run_cli(["evaluate", str(path), "--dataset", "imagenet"]),
                  "evaluate", "unknown dataset 'imagenet'", "digits")


def test_evaluate_class_out_of_range(digits_model: tuple[Path, str],
                                     three_class_model: Path) -> None:
    path, _ = digits_model
    _assert_error(*run_cli(["evaluate", str(path), "--classes", "12", "--no-latency"]),
                  "evaluate", "[12]", "not outputs of this model")
    _assert_error(*run_cli(["evaluate", str(three_class_model), "--classes", "2,3",
                            "--no-latency"]),
                  "evaluate", "[3]", "[0, 1, 2]")


def test_train_class_out_of_range(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    _assert_error(*run_cli(TRAIN_ARGS + ["--classes", "12", "--out", str(out)]),
                  "train", "[12]", "out of range 0..9")
    _assert_error(*run_cli(TRAIN_ARGS + ["--classes", "1,1", "--out", str(out)]),
                  "train", "repeated")
    assert list(tmp_path.iterdir()) == []


def test_train_into_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "missing"
    _assert_error(*run_cli(TRAIN_ARGS + ["--out", str(folder / "m.safetensors")]),
                  "train", f"folder {folder} does not exist")
    assert list(tmp_path.iterdir()) == []


def test_train_unknown_architecture(tmp_path: Path) -> None:
    _assert_error(*run_cli(["train", "lenet7", "--dataset", "digits", "--epochs", "1", "--out",
                            str(tmp_path / "m.safetensors")]),
                  "train", "unknown architecture 'lenet7'", "lenet5")
    assert list(tmp_path.iterdir()) == []


def test_train_bad_epochs(tmp_path: Path) -> None:
    _assert_error(*run_cli(TRAIN_ARGS[:4] + ["--epochs", "0", "--out",
                                             str(tmp_path / "m.safetensors")]),
                  "train", "--epochs must be >= 1, got 0")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- folder datasets


def test_folder_dataset_given_by_relative_path(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """A model trained on folder:imgs is evaluated on the same folder however it is spelled."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["dark", "light"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 100, (16, 16)) + 150 * c
            Image.fromarray(pixels.astype(np.uint8), "L").save(
                tmp_path / "imgs" / name / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "simnet", "--dataset", "folder:imgs", "--epochs", "1", "--width",
                 "0.125", "--quiet", "--out", "m.safetensors"]) == 0
    manifest = read_manifest(tmp_path / "m.safetensors")
    assert manifest["dataset"]["name"] == f"folder:{tmp_path / 'imgs'}"
    assert manifest["class_names"] == ["dark", "light"]
    capsys.readouterr()
    for spelling in (None, "folder:imgs", "folder:./imgs", f"folder:{tmp_path / 'imgs'}"):
        extra = [] if spelling is None else ["--dataset", spelling]
        code = main(["evaluate", "m.safetensors", "--json", "--no-latency"] + extra)
        captured = capsys.readouterr()
        assert code == 0, (spelling, captured.err)
        result = json.loads(captured.out)
        assert result["accuracy"] == manifest["metrics"]["test_accuracy"]
        assert result["n"] == 4


@pytest.mark.parametrize("text, count", [("0-99999999", "100,000,000"),
                                         ("5,0-99999,7", "100,002"),
                                         ("0-" + "9" * 40, f"{10 ** 40:,}")])
def test_huge_class_range_is_refused_before_it_is_expanded(text: str, count: str,
                                                           tmp_path: Path) -> None:
    # 0-99999999 used to build a list of 10^8 ints (2.7 GB) before any check
    out = tmp_path / "m.safetensors"
    result = run_capped(["train", "simnet", "--dataset", "digits", "--epochs", "1",
                         "--classes", text, "--out", out], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last == (f"modellego train: error: argument --classes: class list {text[:40]!r} "
                    f"names {count} class ids, more than the 100,000 allowed; name only ids "
                    "of the model's classes, e.g. 0-9"), result.stderr
    assert not out.exists()


def test_class_list_of_exactly_the_limit_is_parsed() -> None:
    assert parse_classes("0-99999") == tuple(range(100_000))


# --------------------------------------------------------------------------- diverging runs


@pytest.mark.parametrize("lr, words", [
    ("inf", ["--lr must be a finite number > 0, got inf"]),
    ("nan", ["--lr must be a finite number > 0, got nan"]),
    ("1e6", ["training diverged: the loss is nan at step 3 of epoch 1 (learning rate "
             "1000000.0); no model was written: train again with a smaller learning rate"]),
])
def test_train_that_diverges_writes_no_model(lr: str, words: list[str], tmp_path: Path) -> None:
    # --lr inf and --lr 1e6 used to exit 0 with NaN weights that evaluate then refused
    out = tmp_path / "nan.safetensors"
    _assert_error(*run_cli(TRAIN_ARGS + ["--lr", lr, "--out", out]), "train", *words)
    assert list(tmp_path.iterdir()) == []


def test_training_stops_when_weights_go_non_finite() -> None:
    # a loss that stays finite while the weights overflow: caught at the end of the epoch
    from modellego.errors import TrainingError
    from modellego.training import fit

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x, y = torch.ones(8, 1, 2, 2), torch.zeros(8, dtype=torch.long)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
        return (logits * 0).sum() + model[1].weight.sum() * 1e38

    with pytest.raises(TrainingError, match=r"^training diverged: 1\.weight holds "
                                            r"non-finite values after epoch 1 \("):
        fit(model, x, y, x, y, [0, 1], epochs=1, batch_size=8, lr=1e6, progress=False,
            loss_fn=loss_fn)


@pytest.mark.parametrize("seed", ["99999999999999999999", str(-(1 << 63) - 1)])
def test_seed_out_of_torch_range(seed: str, tmp_path: Path) -> None:
    # used to end in a RuntimeError traceback from torch.manual_seed
    out = tmp_path / "m.safetensors"
    _assert_error(*run_cli(TRAIN_ARGS + ["--seed", seed, "--out", out]), "train",
                  f"--seed must be an integer from {-(1 << 63)} to {(1 << 64) - 1} (what "
                  f"torch's random generators accept), got {seed}")
    assert not out.exists()
    assert run_cli(TRAIN_ARGS + ["--seed", str((1 << 64) - 1), "--epochs", "1",
                                 "--out", out])[0] == 0


def test_assemble_seed_out_of_torch_range(digits_model: tuple[Path, str],
                                          tmp_path: Path) -> None:
    path, _ = digits_model
    out = tmp_path / "a.safetensors"
    _assert_error(*run_cli(["assemble", path, path, "--seed", "99999999999999999999",
                            "--out", out]), "assemble",
                  "--seed must be an integer from", "got 99999999999999999999")
    assert not out.exists()
