"""Tests for assembly: label maps, input contracts, scalings, layouts, files and the CLI."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import randomize_bn, run, run_cli
from modellego.assembly import (
    AssembledModel,
    AssemblyConfig,
    InputAdapter,
    contract_shape,
    convert_images,
    evaluate_assembly,
    label_map,
    union_test_set,
)
from modellego.assembly.core import build_assembly
from modellego.assembly.padded import PaddedBody
from modellego.assembly.parts import Part
from modellego.assembly.scalings import JOINT_L2, SPREAD_FLOOR, feature_spread
from modellego.assembly.scoring import FeatureTap, pooled, tap_layers
from modellego.data import dataset_info, load_split, normalize
from modellego.disassembly import DisassemblyConfig, disassemble_model
from modellego.errors import ModelLegoError
from modellego.files import load_model, save_model
from modellego.io import read_manifest
from modellego.manifest import Manifest, as_manifest
from modellego.metrics import predict_logits
from modellego.models import create_model
from modellego.training import TrainConfig, train
from modellego.workflows import assemble

A_CLASSES = (0, 1, 2, 3, 4)
B_CLASSES = (5, 6, 7, 8, 9)
ARCHS = ["simnet", "vgg11_bn", "resnet18", "mobilenet_v2", "googlenet"]
TOL = 1e-5


# --------------------------------------------------------------------------- helpers


def fake_manifest(template: Manifest | dict, arch: str, kwargs: dict, classes, *,
                  dataset: str | None = None, input_shape=None) -> dict:
    """A model manifest (JSON data) for a random-weight network, copied from a trained
    one."""
    man = copy.deepcopy(as_manifest(template).to_dict())
    man.pop("metrics", None)
    man["kind"] = "model"
    man["architecture"] = {"name": arch, "kwargs": dict(kwargs)}
    if dataset is not None:
        info = dataset_info(dataset)
        man["dataset"] = info.to_dict()
        man["input"] = {"shape": list(info.input_shape), "mean": list(info.mean),
                        "std": list(info.std)}
    if input_shape is not None:
        c = input_shape[0]
        man["input"] = {"shape": list(input_shape), "mean": [0.3] * c, "std": [0.3] * c}
    names = man["dataset"]["class_names"]
    man["classes"] = [int(c) for c in classes]
    man["class_names"] = [names[c] for c in classes]
    return man


def fake_part(template: dict, arch: str, classes, seed: int, *, width: float = 0.125,
              in_channels: int = 1, input_size: int = 28, dataset: str | None = None
              ) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    kwargs = {"in_channels": in_channels, "num_classes": len(classes),
              "input_size": input_size, "width": width}
    net = randomize_bn(create_model(arch, **kwargs), seed).eval()
    shape = None if in_channels == 1 and input_size == 28 else (in_channels, input_size,
                                                               input_size)
    return net, fake_manifest(template, arch, kwargs, classes, dataset=dataset,
                              input_shape=shape)


def own_logits(part: tuple[nn.Module, dict], images: torch.Tensor) -> torch.Tensor:
    """A part's logits on ``[0, 1]`` images of its input shape, normalised its own way."""
    net, man = part
    mean = torch.tensor(man["input"]["mean"]).view(-1, 1, 1)
    std = torch.tensor(man["input"]["std"]).view(-1, 1, 1)
    return run(net, (images - mean) / std)


def digits_test(classes=None) -> torch.Tensor:
    split = load_split("digits", "test")
    return (split if classes is None else split.subset(classes)).images


# --------------------------------------------------------------------------- fixtures


def _train(classes) -> tuple[nn.Module, dict]:
    config = TrainConfig(arch="simnet", dataset="digits", epochs=4, width=0.25,
                         classes=classes, batch_size=32)
    return train(config, progress=False)


@pytest.fixture(scope="module")
def part_a(single_thread) -> tuple[nn.Module, dict]:
    """simnet trained on digits 0-4."""
    return _train(A_CLASSES)


@pytest.fixture(scope="module")
def part_b(single_thread) -> tuple[nn.Module, dict]:
    """simnet trained on digits 5-9."""
    return _train(B_CLASSES)


@pytest.fixture(scope="module")
def part_c(single_thread) -> tuple[nn.Module, dict]:
    """simnet trained on all ten digits (duplicates every label of A and B)."""
    return _train(None)


@pytest.fixture(scope="module")
def part_f(part_a) -> tuple[nn.Module, dict]:
    """Random-weight simnet for Fashion-MNIST classes 0, 1, 2 (another dataset)."""
    return fake_part(part_a[1], "simnet", (0, 1, 2), 7, width=0.25, dataset="fashion-mnist")


@pytest.fixture(scope="module")
def files(tmp_path_factory, part_a, part_b, part_c) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("parts")
    out = {}
    for name, (net, man) in (("a", part_a), ("b", part_b), ("c", part_c)):
        out[name] = folder / f"{name}.safetensors"
        save_model(out[name], net, man)
    return out


# --------------------------------------------------------------------------- label map


