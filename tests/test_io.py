"""Tests for modellego.io: the safetensors model file format and its refusals."""

from __future__ import annotations

import builtins
import json
import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from modellego import io as io_module
from modellego.errors import ModelFileError
from modellego.files import load_model, save_model
from modellego.io import (
    FORMAT,
    FORMAT_VERSION,
    atomic_write,
    load_weights,
    read_manifest,
    save_weights,
)
from modellego.kinds import build_from_manifest
from modellego.models import create_model, list_models

KWARGS = {"in_channels": 1, "num_classes": 5, "input_size": 28, "width": 0.125}


NAMES = ["a", "b", "c", "d", "éß — unicode survives"]


def _manifest(arch: str = "lenet5", **kwargs) -> dict:
    return {
        "kind": "model",
        "architecture": {"name": arch, "kwargs": {**KWARGS, **kwargs}},
        "classes": [0, 1, 2, 3, 4],
        "class_names": list(NAMES),
        "dataset": {"name": "unit-test", "class_names": list(NAMES),
                    "input_shape": [1, 28, 28], "mean": [0.5], "std": [0.25]},
        "input": {"shape": [1, 28, 28], "mean": [0.5], "std": [0.25]},
        "metrics": {"test_accuracy": 0.1 + 0.2},
    }


def _trained_like(arch: str, seed: int = 0) -> nn.Module:
    """A fresh model whose BN layers carry non-default statistics, in eval mode."""
    torch.manual_seed(seed)
    model = create_model(arch, **KWARGS)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def _save_lenet(path: Path) -> nn.Module:
    model = _trained_like("lenet5")
    save_model(path, model, _manifest())
    return model


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("arch", list_models())
def test_round_trip_is_bit_identical(tmp_path: Path, arch: str) -> None:
    model = _trained_like(arch)
    manifest = _manifest(arch)
    path = tmp_path / f"{arch}.safetensors"
    save_model(path, model, manifest)
    loaded, back = load_model(path)
    assert back == {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION}
    assert read_manifest(path) == back
    assert type(loaded) is type(model)
    assert not any(m.training for m in loaded.modules())
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for k in original:
        assert restored[k].dtype == original[k].dtype, k
        assert torch.equal(restored[k], original[k]), k


def test_load_weights_returns_tensors_and_manifest(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),  # non-contiguous
               "b": torch.tensor([1, 2, 3], dtype=torch.int64)}
    # (before the typed manifest this saved {"kind": "custom", "x": [1, 2]}; that is now
    # refused on writing, see test_save_weights_refuses_what_reading_would_refuse)
    save_weights(path, tensors, _manifest())
    got, manifest = load_weights(path)
    assert manifest == {**_manifest(), "format": FORMAT, "format_version": FORMAT_VERSION}
    assert set(got) == {"a", "b"}
    assert torch.equal(got["a"], tensors["a"])
    assert torch.equal(got["b"], tensors["b"]) and got["b"].dtype == torch.int64


def test_saving_stamps_the_current_format_version(tmp_path: Path) -> None:
    """A manifest read from an older file and saved again gets the version actually written."""
    path = tmp_path / "m.safetensors"
    model = _trained_like("lenet5")
    save_model(path, model, {**_manifest(), "format": "other", "format_version": 0})
    back = read_manifest(path)
    assert back["format"] == FORMAT
    assert back["format_version"] == FORMAT_VERSION


def test_build_from_manifest_gives_the_architecture() -> None:
    net = build_from_manifest(_manifest("simnet"))
    assert [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)] == [4, 8, 16]
    assert net.fc.out_features == 5


# --------------------------------------------------------------------------- pickle refusal


