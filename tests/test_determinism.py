"""Determinism: the same command on the same inputs writes byte-identical files.

A manifest records the command line, so each command is run twice with identical arguments
(the same relative ``--out`` name, inputs by the same absolute path) from two different
working folders, and the two files are compared byte for byte. The dataset cache is cleared
between the runs, so the second run parses the data again.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import run_cli
from modellego.data import clear_cache
from modellego.files import save_model
from modellego.io import read_manifest
from modellego.training import TrainConfig, train


def _twice(argv: list, out: str, root: Path) -> tuple[bytes, bytes]:
    """Run ``modellego *argv`` in ``root/first`` and ``root/second``; return both ``out`` files."""
    results = []
    for name in ("first", "second"):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        clear_cache()
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            code, _, err = run_cli(argv)
        finally:
            os.chdir(cwd)
        assert code == 0, err
        results.append((folder / out).read_bytes())
        assert sorted(p.name for p in folder.iterdir()) == [out]  # nothing else written
    return results[0], results[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, manifest = train(TrainConfig(arch="simnet", dataset="digits", epochs=2, width=0.25,
                                        batch_size=32), progress=False)
    path = tmp_path_factory.mktemp("det") / "source.safetensors"
    save_model(path, model, manifest)
    return path


@pytest.fixture(scope="module")
def parts(source: Path) -> tuple[Path, Path]:
    """Two components of ``source`` (classes 1,3 and 5,6), to assemble (plain cuts, so that
    the union layout takes them too)."""
    out = []
    for classes in ("1,3", "5,6"):
        path = source.parent / f"comp{classes.replace(',', '')}.safetensors"
        assert run_cli(["disassemble", str(source), "--classes", classes, "--no-reconstruct",
                        "--out", str(path)])[0] == 0
        out.append(path)
    return out[0], out[1]


@pytest.mark.parametrize("options", [[], ["--compensate"], ["--max-accuracy-drop", "1"],
                                     ["--rule", "mass", "--compensate"],
                                     ["--rule", "mass", "--recalibrate-bn", "100"]],
                         ids=["plain", "compensate", "max-accuracy-drop", "mass", "recalibrate"])
def test_disassemble_is_deterministic(options: list[str], source: Path, tmp_path: Path) -> None:
    first, second = _twice(["disassemble", source, "--classes", "3,1,7", "--out",
                            "comp.safetensors", *options], "comp.safetensors", tmp_path)
    assert first == second


def test_disassemble_variants_differ(source: Path, tmp_path: Path) -> None:
    """Not vacuous: the options above do change the written file."""
    files = []
    for k, options in enumerate([[], ["--compensate"], ["--recalibrate-bn", "100"]]):
        folder = tmp_path / str(k)
        files.append(_twice(["disassemble", source, "--classes", "3,1,7", "--out",
                             "comp.safetensors", *options], "comp.safetensors", folder)[0])
    assert len(set(files)) == 3


@pytest.mark.parametrize("layout, scaling", [
    ("parallel", "none"), ("parallel", "logit"), ("parallel", "feature"),
    ("parallel", "calibrated"), ("padded", "feature"), ("union", "none"),
])
def test_assemble_is_deterministic(layout: str, scaling: str, parts: tuple[Path, Path],
                                   tmp_path: Path) -> None:
    first, second = _twice(["assemble", *parts, "--layout", layout, "--scaling", scaling,
                            "--out", "assembled.safetensors"], "assembled.safetensors",
                           tmp_path)
    assert first == second


def test_train_is_deterministic(tmp_path: Path) -> None:
    first, second = _twice(["train", "lenet5", "--dataset", "digits", "--epochs", "1",
                            "--seed", "3", "--quiet", "--out", "m.safetensors"],
                           "m.safetensors", tmp_path)
    assert first == second
    manifest = read_manifest(tmp_path / "first" / "m.safetensors")
    assert manifest["provenance"]["config"]["seed"] == 3