def test_label_order_is_part_order_then_class_order(part_a, part_b, part_f):
    model, man, _ = assemble([part_b, part_a, part_f], AssemblyConfig(scaling="none"))
    keys = [(lab["dataset"], lab["class"]) for lab in man["labels"]]
    assert keys == ([("digits", c) for c in B_CLASSES] + [("digits", c) for c in A_CLASSES]
                    + [("fashion-mnist", c) for c in (0, 1, 2)])
    assert [lab["part"] for lab in man["labels"]] == [0] * 5 + [1] * 5 + [2] * 3
    assert [lab["part_output"] for lab in man["labels"]] == [0, 1, 2, 3, 4] * 2 + [0, 1, 2]
    fashion = dataset_info("fashion-mnist").class_names
    assert man["class_names"] == ([f"digits:{c}" for c in B_CLASSES]
                                  + [f"digits:{c}" for c in A_CLASSES]
                                  + [f"fashion-mnist:{fashion[c]}" for c in (0, 1, 2)])
    assert [lab["name"] for lab in man["labels"]][-3:] == list(fashion[:3])
    assert man["classes"] == list(range(13))
    assert len(man["parts"]) == 3
    assert [p["dataset"]["name"] for p in man["parts"]] == ["digits", "digits", "fashion-mnist"]
    assert man["input"]["shape"] == [1, 28, 28]
    x = digits_test()[:7]
    assert run(model, x).shape == (7, 13)


