"""Tests for compression: channel scores, uniform pruning, the contribution criterion, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import masked_source_logits, randomize_bn, run, run_cli
from modellego.analysis.profile import select_samples
from modellego.compression import (
    CompressConfig,
    channel_scores,
    compress_model,
    masks_from_drops,
    prunable_spaces,
    prune_uniform,
    removal_order,
    uniform_masks,
)
from modellego.data import dataset_info
from modellego.errors import ModelLegoError
from modellego.files import load_model, save_model
from modellego.io import read_manifest
from modellego.manifest import Manifest
from modellego.metrics import count_flops, count_params
from modellego.models import create_model, list_models
from modellego.surgery.extract import apply_plan
from modellego.surgery.graph import build_channel_graph
from modellego.surgery.plan import ComponentPlan, plan_from_masks

TOL = 1e-5
SHAPE = (1, 28, 28)
#: the plain cut (compress repairs every candidate by default): what the structural tests check
PLAIN = {"reconstruct": 0, "recalibrate_bn": 0}
PLAIN_CLI = ["--no-reconstruct", "--recalibrate-bn", "0"]
# Uniform pruning moves in steps of one channel of one space, so it lands at most one step
# under a FLOPs target. On these tiny widths one channel of an early layer is worth up to
# 8 % of the FLOPs; in LeNet-5 one of the 6 channels of the first conv is worth 14 %.
STEP_TOL = {"lenet5": 0.15}


def width(arch: str) -> float:
    # 0.25: see test_disassemble (random googlenet at 0.125 leaves branches unused); LeNet-5
    # is small at full width, and at 0.25 it has two 4-channel convs
    return 1.0 if arch == "lenet5" else 0.25


def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch, in_channels=1, num_classes=10, input_size=28, width=width(arch))
    return randomize_bn(model, seed + 1).eval()


@pytest.fixture(scope="module")
def noise() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(40, *SHAPE, generator=gen), torch.arange(40) % 10


# --------------------------------------------------------------------------- scores


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class Residual(nn.Module):
    """conv_a and conv_b write one space (coupled by the add); fc reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 6, 3, padding=1)
        self.conv_b = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv_a(x))
        h = torch.relu(self.conv_b(h) + h)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def l1_by_hand(w: torch.Tensor) -> list[float]:
    return [sum(abs(float(v)) for v in w[q].flatten()) for q in range(w.shape[0])]


def fpgm_by_hand(w: torch.Tensor) -> list[float]:
    rows = [[float(v) for v in w[q].flatten()] for q in range(w.shape[0])]
    return [sum(math.sqrt(sum((a - b) ** 2 for a, b in zip(r, s))) for s in rows)
            for r in rows]


def ranking(values: list[float]) -> list[int]:
    """Channel indices from least to most important (ties: lower index first)."""
    return sorted(range(len(values)), key=lambda i: (values[i], i))


@pytest.mark.parametrize("criterion,by_hand", [("l1", l1_by_hand), ("fpgm", fpgm_by_hand)])
def test_scores_of_a_tiny_conv_match_the_definition(criterion, by_hand):
    torch.manual_seed(3)
    net = TwoConvs().eval()
    graph = build_channel_graph(net, (2, 6, 6))
    space1 = graph.layer("conv1").out_space
    space2 = graph.layer("conv2").out_space
    assert prunable_spaces(graph) == [space1, space2]  # not the image, not the logits
    scores = channel_scores(graph, criterion)
    for name, space in (("conv1", space1), ("conv2", space2)):
        expected = by_hand(getattr(net, name).weight.detach())
        mean = sum(expected) / len(expected)
        got = scores[space].tolist()
        assert got == pytest.approx([e / mean for e in expected], rel=1e-9)
        assert ranking(got) == ranking(expected)
    # removing 40 % of every space drops floor(0.4 * 5) = 2 and floor(0.4 * 4) = 1 channels:
    # the lowest-scored ones
    masks = uniform_masks(graph, scores, 0.4)
    low1 = ranking(by_hand(net.conv1.weight.detach()))[:2]
    low2 = ranking(by_hand(net.conv2.weight.detach()))[:1]
    assert sorted(torch.nonzero(~masks[space1]).flatten().tolist()) == sorted(low1)
    assert torch.nonzero(~masks[space2]).flatten().tolist() == low2
    assert masks[graph.output_space].all()
    assert all(masks[s].all() for s in graph.input_spaces)


