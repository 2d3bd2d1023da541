"""The file-level half of the zoo sweep (``benchmarks/zoo.py``): a random-weight network of
any source, imported as a model file on a generated image folder, two 2-class components cut
from it through the CLI's workflow, saved and loaded again (bit-identical logits), and the two
assembled into one 4-class classifier that is saved and loaded too."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from modellego import (
    AssemblyConfig,
    DisassemblyConfig,
    ImportConfig,
    assemble,
    disassemble,
    import_model,
    load_model,
    save_model,
)
from modellego.analysis.locate import LocateConfig
from modellego.data import load_split, model_input
from modellego.errors import PlanError

CLASSES = 10
IMAGES_PER_CLASS = 5


def image_folder(root: Path, size: int, seed: int = 0) -> Path:
    """``CLASSES`` sub-folders of ``IMAGES_PER_CLASS`` random RGB PNGs of ``size`` px."""
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def _component(model: nn.Module, manifest: dict[str, Any], classes: tuple[int, int],
               locate: Any) -> tuple[Any, dict[str, Any]]:
    """A component cut by the file-level workflow, with ``locate``'s thresholds scaled down
    as far as needed (on random weights a layer may get no contribution on these images)."""
    base = locate or LocateConfig()
    for scale in (1.0, 0.5, 0.25, 0.1):
        config = DisassemblyConfig(
            classes=classes, samples_per_class=3, preset="paper", locate=replace(
                base, alpha_conv=base.alpha_conv * scale, beta_conv=base.beta_conv * scale,
                alpha_linear=base.alpha_linear * scale, beta_linear=base.beta_linear * scale))
        try:
            comp, comp_manifest, _ = disassemble(model, manifest, config, fingerprint=False)
            return comp, comp_manifest
        except PlanError as exc:
            if "would keep no" not in str(exc) or scale == 0.1:
                raise
    raise AssertionError("unreachable")


def files_step(net: nn.Module, architecture: str, kwargs: dict[str, Any], size: int,
               data: Path, locate: Any = None) -> dict[str, Any]:
    """Import ``net`` (random weights, eval mode, ``CLASSES`` outputs) as a model file of
    ``architecture`` on ``folder:data``, cut two 2-class components, save and reload them,
    assemble them into a 4-class classifier; the figures and a status (``ok`` or ``failed:
    ...``). ``locate``: the thresholds the in-memory component was cut with (random
    weights may need lower ones than the default)."""
    t0 = time.perf_counter()
    dataset = f"folder:{data}"
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp_path / "weights.safetensors"))
        model, manifest, _ = import_model(
            tmp_path / "weights.safetensors",
            ImportConfig(architecture, dataset, kwargs=kwargs, input_size=(size, size),
                         evaluate=False))
        save_model(tmp_path / "model.safetensors", model, manifest)
        model, manifest = load_model(tmp_path / "model.safetensors")
        test = load_split(dataset, "test")
        x = model_input(test.images, test.info, manifest.input)
        with torch.no_grad():
            out["model_round_trip_equal"] = bool(torch.equal(model(x), net(x)))
        parts = []
        for classes in ((0, 1), (2, 3)):
            comp, comp_manifest = _component(model, manifest, classes, locate)
            path = tmp_path / f"c{classes[0]}.safetensors"
            save_model(path, comp.model, comp_manifest)
            again, again_manifest = load_model(path)
            with torch.no_grad():
                equal = torch.equal(again(x), comp.model.eval()(x))
            out.setdefault("component_round_trip_equal", True)
            out["component_round_trip_equal"] &= bool(equal)
            parts.append(path)
        # logit scaling: the calibrated router fits a Gaussian per tapped layer, and on a
        # wide flatten head (AlexNet's 9,216 features) that alone takes most of a minute
        assembled, asm_manifest, _ = assemble(parts, AssemblyConfig(scaling="logit",
                                                                    calibration_samples=3),
                                              evaluate=False)
        save_model(tmp_path / "asm.safetensors", assembled, asm_manifest)
        asm_again, _ = load_model(tmp_path / "asm.safetensors")
        images = torch.as_tensor(test.images[:4], dtype=torch.float32)
        with torch.no_grad():
            out["assembly_round_trip_equal"] = bool(torch.equal(
                asm_again(images), assembled.eval()(images)))
        out["assembly_labels"] = len(asm_manifest.classes)
    out["files_seconds"] = round(time.perf_counter() - t0, 2)
    ok = all(out[k] for k in ("model_round_trip_equal", "component_round_trip_equal",
                              "assembly_round_trip_equal")) and out["assembly_labels"] == 4
    out["files_status"] = "ok" if ok else "failed: a round trip changed the logits"
    return out


def _small_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, CLASSES))


def whole_step(net: nn.Module, architecture: str, kwargs: dict[str, Any], size: int,
               data: Path, other: Path) -> dict[str, Any]:
    """Import ``net`` whole on ``folder:data`` with its router fingerprint (as ``modellego
    import`` writes it), and assemble it with a small CNN imported on another folder by the
    default router (``joint``); the assembly must load again with the same logits."""
    from modellego.assembly.fingerprint import fingerprint_model
    from modellego.models.sources import trusted

    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        paths = []
        for k, (network, arch, kw, folder) in enumerate((
                (net, architecture, kwargs, data),
                (_small_cnn(), f"python:{__name__}:_small_cnn", {}, other))):
            state = {n: v.contiguous() for n, v in network.state_dict().items()}
            save_file(state, str(tmp_path / f"w{k}.safetensors"))
            with trusted(__name__):
                model, manifest, _ = import_model(
                    tmp_path / f"w{k}.safetensors",
                    ImportConfig(arch, f"folder:{folder}", kwargs=kw,
                                 input_size=(size, size), evaluate=False))
                manifest, fingerprint = fingerprint_model(model, manifest, per_class=3)
                paths.append(tmp_path / f"m{k}.safetensors")
                save_model(paths[-1], model, manifest, fingerprint=fingerprint)
            if k == 0:
                out["whole_taps"] = list(manifest.router_fingerprint.taps)
        with trusted(__name__):
            assembled, asm_manifest, _ = assemble(paths, AssemblyConfig(calibration_samples=3),
                                                  evaluate=False)
            save_model(tmp_path / "asm.safetensors", assembled, asm_manifest)
            again, _ = load_model(tmp_path / "asm.safetensors")
        images = torch.rand(2, 3, size, size)
        with torch.no_grad():
            equal = torch.equal(again(images), assembled.eval()(images))
        out["whole_labels"] = len(asm_manifest.classes)
    out["whole_seconds"] = round(time.perf_counter() - t0, 2)
    out["whole_status"] = "ok" if equal and out["whole_labels"] == 2 * CLASSES else \
        "failed: the assembly changed the logits on loading"
    return out