def test_label_map_on_plain_manifests(part_a, part_c):
    labels, columns = label_map([part_c[1], part_a[1]], "replace")
    assert columns == [[5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]
    assert [(lab["class"], lab["part"]) for lab in labels] == (
        [(c, 0) for c in B_CLASSES] + [(c, 1) for c in A_CLASSES])


def test_duplicates_are_refused_by_default(part_a, part_c):
    with pytest.raises(ModelLegoError) as info:
        assemble([part_c, part_a], AssemblyConfig(scaling="none"))
    msg = str(info.value)
    assert "part 0" in msg and "part 1" in msg
    assert "class 0" in msg and "digits" in msg
    assert "`on_duplicate` replace" in msg  # the library names its parameter (CLI: its flag)


def test_replace_keeps_the_later_parts_column(part_a, part_c):
    model, man, _ = assemble([part_c, part_a],
                          AssemblyConfig(scaling="none", on_duplicate="replace"))
    assert [(lab["class"], lab["part"], lab["part_output"]) for lab in man["labels"]] == (
        [(c, 0, c) for c in B_CLASSES] + [(c, 1, i) for i, c in enumerate(A_CLASSES)])
    assert model.columns0.tolist() == [5, 6, 7, 8, 9]
    assert model.columns1.tolist() == [0, 1, 2, 3, 4]
    x = digits_test()[:50]
    expected = torch.cat([own_logits(part_c, x)[:, 5:], own_logits(part_a, x)], 1)
    assert torch.equal(run(model, x), expected)


def test_replace_that_leaves_a_part_empty_is_refused(part_a, part_c):
    with pytest.raises(ModelLegoError, match="part 0 has no outputs left"):
        assemble([part_a, part_c], AssemblyConfig(scaling="none", on_duplicate="replace"))


def test_replace_fixes_a_weak_class(part_a, part_c):
    weak_net = copy.deepcopy(part_c[0])
    with torch.no_grad():  # the weak part can never predict class 3
        weak_net.fc.weight[3].zero_()
        weak_net.fc.bias[3] = -100.0
    weak = (weak_net.eval(), copy.deepcopy(part_c[1]))
    threes = digits_test([3])
    weak_acc = float((own_logits(weak, threes).argmax(1) == 3).double().mean())
    assert weak_acc == 0.0
    for scaling in ("none", "calibrated"):
        model, man, _ = assemble([weak, part_a],
                              AssemblyConfig(scaling=scaling, on_duplicate="replace"))
        result = evaluate_assembly(model, man)
        assert result["per_class"]["digits:3"] >= 0.5 + weak_acc, (scaling, result)
        assert len(result["per_class"]) == 10


# --------------------------------------------------------------------------- scalings


def test_scaling_none_concatenates_the_parts_own_logits(part_a, part_b, part_f):
    model, man, _ = assemble([part_a, part_b, part_f], AssemblyConfig(scaling="none"))
    assert man["provenance"]["calibration"] == {"scaling": "none"}
    for x in (digits_test()[:64], load_split("fashion-mnist", "test").images[:64]):
        expected = torch.cat([own_logits(p, x) for p in (part_a, part_b, part_f)], 1)
        assert torch.equal(run(model, x), expected)


def test_scaling_logit_divides_by_the_mean_winning_logit(part_a, part_b):
    # more calibration samples than any class has: calibration uses every training image
    model, man, _ = assemble([part_a, part_b],
                          AssemblyConfig(scaling="logit", calibration_samples=10_000))
    split = load_split("digits", "train")
    for k, part in enumerate((part_a, part_b)):
        net, pman = part
        sub = split.subset(pman["classes"])
        logits = predict_logits(net, normalize(sub.images, sub.info))
        pred = logits.argmax(1)
        expected = []
        for i, c in enumerate(pman["classes"]):
            ok = (sub.labels == c) & (pred == i)
            expected.append(1.0 / float(logits[ok, i].mean()))
        scale = getattr(model, f"scale{k}")
        assert torch.allclose(scale, torch.tensor(expected), rtol=1e-4, atol=0), k
        assert not torch.equal(scale, torch.ones(5))
    x = digits_test()[:40]
    expected = torch.cat([own_logits(part_a, x) * model.scale0,
                          own_logits(part_b, x) * model.scale1], 1)
    assert torch.allclose(run(model, x), expected, atol=1e-6, rtol=0)


def test_scaling_feature_is_one_factor_per_part(part_a, part_b):
    model, man, _ = assemble([part_a, part_b], AssemblyConfig(scaling="feature"))
    mags = man["provenance"]["calibration"]["feature_magnitudes"]
    avg = sum(mags) / 2
    for k in range(2):
        scale = getattr(model, f"scale{k}")
        assert torch.allclose(scale, torch.full((5,), avg / mags[k]))


def test_calibrated_is_not_worse_than_none(part_a, part_b):
    none = evaluate_assembly(*assemble([part_a, part_b], AssemblyConfig(scaling="none"))[:2])
    model, man, _ = assemble([part_a, part_b], AssemblyConfig(scaling="calibrated"))
    calib = evaluate_assembly(model, man)
    assert calib["balanced_accuracy"] >= none["balanced_accuracy"] - 0.02, (
        f"calibrated balanced accuracy {calib['balanced_accuracy']:.4f}, "
        f"none {none['balanced_accuracy']:.4f}")
    info = man["provenance"]["calibration"]
    assert 0.0 < info["router_fit_accuracy"] <= 1.0
    assert info["taps"] == man["taps"] and len(man["taps"]) == 2
    assert calib["base"] == pytest.approx(none["base"])
    assert calib["n"] == none["n"] == len(load_split("digits", "test"))


@pytest.mark.parametrize("scaling", ["none", "logit", "feature", "calibrated", "joint"])
def test_calibration_never_reads_the_test_split(scaling, part_a, part_b, part_f,
                                                monkeypatch):
    seen = []
    original = load_split

    def guarded(name, split, *args, **kwargs):
        seen.append((name, split))
        if split == "test":
            raise AssertionError(f"assemble read the test split of {name}")
        return original(name, split, *args, **kwargs)

    patched = 0
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("modellego") and getattr(mod, "load_split", None) is original:
            monkeypatch.setattr(mod, "load_split", guarded)
            patched += 1
    assert patched >= 2  # modellego.data and modellego.assembly.core at least
    model, man, _ = assemble([part_a, part_b, part_f],
                             AssemblyConfig(scaling=scaling, calibration_samples=50),
                             evaluate=False)
    if scaling == "none":  # nothing to calibrate: no images read at all
        assert not [s for s in seen if s[1] in ("train", "val")]
    else:
        assert ("digits", "train") in seen and ("fashion-mnist", "train") in seen
    with pytest.raises(AssertionError, match="test split"):  # the guard is really in place
        union_test_set(man)


def test_feature_spread_floors_constant_features():
    """A feature constant up to float rounding is standardised by 1 % of its size (its noise
    no longer scaled up a million-fold); a varying one by its standard deviation; an all-zero
    one by 1e-6."""
    gen = torch.Generator().manual_seed(0)
    varying = torch.randn(200, generator=gen) * 0.5 + 3.0
    constant = 2.5 + 1e-7 * torch.randn(200, generator=gen)
    f = torch.stack([varying, constant, torch.zeros(200)], 1)
    spread = feature_spread(f)
    assert spread.dtype == torch.float32
    assert spread[0].item() == pytest.approx(varying.double().std().item(), rel=1e-6)
    assert spread[1].item() == pytest.approx(SPREAD_FLOOR * 2.5, rel=1e-6)
    assert spread[2].item() == pytest.approx(1e-6)
    # the rounding noise of the constant feature stays below 1e-4 once standardised
    z = (f - f.mean(0)) / spread
    assert z[:, 1].abs().max().item() < 1e-4


def test_joint_router_reads_every_parts_features(part_a, part_b, part_f):
    """One linear router over the standardised tapped features of all parts: as many weights
    per part as all parts' features together, its penalty chosen on held-out images, and
    routing at least as good as none's."""
    parts = [part_a, part_b, part_f]
    none = evaluate_assembly(*assemble(parts, AssemblyConfig(scaling="none"))[:2])
    model, man, _ = assemble(parts, AssemblyConfig(scaling="joint", calibration_samples=60))
    joint = evaluate_assembly(model, man)
    info = man["provenance"]["calibration"]
    dims = [router.feat_mean.numel() for router in model.routers]
    assert [router.weight.numel() for router in model.routers] == [sum(dims)] * 3
    assert info["router_weights"] == 3 * sum(dims) + 3
    assert info["l2"] in JOINT_L2 and set(info["held_out_routing_accuracy"]) == {
        str(v) for v in JOINT_L2}
    assert info["fit_images"] == sum(60 * len(p[1]["classes"]) for p in parts)
    assert joint["routing"]["routing_accuracy"] >= none["routing"]["routing_accuracy"]
    assert joint["balanced_accuracy"] >= none["balanced_accuracy"] - 0.02


def test_calibrated_with_two_samples_per_class_stays_finite(part_a, part_b, tmp_path):
    # Regression: the fit/route halves were not split per class, so a class could end up
    # without fitting images; its Gaussian mean became NaN and so did every output.
    model, man, _ = assemble([part_a, part_b],
                          AssemblyConfig(scaling="calibrated", calibration_samples=2))
    assert all(torch.isfinite(b).all() for b in model.buffers())
    x = digits_test()[:30]
    assert torch.isfinite(run(model, x)).all()
    save_model(tmp_path / "m.safetensors", model, man)
    assert torch.equal(run(load_model(tmp_path / "m.safetensors")[0], x), run(model, x))


# --------------------------------------------------------------------------- layouts


def _compare_layouts(parts, scaling: str) -> None:
    config = dict(scaling=scaling, calibration_samples=20)
    par, man_p, _ = assemble(parts, AssemblyConfig(layout="parallel", **config))
    pad, man_d, _ = assemble(parts, AssemblyConfig(layout="padded", **config))
    assert isinstance(pad.body, PaddedBody)
    assert man_p["labels"] == man_d["labels"]
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out_p, out_d = run(par, x), run(pad, x)
    assert out_p.shape == (6, len(man_p["labels"]))
    diff = (out_p - out_d).abs().max().item()
    assert diff <= TOL, f"padded differs from parallel by {diff}"


@pytest.mark.parametrize("scaling", ["none", "logit"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_equals_parallel(arch, scaling, part_a):
    parts = [fake_part(part_a[1], arch, A_CLASSES, 1),
             fake_part(part_a[1], arch, (5, 6, 7), 2)]
    _compare_layouts(parts, scaling)


@pytest.fixture(scope="module")
def noise() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(40, 1, 28, 28, generator=gen), torch.arange(40) % 5


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_equals_parallel_for_components(arch, part_a, noise):
    x, y = noise
    torch.manual_seed(3)
    kwargs = {"in_channels": 1, "num_classes": 10, "input_size": 28, "width": 0.25}
    source = randomize_bn(create_model(arch, **kwargs), 3).eval()
    parts, plans = [], []
    for classes in ((0, 1), (2, 3, 4)):
        comp = disassemble_model(source, x, y, classes=classes, output_classes=range(10),
                                 config=DisassemblyConfig(classes, samples_per_class=5))
        man = fake_manifest(part_a[1], arch, kwargs, classes)
        man.update(kind="component", plan=comp.plan.to_dict())
        parts.append((comp.model, man))
        plans.append(comp.plan)
    # the two components really have different channel counts
    assert any(len(plans[0].kept(n)) != len(plans[1].kept(n)) for n in plans[0].modules)
    for scaling in ("none", "logit"):
        _compare_layouts(parts, scaling)


def test_padded_equals_parallel_across_datasets(part_a, part_f):
    # different input normalisations: the adapted images are stacked along channels
    parts = [part_a, part_f]
    model, _, _ = assemble(parts, AssemblyConfig(layout="padded", scaling="none"))
    assert not model.body.shared_input
    for scaling in ("none", "logit"):
        _compare_layouts(parts, scaling)


def test_padded_needs_one_architecture(part_a):
    parts = [fake_part(part_a[1], "simnet", A_CLASSES, 1),
             fake_part(part_a[1], "vgg11_bn", B_CLASSES, 2)]
    with pytest.raises(ModelLegoError, match="parallel"):
        assemble(parts, AssemblyConfig(layout="padded", scaling="none"))
    assemble(parts, AssemblyConfig(layout="parallel", scaling="none"))  # fine


def test_padded_with_calibrated_is_refused(part_a, part_b):
    with pytest.raises(ModelLegoError, match="parallel"):
        assemble([part_a, part_b], AssemblyConfig(layout="padded", scaling="calibrated"))


def test_invalid_config_values_are_refused(part_a, part_b):
    for bad in (dict(layout="stacked"), dict(scaling="magic"), dict(on_duplicate="keep"),
                dict(calibration_samples=1)):
        with pytest.raises(ModelLegoError):
            assemble([part_a, part_b], AssemblyConfig(**bad))
    with pytest.raises(ModelLegoError, match="at least two"):
        assemble([part_a], AssemblyConfig(scaling="none"))


# --------------------------------------------------------------------------- files


COMBOS = [("parallel", s) for s in ("none", "logit", "feature", "calibrated", "joint")] + [
    ("padded", s) for s in ("none", "logit", "feature")]


@pytest.mark.parametrize("layout,scaling", COMBOS)
def test_save_load_round_trip_is_bit_identical(layout, scaling, files, tmp_path):
    model, man, _ = assemble([files["a"], files["b"]],
                          AssemblyConfig(layout=layout, scaling=scaling,
                                         calibration_samples=50))
    assert isinstance(model, AssembledModel)
    path = tmp_path / "asm.safetensors"
    save_model(path, model, man)
    loaded, man2 = load_model(path)
    assert man2["kind"] == "assembly"
    assert man2["labels"] == man["labels"]
    assert man2["class_names"] == man["class_names"]
    assert (man2["layout"], man2["scaling"]) == (layout, scaling)
    assert [p["file"] for p in man2["parts"]] == [str(files["a"]), str(files["b"])]
    assert all(len(p["sha256"]) == 64 for p in man2["parts"])
    x = digits_test()[::4]
    assert torch.equal(run(model, x), run(loaded, x))
    assert type(loaded.body) is type(model.body)


# --------------------------------------------------------------------------- input contract


def test_contract_is_the_largest_shape(part_a):
    assert contract_shape([{"shape": [1, 28, 28]}, {"shape": [3, 32, 32]}]) == (3, 32, 32)
    assert contract_shape([{"shape": [1, 28, 28]}, {"shape": [1, 28, 28]}]) == (1, 28, 28)


def test_grey_part_next_to_rgb_part(part_a):
    # An RGB 32x32 part (random weights; its manifest claims the digits dataset so that
    # calibration has images) next to the grey 28x28 digits part.
    rgb = fake_part(part_a[1], "simnet", B_CLASSES, 4, in_channels=3, input_size=32)
    model, man, _ = assemble([part_a, rgb], AssemblyConfig(scaling="none"))
    assert man["input"]["shape"] == [3, 32, 32]
    assert man["input"]["adapters"][0] == "RGB -> grey (mean), resize to 28x28, normalise"
    assert man["input"]["adapters"][1] == "normalise"
    grey = digits_test()[:20]
    x = convert_images(grey, 3, (32, 32))
    assert x.shape == (20, 3, 32, 32)
    back = F.interpolate(x.mean(1, keepdim=True), size=(28, 28), mode="bilinear",
                         align_corners=False)
    expected = torch.cat([own_logits(part_a, back), own_logits(rgb, x)], 1)
    assert torch.equal(run(model, x), expected)
    # the union test set is converted to the contract as well
    xs, ys = union_test_set(man)
    assert xs.shape[1:] == (3, 32, 32) and len(xs) == len(ys)


def test_input_adapter_rgb_to_grey_and_resize():
    x = torch.arange(48, dtype=torch.float32).view(1, 3, 4, 4) / 48
    adapter = InputAdapter((3, 4, 4), {"shape": [1, 2, 2], "mean": [0.25], "std": [0.5]})
    out = adapter(x)
    grey = x.mean(1, keepdim=True)
    # 4x4 -> 2x2 bilinear (align_corners=False) samples at 0.5 and 2.5: the mean of 2x2 blocks
    by_hand = torch.tensor([[grey[0, 0, :2, :2].mean(), grey[0, 0, :2, 2:].mean()],
                            [grey[0, 0, 2:, :2].mean(), grey[0, 0, 2:, 2:].mean()]])
    interp = F.interpolate(grey, size=(2, 2), mode="bilinear", align_corners=False)
    assert torch.allclose(interp[0, 0], by_hand, atol=1e-7)
    assert torch.equal(out, (interp - 0.25) / 0.5)
    assert out.shape == (1, 1, 2, 2)
    assert adapter.describe() == "RGB -> grey (mean), resize to 2x2, normalise"


def test_input_adapter_grey_to_rgb_and_upsample():
    x = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    adapter = InputAdapter((1, 2, 2), {"shape": [3, 3, 3], "mean": mean, "std": std})
    out = adapter(x)
    up = F.interpolate(x, size=(3, 3), mode="bilinear", align_corners=False)
    # centre pixel of a 2x2 -> 3x3 upsampling is the mean of all four
    assert up[0, 0, 1, 1].item() == pytest.approx(0.4375)
    assert up[0, 0, 0, 0].item() == 0.0 and up[0, 0, 0, 2].item() == 1.0
    assert out.shape == (1, 3, 3, 3)
    for c in range(3):
        assert torch.equal(out[0, c], (up[0, 0] - mean[c]) / std[c])
    same = InputAdapter((1, 2, 2), {"shape": [3, 2, 2], "mean": [0.0] * 3, "std": [1.0] * 3})
    assert torch.equal(same(x), x.expand(-1, 3, -1, -1))
    assert torch.equal(convert_images(x, 3, (2, 2)), x.expand(-1, 3, -1, -1))


def test_two_channel_part_next_to_rgb_part_is_refused(part_a):
    with pytest.raises(ModelLegoError, match="channels"):
        InputAdapter((3, 28, 28), {"shape": [2, 28, 28], "mean": [0, 0], "std": [1, 1]})
    two = fake_part(part_a[1], "simnet", A_CLASSES, 5, in_channels=2)
    rgb = fake_part(part_a[1], "simnet", B_CLASSES, 6, in_channels=3)
    with pytest.raises(ModelLegoError, match="grey <-> RGB"):
        assemble([two, rgb], AssemblyConfig(scaling="none"))
    with pytest.raises(ModelLegoError):
        convert_images(torch.zeros(1, 2, 4, 4), 3, (4, 4))


# --------------------------------------------------------------------------- CLI


def test_cli_assemble_then_evaluate(files, tmp_path):
    out = tmp_path / "ab.safetensors"
    code, text, err = run_cli(["assemble", str(files["a"]), str(files["b"]), "--out",
                               str(out), "--scaling", "logit"])
    assert code == 0, err
    assert out.is_file() and "wrote" in text
    code, text, err = run_cli(["evaluate", str(out), "--json", "--no-latency"])
    assert code == 0, err
    result = json.loads(text)
    for key in ("accuracy", "balanced_accuracy", "base", "per_class", "params", "flops", "n"):
        assert key in result
    assert "latency_ms" not in result
    assert sorted(result["per_class"]) == sorted(f"digits:{c}" for c in range(10))
    per_class = result["per_class"].values()
    assert result["balanced_accuracy"] == pytest.approx(sum(per_class) / len(per_class))
    assert result["accuracy"] == read_manifest(out)["metrics"]["test_accuracy"]
    assert result["per_class"]["digits:3"] > 0.5
    manifest = load_model(out)[1]
    assert manifest["metrics"]["test_accuracy"] == pytest.approx(result["accuracy"])
    assert manifest["scaling"] == "logit"


def test_cli_assembly_cannot_be_evaluated_on_another_dataset(files, tmp_path):
    out = tmp_path / "ab.safetensors"
    code, _, err = run_cli(["assemble", str(files["a"]), str(files["b"]), "--out", str(out),
                            "--scaling", "none"])
    assert code == 0, err
    code, _, err = run_cli(["evaluate", str(out), "--dataset", "digits"])
    assert code == 2
    assert "--dataset" in err


def test_cli_assemble_needs_two_files(files, tmp_path):
    out = tmp_path / "one.safetensors"
    code, _, err = run_cli(["assemble", str(files["a"]), "--out", str(out)])
    assert code == 2
    assert "two" in err
    assert not out.exists()


def test_cli_assemble_into_a_missing_folder(files, tmp_path):
    out = tmp_path / "missing" / "ab.safetensors"
    code, _, err = run_cli(["assemble", str(files["a"]), str(files["b"]), "--out", str(out)])
    assert code == 2
    assert "does not exist" in err
    assert not out.parent.exists()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- union layout


def _component_file(part, classes, path: Path, source: Path, **fields) -> Path:
    """Disassemble ``part`` (saved at ``source``) for ``classes`` and save the component
    (the plain cut of the paper preset unless ``fields`` say otherwise)."""
    fields = {"preset": "paper", **fields}
    from modellego import disassemble

    net, man = part
    comp, comp_man, _ = disassemble(net, man, DisassemblyConfig(tuple(classes), **fields),
                                    source_path=source)
    save_model(path, comp.model, comp_man)
    return path


def test_union_refuses_parts_repaired_after_the_cut(files, part_a, tmp_path):
    plain = _component_file(part_a, (0, 1), tmp_path / "c01.safetensors", files["a"])
    fixed = _component_file(part_a, (2, 4), tmp_path / "c24.safetensors", files["a"],
                            preset="default", samples_per_class=5, reconstruct=50)
    with pytest.raises(ModelLegoError, match=r"part 1 was repaired after the cut "
                                             r"\(reconstruct\).*use `layout` parallel"):
        assemble([plain, fixed], AssemblyConfig(layout="union", scaling="none"))
    parallel, man_p, report = assemble([plain, fixed],
                                       AssemblyConfig(layout="parallel", scaling="none"))
    assert report.evaluation == evaluate_assembly(parallel, man_p)
    assert report.evaluation is not None and report.evaluation.balanced_accuracy > 0


def test_union_equals_the_source_masked_by_the_union_of_plans(files, part_a, tmp_path):
    from modellego.io import read_manifest

    c1 = _component_file(part_a, (1, 3), tmp_path / "c13.safetensors", files["a"])
    c2 = _component_file(part_a, (0,), tmp_path / "c0.safetensors", files["a"])
    model, man, _ = assemble([c1, c2], AssemblyConfig(layout="union", scaling="none"))
    plans = [read_manifest(c)["plan"] for c in (c1, c2)]
    source, _ = load_model(files["a"])
    modules = dict(source.named_modules())
    handles = []

    def zero_outside(keep):
        def hook(module, args):
            x = args[0].clone()
            drop = torch.ones(x.shape[1], dtype=torch.bool)
            drop[torch.tensor(sorted(keep))] = False
            x[:, drop] = 0
            return (x,)
        return hook

    for name in plans[0]:
        if "in" in plans[0][name] and isinstance(modules[name], (nn.Conv2d, nn.Linear)):
            keep = set(plans[0][name]["in"]) | set(plans[1][name]["in"])
            handles.append(modules[name].register_forward_pre_hook(zero_outside(keep)))
    raw = digits_test()[:20]
    try:
        expected = run(source, normalize(raw, dataset_info("digits")))[:, [1, 3, 0]]
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(run(model, raw), expected, rtol=0, atol=1e-5)
    assert man["union"]["source"]["sha256"] == man["parts"][0]["source"]["sha256"]


def test_union_computes_shared_channels_once(files, part_a, tmp_path):
    c1 = _component_file(part_a, (0, 1), tmp_path / "c01.safetensors", files["a"])
    c2 = _component_file(part_a, (2, 4), tmp_path / "c24.safetensors", files["a"])
    union, man, _ = assemble([c1, c2], AssemblyConfig(layout="union", scaling="none"))
    parallel, man_p, _ = assemble([c1, c2], AssemblyConfig(layout="parallel", scaling="none"))
    ev_u, ev_p = evaluate_assembly(union, man), evaluate_assembly(parallel, man_p)
    assert ev_u["flops"] < ev_p["flops"]
    assert [lab["class"] for lab in man["labels"]] == [0, 1, 2, 4]
    # Base is measured on the components themselves, so both layouts report the same Base
    assert ev_u["base"] == pytest.approx(ev_p["base"], abs=1e-12)
    out = tmp_path / "u.safetensors"
    save_model(out, union, man)
    again, _ = load_model(out)
    x = digits_test()[:9]
    assert torch.equal(run(again, x), run(union, x))


@pytest.mark.parametrize("scaling", ["logit", "feature"])
def test_union_scales_like_parallel(files, part_a, tmp_path, scaling):
    # the union body has one input adapter for all its parts (this used to be an IndexError)
    c1 = _component_file(part_a, (0, 1), tmp_path / "c01.safetensors", files["a"])
    c2 = _component_file(part_a, (2, 4), tmp_path / "c24.safetensors", files["a"])
    config = {"scaling": scaling, "calibration_samples": 10}
    union, man, _ = assemble([c1, c2], AssemblyConfig(layout="union", **config))
    parallel, _, _ = assemble([c1, c2], AssemblyConfig(layout="parallel", **config))
    for k in range(2):  # the scales are fitted on the parts' own networks in both layouts
        assert torch.equal(getattr(union, f"scale{k}"), getattr(parallel, f"scale{k}"))
    assert man["provenance"]["calibration"]["scaling"] == scaling
    out = tmp_path / "u.safetensors"
    save_model(out, union, man)
    x = digits_test()[:9]
    assert torch.equal(run(load_model(out)[0], x), run(union, x))


def test_union_needs_components_of_one_source(files, part_a, part_b, tmp_path):
    ca = _component_file(part_a, (0, 1), tmp_path / "ca.safetensors", files["a"])
    cb = _component_file(part_b, (5, 6), tmp_path / "cb.safetensors", files["b"])
    with pytest.raises(ModelLegoError, match="one source"):
        assemble([ca, cb], AssemblyConfig(layout="union", scaling="none"))
    with pytest.raises(ModelLegoError, match="one source"):
        assemble([files["a"], files["b"]], AssemblyConfig(layout="union", scaling="none"))


def test_union_refuses_a_changed_source_file(files, part_a, tmp_path):
    import shutil

    src = tmp_path / "src.safetensors"
    shutil.copy(files["a"], src)
    c1 = _component_file(part_a, (0, 1), tmp_path / "c1.safetensors", src)
    c2 = _component_file(part_a, (3,), tmp_path / "c2.safetensors", src)
    src.unlink()
    with pytest.raises(ModelLegoError, match="missing or changed"):
        assemble([c1, c2], AssemblyConfig(layout="union", scaling="none"))


def test_union_does_not_overwrite_the_components_source_without_force(files, part_a,
                                                                      tmp_path, monkeypatch):
    import shutil

    from helpers import run_cli

    work = tmp_path / "work"
    (work / "comps").mkdir(parents=True)
    src = work / "src.safetensors"
    shutil.copy(files["a"], src)
    monkeypatch.chdir(work)
    for classes, name in (("0,1", "c1"), ("3", "c2")):
        code, _, err = run_cli(["disassemble", "src.safetensors", "--classes", classes,
                                "--no-reconstruct", "--out", f"comps/{name}.safetensors"])
        assert code == 0, err
    # stored relative to the component, found from any working folder
    assert read_manifest(work / "comps" / "c1.safetensors")["provenance"]["source"]["file"] \
        == "../src.safetensors"
    original = src.read_bytes()
    monkeypatch.chdir(tmp_path)
    argv = ["assemble", "work/comps/c1.safetensors", "work/comps/c2.safetensors",
            "--layout", "union", "--scaling", "none"]
    code, out, err = run_cli(argv + ["--out", "work/src.safetensors"])
    assert code == 2 and out == ""
    assert err == ("modellego assemble: error: --out work/src.safetensors would overwrite the "
                   "input work/comps/../src.safetensors; choose another path or pass --force\n")
    assert src.read_bytes() == original
    code, out, err = run_cli(argv + ["--out", "u.safetensors"])
    assert code == 0, err
    _, man = load_model(tmp_path / "u.safetensors")
    assert man["union"]["source"]["file"] == "work/comps/../src.safetensors"
    code, out, err = run_cli(argv + ["--out", "work/src.safetensors", "--force"])
    assert code == 0, err


def test_taps_pool_a_channel_last_linear_input_over_its_positions():
    """A linear layer on the last axis of a map (ConvNeXt's MLP) is tapped per channel."""
    from modellego.assembly.scoring import FeatureTap, pooled

    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    assert torch.equal(pooled(x), x.mean((2, 3)))
    assert torch.equal(pooled(x, channels_last=True), x.mean((1, 2)))
    flat = torch.randn(2, 6)
    assert pooled(flat) is flat and pooled(flat, channels_last=True) is flat

    class ChannelLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.mlp = nn.Linear(4, 3)

        def forward(self, x):
            return self.mlp(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2))

    net = ChannelLast().eval()
    images = torch.randn(2, 1, 5, 5)
    _, (feats,) = FeatureTap(net, ["mlp"])(images)
    with torch.no_grad():
        assert torch.allclose(feats, net.conv(images).mean((2, 3)), atol=1e-6)


# --------------------------------------------------------------------------- router taps


def test_pooled_max_and_mean_on_a_hand_made_map():
    x = torch.tensor([[[[1.0, -2.0], [4.0, 0.0]], [[-1.0, -3.0], [-0.5, -7.0]]]])  # (1,2,2,2)
    assert pooled(x).tolist() == [[0.75, -2.875]]
    assert pooled(x, how="max").tolist() == [[4.0, -0.5]]
    last = x.permute(0, 2, 3, 1)  # (N, H, W, C): a linear layer on the last axis
    assert pooled(last, channels_last=True, how="max").tolist() == [[4.0, -0.5]]
    flat = torch.tensor([[3.0, -1.0]])
    assert torch.equal(pooled(flat, how="max"), flat)


def test_a_max_tap_reads_the_maximum_of_the_layers_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 2)).eval()
    x = torch.randn(5, 1, 8, 8)
    _, (mean, peak, lin) = FeatureTap(net, ["2", "2@max", "4"])(x)
    seen = net[1](net[0](x))
    assert torch.equal(mean, seen.mean((2, 3))) and torch.equal(peak, seen.amax((2, 3)))
    assert torch.equal(lin, net[3](net[2](seen)))
    with pytest.raises(ModelLegoError, match="router tap '9@max'.*no conv or linear layer '9'"):
        FeatureTap(net, ["9@max"])(x)


