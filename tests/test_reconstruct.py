"""Tests for closed-form reconstruction (``--reconstruct``): the ridge fits equal independent
least-squares solutions, a keep-everything plan is left alone, and on a trained model the
repaired component is closer to its source than the plain cut."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import randomize_bn, run, run_cli
from modellego.analysis.locate import LocateConfig
from modellego.compression import CompressConfig, compress_model
from modellego.data import load_split, normalize
from modellego.disassembly import DisassemblyConfig, disassemble_model
from modellego.errors import ModelLegoError, PlanError
from modellego.files import load_model, save_model
from modellego.io import read_manifest
from modellego.metrics import accuracy_from_logits, count_flops, predict_logits
from modellego.models import create_model
from modellego.runtime.hooks import forward_hooks, forward_pre_hooks
from modellego.surgery.extract import apply_plan
from modellego.surgery.graph import ChannelGraph, build_channel_graph
from modellego.surgery.plan import ComponentPlan, full_plan, plan_from_masks
from modellego.surgery.reconstruct import RIDGE, layers_to_refit, reconstruct_layers
from modellego.workflows import disassemble


def ridge_lstsq(x: torch.Tensor, y: torch.Tensor, *, intercept: bool = True,
                ridge: float = RIDGE) -> torch.Tensor:
    """``[W; b]`` minimising ``||x W + b - y||^2 + lam ||W||^2``, ``lam = ridge * mean
    squared column norm of x``, by ``torch.linalg.lstsq`` on the stacked system
    ``[x 1; sqrt(lam) I 0] [W; b] = [y; 0]`` (an independent route: no normal equations)."""
    x, y = x.double(), y.double()
    d = x.shape[1]
    lam = ridge * float((x * x).sum(0).mean())
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1) if intercept else x
    penalty = math.sqrt(lam) * torch.eye(d, x1.shape[1], dtype=torch.float64)
    a = torch.cat([x1, penalty])
    b = torch.cat([y, torch.zeros(d, y.shape[1], dtype=torch.float64)])
    return torch.linalg.lstsq(a, b).solution


def patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The design matrix of ``conv`` on ``x``, built tap by tap with slices: one row per
    image and output position (row-major), columns ordered as ``weight.view(Q, -1)``."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (conv.kernel_size, conv.stride, conv.padding,
                                              conv.dilation)
    xp = torch.zeros(x.shape[0], x.shape[1], x.shape[2] + 2 * ph, x.shape[3] + 2 * pw)
    xp[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]] = x
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    taps = [xp[:, :, u * dh:u * dh + sh * (ho - 1) + 1:sh, v * dw:v * dw + sw * (wo - 1) + 1:sw]
            for u in range(kh) for v in range(kw)]               # each (n, C, ho, wo)
    cols = torch.stack(taps, 2)                                  # (n, C, taps, ho, wo)
    return cols.permute(0, 3, 4, 1, 2).reshape(-1, x.shape[1] * kh * kw)


def outputs(y: torch.Tensor) -> torch.Tensor:
    """A conv's output ``(n, Q, h, w)`` as rows ``(n h w, Q)`` (a linear's as it is)."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]) if y.dim() == 4 else y


def masks_removing(graph: ChannelGraph, removed: dict[str, list[int]]
                   ) -> dict[int, torch.Tensor]:
    """Keep-masks with the given output channels of the named layers removed."""
    masks = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    for name, idx in removed.items():
        masks[graph.layer(name).out_space][idx] = False
    return masks


