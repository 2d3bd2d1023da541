"""Tests for the disassembly methods: contribution (default), contribution-2022 and frat."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import TwoLayer, masked_source_logits, randomize_bn, run, run_cli, varied_random_model
from modellego.analysis.frat import frat_locate, gradient_profile
from modellego.analysis.locate import LocateConfig, locate, profiled_layers
from modellego.analysis.methods import candidates, get_method
from modellego.analysis.profile import contribution_profile, select_samples
from modellego.analysis.search import FRAT_SCALES, rule_family
from modellego.cli import main
from modellego.data import load_split, normalize
from modellego.disassembly import METHODS, DisassemblyConfig, default_locate, disassemble_model
from modellego.errors import ModelLegoError
from modellego.files import load_model
from modellego.io import read_manifest
from modellego.models import list_models
from modellego.surgery.extract import apply_plan
from modellego.surgery.graph import build_channel_graph
from modellego.surgery.plan import plan_from_masks

TASK = (3, 1)
K = 20
TOL = 1e-5


def assert_no_hooks(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks, name
        assert not mod._backward_hooks, name


# --------------------------------------------------------------------------- fixtures


# --------------------------------------------------------------------------- default method


def test_default_method_is_the_contribution_pipeline_bit_for_bit(trained, digits):
    """A component made with the default config equals one assembled by hand from the
    pipeline's parts as they were before methods existed (no method anywhere)."""
    x, y = digits
    comp = disassemble_model(trained, x, y, classes=TASK, output_classes=range(10),
                             config=DisassemblyConfig.paper(TASK, samples_per_class=K))
    assert comp.method == "contribution" and comp.locate == LocateConfig()
    assert DisassemblyConfig.paper(TASK).locate == LocateConfig() == default_locate()
    assert comp.reconstruction is None and comp.validation is None
    graph = build_channel_graph(trained, (1, 28, 28))
    sel = select_samples(trained, x, y, TASK, range(10), k=K)
    idx = sel.all_indices()
    layers = {lay.name: lay.module for lay in profiled_layers(graph)}
    profile = contribution_profile(trained, layers, x[idx], y[idx], TASK)
    masks = locate(graph, profile, TASK, range(10), LocateConfig())
    plan = plan_from_masks(graph, masks, list(TASK))
    reference = apply_plan(trained, plan).eval()
    assert comp.plan == plan
    assert comp.selection.indices == sel.indices and not comp.selection.correct_only
    got, want = comp.model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    explicit = disassemble_model(trained, x, y, classes=TASK, output_classes=range(10),
                                 config=DisassemblyConfig(TASK, samples_per_class=K,
                                                          method="contribution",
                                                          preset="paper"))
    assert explicit.plan == plan


def test_unknown_method_and_incompatible_options_are_refused(trained, digits):
    x, y = digits
    with pytest.raises(ModelLegoError, match="unknown disassembly method 'magic'"):
        disassemble_model(trained, x, y, classes=TASK, output_classes=range(10),
                          config=DisassemblyConfig(TASK, method="magic"))
    with pytest.raises(ModelLegoError, match="`compensate`"):
        DisassemblyConfig(TASK, method="frat", compensate=True).validate()
    with pytest.raises(ModelLegoError, match="`refine`"):
        DisassemblyConfig(TASK, method="frat", max_accuracy_drop=1.0, refine=True).validate()
    with pytest.raises(ModelLegoError, match="normalisation 'l2'"):
        LocateConfig(normalize="l2").validate()


# --------------------------------------------------------------------------- contribution-2022


