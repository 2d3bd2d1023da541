"""Photo folders of mixed sizes and modes: the size rule, the evaluation transform, and
streaming through a DataLoader giving exactly what the in-memory path gives."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_cli
from modellego.data import (
    LazyImages,
    ModelInputs,
    as_tensor,
    clear_cache,
    dataset_info,
    iter_batches,
    load_split,
    model_input,
    reading,
)
from modellego.data.folder import DEFAULT_MAX_SIZE, STREAM_ENV
from modellego.data.lazy import Recipe, parse_memory, shape_image
from modellego.disassembly import DEFAULT_FIT_IMAGES, DEFAULT_VALIDATION
from modellego.errors import DataError
from modellego.files import open_model
from modellego.io import read_manifest

CLASSES = ("bright", "dark", "mid")


def _photo(rng: np.random.Generator, c: int, h: int, w: int) -> np.ndarray:
    base = (200, 40, 120)[c]
    return np.clip(rng.normal(base, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _write_photos(root: Path, per_class: int = 60, seed: int = 0) -> list[tuple[int, int]]:
    """``per_class`` images per class: JPEG/PNG, RGB/L/P/RGBA, sides 12..40 px; the file
    first in sorted order is 1x1 and one is 1500x1000. Returns every (H, W)."""
    rng = np.random.default_rng(seed)
    sizes = []
    for c, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(12, 41, 2))
            if c == 0 and i == 0:
                h, w = 1, 1  # sorts first: it must not decide the size
            if c == 1 and i == 5:
                h, w = 1000, 1500
            im = Image.fromarray(_photo(rng, c, h, w), "RGB")
            kind = i % 4
            if kind == 0:
                im.save(folder / f"{i:04d}.jpg", quality=90)
            elif kind == 1:
                im.convert("L").save(folder / f"{i:04d}.png")
            elif kind == 2:
                im.convert("P").save(folder / f"{i:04d}.png")
            else:
                im.convert("RGBA").save(folder / f"{i:04d}.png")
            sizes.append((h, w))
    return sizes


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, int]]]:
    root = tmp_path_factory.mktemp("photos") / "imgs"
    return root, _write_photos(root)


@pytest.fixture
def streamed(monkeypatch: pytest.MonkeyPatch):
    """Every folder is streamed (no folder is small enough to be held in memory)."""
    clear_cache()
    monkeypatch.setenv(STREAM_ENV, "0")
    yield
    clear_cache()


def _read_as(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget parsed folders; from now on they are held in memory or streamed (``mode``)."""
    clear_cache()
    if mode == "streamed":
        monkeypatch.setenv(STREAM_ENV, "0")
    else:
        monkeypatch.delenv(STREAM_ENV, raising=False)


def _splits(name: str) -> dict[str, object]:
    return {s: load_split(name, s) for s in ("train", "val", "test")}


def test_mixed_sizes_take_the_median_shorter_side_not_the_first_image(photos) -> None:
    root, sizes = photos
    clear_cache()
    info = dataset_info(f"folder:{root}")
    side = min(statistics.median_low(min(s) for s in sizes), DEFAULT_MAX_SIZE)
    assert info.input_shape == (3, side, side) and side > 12
    test = load_split(f"folder:{root}", "test")
    assert isinstance(test.images, torch.Tensor)  # 180 small photos: held in memory
    assert test.images.shape[1:] == (3, side, side)
    # asked for a size, every image is resized and centre-cropped to it
    assert dataset_info(f"folder:{root}", image_size=(24, 16)).input_shape == (3, 24, 16)
    with pytest.raises(DataError, match="is for folder:PATH datasets"):
        dataset_info("digits", image_size=(8, 8))


