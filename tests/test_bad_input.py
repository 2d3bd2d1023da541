"""Bad input through the command line: a one-line message naming the argument and the fix,
exit status 2, and nothing half-written (no output file, no temporary file, inputs unchanged).

Cases already covered elsewhere are not repeated here: bad class lists for ``train`` and
``evaluate``, ``train`` into a missing folder and ``assemble`` into a missing folder
(tests/test_cli.py, tests/test_assembly.py); non-finite weights at library level
(tests/test_io.py).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_cli
from modellego.data import clear_cache, load_split
from modellego.files import load_model, save_model
from modellego.io import read_manifest
from modellego.training import TrainConfig, train


def _assert_error(result: tuple[int, str, str], command: str, *words: str) -> str:
    code, out, err = result
    assert code == 2, (code, err)
    assert out == ""
    assert err.startswith(f"modellego {command}: error: "), err
    assert err.count("\n") == 1, err  # one line, no traceback
    for word in words:
        assert word in err, (word, err)
    return err


def _digits_model(classes=None) -> tuple[torch.nn.Module, dict]:
    return train(TrainConfig(arch="simnet", dataset="digits", epochs=2, width=0.25,
                             batch_size=32, classes=classes), progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Digits simnets: ``all`` classifies 0-9, ``low`` only 0-4; and a NaN-poisoned copy."""
    folder = tmp_path_factory.mktemp("models")
    files = {}
    for key, classes in (("all", None), ("low", (0, 1, 2, 3, 4))):
        model, manifest = _digits_model(classes)
        files[key] = folder / f"{key}.safetensors"
        save_model(files[key], model, manifest)
    model, manifest = load_model(files["all"])
    with torch.no_grad():
        model.features[4].weight[0, 0, 1, 1] = float("nan")
        model.fc.bias[3] = float("inf")
    files["nan"] = folder / "nan.safetensors"
    save_model(files["nan"], model, manifest)  # saving does not check; loading must
    return files


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    """An empty folder for outputs; tests check it is still empty after a refusal."""
    path = tmp_path / "out"
    path.mkdir()
    return path


def _unchanged(models: dict[str, Path]) -> dict[str, str]:
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in models.items()}


def _write_images(root: Path, counts: dict[str, int], *, size: int, rgb: bool,
                  seed: int = 0) -> None:
    """``counts[name]`` random images per class sub-folder (class ``i`` brighter with ``i``)."""
    rng = np.random.default_rng(seed)
    for i, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            shape = (size, size, 3) if rgb else (size, size)
            pixels = (rng.integers(0, 60, shape) + 60 * i).astype(np.uint8)
            Image.fromarray(pixels, "RGB" if rgb else "L").save(root / name / f"{j}.png")


# --------------------------------------------------------------------------- class ids


@pytest.mark.parametrize("classes, words", [
    ("3,3", ["--classes", "[3]", "repeated", "list each class once"]),
    ("1,4,1,4", ["--classes", "[1, 4]", "repeated"]),
    ("42", ["--classes", "[42]", "out of range 0..9"]),
    ("2,10", ["--classes", "[10]", "out of range 0..9"]),
])
def test_disassemble_bad_class_ids(classes: str, words: list[str], models, outdir) -> None:
    before = _unchanged(models)
    _assert_error(run_cli(["disassemble", models["all"], "--classes", classes, "--out",
                           outdir / "c.safetensors"]), "disassemble", *words)
    assert list(outdir.iterdir()) == []
    assert _unchanged(models) == before


def test_disassemble_class_the_model_does_not_classify(models, outdir) -> None:
    """A model trained on classes 0-4 has no component for class 7."""
    _assert_error(run_cli(["disassemble", models["low"], "--classes", "2,7", "--out",
                           outdir / "c.safetensors"]),
                  "disassemble", "--classes [7]", "it classifies [0, 1, 2, 3, 4]")
    assert list(outdir.iterdir()) == []