class Identity3(nn.Module):
    """Logits equal to the input: ``x`` of shape (N, 3, 1, 1) -> (N, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(3))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


def test_2022_selection_skips_misclassified_samples():
    """Sample 0 (class 0) has the highest true-class probability of its class but loses to
    class 1, so only the correct-only selection passes it over."""
    logits = torch.tensor([[2.0, 2.1, -5.0],    # class 0, misclassified, p_0 = 0.475
                           [1.0, 0.6, 0.6],     # class 0, correct, p_0 = 0.427
                           [0.5, 0.0, 0.0],     # class 0, correct, p_0 = 0.452
                           [0.0, 3.0, 0.0],     # class 1, correct
                           [0.0, 0.0, 3.0]])    # class 2, correct
    x = logits.view(5, 3, 1, 1)
    y = torch.tensor([0, 0, 0, 1, 2])
    model = Identity3().eval()
    plain = select_samples(model, x, y, (0, 1), range(3), k=2)
    assert plain.indices == {0: (0, 2), 1: (3,)}
    strict = select_samples(model, x, y, (0, 1), range(3), k=2, correct_only=True)
    assert strict.indices == {0: (2, 1), 1: (3,)} and strict.correct_only
    comp = disassemble_model(model, x, y, classes=(0, 1), output_classes=range(3),
                             config=DisassemblyConfig((0, 1), samples_per_class=2,
                                                      method="contribution-2022"))
    assert comp.selection.indices == strict.indices
    assert comp.profile.samples == {0: 2, 1: 1}  # fewer than K is fine
    y_bad = torch.tensor([0, 1, 1, 1, 0])  # both class-0 samples are misclassified
    with pytest.raises(ModelLegoError, match="class 0: none of its 2 training samples"):
        disassemble_model(model, x, y_bad, classes=(0, 1), output_classes=range(3),
                          config=DisassemblyConfig((0, 1), method="contribution-2022"))


def test_2022_keeps_the_inputs_above_alpha_of_the_max():
    """The kept conv channels equal the ones computed here from the definition: per selected
    sample s[q,p] = W[q,p] * a[p], clamped at 0, summed over the class; the class's logit row
    divided by its max over p; kept when > alpha_linear (one relevant output, so beta only
    needs the count to be 1). One-class tasks, so the OR over classes hides nothing."""
    torch.manual_seed(3)
    model = TwoLayer().eval()
    with torch.no_grad():  # all contributions positive, so min-max and max differ
        row = torch.tensor([1.0, 1.2, 1.5, 2.2, 3.0, 3.5])
        model.fc.weight.copy_(torch.stack([row.roll(c) for c in range(4)]))
        model.conv.weight.mul_(0.1)
        model.conv.bias.fill_(1.0)
    x = torch.randn(60, 1, 6, 6)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample correct: the selection is the plain one
        feats = torch.relu(model.conv(x)).mean((2, 3)).double()
    w = model.fc.weight.double()
    differ = 0
    for c in (int(v) for v in y.unique()):
        cfg = DisassemblyConfig((c,), samples_per_class=8, method="contribution-2022")
        comp = disassemble_model(model, x, y, classes=(c,), output_classes=range(4),
                                 config=cfg)
        assert comp.locate.normalize == "max"
        alpha = comp.locate.alpha_linear
        s = (w[c][None, :] * feats[list(comp.selection.indices[c])]).clamp_min(0).sum(0)
        want = s / (s.max() + 1e-5) > alpha
        assert comp.plan.kept("conv") == tuple(int(i) for i in want.nonzero().flatten())
        minmax = disassemble_model(model, x, y, classes=(c,), output_classes=range(4),
                                   config=DisassemblyConfig.paper((c,), samples_per_class=8))
        want_minmax = (s - s.min()) / (s.max() - s.min() + 1e-5) > alpha
        assert minmax.plan.kept("conv") == tuple(
            int(i) for i in want_minmax.nonzero().flatten())
        differ += not torch.equal(want, want_minmax)
    assert differ  # the normalisation matters here


# --------------------------------------------------------------------------- frat


class Tiny(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU -> flatten -> linear (3 classes), 5x5 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.flatten(torch.relu(self.conv2(h)), 1))


def reference_gradients(model: Tiny, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample, d P_top / d (input of each layer), clamped, summed over space; each
    input made a leaf of its own graph, one sample at a time."""
    out = {"conv1": [], "conv2": [], "fc": []}
    for xi in x:
        xi = xi[None].clone().requires_grad_(True)
        h = torch.relu(model.bn(model.conv1(xi)))
        h_leaf = h.detach().requires_grad_(True)
        f = torch.flatten(torch.relu(model.conv2(h_leaf)), 1)
        f_leaf = f.detach().requires_grad_(True)
        logits = model.fc(f_leaf)
        p = torch.softmax(logits.double(), 1)
        top = p[0, int(logits.argmax())]
        g_f, = torch.autograd.grad(top, f_leaf, retain_graph=True)
        # chain rule by hand for the earlier inputs: back through fc, then conv2
        g_h, = torch.autograd.grad(f, h_leaf, grad_outputs=g_f)
        h2 = torch.relu(model.bn(model.conv1(xi)))
        g_x, = torch.autograd.grad(h2, xi, grad_outputs=g_h)
        out["fc"].append(g_f.clamp_min(0).double()[0])
        out["conv2"].append(g_h.clamp_min(0).double()[0].sum((1, 2)))
        out["conv1"].append(g_x.clamp_min(0).double()[0].sum((1, 2)))
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(5)
    model = randomize_bn(Tiny(), 2).eval()
    x = torch.randn(40, 2, 5, 5)
    y = torch.arange(40) % 3
    return model, x, y