def test_a_grid_tap_reads_the_averages_of_the_four_quarters():
    x = torch.arange(32.0).view(1, 2, 4, 4)
    # channel 0 holds 0..15 row by row: its quarters average 2.5, 4.5, 10.5, 12.5
    assert pooled(x, how="grid").tolist() == [[2.5, 4.5, 10.5, 12.5, 18.5, 20.5, 26.5, 28.5]]
    odd = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]]])
    # a 3x3 map: the cells overlap on the middle row and column (adaptive pooling)
    assert pooled(odd, how="grid").tolist() == [[3.0, 4.0, 6.0, 7.0]]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 2)).eval()
    x = torch.randn(5, 1, 8, 8)
    _, (grid,) = FeatureTap(net, ["2@grid"])(x)
    seen = net[1](net[0](x))  # (5, 3, 6, 6)
    assert grid.shape == (5, 12)
    assert torch.allclose(grid[:, 4 * 1 + 3], seen[:, 1, 3:, 3:].mean((1, 2)))
    with pytest.raises(ModelLegoError, match="router tap '4@grid'.*no conv layer '4'"):
        FeatureTap(net, ["4@grid"])(x)


def test_joint_taps_a_conv_every_way_its_map_allows():
    from modellego.assembly.scalings import Joint

    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(4, 5, 1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(5, 6, 1), nn.Flatten(), nn.Linear(6, 2)).eval()
    # conv 0 reads 8x8, conv 2 6x6, conv 5 2x2 (4x4 pooled by 2), conv 8 1x1
    root = Path(__file__).resolve().parents[1]
    _, digits = load_model(root / "checkpoints" / "digits" / "vgg16_bn.safetensors")
    entry = {**{k: digits.to_dict()[k] for k in ("kind", "architecture", "dataset")},
             "classes": [0, 1], "class_names": ["0", "1"], "file": None, "sha256": None,
             "input": {"shape": [1, 8, 8], "mean": [0.0], "std": [1.0]}}
    taps = Joint().taps([Part(net, entry)], 8)
    assert taps == [["0", "2", "5", "8", "10", "0@max", "2@max", "5@max",
                     "0@grid", "2@grid", "5@grid"]]


