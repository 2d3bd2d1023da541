"""Pan & Rajan's one-vs-rest modules (``--method pan-rajan``), the shared profile-pass
helper and the registries behind methods, criteria, scalings and layouts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from helpers import TwoLayer, masked_source_logits, run, run_cli, varied_random_model
from modellego.analysis.activity import activity_profile
from modellego.analysis.frat import gradient_profile
from modellego.analysis.methods import METHOD_REGISTRY, Method, get_method
from modellego.analysis.profile import contribution_profile
from modellego.assembly import LAYOUTS, SCALINGS, AssemblyConfig
from modellego.cli import build_parser
from modellego.compression import CRITERIA, CompressConfig
from modellego.disassembly import METHODS, DisassemblyConfig, disassemble_model
from modellego.errors import ModelLegoError
from modellego.files import load_model, save_model
from modellego.io import read_manifest
from modellego.metrics import count_params
from modellego.models import list_models
from modellego.registry import Registry
from modellego.surgery.graph import build_channel_graph
from modellego.surgery.head import OneVsRest
from modellego.workflows import assemble

TOL = 1e-5


def by_hand(logits: torch.Tensor, n: int) -> torch.Tensor:
    """``logit_i - log(sum_{j != i} exp(logit_j))`` for i < n, one term at a time."""
    z = logits.double()
    out = torch.empty(len(z), n, dtype=torch.float64)
    for i in range(n):
        others = [j for j in range(z.shape[1]) if j != i]
        out[:, i] = z[:, i] - torch.log(torch.exp(z[:, others]).sum(1))
    return out


# --------------------------------------------------------------------------- registries


def test_registry_refuses_duplicates_and_names_the_known_ones():
    reg: Registry[int] = Registry("widget")
    reg.register("b", 1)
    reg.register("a", 2)
    assert reg.names() == ("b", "a") and reg.get("a") == 2 and "b" in reg
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a", 3)
    with pytest.raises(ModelLegoError) as exc:
        reg.get("c")
    assert str(exc.value) == "unknown widget 'c'; use one of b, a"


def test_cli_choices_come_from_the_registries():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    choices = {(cmd, a.dest): tuple(a.choices) for cmd in ("disassemble", "assemble", "compress")
               for a in sub[cmd]._actions if a.choices}
    assert choices[("disassemble", "method")] == METHODS == METHOD_REGISTRY.names()
    assert choices[("compress", "method")] == METHODS
    assert choices[("compress", "criterion")] == CRITERIA == ("contribution", "l1", "fpgm")
    assert choices[("assemble", "layout")] == LAYOUTS == ("parallel", "padded", "union")
    assert choices[("assemble", "scaling")] == SCALINGS == (
        "none", "logit", "feature", "calibrated", "joint", "fingerprint", "concern")
    assert METHODS == ("contribution", "contribution-2022", "frat", "pan-rajan")


def test_a_new_method_is_one_class_and_one_registration(monkeypatch):
    class Everything(Method):
        """Keeps every channel (for this test only)."""
        name = "everything"
        compensate = refine = False

        def locate(self, graph, profile, classes, output_classes, config):
            return {s: torch.ones(graph.space_size[s], dtype=torch.bool)
                    for s in graph.spaces()}

    monkeypatch.setattr(METHOD_REGISTRY, "_items", dict(METHOD_REGISTRY._items))
    METHOD_REGISTRY.register("everything", Everything())
    torch.manual_seed(0)
    model = TwoLayer().eval()
    x = torch.randn(20, 1, 5, 5)
    y = torch.arange(20) % 4
    comp = disassemble_model(model, x, y, classes=(2, 0), output_classes=range(4),
                             config=DisassemblyConfig((2, 0), samples_per_class=3,
                                                      method="everything"))
    assert torch.allclose(run(comp.model, x), run(model, x)[:, [2, 0]], atol=1e-6)
    with pytest.raises(ModelLegoError, match="`compensate`"):
        DisassemblyConfig((0,), method="everything", compensate=True).validate()


# --------------------------------------------------------------------------- profile passes


@pytest.mark.parametrize("profile", [contribution_profile, gradient_profile, activity_profile])
def test_a_label_outside_the_profiled_classes_is_one_line_error(profile):
    model = TwoLayer().eval()
    layers = {"fc": model.fc}
    x = torch.randn(6, 1, 5, 5)
    for bad in (9, -1, 2):  # above the largest class, negative, a gap between classes
        y = torch.tensor([0, 3, 0, 3, bad, 0])
        with pytest.raises(ModelLegoError) as exc:
            profile(model, layers, x, y, (0, 3))
        assert "among the profiled classes [0, 3]" in str(exc.value)
        assert f"[{bad}]" in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- the module


@pytest.fixture(scope="module")
def two_layer():
    torch.manual_seed(7)
    model = TwoLayer().eval()
    with torch.no_grad():
        model.conv.bias[5] = -50.0        # never active on anything
        model.conv.weight[4].mul_(1e-4)   # active, but below 1 % of the layer's largest
        model.conv.bias[4] = 0.0
        model.conv.weight[1].abs_()       # channel 1: only positive images light it up
        model.conv.bias[1] = 0.0
    x = torch.randn(80, 1, 5, 5)
    x[::2] = x[::2].abs()
    x[1::2] = -x[1::2].abs()
    y = torch.arange(80) % 4  # the selection only needs labels, not correct ones
    return model, x, y


def test_module_removes_the_channels_never_active_on_the_class(two_layer):
    """Kept conv channels = by hand: per channel, the max over the class's selected samples
    of the fc input, above 1 % of the largest channel's; the module is physically smaller
    and equals the source with those channels zeroed, all logits kept, task first."""
    model, x, y = two_layer
    classes = (2, 1)
    with torch.no_grad():
        feats = torch.relu(model.conv(x)).mean((2, 3)).double()
    cfg = DisassemblyConfig(classes, samples_per_class=10, method="pan-rajan")
    comp = disassemble_model(model, x, y, classes=classes, output_classes=range(4), config=cfg)
    assert comp.locate.alpha_conv == comp.locate.alpha_linear == 0.01 and comp.head
    want = torch.zeros(6, dtype=torch.bool)
    for c in classes:
        peak = feats[list(comp.selection.indices[c])].amax(0)
        want |= peak > 0.01 * peak.max()
    assert not want[5] and not want[4] and want.any()
    assert comp.plan.kept("conv") == tuple(int(i) for i in want.nonzero().flatten())
    rest = [i for i in range(4) if i not in classes]
    assert comp.plan.kept("fc") == (*classes, *rest)
    assert isinstance(comp.model, OneVsRest)
    assert count_params(comp.model) < count_params(model)
    graph = build_channel_graph(model, (1, 5, 5))
    masked = masked_source_logits(model, graph, comp.plan, x)[:, list(comp.plan.kept("fc"))]
    inner = run(comp.model.net, x)
    assert (inner - masked).abs().max().item() <= TOL
    # the head: each task class against every other logit of the module, by hand
    scores = run(comp.model, x)
    assert scores.shape == (80, 2)
    assert torch.allclose(scores.double(), by_hand(inner, 2), atol=1e-5, rtol=0)
    # one module, several classes: the argmax of the scores is the argmax of its task logits
    assert torch.equal(scores.argmax(1), inner[:, :2].argmax(1))


@pytest.mark.parametrize("arch", list_models())
def test_every_architecture_gives_a_module_equal_to_the_masked_source(arch):
    noise = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model, y, classes = varied_random_model(arch, noise)
    comp = disassemble_model(model, noise, y, classes=classes, output_classes=range(10),
                             config=DisassemblyConfig(classes, samples_per_class=5,
                                                      method="pan-rajan"))
    graph = comp.graph
    order = list(comp.plan.kept(graph.output_layer.name))
    assert order[:2] == list(classes) and sorted(order) == list(range(10))
    masked = masked_source_logits(model, graph, comp.plan, noise[:6])[:, order]
    inner = run(comp.model.net, noise[:6])
    assert (inner - masked).abs().max().item() <= TOL
    assert torch.allclose(run(comp.model, noise[:6]).double(), by_hand(inner, 2), atol=1e-4,
                          rtol=1e-6)


def test_pan_rajan_under_emulated_ranks_gives_the_same_bits(two_layer):
    from test_distributed import ThreadWorld

    model, x, y = two_layer
    layers = {"conv": model.conv, "fc": model.fc}
    single = activity_profile(model, layers, x, y, tuple(range(4)), batch_size=7)
    for size in (2, 3):
        def rank(ctx):
            net = copy.deepcopy(model)
            return activity_profile(net, {n: net.get_submodule(n) for n in layers}, x, y,
                                    tuple(range(4)), batch_size=7, dist=ctx)

        for prof in ThreadWorld(size).run(rank):
            for name in layers:
                assert torch.equal(prof.layers[name], single.layers[name]), (size, name)


def test_pan_rajan_refuses_what_does_not_apply(two_layer):
    model, x, y = two_layer
    with pytest.raises(ModelLegoError, match="`compensate`"):
        DisassemblyConfig((0,), method="pan-rajan", compensate=True).validate()
    with pytest.raises(ModelLegoError, match="one-vs-rest modules"):
        CompressConfig("contribution", method="pan-rajan", target_flops=0.5).validate()
    comp = disassemble_model(model, x, y, classes=(int(y[0]),), output_classes=range(4),
                             config=DisassemblyConfig((int(y[0]),), samples_per_class=5,
                                                      method="pan-rajan"))
    with pytest.raises(ModelLegoError, match="disassemble its source model"):
        disassemble_model(comp.model, x, y, classes=(int(y[0]),), output_classes=range(4))
    assert get_method("pan-rajan").head == "one-vs-rest"


# --------------------------------------------------------------------------- files, assembly


@pytest.fixture(scope="module")
def source(simnet_digits_file: Path) -> Path:
    return simnet_digits_file


@pytest.fixture(scope="module")
def modules(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    out, folder = {}, tmp_path_factory.mktemp("pan_rajan")  # the source's folder is shared
    for c in (1, 3, 7):
        path = folder / f"module{c}.safetensors"
        code, _, err = run_cli(["disassemble", source, "--classes", str(c), "--out", path,
                                "--samples-per-class", "10", "--method", "pan-rajan"])
        assert code == 0, err
        out[c] = path
    return out


def test_module_file_carries_the_head_as_plain_data(modules, source):
    man = read_manifest(modules[3])
    assert man["head"] == "one-vs-rest" and man["classes"] == [3]
    assert man["provenance"]["method"] == "pan-rajan"
    assert man["plan"]["fc"]["out"][0] == 3 and sorted(man["plan"]["fc"]["out"]) == list(
        range(10))
    module, _ = load_model(modules[3])
    src, _ = load_model(source)
    assert isinstance(module, OneVsRest)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(run(module, x).double(), by_hand(run(module.net, x), 1), atol=1e-5)
    assert count_params(module) <= count_params(src)
    plain = read_manifest(source)
    assert "head" not in plain


def test_assembly_of_modules_takes_the_highest_concern_score(modules):
    parts = [modules[1], modules[3], modules[7]]
    model, man, _ = assemble(parts, AssemblyConfig())  # no scaling given: concern
    assert man["scaling"] == "concern" and man["provenance"]["config"]["scaling"] == "concern"
    assert [p["head"] for p in man["parts"]] == ["one-vs-rest"] * 3
    assert man["provenance"]["calibration"] == {"scaling": "concern"}
    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    z = model.body.adapters[0](x)  # the parts read normalised digits
    scores = torch.cat([run(load_model(p)[0], z) for p in parts], 1)
    out = run(model, x)
    assert torch.equal(out, scores)
    assert torch.equal(out.argmax(1), scores.argmax(1))
    assert [lab["class"] for lab in man["labels"]] == [1, 3, 7]
    code, _, err = run_cli(["assemble", *parts, "--out", parts[0].parent / "asm.safetensors",
                            "--scaling", "calibrated"])
    assert code == 2 and "concern" in err
    with pytest.raises(ModelLegoError, match="layout 'parallel'"):
        assemble(parts, AssemblyConfig(layout="padded", scaling="none"))


def test_concern_scaling_scores_plain_parts_one_vs_rest(modules, source, tmp_path):
    comp = tmp_path / "plain.safetensors"
    code, _, err = run_cli(["disassemble", source, "--classes", "2,5", "--out", comp,
                            "--samples-per-class", "10"])
    assert code == 0, err
    model, man, _ = assemble([modules[1], comp], AssemblyConfig(scaling="concern"))
    x = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    z = model.body.adapters[0](x)
    plain = run(load_model(comp)[0], z)
    want = torch.cat([run(load_model(modules[1])[0], z), by_hand(plain, 2).float()], 1)
    assert torch.allclose(run(model, x), want, atol=1e-5)
    path = tmp_path / "asm.safetensors"
    save_model(path, model, man)
    again, _ = load_model(path)
    assert torch.equal(run(again, x), run(model, x))