def inputs_and_targets(component: nn.Module, source: nn.Module, name: str,
                       x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What layer ``name`` reads in ``component`` and what it writes in ``source``."""
    seen: dict[str, torch.Tensor] = {}

    def grab_in(module, args):
        seen["in"] = args[0].clone()

    def grab_out(module, args, out):
        seen["out"] = out.clone()

    with forward_pre_hooks([(dict(component.named_modules())[name], grab_in)]):
        run(component, x)
    with forward_hooks([dict(source.named_modules())[name]], grab_out):
        run(source, x)
    return seen["in"], seen["out"]


# --------------------------------------------------------------------------- exact fits


def test_a_linear_layer_is_refitted_to_the_ridge_least_squares_solution() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).eval()
    x = torch.randn(40, 6)
    graph = build_channel_graph(net, (6,))
    plan = plan_from_masks(graph, masks_removing(graph, {"0": [1, 4, 6]}), range(5))
    comp = apply_plan(net, plan).eval()
    first = comp[0].weight.clone()
    fit = reconstruct_layers(comp, net, graph, plan, x)
    kept = list(plan.kept("0"))
    expected = ridge_lstsq(torch.relu(net[0](x))[:, kept].detach(), run(net, x))
    torch.testing.assert_close(comp[2].weight.double(), expected[:-1].T, rtol=0, atol=1e-5)
    torch.testing.assert_close(comp[2].bias.double(), expected[-1], rtol=0, atol=1e-5)
    assert torch.equal(comp[0].weight, first)  # it reads the image: nothing lost, untouched
    assert [(f.name, f.rows, f.features, f.intercept) for f in fit.layers] == \
        [("2", 40, 6, "bias")]
    assert fit.layers[0].error_after < fit.layers[0].error_before and fit.images == 40


def _conv_net(bias: bool) -> nn.Sequential:
    torch.manual_seed(1)
    tail: list[nn.Module] = [] if bias else [nn.BatchNorm2d(4)]
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 4, 3, stride=2, padding=1, bias=bias), *tail, nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return randomize_bn(net, 2).eval()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "batchnorm"])
def test_a_strided_padded_conv_is_refitted_to_the_ridge_least_squares_solution(bias) -> None:
    net = _conv_net(bias)
    x = torch.randn(5, 2, 7, 7)
    graph = build_channel_graph(net, (2, 7, 7))
    plan = plan_from_masks(graph, masks_removing(graph, {"0": [1, 4], "2": [2]}), range(3))
    comp = apply_plan(net, plan).eval()
    fit = reconstruct_layers(comp, net, graph, plan, x)
    assert [f.name for f in fit.layers] == ["2", str(len(net) - 1)]
    conv, keep_in, keep_out = comp[2], list(plan.kept("0")), list(plan.kept("2"))
    # the conv: kept inputs (conv 0 is untouched), the source's pre-BN output at kept outputs
    design = patches(conv, torch.relu(net[0](x))[:, keep_in].detach())
    expected = ridge_lstsq(design, outputs(run(net[:3], x))[:, keep_out])
    assert design.shape == (5 * 4 * 4, 4 * 9) and fit.layers[0].rows == 80
    torch.testing.assert_close(conv.weight.reshape(3, -1).double(), expected[:-1].T, rtol=0,
                               atol=1e-5)
    if bias:
        torch.testing.assert_close(conv.bias.double(), expected[-1], rtol=0, atol=1e-5)
        assert fit.layers[0].intercept == "bias"
    else:  # the intercept moves the BN's running mean: source's mean minus it
        assert fit.layers[0].intercept == "batchnorm"
        torch.testing.assert_close(comp[3].running_mean.double(),
                                   net[3].running_mean[keep_out].double() - expected[-1],
                                   rtol=0, atol=1e-5)
    # the linear is fitted after, on the component's repaired activations (sequential)
    feats = run(comp[:-1], x)
    expected = ridge_lstsq(feats, run(net, x))
    torch.testing.assert_close(comp[-1].weight.double(), expected[:-1].T, rtol=0, atol=1e-5)
    torch.testing.assert_close(comp[-1].bias.double(), expected[-1], rtol=0, atol=1e-5)


def test_a_bias_free_conv_without_batchnorm_is_fitted_without_intercept() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3, bias=False),
                        nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).eval()
    x = torch.randn(3, 1, 8, 8)
    graph = build_channel_graph(net, (1, 8, 8))
    plan = plan_from_masks(graph, masks_removing(graph, {"0": [0]}), range(2))
    comp = apply_plan(net, plan).eval()
    fit = reconstruct_layers(comp, net, graph, plan, x)
    assert [(f.name, f.intercept, f.features) for f in fit.layers] == [("2", "none", 27)]
    expected = ridge_lstsq(patches(comp[2], torch.relu(net[0](x))[:, 1:].detach()),
                           outputs(run(net[:3], x)), intercept=False)
    torch.testing.assert_close(comp[2].weight.reshape(2, -1).double(), expected.T, rtol=0,
                               atol=1e-5)


def test_positions_are_subsampled_per_image_as_documented() -> None:
    net = _conv_net(True)
    x = torch.randn(5, 2, 7, 7)
    graph = build_channel_graph(net, (2, 7, 7))
    plan = plan_from_masks(graph, masks_removing(graph, {"0": [1, 4], "2": [2]}), range(3))
    comp = apply_plan(net, plan).eval()
    fit = reconstruct_layers(comp, net, graph, plan, x, max_rows=28, seed=7, batch_size=3)
    # ceil(28 / 5) = 6 of the 16 positions of each image, drawn by a generator seeded with
    # seed + the layer's index (conv "2" is layer 1), batch by batch
    gen = torch.Generator().manual_seed(7 + 1)
    pos = torch.cat([torch.rand(3, 16, generator=gen).argsort(1)[:, :6],
                     torch.rand(2, 16, generator=gen).argsort(1)[:, :6]])
    rows = torch.arange(5)[:, None] * 16 + pos
    design = patches(comp[2], torch.relu(net[0](x))[:, list(plan.kept("0"))].detach())
    target = outputs(run(net[:3], x))[:, list(plan.kept("2"))]
    expected = ridge_lstsq(design[rows.flatten()], target[rows.flatten()])
    assert fit.layers[0].rows == 30
    torch.testing.assert_close(comp[2].weight.reshape(3, -1).double(), expected[:-1].T,
                               rtol=0, atol=1e-5)
    again = apply_plan(net, plan).eval()
    reconstruct_layers(again, net, graph, plan, x, max_rows=28, seed=7, batch_size=3)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 comp.state_dict().values()))


def _random_plan(graph: ChannelGraph, seed: int) -> ComponentPlan:
    """A plan removing about a third of every prunable space (residual spaces included)."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for s in graph.spaces():
        keep = torch.rand(graph.space_size[s], generator=gen) > 1 / 3
        keep[0] = True
        masks[s] = keep if s not in graph.frozen_spaces else torch.ones_like(keep)
    return plan_from_masks(graph, masks, range(graph.space_size[graph.output_space]))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_every_refitted_layer_of_a_branching_net_matches_its_least_squares_fit(arch) -> None:
    """Residual adds (a conv writing into one, a shortcut conv) and depthwise convs: each
    layer that lost inputs is fitted to the source's own output of that layer at its kept
    channels, from the repaired component's inputs; the others are untouched."""
    torch.manual_seed(0)
    net = randomize_bn(create_model(arch, in_channels=1, num_classes=4, input_size=12,
                                    width=0.25), 5).eval()
    x = torch.randn(6, 1, 12, 12)
    graph = build_channel_graph(net, (1, 12, 12))
    plan = _random_plan(graph, 1)
    comp = apply_plan(net, plan).eval()
    before = {k: v.clone() for k, v in comp.state_dict().items()}
    fit = reconstruct_layers(comp, net, graph, plan, x)
    lost = [lay.name for lay in graph.layers if not (lay.depthwise or lay.frozen)
            and len(plan.kept(lay.name, "in")) < (lay.module.in_channels if isinstance(
                lay.module, nn.Conv2d) else lay.module.in_features)]
    assert [f.name for f in fit.layers] == lost
    if arch == "resnet18":  # convs whose output enters an add, and shortcut convs, are refit
        assert {"layer1.0.conv2", "layer2.0.shortcut.0"} <= set(lost)
    else:
        assert any(lay.depthwise for lay in graph.layers)
    mods, src = dict(comp.named_modules()), dict(net.named_modules())
    for lay in graph.layers:
        if lay.name not in lost:
            assert torch.equal(mods[lay.name].weight, before[f"{lay.name}.weight"])
            continue
        inp, out = inputs_and_targets(comp, net, lay.name, x)
        keep = list(plan.kept(lay.name))
        mod = mods[lay.name]
        design = patches(mod, inp) if isinstance(mod, nn.Conv2d) else inp
        expected = ridge_lstsq(design, outputs(out)[:, keep], intercept=lay.bn_after is not None
                               or mod.bias is not None)
        q = mod.weight.shape[0]
        torch.testing.assert_close(mod.weight.reshape(q, -1).double(),
                                   expected[:design.shape[1]].T, rtol=1e-4, atol=1e-5)
        if mod.bias is not None:
            torch.testing.assert_close(mod.bias.double(), expected[-1], rtol=1e-4, atol=1e-5)
        elif lay.bn_after is not None:
            torch.testing.assert_close(
                mods[lay.bn_after].running_mean.double(),
                src[lay.bn_after].running_mean[keep].double() - expected[-1],
                rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- no-ops


@pytest.mark.parametrize("arch", ["simnet", "resnet18"])
def test_a_keep_everything_plan_leaves_the_component_bit_identical(arch) -> None:
    torch.manual_seed(0)
    net = randomize_bn(create_model(arch, in_channels=1, num_classes=4, input_size=12,
                                    width=0.25), 4).eval()
    graph = build_channel_graph(net, (1, 12, 12))
    # the whole net, and the net cut to two of its classes (only the logits layer loses
    # outputs; no layer loses an input)
    for plan in (full_plan(graph), plan_from_masks(graph, masks_removing(graph, {}), [3, 1])):
        comp = apply_plan(net, plan).eval()
        before = {k: v.clone() for k, v in comp.state_dict().items()}
        fit = reconstruct_layers(comp, net, graph, plan, torch.randn(8, 1, 12, 12))
        assert fit.layers == () and fit.skipped == {} and layers_to_refit(graph, plan) == []
        after = comp.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_modes_and_the_source_are_restored() -> None:
    net = _conv_net(False).train()
    graph = build_channel_graph(net, (2, 7, 7))
    plan = plan_from_masks(graph, masks_removing(graph, {"0": [1]}), range(3))
    comp = apply_plan(net, plan).train()
    source_state = {k: v.clone() for k, v in net.state_dict().items()}
    reconstruct_layers(comp, net, graph, plan, torch.randn(4, 2, 7, 7))
    assert all(m.training for m in comp.modules()) and all(m.training for m in net.modules())
    assert all(torch.equal(v, source_state[k]) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in comp.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


# --------------------------------------------------------------------------- a trained model


def layer_errors(component: nn.Module, source: nn.Module, graph: ChannelGraph,
                 plan: ComponentPlan, names: list[str], x: torch.Tensor) -> dict[str, float]:
    """``||component's output - source's at the kept channels||^2 / ||source's||^2`` of each
    named layer on ``x``."""
    errors = {}
    for name in names:
        _, theirs = inputs_and_targets(component, source, name, x)
        _, ours = inputs_and_targets(component, component, name, x)
        ref = theirs[:, list(plan.kept(name))]
        errors[name] = float(((ours - ref) ** 2).sum() / (ref ** 2).sum())
    return errors


def test_on_a_trained_model_reconstruction_beats_the_plain_cut(trained, digits) -> None:
    x, y = digits
    task = (0, 1, 2)
    locate = LocateConfig(rule="mass", beta_conv=0.3, beta_linear=0.3)
    kwargs = dict(classes=task, output_classes=range(10))
    plain = disassemble_model(trained, x, y, config=DisassemblyConfig(
        task, samples_per_class=20, locate=locate, reconstruct=0), **kwargs)
    fixed = disassemble_model(trained, x, y, config=DisassemblyConfig(
        task, samples_per_class=20, locate=locate, reconstruct=300), reuse=plain, **kwargs)
    assert fixed.plan == plain.plan and plain.reconstruction is None
    fit = fixed.reconstruction
    assert fit is not None and fit.images == 300
    names = [f.name for f in fit.layers]
    assert names == [lay.name for lay in layers_to_refit(plain.graph, plain.plan)] and names
    test = load_split("digits", "test").subset(task)
    xt = normalize(test.images, test.info)

    def accuracy(net: nn.Module) -> float:
        return accuracy_from_logits(predict_logits(net, xt), test.labels, task).accuracy

    restricted = accuracy_from_logits(predict_logits(trained, xt), test.labels, range(10),
                                      restrict_to=task).accuracy
    assert accuracy(plain.model) < restricted - 0.02  # the cut hurts ...
    assert accuracy(fixed.model) >= accuracy(plain.model)  # ... and the repair helps
    before = layer_errors(plain.model, trained, plain.graph, plain.plan, names, xt)
    after = layer_errors(fixed.model, trained, plain.graph, plain.plan, names, xt)
    assert all(after[n] < before[n] for n in names), (before, after)


def test_the_fit_images_are_a_seeded_draw_of_the_task_s_training_images(trained,
                                                                         digits) -> None:
    x, y = digits
    task = (3, 1)
    cfg = DisassemblyConfig(task, samples_per_class=10, locate=LocateConfig(rule="mass"),
                            reconstruct=150)
    comp = disassemble_model(trained, x, y, classes=task, output_classes=range(10),
                             config=cfg)
    pool = x[(y == 3) | (y == 1)]
    fit_x = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:150]]
    by_hand = apply_plan(trained, comp.plan).eval()
    reconstruct_layers(by_hand, trained, comp.graph, comp.plan, fit_x)
    assert all(torch.equal(a, b) for a, b in zip(by_hand.state_dict().values(),
                                                 comp.model.state_dict().values()))


# --------------------------------------------------------------------------- errors, files


def test_bad_values_are_one_line_errors_naming_the_parameter(trained, digits) -> None:
    for cfg, match in ((DisassemblyConfig((0,), reconstruct=-1), "`reconstruct`.*>= 0"),
                       (DisassemblyConfig((0,), reconstruct=5, compensate=True),
                        "`compensate` and `reconstruct`")):
        with pytest.raises(ModelLegoError, match=match) as info:
            cfg.validate()
        assert "\n" not in str(info.value)
    net = _conv_net(True)
    graph = build_channel_graph(net, (2, 7, 7))
    plan = plan_from_masks(graph, masks_removing(graph, {"0": [1]}), range(3))
    with pytest.raises(ModelLegoError, match="`ridge` must be > 0"):
        reconstruct_layers(apply_plan(net, plan), net, graph, plan, torch.randn(2, 2, 7, 7),
                           ridge=0)
    with pytest.raises(PlanError, match="component layer '2'.*apply_plan"):
        reconstruct_layers(net, net, graph, plan, torch.randn(2, 2, 7, 7))


def test_a_layer_too_wide_to_fit_is_left_as_cut_and_said() -> None:
    net = _conv_net(True)
    graph = build_channel_graph(net, (2, 7, 7))
    plan = plan_from_masks(graph, masks_removing(graph, {"0": [1], "2": [0]}), range(3))
    comp = apply_plan(net, plan).eval()
    cut = comp[2].weight.clone()
    fit = reconstruct_layers(comp, net, graph, plan, torch.randn(3, 2, 7, 7), max_features=40)
    assert fit.skipped == {"2": "46 columns, above `max_features` 40"}
    assert [f.name for f in fit.layers] == ["6"] and torch.equal(comp[2].weight, cut)


def test_cli_reconstructs_records_it_and_the_file_gives_the_same_logits(
        simnet_digits_file: Path, tmp_path: Path) -> None:
    out, rep = tmp_path / "c.safetensors", tmp_path / "c.json"
    code, stdout, err = run_cli(["disassemble", simnet_digits_file, "--classes", "0,1",
                                 "--preset", "paper", "--rule", "mass", "--reconstruct", "200",
                                 "--out", out,
                                 "--report", rep])
    assert code == 0, err
    assert "reconstruction: " in stdout and "on 200 training images" in stdout
    manifest = read_manifest(out)
    assert manifest["provenance"]["config"]["reconstruct"] == 200
    record = manifest["provenance"]["reconstruction"]
    assert record["images"] == 200 and record["layers"]
    assert read_manifest(out)["provenance"]["config"]["compensate"] is False
    # the same disassembly in-process: same weights, and a save/load round trip keeps them
    source, source_manifest = load_model(simnet_digits_file)
    comp, comp_manifest, report = disassemble(
        source, source_manifest, DisassemblyConfig((0, 1), locate=LocateConfig(rule="mass"),
                                                   reconstruct=200))
    assert report["reconstruction"]["layers"] == record["layers"]
    loaded, _ = load_model(out)
    x = torch.randn(16, 1, 28, 28)
    assert torch.equal(run(loaded, x), run(comp.model, x))
    again = tmp_path / "again.safetensors"
    save_model(again, comp.model, comp_manifest)
    assert torch.equal(run(load_model(again)[0], x), run(comp.model, x))
    plain = apply_plan(source, comp.plan).eval()
    assert not torch.equal(run(plain, x), run(comp.model, x))
    bad = tmp_path / "bad.safetensors"
    code, _, err = run_cli(["disassemble", simnet_digits_file, "--classes", "0,1",
                            "--reconstruct", "-3", "--out", bad])
    assert code == 2 and "--reconstruct" in err and not bad.exists()
    assert len(err.strip().splitlines()) == 1


def test_compress_config_carries_the_option_to_every_criterion() -> None:
    assert CompressConfig(target_flops=0.5, reconstruct=30).disassembly((0, 1)).reconstruct == 30
    assert CompressConfig(target_flops=0.5, reconstruct=30).to_dict()["reconstruct"] == 30
    with pytest.raises(ModelLegoError, match="`reconstruct` is a number of images"):
        CompressConfig("l1", target_flops=0.5, reconstruct=-2).validate()


def test_cli_compress_reconstructs_the_chosen_candidate(simnet_digits_file: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "small.safetensors"
    code, _, err = run_cli(["compress", simnet_digits_file, "--criterion", "l1",
                            "--target-flops", "0.6", "--reconstruct", "100",
                            "--recalibrate-bn", "0", "--out", out])
    assert code == 0, err
    manifest = read_manifest(out)
    assert manifest["provenance"]["config"]["reconstruct"] == 100
    source, source_manifest = load_model(simnet_digits_file)
    small, _ = load_model(out)
    plan = ComponentPlan.from_dict(manifest["plan"])
    graph = build_channel_graph(source, (1, 28, 28))
    split = load_split("digits", "train")
    pool = normalize(split.images, split.info)
    fit_x = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:100]]
    by_hand = apply_plan(source, plan).eval()
    reconstruct_layers(by_hand, source, graph, plan, fit_x)
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(run(small, x), run(by_hand, x))