def test_fpgm_prunes_the_filter_nearest_the_others_first():
    """Three filters near each other and one far: the central one goes first, the far one
    last (an L1 ranking would differ: the far filter is the smallest)."""
    net = TwoConvs().eval()
    with torch.no_grad():
        w = torch.zeros_like(net.conv1.weight)
        w[0].fill_(1.0)
        w[1].fill_(1.1)
        w[2].fill_(1.2)
        w[3].fill_(-0.05)
        w[4].fill_(1.15)
        net.conv1.weight.copy_(w)
    graph = build_channel_graph(net, (2, 6, 6))
    fpgm = channel_scores(graph, "fpgm")[graph.layer("conv1").out_space]
    l1 = channel_scores(graph, "l1")[graph.layer("conv1").out_space]
    assert ranking(fpgm.tolist()) == [1, 4, 0, 2, 3]
    assert ranking(l1.tolist()) == [3, 0, 1, 4, 2]


@pytest.mark.parametrize("criterion,by_hand", [("l1", l1_by_hand), ("fpgm", fpgm_by_hand)])
def test_coupled_space_sums_the_normalised_scores_of_its_writers(criterion, by_hand):
    torch.manual_seed(5)
    net = Residual().eval()
    graph = build_channel_graph(net, (1, 8, 8))
    space = graph.layer("conv_a").out_space
    assert graph.layer("conv_b").out_space == space
    assert prunable_spaces(graph) == [space]
    a = by_hand(net.conv_a.weight.detach())
    b = by_hand(net.conv_b.weight.detach())
    expected = [x / (sum(a) / 6) + y / (sum(b) / 6) for x, y in zip(a, b)]
    scores = channel_scores(graph, criterion)
    assert scores[space].tolist() == pytest.approx(expected, rel=1e-9)
    # the coupled channels go from every layer that reads or writes them
    masks = uniform_masks(graph, scores, 0.5)
    gone = sorted(ranking(expected)[:3])
    assert sorted(torch.nonzero(~masks[space]).flatten().tolist()) == gone
    plan = plan_from_masks(graph, masks, range(3))
    kept = tuple(i for i in range(6) if i not in gone)
    for name in ("conv_a", "conv_b"):
        assert plan.kept(name) == kept
    assert plan.kept("conv_b", "in") == kept and plan.kept("fc", "in") == kept
    small = apply_plan(net, plan)
    x = torch.randn(4, 1, 8, 8)
    assert (run(small, x) - masked_source_logits(net, graph, plan, x)).abs().max() <= TOL


def test_removal_order_is_uniform_up_to_one_channel():
    net = tiny_model("resnet18")
    graph = build_channel_graph(net, SHAPE)
    order = removal_order(graph)
    spaces = prunable_spaces(graph)
    assert len(order) == sum(graph.space_size[s] - 1 for s in spaces)
    fractions = [f for f, _ in order]
    assert fractions == sorted(fractions)
    drops = {s: 0 for s in spaces}
    for f, s in order:
        drops[s] += 1
        assert drops[s] == f * graph.space_size[s]  # the k-th channel goes at k / n