def test_joint_router_weights_cover_every_tap(part_a, part_b):
    model, man, _ = assemble([part_a, part_b], AssemblyConfig(scaling="joint",
                                                           calibration_samples=20))
    for taps, (net, _) in zip(man["taps"], (part_a, part_b)):
        base = [t for t in taps if "@" not in t]
        assert base == tap_layers(net, 8)
        assert {t.split("@")[0] for t in taps} == set(base)
    assert man["provenance"]["calibration"]["router_weights"] == \
        2 * sum(r.feat_mean.numel() for r in model.routers) + 2


def test_a_joint_file_with_mean_taps_only_still_loads(part_a, part_b, tmp_path, monkeypatch):
    """Files of the previous release tapped each layer by its mean alone: they load and
    give the logits they were written with."""
    from modellego.assembly.scalings import Calibrated, Joint

    monkeypatch.setattr(Joint, "taps", Calibrated.taps)
    model, man, _ = assemble([part_a, part_b], AssemblyConfig(scaling="joint",
                                                           calibration_samples=20))
    monkeypatch.undo()
    assert not any("@" in t for taps in man["taps"] for t in taps)
    path = tmp_path / "old.safetensors"
    save_model(path, model, man)
    again, _ = load_model(path)
    x = digits_test()[:16]
    assert torch.equal(run(again, x), run(model, x))
    # a file whose taps name a layer its part does not have is refused in one line
    bad = json.loads(json.dumps(man.to_dict()))
    bad["taps"][0][0] = "no.such.layer"
    with pytest.raises(ModelLegoError, match="router tap 'no.such.layer'"):
        build_assembly(bad)


def test_router_taps_read_one_row_per_image():
    """A linear applied to a table shared by every image (Swin-V2's position-bias MLP) or to
    the windows of an image is not a tap: its input has no row per image."""
    from torch import nn

    from modellego.assembly.scoring import called_layers, tap_layers

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Linear(2, 4)
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.windows = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 3)
            self.register_buffer("coords", torch.rand(1, 9, 2))

        def forward(self, x):
            bias = self.table(self.coords).mean()                      # (1, 9, 2): shared
            f = self.conv(x)                                           # (N, 4, 6, 6)
            w = f.reshape(len(x) * 4, 4, 9).transpose(1, 2)            # 4 windows per image
            f = self.windows(w).mean((0, 1)) + f.mean((2, 3))          # (N, 4)
            return self.fc(f + bias)

    net = Net().eval()
    x = torch.randn(2, 1, 6, 6)
    assert called_layers(net, x) == {"conv", "fc"}
    assert tap_layers(net, 8, x) == ["conv", "fc"]
    assert tap_layers(net, 8) == ["table", "conv", "windows", "fc"]