def test_frat_gradients_equal_an_autograd_reference(tiny):
    model, x, y = tiny
    layers = {"conv1": model.conv1, "conv2": model.conv2, "fc": model.fc}
    model.conv1.weight.grad = None
    keep = y != 1
    with pytest.raises(ModelLegoError, match="among the profiled classes"):
        gradient_profile(model, layers, x, y, (2, 0))
    prof = gradient_profile(model, layers, x[keep], y[keep], (2, 0), batch_size=7)
    ref = reference_gradients(model, x)
    assert prof.samples == {2: 13, 0: 14}
    for name in layers:
        for i, c in enumerate((2, 0)):
            want = ref[name][y == c].sum(0)
            got = prof.layers[name][i]
            assert got.dtype == torch.float64
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-12), (name, c)
        assert (prof.layers[name] > 0).any()
    assert model.conv1.weight.grad is None  # no parameter gradient accumulated
    assert_no_hooks(model)
    assert not model.training and torch.is_grad_enabled()


def test_frat_masks_follow_the_definition(tiny):
    """Channels per layer: features of the flattened map summed back to channels, min-max
    rescaled over the layer's input, above alpha; a space keeps what any reader keeps."""
    model, x, y = tiny
    graph = build_channel_graph(model, (2, 5, 5))
    layers = {lay.name: lay.module for lay in profiled_layers(graph)}
    prof = gradient_profile(model, layers, x, y, (0, 1, 2))
    cfg = LocateConfig(alpha_conv=0.3, alpha_linear=0.5)
    masks = frat_locate(graph, prof, (0, 1), cfg)

    def crit(v: torch.Tensor, alpha: float) -> torch.Tensor:
        return (v - v.min()) / (v.max() - v.min()) > alpha

    conv2_in = crit(prof.layers["conv2"][0], 0.3) | crit(prof.layers["conv2"][1], 0.3)
    fc_in = (crit(prof.layers["fc"][0].view(4, 9).sum(1), 0.5) |
             crit(prof.layers["fc"][1].view(4, 9).sum(1), 0.5))
    space = {lay.name: lay.in_layout[0].space for lay in graph.layers}
    assert torch.equal(masks[space["conv2"]], conv2_in)
    assert torch.equal(masks[space["fc"]], fc_in)
    assert masks[space["conv1"]].all()  # the image: frozen
    assert not conv2_in.all() and not fc_in.all()  # not vacuous


def test_frat_refuses_inputs_modified_in_place():
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x)).mean((2, 3))
            out = self.fc(h)
            h.mul_(2)  # changes fc's input after fc has read it
            return out

    model = Bad().eval()
    with pytest.raises(ModelLegoError, match="layer 'fc': its input is modified in place"):
        gradient_profile(model, {"fc": model.fc}, torch.randn(4, 1, 3, 3),
                         torch.zeros(4, dtype=torch.long), (0,))
    assert_no_hooks(model)