# --------------------------------------------------------------------------- every architecture


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["l1", "fpgm"])
@pytest.mark.parametrize("arch", list_models())
def test_uniform_pruning_meets_the_flops_target(arch, criterion, noise):
    model = tiny_model(arch)
    target = 0.6
    res = prune_uniform(model, SHAPE, criterion, target_flops=target)
    graph = build_channel_graph(model, SHAPE)
    source_flops = count_flops(model, SHAPE)
    ratio = count_flops(res.model, SHAPE) / source_flops
    assert ratio == pytest.approx(res.flops_ratio) and ratio <= target
    assert target - ratio <= STEP_TOL.get(arch, 0.08)
    # one removal fewer would miss the target: bisection found the boundary
    scores = channel_scores(graph, criterion)
    order = removal_order(graph)
    removed = _removed(graph, res.plan)
    assert removed > 0
    drops = {s: 0 for s in scores}
    for _, s in order[:removed - 1]:
        drops[s] += 1
    one_less = apply_plan(model, plan_from_masks(graph, masks_from_drops(graph, scores, drops),
                                                 range(10)))
    assert count_flops(one_less, SHAPE) / source_flops > target
    # same fraction everywhere (up to one channel); frozen spaces and the logits untouched
    kept = _kept_per_space(graph, res.plan)
    for s in graph.spaces():
        n = graph.space_size[s]
        if s in prunable_spaces(graph):
            # every channel due before the fraction is gone, some of those due at it
            assert res.fraction * n - 1 - 1e-9 <= n - kept[s] <= res.fraction * n + 1e-9
            assert kept[s] >= 1
        else:
            assert kept[s] == n
    out = run(res.model, noise[0][:6])
    assert out.shape == (6, 10)
    masked = masked_source_logits(model, graph, res.plan, noise[0][:6])
    assert (out - masked).abs().max().item() <= TOL


def _kept_per_space(graph, plan: ComponentPlan) -> dict[int, int]:
    kept = {}
    for lay in graph.layers:
        kept[lay.out_space] = len(plan.kept(lay.name))
        for seg in lay.in_layout:
            kept.setdefault(seg.space, seg.size)
    return kept


def _removed(graph, plan: ComponentPlan) -> int:
    kept = _kept_per_space(graph, plan)
    return sum(graph.space_size[s] - kept[s] for s in prunable_spaces(graph))


@pytest.mark.slow
@pytest.mark.parametrize("arch", list_models())
def test_contribution_compression_meets_the_flops_target(arch, noise):
    x, y = noise
    model = tiny_model(arch)
    target = 0.9
    config = CompressConfig("contribution", target_flops=target, samples_per_class=2, **PLAIN)
    res = compress_model(model, SHAPE, output_classes=range(10), config=config, images=x,
                         labels=y)
    assert res.criterion == "contribution" and res.locate.rule == "mass"
    ratio = count_flops(res.model, SHAPE) / count_flops(model, SHAPE)
    assert ratio <= target
    assert res.plan.kept(res.graph.output_layer.name) == tuple(range(10))
    out = run(res.model, x[:6])
    masked = masked_source_logits(model, res.graph, res.plan, x[:6])
    assert (out - masked).abs().max().item() <= TOL


def test_contribution_from_the_selected_samples_alone_is_the_same(noise):
    """benchmarks/compression.py selects samples once and hands only those on."""
    x, y = noise
    model = tiny_model("resnet18")
    config = CompressConfig("contribution", target_flops=0.9, samples_per_class=2,
                            **PLAIN)
    full = compress_model(model, SHAPE, output_classes=range(10), config=config, images=x,
                          labels=y)
    idx = select_samples(model, x, y, range(10), range(10), k=2).all_indices()
    short = compress_model(model, SHAPE, output_classes=range(10), config=config,
                           images=x[idx], labels=y[idx])
    assert short.plan == full.plan and short.locate == full.locate
    assert len(idx) == 20 < len(x)


# --------------------------------------------------------------------------- other targets


def test_params_target_for_every_criterion(noise):
    x, y = noise
    model = tiny_model("vgg11_bn")
    for criterion in ("l1", "fpgm", "contribution"):
        config = CompressConfig(criterion, target_params=0.7, samples_per_class=2, **PLAIN)
        res = compress_model(model, SHAPE, output_classes=range(10), config=config, images=x,
                             labels=y)
        assert count_params(res.model) / count_params(model) <= 0.7, criterion
    assert all("params_ratio" in t for t in res.trials)  # the search priced in parameters