def test_centre_crop_keeps_the_middle_of_a_wide_image() -> None:
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :75, 0] = 255  # red left quarter, green middle half, blue right quarter
    arr[:, 75:225, 1] = 255
    arr[:, 225:, 2] = 255
    out = shape_image(Image.fromarray(arr), Recipe("RGB", (8, 8), crop=True))
    assert out.shape == (3, 8, 8) and out.dtype == np.uint8
    assert (out[1] == 255).all() and (out[0] == 0).all() and (out[2] == 0).all()
    # without the crop the whole image is squeezed in: all three colours remain
    whole = shape_image(Image.fromarray(arr), Recipe("RGB", (8, 8), crop=False))
    assert whole[0, :, 0].min() > 200 and whole[2, :, -1].min() > 200
    grey = shape_image(Image.fromarray(arr), Recipe("L", (4, 6), crop=True))
    assert grey.shape == (1, 4, 6)


def test_streaming_gives_the_in_memory_images_exactly(photos, streamed,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = photos
    name = f"folder:{root}"
    _read_as("held", monkeypatch)
    held = _splits(name)
    _read_as("streamed", monkeypatch)
    lazy = _splits(name)
    assert lazy["train"].info == held["train"].info  # stats over a sample = all of 180
    for s in held:
        assert isinstance(lazy[s].images, LazyImages)
        assert lazy[s].images.shape == held[s].images.shape
        assert torch.equal(lazy[s].labels, held[s].labels)
        assert torch.equal(lazy[s].images.decode(), held[s].images)
        with reading(workers=2):
            assert torch.equal(lazy[s].images.decode(), held[s].images)
    sub = lazy["test"].subset([2])
    assert isinstance(sub.images, LazyImages) and (sub.labels == 2).all()
    assert torch.equal(sub.images.decode(), held["test"].subset([2]).images)
    # model inputs: lazy, converted per batch, the same as converting the tensor
    contract = {"shape": [1, 20, 20], "mean": [0.5], "std": [0.25]}
    x = model_input(lazy["test"].images, lazy["test"].info, contract)
    assert isinstance(x, ModelInputs) and x.shape == (len(lazy["test"]), 1, 20, 20)
    want = model_input(held["test"].images, held["test"].info, contract)
    batches = [torch.tensor([5, 0, 7]), torch.tensor([1])]
    with reading(workers=2):
        got = list(iter_batches(x, batches))
    assert [torch.equal(g, want[b]) for g, b in zip(got, batches)] == [True, True]
    assert torch.equal(as_tensor(x), want) and torch.equal(x[3:9], want[3:9])


def test_decoding_is_bounded_and_bad_files_are_one_line(photos, streamed,
                                                        tmp_path: Path) -> None:
    root, _ = photos
    test = load_split(f"folder:{root}", "test")
    with reading(max_memory=1000), pytest.raises(DataError) as exc:
        test.images.decode("the test")
    assert str(exc.value).startswith(f"the test would decode {len(test)} images")
    assert "over the bound of" in str(exc.value) and "(`max_memory`)" in str(exc.value)
    assert parse_memory("4G") == 4 << 30 and parse_memory("512MiB") == 512 << 20
    with pytest.raises(DataError, match="write a number"):
        parse_memory("lots")

    bad = tmp_path / "bad"
    _write_photos(bad, per_class=6, seed=1)
    good = bad / "dark" / "0003.png"
    good.write_bytes(good.read_bytes()[:80])  # a valid header, cut-off pixels
    clear_cache()
    images = load_split(f"folder:{bad}", "train").images
    if good not in map(Path, images.paths):  # the automatic split put it in the test split
        images = load_split(f"folder:{bad}", "test").images
    for n in (0, 2):
        with reading(workers=n), pytest.raises(DataError) as exc:
            images.decode()
        message = str(exc.value)
        assert message.startswith(f"cannot read image {good}") and "\n" not in message


def _trained(root: Path, folder: Path) -> Path:
    """A simnet trained for one epoch on the photo folder, read fresh; its file."""
    clear_cache()
    out = folder / "m.safetensors"
    code, _, err = run_cli(["train", "simnet", "--dataset", f"folder:{root}", "--epochs", "1",
                            "--width", "0.125", "--batch-size", "32", "--quiet", "--out", out])
    assert code == 0, err
    return out


def test_commands_on_a_streamed_folder_match_the_in_memory_ones(
        photos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same model, evaluated and disassembled from the folder held in memory and then
    streamed through two DataLoader workers: the same numbers and the same component (the
    pool of 4 x 20 samples per class covers every training image)."""
    root, _ = photos
    model = _trained(root, tmp_path)
    runs = {}
    for mode in ("held", "streamed"):
        _read_as(mode, monkeypatch)
        code, out, err = run_cli(["evaluate", model, "--json", "--no-latency",
                                  "--workers", "2"])
        assert code == 0, err
        comp = tmp_path / f"{mode}.safetensors"
        report = tmp_path / f"{mode}.json"
        code, _, err = run_cli(["disassemble", model, "--classes", "0,2", "--samples-per-class",
                                "20", "--workers", "2", "--out", comp, "--report", report])
        assert code == 0, err
        runs[mode] = (json.loads(out), json.loads(report.read_text()), read_manifest(comp))
    clear_cache()
    (ev_h, rep_h, man_h), (ev_s, rep_s, man_s) = runs["held"], runs["streamed"]
    assert ev_s["accuracy"] == ev_h["accuracy"] and ev_s["per_class"] == ev_h["per_class"]
    assert man_s["plan"] == man_h["plan"]
    assert rep_s["component_accuracy"] == rep_h["component_accuracy"]
    # 4 x 20 to select from, twice the validation top-up, the reconstruction's share per class
    pool = 4 * 20 + 2 * DEFAULT_VALIDATION + -(-DEFAULT_FIT_IMAGES // 2)
    assert rep_s["selection_pool"] == pool and "selection_pool" not in rep_h
    assert man_s["provenance"]["samples"] == man_h["provenance"]["samples"]
    # the router fingerprint, made from every training image of the component's classes
    # read batch by batch: the same statistics
    assert man_s["router_fingerprint"] == man_h["router_fingerprint"]
    fp_h = open_model(tmp_path / "held.safetensors").fingerprint
    fp_s = open_model(tmp_path / "streamed.safetensors").fingerprint
    assert set(fp_s) == set(fp_h)
    for k in fp_h:
        assert torch.allclose(fp_s[k], fp_h[k], rtol=1e-4, atol=1e-5), k


def test_a_small_pool_picks_samples_of_the_right_classes(photos, tmp_path: Path,
                                                         streamed) -> None:
    root, _ = photos
    model = _trained(root, tmp_path)
    report = tmp_path / "r.json"
    code, _, err = run_cli(["disassemble", model, "--classes", "1", "--samples-per-class", "3",
                            "--workers", "0", "--out", tmp_path / "c.safetensors",
                            "--report", report])
    assert code == 0, err
    assert json.loads(report.read_text())["selection_pool"] == \
        4 * 3 + 2 * DEFAULT_VALIDATION + DEFAULT_FIT_IMAGES
    samples = read_manifest(tmp_path / "c.safetensors")["provenance"]["samples"]["1"]
    # positions among the task's training images, as for data held in memory
    task = load_split(f"folder:{root}", "train").subset([1])
    assert len(samples) == 3 and max(samples) < len(task)


def test_a_pool_within_k_is_taken_whole_without_a_selection_pass(
        photos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """k above every class's count: in memory every image is selected, ranked by the model;
    streamed, every image is taken in file order with no forward pass to rank them. The
    component is the same."""
    root, _ = photos
    model = _trained(root, tmp_path)
    made = {}
    for mode in ("held", "streamed"):
        _read_as(mode, monkeypatch)
        out = tmp_path / f"{mode}.safetensors"
        code, _, err = run_cli(["disassemble", model, "--classes", "0,1", "--samples-per-class",
                                "200", "--rule", "mass", "--out", out])
        assert code == 0, err
        made[mode] = read_manifest(out)
    clear_cache()
    held, taken = (made[m]["provenance"]["samples"] for m in ("held", "streamed"))
    task = load_split(f"folder:{root}", "train").subset([0, 1])
    n0 = int((task.labels == 0).sum())
    assert taken == {"0": list(range(n0)), "1": list(range(n0, len(task)))}
    assert {c: sorted(v) for c, v in held.items()} == taken and held != taken
    assert made["streamed"]["plan"] == made["held"]["plan"]