def test_frat_under_emulated_ranks_gives_the_same_bits(tiny):
    from test_distributed import ThreadWorld

    model, x, y = tiny
    layers = {"conv1": model.conv1, "conv2": model.conv2, "fc": model.fc}
    single = gradient_profile(model, layers, x, y, (0, 1, 2), batch_size=6)
    for size in (2, 3):
        def rank(ctx):
            net = copy.deepcopy(model)  # hooks are per module: one copy per emulated rank
            return gradient_profile(net, {n: net.get_submodule(n) for n in layers}, x, y,
                                    (0, 1, 2), batch_size=6, dist=ctx)

        profiles = ThreadWorld(size).run(rank)
        for prof in profiles:
            for name in layers:
                assert torch.equal(prof.layers[name], single.layers[name]), (size, name)


def test_methods_under_emulated_ranks_give_the_single_process_component(trained, digits):
    """contribution-2022 (correct-only selection) and frat, data-parallel over 2 ranks."""
    from test_distributed import ThreadWorld

    x, y = digits
    keep = torch.isin(y, torch.tensor(TASK))
    x, y = x[keep][:300], y[keep][:300]
    for method in ("contribution-2022", "frat"):
        cfg = DisassemblyConfig(TASK, samples_per_class=K, method=method, batch_size=8)
        single = disassemble_model(trained, x, y, classes=TASK, output_classes=range(10),
                                   config=cfg)
        # fx tracing patches torch globally: trace each rank's copy before the threads start
        nets = [copy.deepcopy(trained) for _ in range(2)]
        graphs = [build_channel_graph(net, tuple(x.shape[1:])) for net in nets]
        comps = ThreadWorld(2).run(lambda ctx, cfg=cfg, nets=nets, graphs=graphs:
                                   disassemble_model(nets[ctx.rank], x, y, classes=TASK,
                                                     output_classes=range(10), config=cfg,
                                                     dist=ctx, graph=graphs[ctx.rank]))
        for comp in comps:
            assert comp.selection == single.selection
            assert comp.plan == single.plan
            for name in single.profile.layers:
                assert torch.equal(comp.profile.layers[name], single.profile.layers[name])


# --------------------------------------------------------------------------- searches


@pytest.mark.parametrize("method", METHODS)
def test_threshold_searches_work_for_every_method(method, trained, digits):
    x, y = digits
    val = load_split("digits", "val").subset(TASK)
    vx, vy = normalize(val.images, val.info), val.labels
    base = DisassemblyConfig(TASK, samples_per_class=K, method=method).locate
    family = candidates(base, method)
    comp = disassemble_model(trained, x, y, classes=TASK, output_classes=range(10),
                             config=DisassemblyConfig(TASK, samples_per_class=K, method=method,
                                                      max_accuracy_drop=2.0),
                             val_images=vx, val_labels=vy)
    assert comp.locate in family and comp.search
    ok = [t for t in comp.search if t["ok"]]
    assert ok, "some candidate keeps the validation accuracy"
    assert comp.locate.to_dict() in [t["locate"] for t in ok]
    restricted = (run(trained, vx)[:, list(TASK)].argmax(1) == torch.tensor(
        [TASK.index(int(c)) for c in vy])).double().mean().item()
    got = (run(comp.model, vx).argmax(1) == torch.tensor(
        [TASK.index(int(c)) for c in vy])).double().mean().item()
    assert got >= restricted - 0.02
    small = disassemble_model(trained, x, y, classes=TASK, output_classes=range(10),
                              config=DisassemblyConfig(TASK, samples_per_class=K,
                                                       method=method, target_flops=0.6))
    assert small.locate in family
    passing = [t for t in small.search if t["ok"]]
    if passing:
        assert passing[0]["flops_ratio"] <= 0.6
    if method == "frat":
        assert [c.alpha_conv for c in family] == [min(1.0, 0.2 * f) for f in FRAT_SCALES]
        assert {c.beta_conv for c in family} == {base.beta_conv}
    if method == "contribution-2022":
        assert {c.normalize for c in family} == {"max"}


# --------------------------------------------------------------------------- every architecture


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    return torch.randn(60, 1, 28, 28, generator=torch.Generator().manual_seed(0))


