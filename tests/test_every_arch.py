"""Every command on every registered architecture, end to end through the CLI.

One tiny model per architecture (width 1/8, one epoch on four digits classes) goes through
train -> evaluate -> disassemble (with --html) -> route -> heatmap -> assemble -> evaluate
-> export (a component as ONNX, the assembly as .pt2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli
from modellego.analysis.locate import profiled_layers
from modellego.files import load_model
from modellego.io import read_manifest
from modellego.models import list_models
from modellego.surgery.graph import build_channel_graph


@pytest.fixture(scope="module", params=list_models())
def trained(request, tmp_path_factory) -> tuple[str, Path]:
    arch = request.param
    path = tmp_path_factory.mktemp(arch) / "model.safetensors"
    code, _, err = run_cli(["train", arch, "--dataset", "digits", "--classes", "0-3",
                            "--epochs", "1", "--width", "0.125", "--batch-size", "64",
                            "--quiet", "--out", path])
    assert code == 0, err
    return arch, path


def _ok(argv: list) -> str:
    code, out, err = run_cli(argv)
    assert code == 0, f"{argv[0]} failed: {err}"
    return out


@pytest.mark.slow
def test_every_command(trained, tmp_path: Path) -> None:
    arch, model_path = trained
    manifest = read_manifest(model_path)
    assert manifest["architecture"]["name"] == arch and manifest["classes"] == [0, 1, 2, 3]

    model, _ = load_model(model_path)
    result = json.loads(_ok(["evaluate", model_path, "--json"]))
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert result["accuracy"] == pytest.approx(manifest["metrics"]["test_accuracy"], abs=1e-12)

    comps = []
    for classes in ("2,0", "1,3"):
        comp = tmp_path / f"comp{classes[0]}.safetensors"
        html = tmp_path / f"comp{classes[0]}.html"
        rep = tmp_path / f"comp{classes[0]}.json"
        _ok(["disassemble", model_path, "--classes", classes, "--rule", "mass",
             "--samples-per-class", "5", "--out", comp, "--report", rep, "--html", html])
        cm = read_manifest(comp)
        assert cm["kind"] == "component" and cm["classes"] == [int(c) for c in classes.split(",")]
        assert json.loads(rep.read_text())["classes"] == cm["classes"]
        page = html.read_text()
        assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
        comps.append(comp)

    route_png, route_json = tmp_path / "route.png", tmp_path / "route.json"
    _ok(["route", model_path, "--classes", "0,1", "--samples-per-class", "5", "--out",
         route_png, "--json", route_json])
    assert route_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    graph = build_channel_graph(model, tuple(manifest["input"]["shape"]))
    layers = {lay.name: lay for lay in profiled_layers(graph)}
    drawn = json.loads(route_json.read_text())["layers"]
    # one row per conv/linear layer, in graph order, with that layer's output width
    assert [row["layer"] for row in drawn] == [lay.name for lay in graph.layers]
    for row, lay in zip(drawn, graph.layers):
        assert row["channels"] == graph.space_size[lay.out_space]

    first = next(iter(layers))
    heat = tmp_path / "heat.svg"
    _ok(["heatmap", model_path, "--layer", first, "--samples-per-class", "3", "--out", heat])
    assert heat.read_text().lstrip().startswith("<?xml")

    asm = tmp_path / "asm.safetensors"
    _ok(["assemble", *comps, "--out", asm])
    am = read_manifest(asm)
    assert am["kind"] == "assembly"
    result = json.loads(_ok(["evaluate", asm, "--json"]))
    per_class = result["per_class"].values()
    assert result["balanced_accuracy"] == pytest.approx(sum(per_class) / len(per_class))
    assert sorted(result["per_class"]) == ["digits:0", "digits:1", "digits:2", "digits:3"]

    # deployment: a component as ONNX, the assembly (components, adapters and router) as a
    # torch.export program, each checked against modellego's logits by the command itself
    for path, out in ((comps[0], tmp_path / "comp.onnx"), (asm, tmp_path / "asm.pt2")):
        text = _ok(["export", path, "--out", out, "--check-images", "8"])
        assert "checked on 8 test images of" in text and out.stat().st_size > 0