def test_accuracy_budget_for_uniform_pruning_stops_at_the_boundary(noise):
    x, y = noise
    model = tiny_model("simnet")
    # labels the source itself predicts: source accuracy 1.0 on this "validation" set
    labels = run(model, x).argmax(1)
    config = CompressConfig("l1", max_accuracy_drop=30.0, **PLAIN)
    res = compress_model(model, SHAPE, output_classes=range(10), config=config,
                         val_images=x, val_labels=labels)
    acc = (run(res.model, x).argmax(1) == labels).double().mean().item()
    assert acc >= 0.7
    graph = build_channel_graph(model, SHAPE)
    removed = _removed(graph, res.plan)
    order = removal_order(graph)
    assert 0 < removed < len(order)
    scores = channel_scores(graph, "l1")
    drops = {s: 0 for s in scores}
    for _, s in order[:removed + 1]:
        drops[s] += 1
    one_more = apply_plan(model, plan_from_masks(graph, masks_from_drops(graph, scores, drops),
                                                 range(10)))
    assert (run(one_more, x).argmax(1) == labels).double().mean().item() < 0.7


def test_unreachable_target_is_refused():
    model = tiny_model("simnet")
    with pytest.raises(ModelLegoError, match="one channel per prunable layer"):
        prune_uniform(model, SHAPE, "l1", target_flops=0.001)


@pytest.mark.parametrize("kwargs,words", [
    ({}, ["give a target"]),
    ({"target_flops": 0.0}, ["`target_flops`", "(0, 1]"]),
    ({"target_flops": 1.2}, ["`target_flops`", "(0, 1]"]),
    ({"target_params": -0.5}, ["`target_params`", "(0, 1]"]),
    ({"target_flops": 0.5, "target_params": 0.5}, ["`target_flops`", "`target_params`"]),
    ({"target_flops": 0.5, "max_accuracy_drop": 1.0}, ["`max_accuracy_drop`", "not both"]),
    ({"criterion": "magic", "target_flops": 0.5}, ["criterion", "l1"]),
    ({"target_flops": 0.5, "samples_per_class": 0}, ["`samples_per_class`"]),
    ({"target_flops": 0.5, "method": "magic"}, ["unknown disassembly method"]),
    ({"target_flops": 0.5, "criterion": "l1", "method": "frat"}, ["`method` frat", "l1"]),
])
def test_bad_configs_are_refused(kwargs, words):
    # library errors name the parameters; the command line shows them as its flags
    with pytest.raises(ModelLegoError) as info:
        CompressConfig(**kwargs).validate()
    for w in words:
        assert w in str(info.value)


# --------------------------------------------------------------------------- files and CLI


def model_file(folder: Path, arch: str) -> Path:
    info = dataset_info("digits")
    kwargs = {"in_channels": 1, "num_classes": 10, "input_size": 28, "width": width(arch)}
    torch.manual_seed(0)
    model = randomize_bn(create_model(arch, **kwargs), 1).eval()
    manifest = Manifest.for_model(architecture={"name": arch, "kwargs": kwargs},
                                  dataset=info.to_dict(), classes=range(10))
    path = folder / f"{arch}.safetensors"
    save_model(path, model, manifest)
    return path


@pytest.fixture(scope="module")
def simnet_file(tmp_path_factory) -> Path:
    return model_file(tmp_path_factory.mktemp("compress"), "simnet")