#: methods whose components answer with their task logits (pan-rajan's modules answer with
#: concern scores; their masked-source test is in tests/test_pan_rajan.py)
LOGIT_METHODS = tuple(m for m in METHODS if get_method(m).head is None)


@pytest.mark.slow
@pytest.mark.parametrize("method", LOGIT_METHODS)
@pytest.mark.parametrize("arch", list_models())
def test_every_architecture_disassembles_with_every_method(arch, method, noise):
    # its own predictions as labels: ones the model gets right, for contribution-2022
    model, y, classes = varied_random_model(arch, noise)
    assert torch.bincount(y, minlength=10)[list(classes)].min() > 0
    comp = disassemble_model(model, noise, y, classes=classes, output_classes=range(10),
                             config=DisassemblyConfig(classes, samples_per_class=5,
                                                      method=method, preset="paper"))
    assert comp.method == method
    assert comp.plan.kept(comp.graph.output_layer.name) == classes
    out = run(comp.model, noise[:6])
    assert out.shape == (6, 2)
    masked = masked_source_logits(model, comp.graph, comp.plan, noise[:6])[:, list(classes)]
    assert (out - masked).abs().max().item() <= TOL
    assert_no_hooks(model)
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def source(simnet_digits_file: Path) -> Path:
    return simnet_digits_file


@pytest.mark.parametrize("method", METHODS)
def test_cli_records_the_method(method, source, tmp_path):
    out = tmp_path / "comp.safetensors"
    args = ["disassemble", source, "--classes", "1,3", "--out", out,
            "--samples-per-class", "10"]
    if method != "contribution":
        args += ["--method", method]
    if method == "frat":
        args += ["--html", tmp_path / "r.html"]
    code, stdout, err = run_cli(args)
    assert code == 0, err
    prov = read_manifest(out)["provenance"]
    assert prov["method"] == method and prov["config"]["method"] == method
    if method == "contribution":  # the default preset: the mass rule's searched threshold
        family = [d.to_dict() for c in rule_family(LocateConfig(rule="mass"))
                  for d in (c, replace(c, task_level=True))]  # two classes: both families
        assert prov["config"]["preset"] == "default" and prov["locate"] in family
        assert prov["validation"]["budget_pp"] == 0.5 and prov["config"]["reconstruct"] == 1000
    else:
        assert prov["locate"] == default_locate(method).to_dict()
    assert prov["locate"]["normalize"] == ("max" if method == "contribution-2022" else "minmax")
    comp, _ = load_model(out)
    assert run(comp, torch.zeros(1, 1, 28, 28)).shape == (1, 2)
    if method == "frat":
        assert prov["locate"]["alpha_conv"] == 0.2 and (tmp_path / "r.html").exists()


def test_cli_explicit_thresholds_override_the_method_defaults(source, tmp_path):
    out = tmp_path / "comp.safetensors"
    code, _, err = run_cli(["disassemble", source, "--classes", "1,3", "--out", out,
                            "--samples-per-class", "10", "--method", "frat",
                            "--alpha-conv", "0.1"])
    assert code == 0, err
    loc = read_manifest(out)["provenance"]["locate"]
    assert loc["alpha_conv"] == 0.1 and loc["alpha_linear"] == 0.2
    assert replace(default_locate("frat"), alpha_conv=0.1).to_dict() == loc


def test_cli_unknown_method_exits_2(source, tmp_path, capsys):
    out = tmp_path / "comp.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["disassemble", str(source), "--classes", "1,3", "--out", str(out),
              "--method", "magic"])
    assert exc.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err
    assert not out.exists()
    code, _, err = run_cli(["disassemble", source, "--classes", "1,3", "--out", out,
                            "--method", "frat", "--compensate"])
    assert code == 2 and "--compensate" in err and not out.exists()


def test_cli_method_choices_are_the_library_methods():
    from modellego.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["disassemble"]
    action = next(a for a in sub._actions if a.dest == "method")
    assert tuple(action.choices) == METHODS and action.default == "contribution"