def _rare_class_folder(root: Path) -> Path:
    """An image folder (train/ and test/) whose class ``rare`` has a single training image,
    which the validation carve-out takes: the train split has no image of it."""
    for position in range(3):  # where "rare" sorts among the classes; first that works
        folder = root / f"rare{position}"
        names = ["a", "b"]
        names.insert(position, "rare")
        names = [f"{i}{n}" for i, n in enumerate(names)]
        _write_images(folder / "train", {n: 1 if n.endswith("rare") else 12 for n in names},
                      size=12, rgb=False)
        _write_images(folder / "test", {n: 3 for n in names}, size=12, rgb=False, seed=1)
        dataset = f"folder:{folder}"
        if not (load_split(dataset, "train").labels == position).any():
            assert (load_split(dataset, "val").labels == position).any()
            return folder
    raise AssertionError("no layout puts the single rare image into the validation split")


def test_disassemble_class_without_training_images(tmp_path: Path, outdir: Path) -> None:
    folder = _rare_class_folder(tmp_path)
    dataset = f"folder:{folder}"
    names = load_split(dataset, "train").info.class_names
    rare = next(i for i, n in enumerate(names) if n.endswith("rare"))
    # a class without training images: the model is written, without a router fingerprint
    with pytest.warns(UserWarning, match=r"no router fingerprint written: .* has 0 training "
                                         r"images of class \d+; .*scaling that calibrates"):
        model, manifest = train(TrainConfig(arch="simnet", dataset=dataset, epochs=1,
                                            width=0.125, batch_size=8), progress=False)
    assert "router_fingerprint" not in manifest
    source = tmp_path / "rare.safetensors"
    save_model(source, model, manifest)
    err = _assert_error(run_cli(["disassemble", source, "--classes", f"{rare}", "--out",
                                 outdir / "c.safetensors"]),
                        "disassemble", "--classes", f"class {rare} ({names[rare]})",
                        "no images in the train split", "choose other classes")
    assert "add images" in err
    assert list(outdir.iterdir()) == []
    # the other classes still disassemble fine
    code, _, err = run_cli(["disassemble", source, "--classes", f"{(rare + 1) % 3}", "--out",
                            outdir / "c.safetensors", "--samples-per-class", "5"])
    assert code == 0, err


