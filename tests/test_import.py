"""Networks from elsewhere: architecture sources (torchvision:, timm:, python: with an
explicit grant), ``modellego import`` of state dicts, and input contracts other than the
dataset's. Files crafted to run code run nothing."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from helpers import needs, run_cli
from modellego import ImportConfig, ModelFileError, ModelLegoError, import_model, load_model
from modellego.data import load_split, model_input, normalize
from modellego.files import save_model
from modellego.io import read_manifest
from modellego.models import build_architecture, split_source, trusted
from modellego.models.sources import TRUST_ENV, is_granted
from modellego.statedict import read_state_dict

DIGITS = Path(__file__).resolve().parent.parent / "checkpoints" / "digits" / \
    "vgg16_bn.safetensors"

OWN_NETS = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """conv -> ReLU -> global mean -> linear, for any number of classes."""

    def __init__(self, num_classes=10, in_channels=1, width=6):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def build(num_classes=10):
    return TinyNet(num_classes=num_classes)


def tiny_vit(num_classes=10):
    """A plain torchvision VisionTransformer, as a user would configure a small one."""
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2,
                             hidden_dim=16, mlp_dim=32, num_classes=num_classes)
'''


@pytest.fixture(scope="module")
def own_package(tmp_path_factory):
    """A package ``ownnets_for_tests`` of the user's own code on ``sys.path``."""
    root = tmp_path_factory.mktemp("usercode")
    pkg = root / "ownnets_for_tests"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(OWN_NETS)
    sys.path.insert(0, str(root))
    yield "ownnets_for_tests.models"
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m.startswith("ownnets_for_tests")]:
        del sys.modules[name]