def test_cli_compress_repairs_by_default(simnet_digits_file: Path, tmp_path: Path) -> None:
    """No repair flag: reconstruction on DEFAULT_RECONSTRUCT images, then BN re-estimation
    on DEFAULT_RECALIBRATE_BN, recorded in the manifest; the file is that model exactly."""
    from modellego.compression import DEFAULT_RECALIBRATE_BN, DEFAULT_RECONSTRUCT
    from modellego.surgery.recalibrate import recalibrate_batchnorm
    from modellego.workflows import sample_calibration_images

    out = tmp_path / "small.safetensors"
    code, _, err = run_cli(["compress", simnet_digits_file, "--criterion", "fpgm",
                            "--target-flops", "0.6", "--out", out])
    assert code == 0, err
    config = read_manifest(out)["provenance"]["config"]
    assert (config["reconstruct"], config["recalibrate_bn"]) == (DEFAULT_RECONSTRUCT,
                                                                 DEFAULT_RECALIBRATE_BN)
    source, _ = load_model(simnet_digits_file)
    small, manifest = load_model(out)
    plan = ComponentPlan.from_dict(manifest["plan"])
    split = load_split("digits", "train")
    pool = normalize(split.images, split.info)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))
    by_hand = apply_plan(source, plan).eval()
    reconstruct_layers(by_hand, source, build_channel_graph(source, (1, 28, 28)), plan,
                       pool[order[:DEFAULT_RECONSTRUCT]])
    recalibrate_batchnorm(by_hand, sample_calibration_images(split, DEFAULT_RECALIBRATE_BN))
    x = torch.randn(8, 1, 28, 28)
    assert torch.allclose(run(small, x), run(by_hand, x), rtol=1e-5, atol=1e-5)
    # both flags at once are refused before any file is read
    code, stdout, err = run_cli(["compress", simnet_digits_file, "--target-flops", "0.6",
                                 "--reconstruct", "10", "--no-reconstruct",
                                 "--out", tmp_path / "x.safetensors"])
    assert code == 2 and stdout == "" and not (tmp_path / "x.safetensors").exists()
    assert "give one of --reconstruct and --no-reconstruct" in err


def test_library_compress_without_images_says_how_to_cut_plainly() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    with pytest.raises(ModelLegoError, match="pass recalibrate_bn=0"):
        compress_model(net, (1, 9, 9), output_classes=range(3),
                       config=CompressConfig("l1", target_flops=0.7))
    with pytest.raises(ModelLegoError, match="pass reconstruct=0 for the plain cut"):
        compress_model(net, (1, 9, 9), output_classes=range(3),
                       config=CompressConfig("l1", target_flops=0.7, recalibrate_bn=0))
    plain = compress_model(net, (1, 9, 9), output_classes=range(3),
                           config=CompressConfig("l1", target_flops=0.7, recalibrate_bn=0,
                                                 reconstruct=0))
    assert count_flops(plain.model, (1, 9, 9)) <= 0.7 * count_flops(net, (1, 9, 9))
