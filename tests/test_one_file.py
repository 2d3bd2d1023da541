"""One file, whichever door: a library verb followed by :func:`modellego.save_model` writes
the bytes the command line writes for the same inputs (the recorded command line passed
alike), the router fingerprint and the source path relative to the file included."""

from __future__ import annotations

import copy
import shlex
import shutil

import pytest
import safetensors.torch

import modellego as ml
from helpers import run_cli
from modellego.files import attach_fingerprint, attached_fingerprint
from modellego.io import read_manifest
from modellego.models import create_model

SOURCE = "source.safetensors"


@pytest.fixture
def here(tmp_path, monkeypatch, simnet_digits_file):
    """A working folder holding the source, with an ``out/`` folder for what is written."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(simnet_digits_file, SOURCE)
    (tmp_path / "out").mkdir()
    return tmp_path


def cli(argv: list[str]) -> str:
    """Run the command line; the command it records."""
    code, _, err = run_cli(argv)
    assert code == 0, err
    return "modellego " + shlex.join(argv)


def same_bytes(a: str, b: str) -> None:
    assert read_manifest(a) == read_manifest(b)  # says where they differ, if they do
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


def test_disassemble_writes_the_cli_file_with_fingerprint_and_relative_source(here):
    argv = ["disassemble", SOURCE, "--classes", "0,1", "--samples-per-class", "10",
            "--reconstruct", "200", "--out", "out/cli.safetensors"]
    command = cli(argv)
    model, manifest = ml.load_model(SOURCE)
    config = ml.DisassemblyConfig((0, 1), samples_per_class=10, reconstruct=200)
    comp, comp_manifest, _ = ml.disassemble(model, manifest, config, source_path=SOURCE,
                                            command=command)
    ml.save_model("out/lib.safetensors", comp.model, comp_manifest)
    same_bytes("out/cli.safetensors", "out/lib.safetensors")
    written = read_manifest("out/lib.safetensors")
    # stored relative to the file's folder, recorded as given (relative to the working one)
    assert written["provenance"]["source"]["file"] == "../" + SOURCE
    assert comp_manifest["provenance"]["source"]["file"] == SOURCE
    assert written["router_fingerprint"]["images"] > 0
    loaded = ml.open_model("out/lib.safetensors")
    assert loaded.fingerprint is not None and set(loaded.fingerprint) == set(
        attached_fingerprint(comp.model))
    # the library's files assemble without any data, as the command line's do
    other, other_manifest, _ = ml.disassemble(
        model, manifest, ml.DisassemblyConfig((2, 3), samples_per_class=10, reconstruct=200),
        source_path=SOURCE)
    ml.save_model("out/other.safetensors", other.model, other_manifest)
    code, out, err = run_cli(["assemble", "out/lib.safetensors", "out/other.safetensors",
                              "--data-free", "--out", "out/asm.safetensors", "--data",
                              "digits=/nonexistent"])
    assert code == 0, err
    assert read_manifest("out/asm.safetensors")["scaling"] == "fingerprint"
    # and in memory: the networks carry their fingerprints into the assembly
    _, asm_manifest, _ = ml.assemble([(comp.model, comp_manifest), (other.model, other_manifest)],
                                     ml.AssemblyConfig(scaling="fingerprint"), evaluate=False)
    assert asm_manifest["provenance"]["calibration"]["data_free"] is True


def test_no_fingerprint_is_the_same_at_both_doors(here):
    argv = ["disassemble", SOURCE, "--classes", "0,1", "--preset", "paper",
            "--samples-per-class", "10", "--no-fingerprint", "--out", "out/cli.safetensors"]
    command = cli(argv)
    model, manifest = ml.load_model(SOURCE)
    comp, comp_manifest, _ = ml.disassemble(
        model, manifest, ml.DisassemblyConfig((0, 1), samples_per_class=10, preset="paper"),
        source_path=SOURCE, command=command, fingerprint=False)
    assert "router_fingerprint" not in comp_manifest
    ml.save_model("out/lib.safetensors", comp.model, comp_manifest)
    same_bytes("out/cli.safetensors", "out/lib.safetensors")


def test_compress_writes_the_cli_file(here):
    argv = ["compress", SOURCE, "--criterion", "l1", "--target-flops", "0.6",
            "--reconstruct", "200", "--out", "out/cli.safetensors"]
    command = cli(argv)
    model, manifest = ml.load_model(SOURCE)
    small, small_manifest, _ = ml.compress(
        model, manifest, ml.CompressConfig("l1", target_flops=0.6, reconstruct=200),
        source_path=SOURCE, command=command)
    ml.save_model("out/lib.safetensors", small, small_manifest)
    same_bytes("out/cli.safetensors", "out/lib.safetensors")
    assert "router_fingerprint" in read_manifest("out/lib.safetensors")


def test_import_and_train_write_the_cli_files(here):
    net = create_model("lenet5", in_channels=1, num_classes=10, input_size=28)
    safetensors.torch.save_file(net.state_dict(), "lenet.safetensors")
    argv = ["import", "lenet5", "--weights", "lenet.safetensors", "--dataset", "digits",
            "--out", "out/cli.safetensors"]
    command = cli(argv)
    model, manifest, _ = ml.import_model("lenet.safetensors",
                                         ml.ImportConfig("lenet5", "digits"), command=command)
    ml.save_model("out/lib.safetensors", model, manifest)
    same_bytes("out/cli.safetensors", "out/lib.safetensors")
    assert "router_fingerprint" in manifest

    argv = ["train", "simnet", "--dataset", "digits", "--epochs", "1", "--width", "0.25",
            "--batch-size", "32", "--quiet", "--out", "out/cli-train.safetensors"]
    command = cli(argv)
    model, manifest = ml.train(ml.TrainConfig(arch="simnet", dataset="digits", epochs=1,
                                              width=0.25, batch_size=32),
                               command=command, progress=False)
    ml.save_model("out/lib-train.safetensors", model, manifest)
    same_bytes("out/cli-train.safetensors", "out/lib-train.safetensors")


def test_a_loaded_fingerprint_is_saved_again_and_a_stored_path_kept(here):
    """Loading and saving keeps what the file had: its fingerprint (kept with the network)
    and a source path stored relative to its own folder (not taken as the working folder's)."""
    model, manifest = ml.load_model(SOURCE)
    comp, comp_manifest, _ = ml.disassemble(
        model, manifest, ml.DisassemblyConfig((0, 1), samples_per_class=10, preset="paper"),
        source_path=SOURCE)
    ml.save_model("out/comp.safetensors", comp.model, comp_manifest)
    again, again_manifest = ml.load_model("out/comp.safetensors")
    ml.save_model("out/copy.safetensors", again, again_manifest)
    same_bytes("out/comp.safetensors", "out/copy.safetensors")
    tensors = safetensors.torch.load_file("out/copy.safetensors")
    assert any(k.startswith("@fingerprint/") for k in tensors)
    # an explicit fingerprint still wins; a manifest without one writes none
    plain = {k: v for k, v in again_manifest.to_dict().items() if k != "router_fingerprint"}
    ml.save_model("out/plain.safetensors", again, plain)
    assert not any(k.startswith("@fingerprint/") for k in
                   safetensors.torch.load_file("out/plain.safetensors"))
    bare = copy.deepcopy(again)
    attach_fingerprint(bare, None)
    with pytest.raises(ml.ModelFileError, match="needs both its tensors"):
        ml.save_model("out/bad.safetensors", bare, again_manifest)
    assert not (here / "out" / "bad.safetensors").exists()


@pytest.mark.parametrize("provenance, field", [
    ("x", "provenance"), ({"source": "y"}, "provenance.source"),
    ({"source": {"file": 5}}, "provenance.source.file")])
def test_a_malformed_source_record_is_refused_in_one_line(here, provenance, field):
    model, manifest = ml.load_model(SOURCE)
    with pytest.raises(ml.ModelFileError, match=f"manifest field {field}: expected"):
        ml.save_model("out/x.safetensors", model, {**manifest, "provenance": provenance})
    assert not (here / "out" / "x.safetensors").exists()


def test_assemble_writes_the_cli_file(here):
    model, manifest = ml.load_model(SOURCE)
    for name, classes in (("a", (0, 1)), ("b", (2, 3))):
        comp, comp_manifest, _ = ml.disassemble(
            model, manifest, ml.DisassemblyConfig(classes, samples_per_class=10,
                                                  preset="paper"),
            source_path=SOURCE, fingerprint=False)
        ml.save_model(f"out/{name}.safetensors", comp.model, comp_manifest)
    argv = ["assemble", "out/a.safetensors", "out/b.safetensors", "--calibration-samples",
            "50", "--out", "out/cli.safetensors"]
    command = cli(argv)
    assembled, asm_manifest, report = ml.assemble(
        ["out/a.safetensors", "out/b.safetensors"], ml.AssemblyConfig(calibration_samples=50),
        command=command)
    ml.save_model("out/lib.safetensors", assembled, asm_manifest)
    same_bytes("out/cli.safetensors", "out/lib.safetensors")
    assert asm_manifest["metrics"]["test_accuracy"] == report["evaluation"]["accuracy"]