@pytest.fixture
def two_threads():
    """A full-size network: both cores (the session runs tiny models on one), unless the
    suite runs in several worker processes (``make test``), which share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) < 2
                          else 1)
    yield
    torch.set_num_threads(threads)


def crafted_file(path: Path, architecture: dict) -> Path:
    """A model file whose manifest is a genuine one with ``architecture`` swapped in."""
    manifest = read_manifest(DIGITS)
    manifest["architecture"] = architecture
    save_file({"w": torch.zeros(1)}, str(path), metadata={"modellego": json.dumps(manifest)})
    return path


# ---------------------------------------------------------------- sources and trust


def test_architecture_names_and_their_sources():
    assert split_source("lenet5") == ("modellego", "lenet5")
    assert split_source("modellego:lenet5") == ("modellego", "lenet5")
    assert split_source("torchvision:resnet18") == ("torchvision", "resnet18")
    assert split_source("timm:efficientnet_b0.ra_in1k") == ("timm", "efficientnet_b0.ra_in1k")
    assert split_source("python:a.b:make") == ("python", "a.b:make")
    with pytest.raises(ModelLegoError, match="unknown architecture source 'keras'"):
        split_source("keras:resnet")
    with pytest.raises(ModelLegoError, match="expected python:package.module:callable"):
        split_source("python:os.system")
    with pytest.raises(ModelLegoError, match="expected python:package.module:callable"):
        split_source("python:os:sys tem")


def test_grants_cover_a_module_and_its_submodules_only(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with trusted(["mynets"]):
        assert is_granted("mynets") and is_granted("mynets.models")
        assert not is_granted("mynets_evil") and not is_granted("os")
    assert not is_granted("mynets")  # the grant ends with the block
    monkeypatch.setenv(TRUST_ENV, "a.b, c")
    assert is_granted("a.b.c") and is_granted("c") and not is_granted("a")
    with pytest.raises(ModelLegoError, match="'os;rm' is not a module name"):
        with trusted("os;rm"):
            pass


@pytest.mark.parametrize("target, kwargs", [
    ("os:system", {"command": "touch {marker}"}),
    ("subprocess:run", {"args": ["touch", "{marker}"]}),
    ("ownnets_for_tests.models:build", {}),
])
def test_a_file_naming_code_runs_nothing_without_a_grant(tmp_path, monkeypatch, own_package,
                                                         target, kwargs):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    marker = tmp_path / "ran"
    filled = json.loads(json.dumps(kwargs).replace("{marker}", str(marker)))
    path = crafted_file(tmp_path / "evil.safetensors", {"name": f"python:{target}",
                                                         "kwargs": filled})
    module = target.partition(":")[0]
    sys.modules.pop("ownnets_for_tests.models", None)
    for trust in (None, ["ownnets_for_tests.other"], ["mynets"]):
        with pytest.raises(ModelFileError) as exc:
            load_model(path, trust_code=trust)
        assert str(exc.value) == (
            f"{path}: the file's architecture 'python:{target}' asks to import and run code "
            f"of module {module!r}, which is not trusted; if you trust it, grant it with "
            f"`trust_code` {module} (or set {TRUST_ENV}={module})")
    assert not marker.exists()
    assert "ownnets_for_tests.models" not in sys.modules  # not even imported
    code, out, err = run_cli(["evaluate", path])
    assert code == 2 and "--trust-code " + module in err and not marker.exists()


def test_own_class_with_a_grant_round_trips(tmp_path, monkeypatch, own_package):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    name = f"python:{own_package}:TinyNet"
    with trusted(own_package):
        net = build_architecture(name, {"num_classes": 10}).eval()
    torch.save(net.state_dict(), tmp_path / "tiny.pt")
    code, out, err = run_cli(["import", name, "--weights", tmp_path / "tiny.pt", "--out",
                              tmp_path / "tiny.safetensors", "--dataset", "digits",
                              "--trust-code", own_package])
    assert code == 0, err
    with pytest.raises(ModelFileError, match="which is not trusted"):
        load_model(tmp_path / "tiny.safetensors")
    model, manifest = load_model(tmp_path / "tiny.safetensors", trust_code=[own_package])
    # the user's own builder gets exactly the arguments given (here none)
    assert manifest["architecture"] == {"name": name, "kwargs": {}}
    test = load_split("digits", "test")
    x = normalize(test.images[:16], test.info)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    monkeypatch.setenv(TRUST_ENV, "ownnets_for_tests")  # a package grants its modules
    assert load_model(tmp_path / "tiny.safetensors")[1]["kind"] == "model"
    acc = manifest["metrics"]["test_accuracy"]
    assert f"test accuracy {acc:.4f} ({len(test)} images)" in out


def test_torchvision_builder_round_trip_and_refusals(tmp_path):
    tv = needs("torchvision")
    net = tv.models.resnet18(num_classes=10).eval()
    save_file(net.state_dict(), str(tmp_path / "r18.safetensors"))
    model, manifest, report = import_model(
        tmp_path / "r18.safetensors",
        ImportConfig("torchvision:resnet18", "digits", evaluate=False))
    assert manifest["architecture"] == {"name": "torchvision:resnet18",
                                        "kwargs": {"num_classes": 10}}
    info = load_split("digits", "test").info
    # grey digits, read by a colour network: the dataset's normalisation per channel
    assert manifest["input"] == {"shape": [3, 28, 28], "mean": [info.mean[0]] * 3,
                                 "std": [info.std[0]] * 3}
    assert "test_accuracy" not in report and manifest["metrics"] == {}
    save_model(tmp_path / "m.safetensors", model, manifest)
    again, _ = load_model(tmp_path / "m.safetensors")
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))
    with pytest.raises(ModelLegoError, match="torchvision has no classification builder "
                                             "'fasterrcnn_resnet50_fpn'"):
        build_architecture("torchvision:fasterrcnn_resnet50_fpn")
    with pytest.raises(ModelLegoError, match="argument 'weights' would load weights"):
        build_architecture("torchvision:resnet18", {"weights": "DEFAULT"})


def test_timm_model_imports(tmp_path):
    timm = needs("timm")
    net = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval()
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    model, manifest, report = import_model(
        tmp_path / "ckpt.pth", ImportConfig("timm:resnet10t", "digits", classes=(0, 1, 2, 3),
                                            input_size=(32, 32)))
    assert manifest["input"]["shape"] == [3, 32, 32]
    assert manifest["class_names"] == ["0", "1", "2", "3"]
    assert 0.0 <= report["test_accuracy"] <= 1.0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    with pytest.raises(ModelLegoError, match="argument 'pretrained' would load weights"):
        build_architecture("timm:resnet10t", {"pretrained": True})
    with pytest.raises(ModelLegoError, match="timm has no model 'resnet10000'"):
        build_architecture("timm:resnet10000")


# ---------------------------------------------------------------- the state dict


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError) as exc:
        read_state_dict(tmp_path / "evil.pt")
    assert str(exc.value).startswith(f"{tmp_path / 'evil.pt'}: refused: the file holds more "
                                     "than tensors and plain containers")
    assert not marker.exists()
    code, _, err = run_cli(["import", "lenet5", "--weights", tmp_path / "evil.pt", "--out",
                            tmp_path / "m.safetensors", "--dataset", "digits"])
    assert code == 2 and "refused" in err and not marker.exists()
    assert not (tmp_path / "m.safetensors").exists()


def test_state_dict_wrappers_and_prefixes(tmp_path):
    state = {"a.weight": torch.ones(2), "b": torch.zeros(1, dtype=torch.int64)}
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pt")
    torch.save({"model_state_dict": state, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    for name in ("ddp.pt", "ckpt.pt"):
        got = read_state_dict(tmp_path / name)
        assert list(got) == list(state) and all(torch.equal(got[k], state[k]) for k in state)
    torch.save({"w": torch.ones(1), "epoch": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ModelFileError, match="mixes tensors with other entries \\(epoch\\)"):
        read_state_dict(tmp_path / "mixed.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ModelFileError, match="holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pt")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unknown weights format '.npz'"):
        read_state_dict(tmp_path / "w.npz")


def test_state_dict_that_does_not_fit_is_named(tmp_path, own_package):
    name = f"python:{own_package}:TinyNet"
    with trusted(own_package):
        state = build_architecture(name, {"num_classes": 10}).state_dict()
    bad = dict(state)
    bad.pop("conv.bias")
    bad["extra.weight"] = torch.ones(1)
    bad["fc.weight"] = torch.ones(3, 6)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    code, _, err = run_cli(["import", name, "--weights", tmp_path / "bad.safetensors", "--out",
                            tmp_path / "m.safetensors", "--dataset", "digits",
                            "--trust-code", own_package])
    assert code == 2
    assert err.strip() == (
        f"modellego import: error: {tmp_path / 'bad.safetensors'}: the state dict does not "
        "fit the network: 1 missing (conv.bias); 1 unexpected (extra.weight); 1 of another "
        "shape (fc.weight: file (3, 6), network (10, 6)); check the architecture and its "
        "--kwargs (e.g. num_classes)")
    assert not (tmp_path / "m.safetensors").exists()


def test_outputs_must_match_the_classes(tmp_path, own_package):
    name = f"python:{own_package}:TinyNet"
    with trusted(own_package):
        state = build_architecture(name, {"num_classes": 5}).state_dict()
    save_file(state, str(tmp_path / "five.safetensors"))
    with trusted(own_package), pytest.raises(ModelLegoError) as exc:
        import_model(tmp_path / "five.safetensors",
                     ImportConfig(name, "digits", kwargs={"num_classes": 5}))
    assert str(exc.value) == (
        "the network has 5 outputs but 10 classes are given (digits has 10); pass `classes` "
        "(the dataset's class ids in output order) or set num_classes in `kwargs`")
    with trusted(own_package):
        _, manifest, _ = import_model(tmp_path / "five.safetensors",
                                      ImportConfig(name, "digits", kwargs={"num_classes": 5},
                                                   classes=(5, 6, 7, 8, 9), evaluate=False))
    assert manifest["classes"] == [5, 6, 7, 8, 9]


def test_import_flags_are_checked(tmp_path):
    from modellego.models import create_model

    torch.save(create_model("lenet5", in_channels=1, num_classes=10, input_size=28)
               .state_dict(), tmp_path / "lenet.pt")
    for weights, argv, message in (
            ("none.pt", ["--kwargs", "[1]"], "--kwargs must be a JSON object"),
            ("none.pt", ["--kwargs", "{"], "--kwargs value is not valid JSON"),
            ("none.pt", ["--std", "0"], "--std must be positive"),
            ("none.pt", [], f"weights file {tmp_path / 'none.pt'} does not exist"),
            ("lenet.pt", ["--mean", "0.1", "0.2"],
             "--mean has 2 values; the network reads 1 channels (give 1 or one)")):
        code, _, err = run_cli(["import", "lenet5", "--weights", tmp_path / weights,
                                "--out", tmp_path / "m.safetensors", "--dataset", "digits",
                                *argv])
        assert code == 2 and message in err, err
    with pytest.raises(SystemExit) as exc:  # argparse's own check of --input-size
        run_cli(["import", "lenet5", "--weights", tmp_path / "lenet.pt", "--out",
                 tmp_path / "m.safetensors", "--dataset", "digits", "--input-size", "4"])
    assert exc.value.code == 2
    assert not (tmp_path / "m.safetensors").exists()
    code, _, err = run_cli(["import", "lenet5", "--weights", tmp_path / "lenet.pt", "--out",
                            tmp_path / "m.safetensors", "--dataset", "digits"])
    assert code == 0, err
    assert load_model(tmp_path / "m.safetensors")[1]["architecture"] == {
        "name": "lenet5", "kwargs": {"num_classes": 10, "in_channels": 1, "input_size": 28}}


# ---------------------------------------------------------------- input contracts


def test_model_input_converts_to_the_contract():
    test = load_split("digits", "test")
    x = test.images[:3]
    same = {"shape": list(test.info.input_shape), "mean": list(test.info.mean),
            "std": list(test.info.std)}
    assert torch.equal(model_input(x, test.info, same), normalize(x, test.info))
    other = {"shape": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    got = model_input(x, test.info, other)
    assert got.shape == (3, 3, 32, 32)
    expected = (nn.functional.interpolate(x.float(), size=(32, 32), mode="bilinear",
                                          align_corners=False) - 0.5) / 0.25
    assert torch.allclose(got[:, 1:2], expected, atol=1e-6)


def test_an_imported_model_works_through_disassemble_and_evaluate(tmp_path, own_package):
    """A grey network read at another size with its own normalisation: evaluate,
    disassemble and the component all feed it what it reads."""
    name = f"python:{own_package}:TinyNet"
    with trusted(own_package):
        net = build_architecture(name, {"num_classes": 10})
    torch.save(net.state_dict(), tmp_path / "t.pt")
    code, _, err = run_cli(["import", name, "--weights", tmp_path / "t.pt", "--out",
                            tmp_path / "t.safetensors", "--dataset", "digits", "--input-size",
                            "20", "--mean", "0.5", "--std", "0.5", "--trust-code", own_package])
    assert code == 0, err
    code, out, err = run_cli(["evaluate", tmp_path / "t.safetensors", "--json", "--no-latency",
                              "--trust-code", own_package])
    assert code == 0, err
    test = load_split("digits", "test")
    contract = {"shape": [1, 20, 20], "mean": [0.5], "std": [0.5]}
    with torch.no_grad():
        pred = net.eval()(model_input(test.images, test.info, contract)).argmax(1)
    assert json.loads(out)["accuracy"] == pytest.approx(
        float((pred == test.labels).float().mean()))
    code, _, err = run_cli(["disassemble", tmp_path / "t.safetensors", "--classes", "1,2",
                            "--out", tmp_path / "c.safetensors", "--samples-per-class", "5",
                            "--trust-code", own_package])
    assert code == 0, err
    _, comp = load_model(tmp_path / "c.safetensors", trust_code=own_package)
    assert comp["input"] == contract and comp["architecture"]["name"] == name


def train_plainly(net: nn.Module, train, mean: float, std: float, *, steps: int, lr: float,
                  gen: torch.Generator | None = None) -> None:
    """Adam on batches of 64 grey images repeated to 3 channels, as a plain PyTorch user
    trains a torchvision network (``gen``: the batches' generator; else the global one)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(train.labels), (64,), generator=gen)
        x = ((train.images[idx].float() - mean) / std).repeat(1, 3, 1, 1)
        loss = nn.functional.cross_entropy(net(x), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.slow
def test_a_torchvision_resnet18_trained_as_plain_pytorch_end_to_end(tmp_path, two_threads):
    """The example of docs/commands.md ("Your own models"): a torchvision resnet18 trained
    by a plain PyTorch loop on Fashion-MNIST (grey images repeated to RGB), its state dict
    imported, a 3-class component cut from it and assembled with the shipped digits model,
    all by the CLI."""
    tv = needs("torchvision")
    torch.manual_seed(0)
    train = load_split("fashion-mnist", "train")
    mean, std = 0.286, 0.353
    net = tv.models.resnet18(num_classes=10)
    # Adam: 40 steps of SGD at lr 0.05 reach 0.31..0.64 by seed and machine
    train_plainly(net, train, mean, std, steps=40, lr=1e-3)
    torch.save(net.state_dict(), tmp_path / "resnet18.pt")

    model = tmp_path / "resnet18.safetensors"
    code, out, err = run_cli(["import", "torchvision:resnet18", "--weights",
                              tmp_path / "resnet18.pt", "--out", model, "--dataset",
                              "fashion-mnist", "--mean", str(mean), "--std", str(std),
                              "--no-fingerprint"])  # (the assembly below routes jointly)
    assert code == 0, err
    _, manifest = load_model(model)
    assert manifest["input"] == {"shape": [3, 28, 28], "mean": [mean] * 3, "std": [std] * 3}
    assert manifest["metrics"]["test_accuracy"] > 0.5  # 40 steps: well above chance (0.1)
    assert f"test accuracy {manifest['metrics']['test_accuracy']:.4f}" in out

    comp = tmp_path / "shoes.safetensors"
    # the default (search + reconstruction), re-fitting on 250 images instead of 1000
    code, out, err = run_cli(["disassemble", model, "--classes", "5,7,9", "--out", comp,
                              "--samples-per-class", "20", "--reconstruct", "250"])
    assert code == 0, err
    _, comp_manifest = load_model(comp)
    assert comp_manifest["kind"] == "component"
    assert comp_manifest["class_names"] == ["Sandal", "Sneaker", "Ankle boot"]
    assert comp_manifest["input"] == manifest["input"]
    code, out, err = run_cli(["export", comp, "--out", tmp_path / "shoes.onnx",
                              "--check-images", "16"])
    assert code == 0, err
    assert "checked on 16 test images of fashion-mnist" in out

    assembly = tmp_path / "shoes+digits.safetensors"
    code, out, err = run_cli(["assemble", comp, DIGITS, "--out", assembly,
                              "--calibration-samples", "20"])
    assert code == 0, err
    net_a, man_a = load_model(assembly)
    assert [(lab["dataset"], lab["name"]) for lab in man_a["labels"]] == [
        ("fashion-mnist", "Sandal"), ("fashion-mnist", "Sneaker"),
        ("fashion-mnist", "Ankle boot")] + [("digits", str(d)) for d in range(10)]
    assert "digits:9" in out and "fashion-mnist:5" in out


@pytest.mark.slow
def test_a_torchvision_vit_trained_as_plain_pytorch_end_to_end(tmp_path, own_package):
    """A small torchvision VisionTransformer trained by a plain PyTorch loop on
    Fashion-MNIST, imported, taken apart by the default (MLP neurons and the heads of its
    ``nn.MultiheadAttention`` layers are units) and exported, all by the CLI."""
    needs("torchvision")
    name = f"python:{own_package}:tiny_vit"
    with trusted(own_package):
        net = build_architecture(name, {"num_classes": 10})
    train = load_split("fashion-mnist", "train")
    mean, std = 0.286, 0.353
    train_plainly(net, train, mean, std, steps=120, lr=2e-3,
                  gen=torch.Generator().manual_seed(0))
    torch.save(net.state_dict(), tmp_path / "vit.pt")
    model = tmp_path / "vit.safetensors"
    code, out, err = run_cli(["import", name, "--weights", tmp_path / "vit.pt", "--out", model,
                              "--dataset", "fashion-mnist", "--mean", str(mean), "--std",
                              str(std), "--no-fingerprint", "--trust-code", own_package])
    assert code == 0, err
    _, manifest = load_model(model, trust_code=own_package)
    assert manifest["metrics"]["test_accuracy"] > 0.5  # 120 steps: well above chance
    comp = tmp_path / "shoes.safetensors"
    code, out, err = run_cli(["disassemble", model, "--classes", "5,7,9", "--out", comp,
                              "--samples-per-class", "20", "--reconstruct", "250",
                              "--trust-code", own_package])
    assert code == 0, err
    cnet, cman = load_model(comp, trust_code=own_package)
    hidden = [len(cman["plan"][f"encoder.layers.encoder_layer_{i}.mlp.0"]["out"])
              for i in range(2)]
    heads = [len(cman["plan"][f"encoder.layers.encoder_layer_{i}.self_attention"]["out"])
             for i in range(2)]
    assert min(hidden) < 32 and set(heads) <= {1, 2}
    assert re.search(r"component accuracy +0\.\d{4}  \([+-]\d+\.\d\d pp\)", out)
    assert cman["metrics"]["test_accuracy"] > 0.5  # of three classes
    code, out, err = run_cli(["export", comp, "--out", tmp_path / "shoes.onnx",
                              "--check-images", "16", "--trust-code", own_package])
    assert code == 0, err
    assert "checked on 16 test images of fashion-mnist" in out


def test_distilling_from_a_teacher_that_reads_another_input(own_package):
    """The student reads the dataset's images; the teacher (20 px, its own normalisation)
    is fed them converted, and its reported accuracy is its accuracy on what it reads."""
    from modellego import DistillConfig, distill
    from modellego.data import dataset_fingerprint
    from modellego.evaluation import evaluate

    name = f"python:{own_package}:TinyNet"
    with trusted(own_package):
        net = build_architecture(name, {"num_classes": 10}).eval()
    test = load_split("digits", "test")
    dataset = {**test.info.to_dict(), "fingerprint": dataset_fingerprint("digits")}
    manifest = {"kind": "model", "architecture": {"name": name, "kwargs": {}},
                "dataset": dataset, "classes": list(range(10)),
                "class_names": list(test.info.class_names),
                "input": {"shape": [1, 20, 20], "mean": [0.5], "std": [0.5]}}
    student, student_manifest, report = distill(
        net, manifest, DistillConfig("lenet5", width=0.25, epochs=1), compare=False)
    assert student_manifest["input"]["shape"] == list(test.info.input_shape)
    assert report["teacher"]["accuracy"] == evaluate(net, manifest, latency=False)["accuracy"]


def test_compressing_an_imported_model_of_another_input(tmp_path, own_package):
    name = f"python:{own_package}:TinyNet"
    with trusted(own_package):
        net = build_architecture(name, {"num_classes": 10, "width": 12})
    torch.save(net.state_dict(), tmp_path / "t.pt")
    code, _, err = run_cli(["import", name, "--weights", tmp_path / "t.pt", "--out",
                            tmp_path / "t.safetensors", "--dataset", "digits", "--kwargs",
                            '{"width": 12}', "--input-size", "24", "--no-evaluate",
                            "--trust-code", own_package])
    assert code == 0, err
    code, out, err = run_cli(["compress", tmp_path / "t.safetensors", "--target-params", "0.6",
                              "--criterion", "l1", "--out", tmp_path / "s.safetensors",
                              "--trust-code", own_package])
    assert code == 0, err
    small, manifest = load_model(tmp_path / "s.safetensors", trust_code=own_package)
    assert manifest["kind"] == "component" and manifest["input"]["shape"] == [1, 24, 24]
    assert small.conv.out_channels < 12
    assert sum(p.numel() for p in small.parameters()) <= 0.6 * sum(
        p.numel() for p in net.parameters())


def assert_torchvision_file_round_trip(tv, builder: str, tmp_path: Path) -> None:
    """torchvision's ``builder`` (10 classes, random weights) imported on digits at 32 px,
    saved and loaded: the loaded network gives the source's logits exactly."""
    net = tv.models.get_model(builder, num_classes=10).eval()
    save_file(net.state_dict(), str(tmp_path / "weights.safetensors"))
    model, manifest, _ = import_model(tmp_path / "weights.safetensors",
                                      ImportConfig(f"torchvision:{builder}", "digits",
                                                   input_size=(32, 32), evaluate=False))
    save_model(tmp_path / "model.safetensors", model, manifest)
    again, _ = load_model(tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))


def test_modules_that_check_their_state_dict_version_load(tmp_path):
    """torchvision's MNASNet refuses a state dict without its module versions; a file holds
    tensors only, so loading passes the versions the network itself carries."""
    tv = needs("torchvision")
    assert_torchvision_file_round_trip(tv, "mnasnet0_5", tmp_path)


def test_a_builder_that_cannot_run_on_meta_is_built_on_the_cpu(tmp_path):
    """torchvision's RegNet computes its widths from tensors, which the ``meta`` device has no
    values for: the structure check builds such a library network on the CPU instead."""
    tv = needs("torchvision")
    with pytest.raises(NotImplementedError, match="meta"), torch.device("meta"):
        tv.models.regnet_x_400mf(num_classes=10)
    assert_torchvision_file_round_trip(tv, "regnet_x_400mf", tmp_path)


def test_a_torchvision_vit_imports_and_assembles_with_a_cnn_by_default(tmp_path, own_package):
    """Whole transformers: `import` makes its router fingerprint and `assemble` (default
    joint router) runs, both tapping only layers that run as modules."""
    needs("torchvision")
    from modellego.assembly.scoring import called_layers

    vit_name, cnn_name = f"python:{own_package}:tiny_vit", f"python:{own_package}:TinyNet"
    with trusted(own_package):
        vit = build_architecture(vit_name, {"num_classes": 5}).eval()
        cnn = build_architecture(cnn_name, {"num_classes": 5, "in_channels": 1}).eval()
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    torch.save(cnn.state_dict(), tmp_path / "cnn.pt")
    for name, weights, out, classes, kwargs in (
            (vit_name, "vit.pt", "vit.safetensors", "0-4", '{"num_classes": 5}'),
            (cnn_name, "cnn.pt", "cnn.safetensors", "5-9",
             '{"num_classes": 5, "in_channels": 1}')):
        code, _, err = run_cli(["import", name, "--weights", tmp_path / weights, "--out",
                                tmp_path / out, "--dataset", "digits", "--classes", classes,
                                "--kwargs", kwargs, "--trust-code",
                                own_package])
        assert code == 0, err
    model, manifest = load_model(tmp_path / "vit.safetensors", trust_code=[own_package])
    taps = manifest["router_fingerprint"]["taps"]
    x = torch.zeros(2, 3, 28, 28)
    ran = called_layers(model, x)
    assert taps and set(taps) <= ran
    # a file's nn.MultiheadAttention is a SelfAttentionMHA: its output projection runs as a
    # module, so it can be tapped
    out_proj = "encoder.layers.encoder_layer_1.self_attention.out_proj"
    assert out_proj in ran
    code, out, err = run_cli(["assemble", tmp_path / "vit.safetensors",
                              tmp_path / "cnn.safetensors", "--out", tmp_path / "both.safetensors",
                              "--calibration-samples", "10", "--trust-code", own_package])
    assert code == 0, err
    both, bm = load_model(tmp_path / "both.safetensors", trust_code=[own_package])
    assert bm["classes"] == list(range(10))
    with torch.no_grad():
        assert both(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    # the assembled transformer and CNN export as one torch.export program
    code, out, err = run_cli(["export", tmp_path / "both.safetensors", "--out",
                              tmp_path / "both.pt2", "--check-images", "8", "--trust-code",
                              own_package])
    assert code == 0, err