# --------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("layout", ["nothing", "empty-class-folders", "no-image-files"])
def test_empty_datasets(layout: str, models, tmp_path: Path, outdir: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    if layout != "nothing":
        for name in ("cat", "dog"):
            (root / name).mkdir()
            if layout == "no-image-files":
                (root / name / "notes.txt").write_text("not an image")
                (root / name / ".hidden.png").write_bytes(b"")
    phrase, fix = {"nothing": ("has no class sub-folders", "put the images of each class"),
                   "empty-class-folders": ("contains no images", "add images"),
                   "no-image-files": ("contains no images", "add images")}[layout]
    dataset = f"folder:{root}"
    _assert_error(run_cli(["train", "simnet", "--dataset", dataset, "--epochs", "1", "--quiet",
                           "--out", outdir / "m.safetensors"]),
                  "train", str(root), phrase, fix)
    _assert_error(run_cli(["evaluate", models["all"], "--dataset", dataset, "--no-latency"]),
                  "evaluate", str(root), phrase, fix)
    _assert_error(run_cli(["disassemble", models["all"], "--classes", "0", "--dataset", dataset,
                           "--out", outdir / "c.safetensors"]),
                  "disassemble", str(root), phrase, fix)
    assert list(outdir.iterdir()) == []


def test_rgb_folder_for_a_grey_digits_model(models, tmp_path: Path, outdir: Path) -> None:
    """A 1x28x28 model evaluated on 3x32x32 images: a clear message, not a shape traceback."""
    root = tmp_path / "rgb32"
    _write_images(root, {"a": 4, "b": 4}, size=32, rgb=True)
    err = _assert_error(run_cli(["evaluate", models["all"], "--dataset", f"folder:{root}",
                                 "--no-latency"]),
                        "evaluate", "--dataset", "[3, 32, 32]", "[1, 28, 28]",
                        "pass --dataset digits")
    assert "Traceback" not in err
    _assert_error(run_cli(["disassemble", models["all"], "--classes", "0", "--dataset",
                           f"folder:{root}", "--out", outdir / "c.safetensors"]),
                  "disassemble", "--dataset", "'digits'")
    assert list(outdir.iterdir()) == []


@pytest.mark.parametrize("rgb, size, words", [
    (True, 12, ("[3, 12, 12]", "[1, 12, 12]")),
    # read at the model's 12 px, the new 20 px images are other images
    (False, 20, ("are not those the model was made on", "other labels or images"))])
def test_folder_whose_images_changed_shape(rgb: bool, size: int, words: tuple[str, ...],
                                           tmp_path: Path, outdir: Path) -> None:
    """A model trained on folder:PATH, whose images are then replaced by images of another
    channel count or size (simnet would silently accept another size: it pools globally)."""
    root = tmp_path / "imgs"
    _write_images(root, {"a": 6, "b": 6}, size=12, rgb=False)
    dataset = f"folder:{root}"
    model, manifest = train(TrainConfig(arch="simnet", dataset=dataset, epochs=1, width=0.125,
                                        batch_size=8), progress=False)
    source = tmp_path / "m.safetensors"
    save_model(source, model, manifest)
    shutil.rmtree(root)
    _write_images(root, {"a": 6, "b": 6}, size=size, rgb=rgb, seed=3)
    clear_cache()  # a new process would read the new images
    try:
        for argv in (["evaluate", source, "--no-latency"],
                     ["disassemble", source, "--classes", "0", "--out",
                      outdir / "c.safetensors"]):
            err = _assert_error(run_cli(argv), argv[0], *words, "restore them")
            assert "Traceback" not in err
    finally:
        clear_cache()
    assert list(outdir.iterdir()) == []


# --------------------------------------------------------------------------- weights


def test_non_finite_weights_are_refused_by_every_command(models, outdir: Path) -> None:
    nan = models["nan"]
    for argv in (["evaluate", nan, "--no-latency"],
                 ["disassemble", nan, "--classes", "0,1", "--out", outdir / "c.safetensors"],
                 ["assemble", models["low"], nan, "--out", outdir / "a.safetensors"]):
        _assert_error(run_cli(argv), argv[0], str(nan), "contains NaN or infinite values")
    assert list(outdir.iterdir()) == []


# --------------------------------------------------------------------------- numeric options


@pytest.mark.parametrize("options, words", [
    (["--alpha-conv", "1.5"], ["--alpha-conv must lie in [0, 1], got 1.5"]),
    (["--beta-linear", "-0.1"], ["--beta-linear must lie in [0, 1], got -0.1"]),
    (["--beta-conv", "2"], ["--beta-conv must lie in [0, 1], got 2.0"]),
    (["--alpha-linear", "-1"], ["--alpha-linear must lie in [0, 1], got -1.0"]),
    (["--alpha-conv", "nan"], ["--alpha-conv must lie in [0, 1], got nan"]),
    (["--samples-per-class", "0"], ["--samples-per-class must be >= 1, got 0"]),
    (["--max-accuracy-drop", "150"], ["--max-accuracy-drop", "[0, 100]", "150"]),
    (["--target-flops", "0"], ["--target-flops", "(0, 1]"]),
    (["--max-accuracy-drop", "1", "--target-flops", "0.5"],
     ["--max-accuracy-drop", "--target-flops", "not both"]),
])
def test_disassemble_numeric_options_out_of_range(options: list[str], words: list[str],
                                                  models, outdir: Path) -> None:
    _assert_error(run_cli(["disassemble", models["all"], "--classes", "1,3", "--out",
                           outdir / "c.safetensors", "--report", outdir / "r.json", *options]),
                  "disassemble", *words)
    assert list(outdir.iterdir()) == []


def test_thresholds_that_keep_nothing(models, outdir: Path) -> None:
    err = _assert_error(run_cli(["disassemble", models["all"], "--classes", "1,3", "--out",
                                 outdir / "c.safetensors", "--alpha-conv", "1", "--beta-conv", "1",
                                 "--alpha-linear", "1", "--beta-linear", "1"]),
                        "disassemble", "would keep no", "lower --beta-conv")
    assert "layer '" in err
    assert list(outdir.iterdir()) == []


# --------------------------------------------------------------------------- output paths


def test_disassemble_into_a_missing_folder(models, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    _assert_error(run_cli(["disassemble", models["all"], "--classes", "1", "--out",
                           missing / "c.safetensors"]),
                  "disassemble", "--out", f"folder {missing} does not exist", "create it")
    _assert_error(run_cli(["disassemble", models["all"], "--classes", "1", "--out",
                           tmp_path / "c.safetensors", "--report", missing / "r.json"]),
                  "disassemble", "--report", f"folder {missing} does not exist")
    _assert_error(run_cli(["assemble", models["all"], models["low"], "--out",
                           tmp_path / "a.safetensors", "--report", missing / "r.json",
                           "--on-duplicate", "replace"]),
                  "assemble", "--report", f"folder {missing} does not exist")
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_a_folder(models, outdir: Path) -> None:
    _assert_error(run_cli(["disassemble", models["all"], "--classes", "1", "--out", outdir]),
                  "disassemble", f"--out {outdir} is a folder")
    _assert_error(run_cli(["train", "simnet", "--dataset", "digits", "--epochs", "1",
                           "--out", outdir]), "train", "is a folder")
    assert list(outdir.iterdir()) == []


def test_report_that_would_replace_the_output(models, outdir: Path) -> None:
    out = outdir / "c.safetensors"
    _assert_error(run_cli(["disassemble", models["all"], "--classes", "1", "--out", out,
                           "--report", out]),
                  "disassemble", "--report", "also the --out file")
    assert list(outdir.iterdir()) == []


def test_output_that_would_overwrite_an_input(models, tmp_path: Path) -> None:
    source = tmp_path / "m.safetensors"
    other = tmp_path / "low.safetensors"
    shutil.copy(models["all"], source)
    shutil.copy(models["low"], other)
    original = source.read_bytes()
    for argv in (["disassemble", source, "--classes", "1,3", "--out", source],
                 ["disassemble", source, "--classes", "1,3", "--out",
                  tmp_path / "c.safetensors", "--report", source],
                 # another spelling of the same file
                 ["disassemble", source, "--classes", "1,3", "--out",
                  tmp_path / ".." / tmp_path.name / "m.safetensors"],
                 ["assemble", source, other, "--out", other, "--on-duplicate", "replace"]):
        _assert_error(run_cli(argv), argv[0], "would overwrite the input", "--force")
    assert source.read_bytes() == original
    assert sorted(tmp_path.iterdir()) == sorted([source, other])

    # with --force the input is replaced by the component, atomically
    code, out, err = run_cli(["disassemble", source, "--classes", "1,3", "--out", source,
                              "--force"])
    assert code == 0, err
    assert f"wrote {source}" in out
    assert sorted(tmp_path.iterdir()) == sorted([source, other])  # no temporary file left
    model, manifest = load_model(source)
    assert manifest["kind"] == "component" and manifest["classes"] == [1, 3]
    assert manifest["provenance"]["source"]["sha256"] == hashlib.sha256(original).hexdigest()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 2)
    assert read_manifest(source)["provenance"]["source"]["file"] == str(source)


def _special_outputs(folder: Path) -> dict[str, Path]:
    import os
    import stat

    found = {"named pipe (FIFO)": folder / "fifo"}
    os.mkfifo(found["named pipe (FIFO)"])
    link = folder / "null-link"
    link.symlink_to("/dev/null")
    found["device"] = link
    try:
        os.mknod(folder / "chardev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        found["device "] = folder / "chardev"  # a second device case, if we may make one
    except OSError:
        pass
    return found


@pytest.mark.parametrize("flag", ["--out", "--report", "--html"])
def test_output_that_is_a_special_file_is_refused(flag: str, models, tmp_path: Path,
                                                  outdir: Path) -> None:
    import os

    specials = _special_outputs(tmp_path)
    for what, target in specials.items():
        paths = {"--out": outdir / "c.safetensors", flag: target}
        argv = ["disassemble", models["all"], "--classes", "1"]
        for f, p in paths.items():
            argv += [f, p]
        _assert_error(run_cli(argv), "disassemble",
                      f"{flag} {target} is a {what.strip()}, not a regular file",
                      "give the path of a regular file")
    assert list(outdir.iterdir()) == []
    assert os.path.realpath(tmp_path / "null-link") == "/dev/null"
    assert Path("/dev/null").is_char_device()


def test_route_json_that_is_a_fifo_is_refused(models, tmp_path: Path, outdir: Path) -> None:
    import os

    os.mkfifo(tmp_path / "fifo")
    _assert_error(run_cli(["route", models["all"], "--classes", "1,2", "--out",
                           outdir / "r.png", "--json", tmp_path / "fifo"]),
                  "route", f"--json {tmp_path / 'fifo'} is a named pipe (FIFO)")
    assert list(outdir.iterdir()) == []


def test_output_in_a_read_only_folder(models, tmp_path: Path, monkeypatch) -> None:
    import os
    import shutil as sh
    import subprocess

    folder = tmp_path / "ro"
    folder.mkdir()
    argv = ["disassemble", models["all"], "--classes", "1", "--out", folder / "c.safetensors"]
    immutable = os.geteuid() == 0 and sh.which("chattr") is not None and subprocess.run(
        ["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        if not immutable:  # not root: a folder without write permission does it
            folder.chmod(0o555)
            if os.access(folder, os.W_OK):
                monkeypatch.setattr(os, "access", lambda *a, **k: False)
        _assert_error(run_cli(argv), "disassemble", f"--out {folder / 'c.safetensors'}: "
                      f"folder {folder} cannot be written to", "choose another folder")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_output_whose_folder_is_a_file_or_whose_name_is_too_long(models, tmp_path: Path,
                                                                 outdir: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    _assert_error(run_cli(["disassemble", models["all"], "--classes", "1", "--out",
                           afile / "c.safetensors"]),
                  "disassemble", f"--out {afile / 'c.safetensors'}: {afile} is not a folder "
                  "but a file")
    long = outdir / ("c" * 256 + ".safetensors")
    _assert_error(run_cli(["disassemble", models["all"], "--classes", "1", "--out", long]),
                  "disassemble", "the file name is 268 bytes, longer than the", "shorter name")
    _assert_error(run_cli(["disassemble", models["all"], "--classes", "1", "--out",
                           outdir / "c.safetensors", "--report", outdir / ("r" * 250)]),
                  "disassemble", "--report", "the file name is 250 bytes")
    assert list(outdir.iterdir()) == [] and sorted(tmp_path.iterdir()) == [afile, outdir]


def test_no_space_at_write_time_is_one_line(models, outdir: Path, monkeypatch) -> None:
    import errno

    from modellego import io as io_module

    def full(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_module, "save_file", full)
    out = outdir / "c.safetensors"
    code, _, err = run_cli(["disassemble", models["all"], "--classes", "1", "--out", out])
    assert code == 2
    assert err == (f"modellego disassemble: error: cannot write {out}: No space left on "
                   "device; nothing was written (free some space, check the folder's "
                   "permissions or choose another path)\n")
    assert list(outdir.iterdir()) == []


_TERMINATED_CHILD = r'''
import sys, time
from pathlib import Path
from modellego import io
from modellego.cli import main
def slow(tensors, filename, metadata):
    Path(filename).write_bytes(b"half a file")
    print("writing", flush=True)
    time.sleep(120)
io.save_file = slow
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_sigterm_during_a_write_leaves_nothing(models, outdir: Path) -> None:
    import signal
    import subprocess
    import sys

    out = outdir / "c.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _TERMINATED_CHILD, "disassemble",
                             str(models["all"]), "--classes", "1", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    [tmp] = outdir.iterdir()
    assert tmp.name.startswith(f".c.safetensors.{proc.pid}.")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err == "terminated\n"
    assert list(outdir.iterdir()) == []