@pytest.mark.parametrize("criterion", ["contribution", "l1", "fpgm"])
def test_cli_writes_a_component_file(criterion, simnet_file, tmp_path):
    out, rep = tmp_path / "small.safetensors", tmp_path / "r.json"
    code, stdout, err = run_cli(["compress", simnet_file, "--criterion", criterion,
                                 "--target-flops", "0.8", "--samples-per-class", "3",
                                 "--out", out, "--report", rep, *PLAIN_CLI])
    assert code == 0, err
    assert f"compressed by {criterion}" in stdout and "wrote" in stdout
    small, manifest = load_model(out)
    assert manifest["kind"] == "component" and manifest["classes"] == list(range(10))
    prov = manifest["provenance"]
    assert prov["made_by"] == "modellego compress" and prov["method"] == criterion
    assert prov["config"]["target_flops"] == 0.8
    assert prov["source"]["file"] == str(simnet_file)
    source, _ = load_model(simnet_file)
    assert count_flops(small, (1, 28, 28)) / count_flops(source, (1, 28, 28)) <= 0.8
    if criterion == "contribution":
        assert prov["disassembly"]["target_flops"] == 0.8
        assert prov["locate"]["rule"] == "mass"
    else:
        assert 0 < prov["fraction"] < 1
    # the plan in the manifest rebuilds the same model from the source
    graph = build_channel_graph(source, (1, 28, 28))
    plan = ComponentPlan.from_dict(manifest["plan"])
    x = torch.randn(5, 1, 28, 28)
    assert (run(small, x) - masked_source_logits(source, graph, plan, x)).abs().max() <= TOL
    # evaluate reads it and agrees with the report
    import json

    report = json.loads(rep.read_text())
    code, stdout, _ = run_cli(["evaluate", out, "--json", "--no-latency"])
    assert code == 0
    assert json.loads(stdout)["accuracy"] == report["component_accuracy"]
    assert report["criterion"] == criterion and report["flops_ratio"] <= 0.8


def test_cli_method_of_the_contribution_criterion(simnet_file, tmp_path):
    out = tmp_path / "small.safetensors"
    method = "frat"
    code, _, err = run_cli(["compress", simnet_file, "--criterion", "contribution", "--method",
                            method, "--target-flops", "0.9", "--samples-per-class", "3",
                            "--out", out])
    assert code == 0, err
    prov = read_manifest(out)["provenance"]
    assert prov["config"]["method"] == prov["disassembly"]["method"] == method
    source, _ = load_model(simnet_file)
    small, _ = load_model(out)
    assert count_flops(small, (1, 28, 28)) / count_flops(source, (1, 28, 28)) <= 0.9
    # the random-weight model classifies no image of some class correctly: contribution-2022
    # (correctly classified samples only) says so and writes nothing
    bad = tmp_path / "bad.safetensors"
    code, _, err = run_cli(["compress", simnet_file, "--criterion", "contribution", "--method",
                            "contribution-2022", "--target-flops", "0.9", "--out", bad])
    assert code == 2 and "classified correctly" in err and not bad.exists()
    # the method is the contribution criterion's: with the default criterion it is refused
    code, _, err = run_cli(["compress", simnet_file, "--method", "frat", "--target-flops",
                            "0.9", "--out", bad])
    assert code == 2 and not bad.exists()
    assert err.splitlines()[-1] == (
        "modellego compress: error: --method frat applies to --criterion contribution only, "
        "not fpgm; pass --criterion contribution")


def test_cli_compressed_file_can_be_disassembled_and_compressed_again(simnet_file, tmp_path):
    first = tmp_path / "a.safetensors"
    assert run_cli(["compress", simnet_file, "--criterion", "l1", "--target-params", "0.8",
                    "--out", first, *PLAIN_CLI])[0] == 0
    second = tmp_path / "b.safetensors"
    code, _, err = run_cli(["compress", first, "--criterion", "fpgm", "--target-flops", "0.9",
                            "--out", second, *PLAIN_CLI])
    assert code == 0, err
    comp = tmp_path / "c.safetensors"
    code, _, err = run_cli(["disassemble", second, "--classes", "0,1", "--out", comp,
                            "--samples-per-class", "3"])
    assert code == 0, err
    # composed plans: the twice-compressed file is rebuilt from the original architecture
    small, manifest = load_model(second)
    source, _ = load_model(simnet_file)
    graph = build_channel_graph(source, (1, 28, 28))
    x = torch.randn(5, 1, 28, 28)
    plan = ComponentPlan.from_dict(manifest["plan"])
    assert (run(small, x) - masked_source_logits(source, graph, plan, x)).abs().max() <= TOL
    assert read_manifest(comp)["classes"] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("arch", list_models())
