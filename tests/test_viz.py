"""Tests for the figures and reports: decision routes, heatmaps, HTML pages."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_cli
from modellego import DisassemblyConfig, disassemble
from modellego.analysis.locate import LocateConfig, locate_class, profiled_layers
from modellego.analysis.profile import contribution_profile, select_samples
from modellego.data import load_split, normalize
from modellego.errors import ModelLegoError
from modellego.files import save_model
from modellego.models import create_model
from modellego.surgery.graph import build_channel_graph
from modellego.training import TrainConfig, train
from modellego.viz import (
    compute_heatmap,
    compute_route,
    heatmap_data,
    plot_heatmap,
    plot_route,
    route_from_profile,
    route_masks,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory: pytest.TempPathFactory, single_thread):
    """A tiny SimNet trained for two epochs on sklearn digits, and its file."""
    model, manifest = train(TrainConfig(arch="simnet", dataset="digits", epochs=2, width=0.25,
                                        batch_size=32), progress=False)
    path = tmp_path_factory.mktemp("viz") / "simnet.safetensors"
    save_model(path, model, manifest)
    return model, manifest, path


def _digits_train(classes):
    split = load_split("digits", "train").subset(classes)
    return normalize(split.images, split.info), split.labels


def _independent_counts(masks_per_class: list[torch.Tensor], classes) -> dict:
    """Segment sizes of one layer, computed channel by channel from the raw masks."""
    k, n = len(classes), len(masks_per_class[0])
    seg = {"shared": 0, "some": 0, "unused": 0, **{f"class {c}": 0 for c in classes}}
    for j in range(n):
        users = [c for c, m in zip(classes, masks_per_class) if bool(m[j])]
        if not users:
            seg["unused"] += 1
        elif len(users) == 1:
            seg[f"class {users[0]}"] += 1
        elif len(users) == k:
            seg["shared"] += 1
        else:
            seg["some"] += 1
    return seg


def _expected_route(model, x, y, classes, output_classes, k, locate=None):
    """Per layer (topological order) the segments, from locate_class on a fresh profile."""
    locate = locate or LocateConfig()
    graph = build_channel_graph(model, tuple(x.shape[1:]))
    sel = select_samples(model, x, y, classes, output_classes, k=k)
    idx = sel.all_indices()
    prof = contribution_profile(model, {lay.name: lay.module for lay in profiled_layers(graph)},
                                x[idx], y[idx], classes)
    per_class = [locate_class(graph, prof, list(output_classes).index(c), c, locate)
                 for c in classes]
    return [(lay.name, _independent_counts([m[lay.out_space] for m in per_class], classes))
            for lay in graph.layers]


def _check_png(path: Path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG)
    assert len(data) > min_bytes


# ----------------------------------------------------------------------------- route


def test_route_figure_matches_locate_masks(digits_model, tmp_path: Path) -> None:
    model, manifest, _ = digits_model
    classes = [3, 4, 8]
    data = route_masks(model, manifest, classes, samples_per_class=12)
    x, y = _digits_train(classes)
    expected = _expected_route(model, x, y, classes, manifest["classes"], 12)
    assert [lay.name for lay in data.layers] == [name for name, _ in expected]
    out = tmp_path / "route.png"
    drawn = plot_route(data, out)
    assert [d["layer"] for d in drawn] == [name for name, _ in expected]
    for d, (_, seg) in zip(drawn, expected):
        assert d["segments"] == seg, d["layer"]
        assert sum(d["segments"].values()) == d["channels"]
    # the logits: each class uses exactly its own output
    assert drawn[-1]["segments"] == {"shared": 0, "some": 0, "class 3": 1, "class 4": 1,
                                     "class 8": 1, "unused": 7}
    _check_png(out)
    svg = tmp_path / "route.svg"
    plot_route(data, svg)
    text = svg.read_text()
    assert "<svg" in text and len(text) > 5000


def test_route_any_depth_untrained_resnet18(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=3, num_classes=10, input_size=32,
                         width=0.125).eval()
    x = torch.randn(40, 3, 32, 32)
    y = torch.arange(40) % 10
    classes = [1, 2, 5]
    data = compute_route(model, x, y, classes=classes, output_classes=range(10),
                         samples_per_class=3)
    expected = _expected_route(model, x, y, classes, range(10), 3)
    assert len(data.layers) == len(expected) >= 20
    out = tmp_path / "resnet.png"
    drawn = plot_route(data, out)
    assert [(d["layer"], d["segments"]) for d in drawn] == expected
    _check_png(out)


def test_route_agrees_with_disassembly(digits_model) -> None:
    """The union of the classes' routes is what the component located as the OR of its
    classes' masks keeps (no frozen layers); the default's search may instead keep the task
    located as one class, whose plan the routes do not show."""
    model, manifest, _ = digits_model
    found, _, _ = disassemble(model, manifest, DisassemblyConfig((2, 7), samples_per_class=8))
    union = replace(found.locate, task_level=False)
    comp, _, _ = disassemble(model, manifest, DisassemblyConfig((2, 7), samples_per_class=8,
                                                                locate=union))
    assert comp.locate == union and not comp.search  # thresholds given: no search
    route = route_from_profile(comp.graph, comp.profile, (2, 7), manifest["classes"],
                               comp.locate)
    for counts in route.counts():
        assert counts["any"] == len(comp.plan.kept(counts["layer"]))


def test_route_cli(digits_model, tmp_path: Path) -> None:
    model, manifest, path = digits_model
    out, js = tmp_path / "r.png", tmp_path / "r.json"
    code, stdout, err = run_cli(["route", path, "--dataset", "digits", "--classes", "3,4",
                                 "--out", out, "--samples-per-class", "10", "--json", js])
    assert code == 0, err
    _check_png(out)
    data = route_masks(model, manifest, [3, 4], samples_per_class=10)
    assert json.loads(js.read_text())["layers"] == json.loads(json.dumps(data.counts()))
    for counts in data.counts():  # the per-layer shared share is printed
        line = next(ln for ln in stdout.splitlines() if ln.split()[:1] == [counts["layer"]])
        assert f"{100 * counts['shared'] / counts['channels']:.1f}%" in line
    assert "shared" in stdout


def test_route_cli_errors(digits_model, tmp_path: Path) -> None:
    _, _, path = digits_model
    code, _, err = run_cli(["route", path, "--classes", "3,4", "--out", tmp_path / "r.pdf"])
    assert code == 2 and ".png or .svg" in err
    code, _, err = run_cli(["route", path, "--classes", "3,12", "--out", tmp_path / "r.png"])
    assert code == 2 and "out of range" in err
    code, _, err = run_cli(["route", path, "--classes", "3", "--dataset", "mnist",
                            "--out", tmp_path / "r.png"])
    assert code == 2 and "digits" in err
    assert not (tmp_path / "r.png").exists()


# ----------------------------------------------------------------------------- heatmap


@pytest.mark.parametrize("layer", ["features.8", "fc"])
def test_heatmap_matrix_matches_profile(digits_model, tmp_path: Path, layer: str) -> None:
    model, manifest, _ = digits_model
    classes = [0, 3, 4]
    data = heatmap_data(model, manifest, layer, classes, samples_per_class=10)
    x, y = _digits_train(classes)
    sel = select_samples(model, x, y, classes, manifest["classes"], k=10)
    idx = sel.all_indices()
    module = dict(model.named_modules())[layer]
    prof = contribution_profile(model, {layer: module}, x[idx], y[idx], classes)
    totals = prof.layers[layer].sum(1).numpy()          # (classes, input channels)
    lo, hi = totals.min(1, keepdims=True), totals.max(1, keepdims=True)
    expected = (totals - lo) / (hi - lo)
    np.testing.assert_allclose(data.matrix, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(data.totals, totals, rtol=1e-9)
    # per-sample rows: grouped by class, normalised, and a class's rows add up to its row
    assert list(data.sample_labels) == [c for c in classes for _ in range(10)]
    assert np.allclose(data.samples.max(1), 1) and np.allclose(data.samples.min(1), 0)
    for i, c in enumerate(classes):
        np.testing.assert_allclose(data.sample_totals[data.sample_labels == c].sum(0),
                                   totals[i], rtol=1e-6)
    out = tmp_path / "heat.png"
    drawn = plot_heatmap(data, out)
    np.testing.assert_allclose(drawn["matrix"], expected[:, drawn["order"]], atol=1e-12)
    assert sorted(drawn["order"]) == list(range(module.weight.shape[1]))
    _check_png(out)


def test_heatmap_folds_flattened_features(tmp_path: Path) -> None:
    """A linear layer reading a flattened C x H x W map gets one column per channel."""
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, num_classes=10, input_size=28,
                         width=0.5).eval()
    x = torch.randn(30, 1, 28, 28)
    y = torch.arange(30) % 10
    data = compute_heatmap(model, x, y, layer="classifier.0", classes=[0, 1],
                           output_classes=range(10), samples_per_class=3, per_sample=False)
    channels = model.features[3].out_channels
    S = data.profile.layers["classifier.0"].sum(1)       # (2, channels * 5 * 5)
    totals = S.reshape(2, channels, -1).sum(-1).numpy()
    np.testing.assert_allclose(data.totals, totals, rtol=1e-9)
    assert data.matrix.shape == (2, channels) and data.samples is None
    out = tmp_path / "h.svg"
    plot_heatmap(data, out)
    assert "<svg" in out.read_text()


def test_heatmap_unknown_layer(digits_model, tmp_path: Path) -> None:
    model, manifest, path = digits_model
    with pytest.raises(ModelLegoError, match="valid layer names: features.0, features.4, "
                                             "features.8, fc"):
        heatmap_data(model, manifest, "features.1")
    code, _, err = run_cli(["heatmap", path, "--layer", "conv9", "--out", tmp_path / "h.png"])
    assert code == 2 and "features.8" in err and "conv9" in err
    assert not (tmp_path / "h.png").exists()


def test_heatmap_cli(digits_model, tmp_path: Path) -> None:
    _, _, path = digits_model
    out = tmp_path / "h.png"
    code, stdout, err = run_cli(["heatmap", path, "--dataset", "digits", "--layer", "fc",
                                 "--classes", "1,7", "--samples-per-class", "6", "--out", out])
    assert code == 0, err
    _check_png(out)
    assert "class   1 strongest channels" in stdout


# ----------------------------------------------------------------------------- HTML


def _check_page(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert "http" not in page.lower()  # no external resources of any kind
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert uris
    for uri in uris:
        assert base64.b64decode(uri).startswith(PNG)


def test_disassemble_html(digits_model, tmp_path: Path) -> None:
    _, _, path = digits_model
    out, rep, page = tmp_path / "c.safetensors", tmp_path / "r.json", tmp_path / "r.html"
    code, stdout, err = run_cli(["disassemble", path, "--classes", "3,4", "--out", out,
                                 "--samples-per-class", "8", "--report", rep, "--html", page])
    assert code == 0, err
    assert str(page) in stdout
    report = json.loads(rep.read_text())
    html = page.read_text()
    _check_page(html)
    for key in ("source_accuracy", "restricted_accuracy", "component_accuracy"):
        assert f"{report[key]:.4f}" in html
        assert json.dumps(report[key]) in html  # the full JSON report is embedded
    for row in report["per_class"]:
        assert f"{row['component_accuracy']:.4f}" in html
    assert "Decision route" in html and "Provenance" in html
    assert "modellego disassemble" in html  # provenance: made_by / command


def test_disassemble_html_path_checks(digits_model, tmp_path: Path) -> None:
    _, _, path = digits_model
    out = tmp_path / "c.safetensors"
    code, _, err = run_cli(["disassemble", path, "--classes", "3,4", "--out", out,
                            "--html", out])
    assert code == 2 and "--html" in err
    code, _, err = run_cli(["disassemble", path, "--classes", "3,4", "--out", out,
                            "--report", tmp_path / "x", "--html", tmp_path / "x"])
    assert code == 2 and "--report" in err
    code, _, err = run_cli(["disassemble", path, "--classes", "3,4", "--out", out,
                            "--html", tmp_path / "nope" / "r.html"])
    assert code == 2 and "does not exist" in err
    assert not out.exists()


def test_assemble_html(digits_model, tmp_path: Path) -> None:
    model, manifest, _ = digits_model
    parts = []
    for classes in ((3, 4), (8, 9)):
        comp, man, _ = disassemble(model, manifest,
                                   DisassemblyConfig(classes, samples_per_class=8))
        p = tmp_path / f"c{classes[0]}.safetensors"
        save_model(p, comp.model, man)
        parts.append(p)
    out, rep, page = tmp_path / "a.safetensors", tmp_path / "a.json", tmp_path / "a.html"
    code, stdout, err = run_cli(["assemble", *parts, "--out", out, "--report", rep,
                                 "--html", page, "--calibration-samples", "20"])
    assert code == 0, err
    report = json.loads(rep.read_text())["evaluation"]
    html = page.read_text()
    _check_page(html)
    for key in ("accuracy", "balanced_accuracy", "base"):
        assert f"{report[key]:.4f}" in html
        assert json.dumps(report[key]) in html
    for acc in report["per_class"].values():
        assert f"{acc:.4f}" in html
    assert "modellego assemble" in html
