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
    assert back.to_dict() == {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION}
    assert read_manifest(path) == back.to_dict()
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
    assert "wrap a plain state dict with the modellego import command" in str(exc.value)
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


# --------------------------------------------------------------------------- hardening


def _file_header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n])


def test_genuine_file_whose_header_length_looks_like_a_pickle(tmp_path: Path) -> None:
    """Header length 66,176 = 0x10280: the file starts ``80 02 01 00``, a pickle's opcodes."""
    model = _trained_like("lenet5")
    path = tmp_path / "m.safetensors"
    pad = 1
    for _ in range(10):  # safetensors pads the header to a multiple of 8 bytes
        manifest = {**_manifest(), "provenance": {"command": "x" * pad}}
        save_model(path, model, manifest)
        n, _ = _file_header(path)
        if n == 0x10280:
            break
        pad += 0x10280 - n
    assert path.read_bytes()[:4] == b"\x80\x02\x01\x00"
    loaded, back = load_model(path)
    assert back["provenance"]["command"] == "x" * pad
    assert torch.equal(loaded.state_dict()["classifier.0.weight"],
                       model.state_dict()["classifier.0.weight"])


def test_a_path_that_is_not_a_file_is_named_for_what_it_is(tmp_path: Path) -> None:
    import os
    import threading

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    cases = {tmp_path: f"model file {tmp_path} is a folder",
             fifo: f"model file {fifo} is a named pipe (FIFO), not a regular file",
             Path("/dev/null"): "model file /dev/null is a device, not a regular file"}
    for path, words in cases.items():
        for fn in (load_model, read_manifest, load_weights):
            result: list[BaseException] = []
            # a FIFO opened for reading would block: run in a thread that must finish
            def attempt(fn=fn, path=path, result=result) -> None:
                result.append(pytest.raises(ModelFileError, fn, path).value)

            worker = threading.Thread(target=attempt)
            worker.start()
            worker.join(10)
            assert not worker.is_alive(), f"{fn.__name__}({path}) blocked"
            assert str(result[0]).startswith(words), str(result[0])
            assert "\n" not in str(result[0])


@pytest.mark.parametrize("dtype, stored", [(torch.float16, "F16"), (torch.bfloat16, "BF16"),
                                           (torch.float64, "F64")])
def test_half_and_double_precision_weights_are_read_as_float32(tmp_path: Path, dtype,
                                                               stored: str) -> None:
    model = _trained_like("lenet5")
    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    path = _with_manifest(tmp_path, _manifest(), state)
    assert _file_header(path)[1]["features.0.weight"]["dtype"] == stored
    loaded, _ = load_model(path)
    for k, v in loaded.state_dict().items():
        assert v.dtype == model.state_dict()[k].dtype, k
        assert torch.equal(v, state[k].to(v.dtype)), k


@pytest.mark.parametrize("name, dtype, stored", [
    ("features.0.weight", torch.int8, "I8"),
    ("features.0.weight", torch.bool, "BOOL"),
    ("features.0.weight", torch.complex64, "C64"),
    ("features.0.weight", torch.int64, "I64"),
    ("features.1.running_mean", torch.int32, "I32"),  # a float buffer
    ("features.1.num_batches_tracked", torch.float32, "F32"),  # an integer buffer
])
def test_weights_of_the_wrong_kind_of_dtype_are_refused(tmp_path: Path, name: str, dtype,
                                                        stored: str) -> None:
    state = dict(_trained_like("simnet").state_dict())
    state[name] = state[name].to(dtype)
    path = _with_manifest(tmp_path, _manifest("simnet"), state)
    held = "int64" if "num_batches" in name else "float32"
    with pytest.raises(ModelFileError) as exc:
        load_model(path)
    assert str(exc.value).startswith(
        f"{path}: tensor {name} is stored as {stored}, but the network holds {held} there")


