"""``modellego export``: ONNX and ``torch.export`` files of models, components and the three
assembly layouts, read back by onnxruntime / ``torch.export.load`` and compared with
modellego's own outputs; the metadata they carry; what happens when an export cannot be made
or does not match (nothing is written).

onnx, onnxruntime and onnxscript are the extra ``modellego[export]``, which ``make test``
installs: these tests import them and fail without them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

import modellego.exporting as export_module
from helpers import needs, run_cli
from modellego import AssemblyConfig, DisassemblyConfig, assemble, disassemble, load_model
from modellego.data import load_split
from modellego.exporting import MAX_DIFF, ExportError, export, export_model, read_export_metadata
from modellego.files import open_model, save_model
from modellego.io import raw_header


def _session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _modellego_logits(path: Path, images: torch.Tensor) -> torch.Tensor:
    """What modellego computes for ``[0, 1]`` images: the network on normalised input."""
    loaded = open_model(path)
    contract = loaded.manifest.input
    mean = torch.tensor(contract.mean).view(1, -1, 1, 1)
    std = torch.tensor(contract.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return loaded.model((images - mean) / std)


def _digits(n: int, shape=(1, 28, 28)) -> torch.Tensor:
    from modellego.data.base import convert_images

    test = load_split("digits", "test")
    return convert_images(test.images[:n].float(), shape[0], shape[1:])


@pytest.fixture(scope="module")
def parts(tmp_path_factory, simnet_digits_file) -> dict[str, Path]:
    """The shared simnet (digits 0-9) and two plain-cut components of it."""
    folder = tmp_path_factory.mktemp("export-parts")
    model, manifest = load_model(simnet_digits_file)
    out = {"model": simnet_digits_file}
    for name, classes in (("c013", (0, 1, 3)), ("c27", (2, 7))):
        comp, man, _ = disassemble(model, manifest,
                                   DisassemblyConfig(classes, preset="paper",
                                                     samples_per_class=5),
                                   source_path=simnet_digits_file)
        out[name] = folder / f"{name}.safetensors"
        save_model(out[name], comp.model, man)
    return out


def test_onnx_of_a_model_matches_and_carries_its_metadata(parts, tmp_path):
    out = tmp_path / "model.onnx"
    code, stdout, err = run_cli(["export", parts["model"], "--out", out, "--report",
                                 tmp_path / "r.json", "--check-images", "40"])
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["format"] == "onnx" and report["exporter"] == "torch.onnx (dynamo)"
    assert report["check_images"] == 40 and report["check_source"] == "test images of digits"
    assert report["batch_sizes"] == [1, 32] and report["max_abs_diff"] <= MAX_DIFF
    assert "checked on 40 test images of digits at batch sizes 1 and 32" in stdout

    header, _, _ = raw_header(parts["model"])
    text = header["__metadata__"]["modellego"]
    manifest = json.loads(text)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["modellego.manifest_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert report["manifest_sha256"] == meta["modellego.manifest_sha256"]
    assert json.loads(meta["modellego.classes"]) == manifest["classes"] == list(range(10))
    assert json.loads(meta["modellego.class_names"]) == manifest["class_names"]
    contract = json.loads(meta["modellego.input"])
    assert contract == {"shape": ["batch", 1, 28, 28], "dtype": "float32", "range": [0.0, 1.0],
                        "normalisation": "inside", "mean": manifest["input"]["mean"],
                        "std": manifest["input"]["std"]}
    assert meta["modellego.kind"] == "model" and meta["modellego.output"] == "logits"
    assert read_export_metadata(out) == meta

    # a batch size the check did not use: the batch axis is dynamic
    session = _session(out)
    assert session.get_inputs()[0].shape[0] not in (1, 2, 32)
    x = _digits(7)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    want = _modellego_logits(parts["model"], x)
    assert got.shape == (7, 10) and (got - want).abs().max().item() <= MAX_DIFF


def test_pt2_of_a_component_matches(parts, tmp_path):
    out = tmp_path / "comp.pt2"
    report = export(parts["c013"], out)
    assert (report.format, report.exporter) == ("pt2", "torch.export")
    assert report.max_abs_diff <= MAX_DIFF and report.check_images == 64
    # its odd channel counts were padded to multiples of 8 (checked against the unpadded one)
    assert report.align == 8 and report.channels_added > 0 and report.spaces_padded > 0
    program = torch.export.load(str(out))
    x = _digits(5)
    with torch.no_grad():
        got = program.module()(x)
    assert got.shape == (5, 3)
    assert (got - _modellego_logits(parts["c013"], x)).abs().max().item() <= MAX_DIFF
    meta = read_export_metadata(out)
    assert json.loads(meta["modellego.classes"]) == [0, 1, 3]
    assert meta["modellego.kind"] == "component"
    # plain tensors are stored as raw bytes: nothing in the archive is a pickle
    import zipfile

    with zipfile.ZipFile(out) as archive:
        assert not [n for n in archive.namelist() if n.endswith(".pkl")]


@pytest.mark.parametrize("layout,scaling", [("parallel", "joint"), ("padded", "logit"),
                                            ("union", "none")])
def test_every_layout_exports_to_onnx(layout, scaling, parts, tmp_path):
    model, man, _ = assemble([parts["c013"], parts["c27"]],
                          AssemblyConfig(layout=layout, scaling=scaling,
                                         calibration_samples=20))
    path = tmp_path / "asm.safetensors"
    save_model(path, model, man)
    report = export(path, tmp_path / "asm.onnx", check_images=24)
    assert report.exporter == "torch.onnx (dynamo)"
    assert report.check_source == "test images of the parts' datasets"
    assert report.max_abs_diff <= MAX_DIFF
    assert (report.channels_added, report.align_note) == (0, "assemblies are exported as "
                                                              "they are")
    meta = read_export_metadata(tmp_path / "asm.onnx")
    assert json.loads(meta["modellego.labels"]) == [
        "digits:0", "digits:1", "digits:3", "digits:2", "digits:7"]
    contract = json.loads(meta["modellego.input"])
    assert (contract["mean"], contract["std"]) == ([0.0], [1.0])  # [0, 1] images already
    session = _session(tmp_path / "asm.onnx")
    x = _digits(3)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = load_model(path)[0](x)
    assert (got - want).abs().max().item() <= MAX_DIFF


def test_alignment_can_be_turned_off(parts, tmp_path):
    code, out, err = run_cli(["export", parts["c27"], "--out", tmp_path / "c.pt2", "--align",
                              "1", "--check-images", "4"])
    assert code == 0, err
    assert "channel counts" not in out
    code, out, err = run_cli(["export", parts["c27"], "--out", tmp_path / "d.pt2",
                              "--check-images", "4"])
    assert code == 0, err
    assert "channel counts padded to multiples of 8: " in out
    code, _, err = run_cli(["export", parts["c27"], "--out", tmp_path / "e.pt2", "--align",
                            "0"])
    assert code == 2 and "--align must be between 1 and 1024, got 0" in err


def test_an_export_that_differs_is_removed(parts, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_compare", lambda *args: (0.25, 2.0))
    out = tmp_path / "model.pt2"
    code, _, err = run_cli(["export", parts["model"], "--out", out])
    assert code == 2
    assert err.strip().splitlines() == [
        f"modellego export: error: the pt2 export of model differs from modellego's outputs "
        f"by 0.25 (max |logit difference| on 64 test images of digits; at most 0.0002 is "
        f"accepted: 0.0001 x max(1, largest |logit|)); nothing was written to {out}; report "
        f"the network"]
    assert list(tmp_path.iterdir()) == []


def test_a_network_torch_export_cannot_capture(parts, tmp_path, monkeypatch):
    def refuse(net, example):
        raise RuntimeError("data-dependent control flow\nsecond line")
    monkeypatch.setattr(export_module, "_captured", refuse)
    report = export(parts["c27"], tmp_path / "c.onnx", check_images=10)
    assert report.exporter == "torch.onnx (torchscript)" and report.max_abs_diff <= MAX_DIFF
    assert json.loads(read_export_metadata(tmp_path / "c.onnx")["modellego.classes"]) == [2, 7]
    with pytest.raises(ExportError, match=r"^cannot export to pt2: torch.export failed "
                                          r"\(RuntimeError: data-dependent control flow\); "
                                          r"try format onnx"):
        export(parts["c27"], tmp_path / "c.pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx"]


def test_without_its_data_an_export_is_checked_on_random_images(parts, tmp_path, monkeypatch):
    from modellego.data import registry
    from modellego.errors import DataError

    def missing(*args, **kwargs):
        raise DataError("dataset 'digits' not found")
    monkeypatch.setattr(registry, "load_split_for", missing)
    report = export(parts["model"], tmp_path / "m.pt2", check_images=5)
    assert report.check_images == 64  # the random images' default count
    assert report.check_source == ("random images (the test data could not be read: "
                                   "dataset 'digits' not found)")


def test_bad_requests_are_one_line_errors(parts, tmp_path):
    cases = [
        (["--out", tmp_path / "m.bin"], "cannot tell the format of"),
        (["--out", tmp_path / "m.onnx", "--check-images", "0"],
         "--check-images must be between 1 and 2048, got 0"),
        (["--out", tmp_path / "missing" / "m.onnx"], "folder"),
        (["--out", parts["model"]], "would overwrite the input"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(["export", parts["model"], *extra])
        assert code == 2, (extra, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("modellego export: error: ")
        assert message in lines[0], (extra, lines[0])
    code, _, err = run_cli(["export", tmp_path / "nope.safetensors", "--out",
                            tmp_path / "m.onnx"])
    assert code == 2 and "does not exist" in err
    with pytest.raises(ExportError, match="`format` 'tflite' is not a format"):
        export_model(torch.nn.Identity(), open_model(parts["model"]).manifest,
                     tmp_path / "m.x", format="tflite")
    assert not any(p.suffix in (".onnx", ".pt2", ".bin", ".x") for p in tmp_path.iterdir())


def test_a_timm_import_and_its_component_export(tmp_path):
    timm = needs("timm")
    from safetensors.torch import save_file

    from modellego import ImportConfig, import_model

    net = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval()
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    model, manifest, _ = import_model(
        tmp_path / "w.safetensors", ImportConfig("timm:resnet10t", "digits", classes=(0, 1, 2, 3),
                                                 input_size=(32, 32), evaluate=False))
    path = tmp_path / "timm.safetensors"
    save_model(path, model, manifest)
    comp, comp_man, _ = disassemble(model, manifest,
                                    DisassemblyConfig((1, 2), preset="paper",
                                                      samples_per_class=5),
                                    source_path=path)
    comp_path = tmp_path / "comp.safetensors"
    save_model(comp_path, comp.model, comp_man)
    assert export(path, tmp_path / "timm.pt2", check_images=16).max_abs_diff <= MAX_DIFF
    report = export(comp_path, tmp_path / "comp.onnx", check_images=16)
    assert report.exporter == "torch.onnx (dynamo)" and report.max_abs_diff <= MAX_DIFF
    assert report.input_shape == (3, 32, 32)


def test_the_tolerance_is_relative_beyond_unit_logits(parts, tmp_path, monkeypatch):
    """1e-4 absolute for logits up to 1, 1e-4 of the largest |logit| beyond: an export whose
    outputs are off by 0.9e-4 of that scale is kept, one off by 1.1e-4 of it is not."""
    real = export_module._run_pt2

    def off_by(share):
        def run_with_error(path):
            run = real(path)

            def shifted(x):
                out = run(x)
                return out + share * out.abs().max()
            return shifted
        return run_with_error

    monkeypatch.setattr(export_module, "_run_pt2", off_by(0.9e-4))
    report = export(parts["model"], tmp_path / "a.pt2", check_images=8)
    assert report.max_abs_diff > MAX_DIFF and report.tolerance > MAX_DIFF
    assert report.max_abs_diff <= report.tolerance
    monkeypatch.setattr(export_module, "_run_pt2", off_by(1.1e-4))
    with pytest.raises(ExportError, match="differs from modellego's outputs"):
        export(parts["model"], tmp_path / "b.pt2", check_images=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt2"]


def test_a_compressed_model_exports(parts, tmp_path):
    from modellego import CompressConfig
    from modellego.workflows import compress

    model, manifest = load_model(parts["model"])
    small, small_manifest, _ = compress(model, manifest,
                                        CompressConfig("l1", target_flops=0.5, reconstruct=0,
                                                       recalibrate_bn=0))
    path = tmp_path / "small.safetensors"
    save_model(path, small, small_manifest)
    report = export(path, tmp_path / "small.onnx", check_images=16)
    assert report.max_abs_diff <= MAX_DIFF and report.exporter == "torch.onnx (dynamo)"
    meta = read_export_metadata(tmp_path / "small.onnx")
    assert json.loads(meta["modellego.classes"]) == list(range(10))
    assert meta["modellego.kind"] == "component"