def test_cli_on_every_architecture(arch, tmp_path):
    path = model_file(tmp_path, arch)
    out = tmp_path / "small.safetensors"
    # the default repairs, on few images: reconstruction is graph-aware on every architecture
    code, stdout, err = run_cli(["compress", path, "--criterion", "fpgm", "--target-flops",
                                 "0.7", "--out", out, "--reconstruct", "64",
                                 "--recalibrate-bn", "64", "--no-fingerprint"])
    assert code == 0, err
    manifest = read_manifest(out)
    assert manifest["architecture"]["name"] == arch
    assert manifest["provenance"]["config"]["reconstruct"] == 64
    load_model(out)


@pytest.mark.parametrize("args,words", [
    ([], ["give a target"]),
    (["--target-flops", "0"], ["--target-flops", "(0, 1]"]),
    (["--target-flops", "1.5"], ["--target-flops", "(0, 1]"]),
    (["--target-params", "0"], ["--target-params", "(0, 1]"]),
    (["--target-flops", "0.5", "--target-params", "0.5"], ["--target-flops", "not both"]),
    (["--target-flops", "0.5", "--max-accuracy-drop", "1"], ["--max-accuracy-drop"]),
    (["--max-accuracy-drop", "-1"], ["--max-accuracy-drop", "[0, 100]"]),
    (["--target-flops", "0.0001", "--criterion", "l1"], ["one channel per prunable layer"]),
])
def test_cli_bad_targets_exit_2_and_write_nothing(args, words, simnet_file, tmp_path):
    out = tmp_path / "out" / "small.safetensors"
    out.parent.mkdir()
    code, stdout, err = run_cli(["compress", simnet_file, "--out", out, "--report",
                                 out.parent / "r.json", *args])
    assert code == 2 and stdout == ""
    # (a warning may come first: the fixture records no data fingerprint, and the repairs
    # read training images before the target is found unreachable)
    assert err.splitlines()[-1].startswith("modellego compress: error:")
    for w in words:
        assert w in err.splitlines()[-1]
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("criterion", ["l1", "contribution"])
def test_recalibrate_bn_refreshes_the_statistics_of_the_chosen_model(criterion, simnet_file,
                                                                     tmp_path):
    import copy

    from modellego.data import load_split
    from modellego.surgery.recalibrate import recalibrate_batchnorm
    from modellego.workflows import sample_calibration_images

    plain, recal = tmp_path / "plain.safetensors", tmp_path / "recal.safetensors"
    common = ["--criterion", criterion, "--target-flops", "0.8", "--samples-per-class", "3"]
    assert run_cli(["compress", simnet_file, *common, *PLAIN_CLI, "--out", plain])[0] == 0
    code, _, err = run_cli(["compress", simnet_file, *common, "--no-reconstruct",
                            "--recalibrate-bn", "300", "--out", recal])
    assert code == 0, err
    a, man_a = load_model(plain)
    b, man_b = load_model(recal)
    assert man_a["plan"] == man_b["plan"]  # a cost target does not depend on the statistics
    assert man_b["provenance"]["config"]["recalibrate_bn"] == 300
    # the file holds the plain model's BNs re-estimated on the seeded calibration images
    train = load_split("digits", "train")
    by_hand = copy.deepcopy(a)
    recalibrate_batchnorm(by_hand, sample_calibration_images(train, 300))
    for (k, v), w in zip(by_hand.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), rtol=1e-5, atol=1e-6), k
    assert any(not torch.equal(v, w) for v, w in zip(a.state_dict().values(),
                                                      b.state_dict().values()))