def test_integer_buffers_keep_their_dtype(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_model(path, _trained_like("simnet"), _manifest("simnet"))
    assert _file_header(path)[1]["features.1.num_batches_tracked"]["dtype"] == "I64"
    loaded, _ = load_model(path)
    assert loaded.state_dict()["features.1.num_batches_tracked"].dtype == torch.int64
    assert int(loaded.state_dict()["features.1.num_batches_tracked"]) == 7


def test_tensor_table_entries_are_checked_before_reading(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    _save_lenet(good)
    n, header = _file_header(good)
    data = good.read_bytes()
    for edit, words in (
            (lambda e: e.update(dtype="Q7"), "has an unknown dtype 'Q7'"),
            (lambda e: e.update(data_offsets=[0, 3]), "cannot read weights (data offsets"),
            (lambda e: e.update(data_offsets=[0, 10 ** 12]), "cannot read weights"),
            (lambda e: e.update(shape=[-1]), "has no valid shape")):
        crafted = json.loads(json.dumps(header))
        edit(crafted["features.0.weight"])
        raw = json.dumps(crafted).encode()
        path = tmp_path / "crafted.safetensors"
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
        with pytest.raises(ModelFileError) as exc:
            load_model(path)
        assert f"{path}: safetensors header entry 'features.0.weight'" in str(exc.value)
        assert words in str(exc.value), str(exc.value)


# --------------------------------------------------------------------------- memory


_CAPPED = r'''
import json, resource, sys
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import torch
from modellego.cli import main
from modellego.files import open_model, save_model
from modellego.models import create_model
results = {}
open_model(sys.argv[2])  # a genuine small file loads under the cap
for name in sys.argv[3:]:
    results[name] = main(["evaluate", name, "--no-latency"])
manifest = json.loads(sys.stdin.read())
try:
    save_model(sys.argv[2] + ".new", create_model("lenet5", **manifest["architecture"]
                                                  ["kwargs"] | {"width": 0.125}), manifest)
    results["save"] = "saved"
except Exception as exc:
    results["save"] = f"{type(exc).__name__}: {exc}"
peak = [l for l in open("/proc/self/status") if l.startswith("VmPeak")][0].split()[1]
try:
    torch.empty(1 << 29)  # 2 GiB, less than the networks asked for: the cap does bite
    results["control"] = "allocated"
except (MemoryError, RuntimeError):
    results["control"] = "refused"
print(json.dumps(results))
print(peak)
'''


@pytest.mark.slow
def test_small_files_asking_for_huge_networks_allocate_nothing(tmp_path: Path) -> None:
    """Under an address-space cap of 1 GiB above what the same process needs to load a
    genuine file, files (and a manifest given to ``save_model``) whose manifests describe
    networks of gigabytes are refused with the one-line error about the file itself."""
    import subprocess
    import sys

    v010 = Path(__file__).parent / "data" / "v0_1_0"
    tensors, wide = load_weights(v010 / "model.safetensors")
    wide["architecture"]["kwargs"]["width"] = 100  # 2.6 GB of float32
    save_file(tensors, str(tmp_path / "wide.safetensors"),
              metadata={"modellego": json.dumps(wide)})
    tensors, padded = load_weights(v010 / "assembly.safetensors")
    padded.update(layout="padded", scaling="none", taps=None)
    padded["provenance"]["calibration"] = {"scaling": "none"}
    for part in padded["parts"]:
        part["architecture"]["kwargs"]["width"] = 100
    save_file(tensors, str(tmp_path / "padded.safetensors"),
              metadata={"modellego": json.dumps(padded)})
    # a manifest whose network does not run on its input: once built for real to find out
    tiny = _manifest(width=100)
    for where in (tiny["input"], tiny["dataset"]):
        where[("input_shape" if "name" in where else "shape")] = [1, 2, 2]
    files = [str(tmp_path / "wide.safetensors"), str(tmp_path / "padded.safetensors")]
    good = str(tmp_path / "good.safetensors")
    _save_lenet(Path(good))

    def child(limit: int) -> tuple[dict, int, str]:
        proc = subprocess.run([sys.executable, "-c", _CAPPED, str(limit), good, *files],
                              input=json.dumps(tiny), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = proc.stdout.strip().splitlines()
        return json.loads(lines[-2]), int(lines[-1]) * 1024, proc.stderr

    uncapped, needed, _ = child(0)  # the same work uncapped: what the process needs
    assert uncapped["control"] == "allocated"
    limit = needed + (1 << 30)
    results, peak, err = child(limit)
    assert results["control"] == "refused"
    assert results[files[0]] == results[files[1]] == 2
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(f"modellego evaluate: error: {files[0]}: weights do not match "
                               "the manifest: shape mismatch for features.0.weight")
    assert lines[1].startswith(f"modellego evaluate: error: {files[1]}: weights do not match "
                               "the manifest")
    assert results["save"].startswith(
        f"ModelFileError: {good}.new (not written): the network the manifest describes does "
        "not run on its input shape [1, 2, 2]")
    assert not Path(good + ".new").exists()
    assert peak < limit


# --------------------------------------------------------------------------- output targets


def _special_targets(tmp_path: Path) -> dict[str, Path]:
    import os
    import stat

    targets = {"fifo": tmp_path / "fifo"}
    os.mkfifo(targets["fifo"])
    targets["symlink to /dev/null"] = tmp_path / "null-link"
    targets["symlink to /dev/null"].symlink_to("/dev/null")
    try:
        os.mknod(tmp_path / "chardev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        targets["char device"] = tmp_path / "chardev"
    except (PermissionError, OSError):  # not root, or no CAP_MKNOD: the symlink covers it
        pass
    return targets


def test_atomic_write_refuses_to_replace_a_special_file(tmp_path: Path) -> None:
    import os
    import stat

    for what, target in _special_targets(tmp_path).items():
        before = os.lstat(target)
        with pytest.raises(ModelFileError) as exc:
            atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
        assert "not a regular file, and would be replaced" in str(exc.value), what
        after = os.lstat(target)
        assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode), what
    assert not list(tmp_path.glob(".*.tmp"))
    # a symlink to a regular file is replaced as before (the file it named is untouched)
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    atomic_write(link, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert link.read_bytes() == b"new" and real.read_bytes() == b"old"


def test_atomic_write_checks_the_target_again_before_the_rename(tmp_path: Path) -> None:
    import os

    target = tmp_path / "out.bin"

    def writer(tmp: str) -> None:
        Path(tmp).write_bytes(b"new")
        os.mkfifo(target)  # appears while the output is written

    with pytest.raises(ModelFileError, match="named pipe"):
        atomic_write(target, writer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_write_error_is_a_one_line_model_file_error(tmp_path: Path) -> None:
    from modellego.errors import OutputWriteError

    target = tmp_path / "out.bin"

    def writer(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        with open("/dev/full", "wb") as full:
            full.write(b"x" * 65536)
            full.flush()

    with pytest.raises(ModelFileError) as exc:
        atomic_write(target, writer)
    assert isinstance(exc.value, OutputWriteError) and isinstance(exc.value, OSError)
    assert str(exc.value) == (f"cannot write {target}: No space left on device; nothing was "
                              "written (free some space, check the folder's permissions or "
                              "choose another path)")
    assert list(tmp_path.iterdir()) == []


_SLOW_WRITER = r'''
import sys, time
from pathlib import Path
from modellego.io import atomic_write
def write(tmp):
    Path(tmp).write_bytes(b"half a file")
    print("writing", flush=True)
    time.sleep(120)
atomic_write(sys.argv[1], write)
'''


def _start_slow_writer(target: Path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    return proc


def test_stale_temporary_file_of_a_killed_writer_is_removed(tmp_path: Path) -> None:
    import os
    import signal

    target = tmp_path / "out.bin"
    proc = _start_slow_writer(target)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    [left] = tmp_path.iterdir()
    assert left.name.startswith(f".out.bin.{proc.pid}.") and left.name.endswith(".tmp")
    # another writer's file, alive (this process), and a 0.1.0-style name, fresh and old
    alive = tmp_path / f".out.bin.{os.getpid()}.abcd1234.tmp"
    fresh, old = tmp_path / ".out.bin.fresh123.tmp", tmp_path / ".out.bin.old45678.tmp"
    for p in (alive, fresh, old):
        p.write_bytes(b"x")
    os.utime(old, (0, 0))
    other = tmp_path / f".other.bin.{proc.pid}.abcd1234.tmp"  # another output's
    other.write_bytes(b"x")
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.bin", alive.name, fresh.name, other.name])


def test_fuzzed_model_files_load_or_are_refused(tmp_path: Path) -> None:
    """150 mutated copies of a real file (header length, manifest text, tensor table,
    truncations, byte flips): each loads or raises ModelFileError (one line), nothing else.
    ``scripts/fuzz_model_file.py --examples 20000`` runs the same for longer."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_model_file.py"
    spec = importlib.util.spec_from_file_location("fuzz_model_file", script)
    assert spec is not None and spec.loader is not None
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    fuzz.run(150, tmp_path, seed=0)