class _Payload:
    """Unpickling an instance calls ``open(marker, 'w')``, creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_payload_really_is_dangerous(tmp_path: Path) -> None:
    """Control: the crafted bytes do create the marker when someone unpickles them."""
    control = tmp_path / "control-marker"
    fh = pickle.loads(pickle.dumps(_Payload(control)))
    fh.close()
    assert control.exists()


@pytest.mark.parametrize("name,protocol", [
    ("model.pth", pickle.DEFAULT_PROTOCOL),
    ("model.pt", 2),
    ("model.safetensors", pickle.DEFAULT_PROTOCOL),
    ("model.safetensors", 2),
    ("model.bin", pickle.HIGHEST_PROTOCOL),
])
def test_pickle_file_is_refused(tmp_path: Path, name: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=protocol))
    for fn in (load_model, load_weights, read_manifest):
        with pytest.raises(ModelFileError) as exc:
            fn(path)
        msg = str(exc.value)
        assert "pickle" in msg
        assert str(path) in msg
        assert "safetensors" in msg  # tells what to do instead
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 1])
def test_old_protocol_pickle_is_refused_too(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=protocol))
    with pytest.raises(ModelFileError, match="not a valid safetensors file"):
        load_model(path)
    assert not marker.exists()


def test_torch_save_zip_named_safetensors_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    torch.save({"weight": torch.zeros(3), "evil": _Payload(marker)}, path)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    with pytest.raises(ModelFileError, match="pickle"):
        load_model(path)
    with pytest.raises(ModelFileError, match="pickle"):
        read_manifest(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- corrupted files


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nothing.safetensors"
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(path)
    with pytest.raises(ModelFileError, match="does not exist"):
        read_manifest(tmp_path)  # a folder is not a model file either


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.02])
def test_truncated_file(tmp_path: Path, fraction: float) -> None:
    good = tmp_path / "good.safetensors"
    _save_lenet(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelFileError) as exc:
        load_model(bad)
    assert "truncated" in str(exc.value)
    assert str(bad) in str(exc.value)


def test_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(path)
    path.write_bytes(b"")
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(ModelFileError) as exc:
        load_model(path)
    assert "not a valid safetensors file" in str(exc.value)


def test_header_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "bad-header.safetensors"
    header = b"{not json!"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(ModelFileError, match="header is not valid JSON"):
        load_model(path)


def test_safetensors_without_manifest(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(ModelFileError) as exc:
        load_model(path)
    assert "no modellego manifest" in str(exc.value)
    assert "save_model" in str(exc.value)
    save_file({"w": torch.ones(2)}, str(path), metadata={"other": "x"})
    with pytest.raises(ModelFileError, match="no modellego manifest"):
        read_manifest(path)


def _write_raw(path: Path, manifest: object, tensors: dict | None = None) -> None:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    save_file(tensors or {"w": torch.ones(2)}, str(path), metadata={"modellego": text})


def test_manifest_not_json_or_wrong_format(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    _write_raw(path, "{oops")
    with pytest.raises(ModelFileError, match="manifest is not valid JSON"):
        read_manifest(path)
    _write_raw(path, {"format": "something.else", "format_version": 1})
    with pytest.raises(ModelFileError, match="manifest format is not"):
        read_manifest(path)


@pytest.mark.parametrize("version", [99, 0, "1", None])
def test_unsupported_format_version(tmp_path: Path, version: object) -> None:
    path = tmp_path / "future.safetensors"
    manifest = {**_manifest(), "format": FORMAT, "format_version": version}
    _write_raw(path, manifest, _trained_like("lenet5").state_dict())
    for fn in (load_model, read_manifest):
        with pytest.raises(ModelFileError) as exc:
            fn(path)
        msg = str(exc.value)
        assert f"format version {version!r} is not supported" in msg
        assert "upgrade modellego" in msg


def _with_manifest(tmp_path: Path, manifest: dict, state: dict | None = None) -> Path:
    path = tmp_path / "edited.safetensors"
    state = state if state is not None else _trained_like("lenet5").state_dict()
    save_weights(path, state, manifest)
    return path


def test_unknown_architecture(tmp_path: Path) -> None:
    path = _with_manifest(tmp_path, _manifest("lenet6"))
    with pytest.raises(ModelFileError) as exc:
        load_model(path)
    msg = str(exc.value)
    assert "cannot rebuild" in msg
    assert "unknown architecture 'lenet6'" in msg
    assert "lenet5" in msg  # lists the known names


def test_unknown_kind_and_missing_architecture(tmp_path: Path) -> None:
    # written around save_weights, which refuses both manifests (nothing is written)
    path = tmp_path / "edited.safetensors"
    state = _trained_like("lenet5").state_dict()
    stamp = {"format": FORMAT, "format_version": FORMAT_VERSION}
    _write_raw(path, {**_manifest(), "kind": "hologram", **stamp}, state)
    with pytest.raises(ModelFileError, match="unknown model kind 'hologram'"):
        load_model(path)
    manifest = _manifest()
    del manifest["architecture"]
    _write_raw(path, {**manifest, **stamp}, state)
    with pytest.raises(ModelFileError, match="no architecture entry"):
        load_model(path)
    for bad in ({**_manifest(), "kind": "hologram"}, manifest):
        with pytest.raises(ModelFileError):
            save_weights(tmp_path / "new.safetensors", state, bad)
    assert not (tmp_path / "new.safetensors").exists()


def test_save_weights_refuses_what_reading_would_refuse(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    with pytest.raises(ModelFileError) as exc:
        save_weights(path, {"a": torch.zeros(2)}, {"kind": "custom", "x": [1, 2]})
    assert str(exc.value) == (
        f"{path} (not written): unknown model kind 'custom' in manifest; known: assembly, "
        "component, model; upgrade modellego")
    assert list(tmp_path.iterdir()) == []


def test_invalid_architecture_kwargs(tmp_path: Path) -> None:
    path = _with_manifest(tmp_path, _manifest(num_classes=0))
    with pytest.raises(ModelFileError, match="num_classes must be an integer >= 1"):
        load_model(path)


def test_kwargs_that_do_not_match_the_weights(tmp_path: Path) -> None:
    path = _with_manifest(tmp_path, _manifest(num_classes=7))
    with pytest.raises(ModelFileError) as exc:
        load_model(path)
    msg = str(exc.value)
    assert "weights do not match the manifest" in msg
    assert "shape mismatch for classifier.4.weight: file (5, 10), manifest implies (7, 10)" \
        in msg


def test_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    state = dict(_trained_like("lenet5").state_dict())
    del state["classifier.0.bias"]
    state["extra.weight"] = torch.zeros(3)
    path = _with_manifest(tmp_path, _manifest(), state)
    with pytest.raises(ModelFileError) as exc:
        load_model(path)
    msg = str(exc.value)
    assert "missing 1 tensors (e.g. classifier.0.bias)" in msg
    assert "1 unexpected tensors (e.g. extra.weight)" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(tmp_path: Path, bad: float) -> None:
    model = _trained_like("simnet")
    with torch.no_grad():
        model.features[0].weight[0, 0, 1, 1] = bad
    path = tmp_path / "nan.safetensors"
    save_model(path, model, _manifest("simnet"))
    with pytest.raises(ModelFileError) as exc:
        load_model(path)
    assert "features.0.weight contains NaN or infinite values" in str(exc.value)


def test_non_finite_bn_statistics_are_refused(tmp_path: Path) -> None:
    model = _trained_like("simnet")
    with torch.no_grad():
        model.features[1].running_var[2] = float("nan")
    path = tmp_path / "nan-bn.safetensors"
    save_model(path, model, _manifest("simnet"))
    with pytest.raises(ModelFileError, match="features.1.running_var contains NaN"):
        load_model(path)


# --------------------------------------------------------------------------- writing


def test_atomic_write_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"

    def writer(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, writer)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def writer(tmp: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, writer)
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_write_success(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    seen = []

    def writer(tmp: str) -> None:
        seen.append(Path(tmp))
        Path(tmp).write_bytes(b"new")

    atomic_write(target, writer)
    assert target.read_bytes() == b"new"
    assert list(tmp_path.iterdir()) == [target]
    assert seen[0].parent == tmp_path and seen[0] != target


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"previous")

    def failing_save_file(tensors: dict, filename: str, metadata: dict) -> None:
        assert Path(filename) != target
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(io_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        save_model(target, _trained_like("lenet5"), _manifest())
    assert list(tmp_path.iterdir()) == [target]
    assert target.read_bytes() == b"previous"


def test_save_into_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "missing" / "deeper"
    with pytest.raises(ModelFileError) as exc:
        save_model(folder / "m.safetensors", _trained_like("lenet5"), _manifest())
    msg = str(exc.value)
    assert f"folder {folder} does not exist" in msg
    assert not (tmp_path / "missing").exists()
