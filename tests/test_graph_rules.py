"""Each rule of the channel graph on a small hand-written module (no torchvision needed).

Every model is checked by the two invariants of ``test_graph.py``: the keep-everything plan
reproduces the logits exactly, and a random plan's component equals the masked source.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import (
    assert_graph_invariants,
    graph_random_masks,
    masked_source_logits,
    randomize_bn,
    run,
)
from modellego.disassembly import DisassemblyConfig, disassemble_model
from modellego.errors import PlanError, UnsupportedModelError
from modellego.surgery.extract import apply_plan
from modellego.surgery.graph import ChannelGraph, Segment, build_channel_graph
from modellego.surgery.plan import ComponentPlan, full_plan, plan_from_masks

SIZE = 16
TOL = 1e-5
OUT = [3, 0]


def check_invariants(model: nn.Module, seeds: int = 4, size: int = SIZE) -> ChannelGraph:
    return assert_graph_invariants(model, (3, size, size), seeds=seeds, out=tuple(OUT),
                                   tol=TOL)


def random_masks(graph: ChannelGraph, seed: int) -> dict[int, torch.Tensor]:
    return graph_random_masks(graph, seed)


def cbr(i: int, o: int, k: int = 3, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, bias=False, **kw),
                         nn.BatchNorm2d(o), nn.ReLU())


# --------------------------------------------------------------------------- rules


class SENet(nn.Module):
    """Squeeze-and-excitation: a gate from the same channels multiplies them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.fc2(F.silu(self.fc1(s))))
        x = F.hardswish(x * s)
        x = F.dropout(x, 0.2, self.training)
        return self.head(torch.flatten(x.mean((2, 3), keepdim=True), 1))


def test_squeeze_excitation_couples_gate_and_channels():
    graph = check_invariants(SENet())
    assert graph.find(graph.layer("fc2").out_space) == graph.find(graph.layer("stem.0").out_space)
    assert not graph.frozen_spaces - graph.input_spaces


class ShuffleUnit(nn.Module):
    """ShuffleNetV2: chunk, one half through a branch, concat, channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.branch = nn.Sequential(cbr(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                                    nn.BatchNorm2d(4), cbr(4, 4, 1))
        self.branch2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4),
                                     nn.BatchNorm2d(4), cbr(4, 4, 1))
        self.head = nn.Linear(8, 5)

    @staticmethod
    def shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
        b, c, h, w = x.size()
        x = x.view(b, groups, c // groups, h, w)
        return torch.transpose(x, 1, 2).contiguous().view(b, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for branch in (self.branch, self.branch2):
            a, b = x.chunk(2, dim=1)
            x = self.shuffle(torch.cat((a, branch(b)), dim=1), 2)
        return self.head(x.mean([2, 3]))


def test_channel_shuffle_and_chunk_are_followed():
    graph = check_invariants(ShuffleUnit(), seeds=6)
    stem = graph.find(graph.layer("stem.0").out_space)
    first = graph.layer("branch.0.0").in_layout  # the second half of the stem's channels
    assert [(s.space, s.start, s.size) for s in first] == [(stem, 4, 4)]
    # after a shuffle, channels of two spaces alternate: runs of one channel each
    dw = graph.layer("branch2.0")
    assert dw.depthwise and [s.size for s in dw.in_layout] == [1, 1, 1, 1]
    assert len({s.space for s in dw.in_layout}) == 2


class GhostLike(nn.Module):
    """GhostNet: a cheap depthwise copy concatenated, sliced with ``x[:, :n]``, added."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = cbr(3, 6)
        self.primary = cbr(6, 3, 1)
        self.cheap = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.BatchNorm2d(3))
        self.short = nn.Sequential(nn.Conv2d(6, width, 1), nn.BatchNorm2d(width))
        self.head = nn.Linear(width, 5)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        p = self.primary(x)
        g = torch.cat([p, self.cheap(p)], dim=1)[:, :self.width, :, :]
        y = g + self.short(x)  # a whole space (6) against two runs of one space (3 + 3)
        return self.head(y.mean((2, 3)))


def test_partial_couplings_become_ties():
    graph = check_invariants(GhostLike(), seeds=8)
    assert graph.ties  # the shortcut's channels are tied to the primary's, twice
    short = graph.find(graph.layer("short.0").out_space)
    primary = graph.find(graph.layer("primary.0").out_space)
    assert {(a.space, b.space) for a, b in graph.ties} <= {(primary, short), (short, primary)}
    assert short not in graph.frozen_spaces and primary not in graph.frozen_spaces
    # shortcut channels 0 and 3 are both tied to primary channel 0: removing 3 alone keeps it
    masks = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    masks[short][3] = False
    assert 3 in plan_from_masks(graph, masks, OUT).kept("short.0")
    masks[short][0] = masks[primary][0] = False
    plan = plan_from_masks(graph, masks, OUT)
    assert 3 not in plan.kept("short.0") and 0 not in plan.kept("primary.0")


def test_slice_at_fixed_bounds_freezes_its_channels():
    """``x[:, :5]`` of 6 channels: a component would cut its own channels at 5 too."""
    graph = check_invariants(GhostLike(width=5), seeds=8)
    primary = graph.find(graph.layer("primary.0").out_space)
    assert "getitem at getitem" in graph.frozen_reasons[primary]


class ConvNeXtLike(nn.Module):
    """ConvNeXt: depthwise conv, permute, LayerNorm, channel-last MLP, layer scale, add;
    a LayerNorm2d (permute, functional layer_norm, permute) before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.layer_scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.head_norm_w = nn.Parameter(torch.rand(8) + 0.5)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        x = x + self.layer_scale * y
        x = x.mul(self.gamma.reshape(1, -1, 1, 1)) + x
        x = F.adaptive_avg_pool2d(x, 1)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (8,), self.head_norm_w).permute(0, 3, 1, 2)
        return self.head(torch.flatten(x, 1))


def test_layernorm_freezes_its_channels_and_the_mlp_is_pruned():
    graph = check_invariants(ConvNeXtLike())
    stream = graph.find(graph.layer("stem").out_space)
    hidden = graph.find(graph.layer("fc1").out_space)
    assert stream in graph.frozen_spaces and "LayerNorm norm" in graph.frozen_reasons[stream]
    assert hidden not in graph.frozen_spaces
    assert graph.layer("fc1").in_layout == graph.layer("dw").out_layout  # the last axis
    assert {"layer_scale", "gamma"} <= set(graph.channel_params)
    masks = random_masks(graph, 0)
    masks[stream][0] = False
    with pytest.raises(PlanError, match="kept whole .*LayerNorm norm"):
        plan_from_masks(graph, masks, OUT)


class GroupNormNet(nn.Module):
    """A GroupNorm module (4 groups of 2 channels), then GroupNorm as a function (as in a
    forward that calls ``F.group_norm`` itself), then a 1x1 conv that no norm reads."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.n1 = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.w = nn.Parameter(torch.rand(12) + 0.5)
        self.c3 = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.n1(self.c1(x)))
        x = F.relu(F.group_norm(self.c2(x), 3, self.w))
        return self.head(F.relu(self.c3(x)).mean((2, 3)))


def test_groupnorm_loses_whole_groups_and_a_functional_one_is_kept_whole():
    model = GroupNormNet()
    graph = check_invariants(model, seeds=8, size=8)  # (the graph of this very model)
    first = graph.find(graph.layer("c1").out_space)
    second = graph.find(graph.layer("c2").out_space)
    assert first not in graph.frozen_spaces and graph.group_norms == {
        "n1": (Segment(first, 8, 1, 0),)}
    assert graph.frozen_reasons[second] == \
        "group_norm at group_norm normalises over groups of these channels"
    assert graph.find(graph.layer("c3").out_space) not in graph.frozen_spaces
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    masks = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    masks[first][[2, 3, 5]] = False  # group 1 goes; group 2 stays, channel 5 with it
    plan = plan_from_masks(graph, masks, OUT)
    assert plan.modules["n1"] == {"out": (0, 1, 4, 5, 6, 7)}
    assert plan.modules["c1"]["out"] == (0, 1, 4, 5, 6, 7)
    comp = apply_plan(model, plan).eval()
    assert (comp.n1.num_groups, comp.n1.num_channels) == (3, 6)
    assert torch.equal(comp.n1.weight, model.n1.weight[[0, 1, 4, 5, 6, 7]])
    masked = masked_source_logits(model, graph, plan, x)[:, OUT]
    assert (run(comp, x) - masked).abs().max().item() <= TOL * max(1.0, masked.abs().max().item())
    assert (run(comp, x) - run(model, x)[:, OUT]).abs().max().item() > 1e-3  # groups mattered
    bad = dict(plan.modules, n1={"out": (0, 1, 2, 4, 5, 6, 7)})
    with pytest.raises(PlanError, match="GroupNorm 'n1' can only lose whole groups of 2"):
        apply_plan(model, ComponentPlan(bad))


def test_groupnorm_with_one_group_keeps_its_channels_whole():
    model = GroupNormNet()
    model.n1 = nn.GroupNorm(1, 8)
    graph = check_invariants(model, size=8)
    first = graph.find(graph.layer("c1").out_space)
    assert graph.frozen_reasons[first] == "GroupNorm n1 normalises over groups of these channels"
    assert graph.group_norms == {}
    masks = random_masks(graph, 0)
    masks[first][0] = False
    with pytest.raises(PlanError, match="kept whole .*GroupNorm n1"):
        plan_from_masks(graph, masks, OUT)


class LayerScaleNet(nn.Module):
    """A per-channel parameter (read through get_attr) on prunable channels is sliced."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = cbr(3, 6)
        self.scale = nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)
        self.act = nn.PReLU(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x) * self.scale.exp()).mean((2, 3)))


def test_per_channel_parameters_are_sliced():
    graph = check_invariants(LayerScaleNet())
    assert set(graph.channel_params) == {"scale", "act.weight"}
    model = randomize_bn(LayerScaleNet(), 1).eval()
    space = graph.find(graph.layer("conv.0").out_space)
    masks = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    masks[space][[1, 4]] = False
    plan = plan_from_masks(graph, masks, OUT)
    assert plan.to_dict()["scale"] == {"out": [0, 2, 3, 5]}
    comp = apply_plan(model, plan)
    assert comp.scale.shape == (1, 4, 1, 1) and comp.act.weight.shape == (4,)


class DenseLike(nn.Module):
    """DenseNet: a BatchNorm over a concatenation is sliced per segment."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 6)
        self.grow1 = cbr(6, 4)
        self.norm = nn.BatchNorm2d(10)
        self.grow2 = nn.Conv2d(10, 4, 3, padding=1)
        self.norm5 = nn.BatchNorm2d(14)
        self.head = nn.Linear(14, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.grow1(x)], 1)
        x = torch.cat([x, self.grow2(F.relu(self.norm(x)))], 1)
        return self.head(F.relu(self.norm5(x)).mean((2, 3)))


def test_batchnorm_over_a_concatenation_is_sliced_per_segment():
    graph = check_invariants(DenseLike())
    assert {"norm", "norm5"} <= set(graph.channel_params)
    assert len(graph.channel_params["norm5"]) == 3
    assert "norm" not in graph.norms and "grow1.1" in graph.norms


class BNAct(nn.BatchNorm2d):
    """A norm-act layer as timm has them: BN then an activation of a library of its own."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.act = Swish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.sigmoid()


class BNMix(nn.BatchNorm2d):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.mix = nn.Conv2d(n, n, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(super().forward(x))


class NormActNet(nn.Module):
    def __init__(self, norm: type = BNAct) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = norm(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def test_norm_act_layers_are_sliced_keeping_their_class():
    graph = check_invariants(NormActNet())
    assert "bn" in graph.norms
    model = randomize_bn(NormActNet(), 1).eval()
    plan = plan_from_masks(graph, random_masks(graph, 1), OUT)
    comp = apply_plan(model, plan)
    assert type(comp.bn) is BNAct and isinstance(comp.bn.act, Swish)
    assert comp.bn.num_features == len(plan.kept("bn")) == comp.bn.running_mean.numel()


def test_norm_subclass_with_unknown_submodules_is_refused():
    with pytest.raises(UnsupportedModelError, match="node 'bn'.*BNMix"):
        build_channel_graph(NormActNet(BNMix), (3, SIZE, SIZE))


class MixConv(nn.Module):
    """MixNet: ``torch.split`` the channels, a depthwise conv per part, concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 7)
        self.dw3 = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.dw5 = nn.Conv2d(3, 3, 5, padding=2, groups=3)
        self.pw = nn.ModuleList([nn.Conv2d(4, 2, 1), nn.Conv2d(3, 2, 1)])
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.stem(x), [4, 3], 1)
        a, b = self.dw3(a), self.dw5(b)
        x = torch.cat([self.pw[0](a), self.pw[1](b)], 1)
        return self.head(x.mean((2, 3)))


def test_split_feeds_depthwise_convs_with_runs():
    graph = check_invariants(MixConv())
    stem = graph.find(graph.layer("stem.0").out_space)
    assert [(s.space, s.start, s.size) for s in graph.layer("dw5").in_layout] == [(stem, 4, 3)]
    assert graph.layer("dw5").out_space == stem


class ChannelLastFlatten(nn.Module):
    """A permute to channel-last, then flatten: channels repeat as runs, not blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = cbr(3, 4)
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_max_pool2d(self.conv(x), 4).permute(0, 2, 3, 1)
        return self.head(x.reshape(x.shape[0], -1))


class OuterGate(nn.Module):
    """A spatial map times a channel vector: no operand has the output's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = cbr(3, 5)
        self.where = nn.Conv2d(5, 1, 1)
        self.what = nn.Conv2d(5, 5, 1)
        self.head = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        g = torch.sigmoid(self.where(x)) * self.what(F.adaptive_avg_pool2d(x, 1))
        return self.head((x * g).mean((2, 3)))


def test_broadcast_of_a_map_and_a_channel_vector():
    graph = check_invariants(OuterGate())
    assert graph.find(graph.layer("what").out_space) == graph.find(graph.layer("conv.0").out_space)


def test_channel_last_flatten():
    graph = check_invariants(ChannelLastFlatten())
    layout = graph.layer("head").in_layout
    assert len(layout) == 16 and all(s.size == 4 and s.repeat == 1 for s in layout)


class FixedView(nn.Module):
    """A reshape with the channel count written out: a component could not shrink it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = cbr(3, 4)
        self.mid = cbr(4, 4)
        self.head = nn.Linear(4 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.mid(self.conv(x)), 4)
        return self.head(x.view(x.size(0), 4, 16).flatten(1))


def test_reshape_to_a_fixed_channel_count_freezes_them():
    graph = check_invariants(FixedView())
    space = graph.find(graph.layer("mid.0").out_space)
    assert "view at view fixes the number" in graph.frozen_reasons[space]
    assert graph.find(graph.layer("conv.0").out_space) not in graph.frozen_spaces


class AuxHead(nn.Module):
    """An auxiliary head used only in training (GoogLeNet, Inception-v3)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = cbr(3, 6)
        self.aux = nn.Linear(6, 5)
        self.head = nn.Sequential(nn.Conv2d(6, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())  # SqueezeNet: a conv classifier, then pool

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.body(x)
        out = self.head(x)
        if self.training:
            return out, self.aux(x.mean((2, 3)))
        return out


def test_training_only_aux_heads_stay_untouched():
    model = randomize_bn(AuxHead(), 1).train()
    graph = build_channel_graph(model, (3, SIZE, SIZE))
    assert model.training  # the caller's mode is restored
    assert graph.output_layer.name == "head.0"
    plan = plan_from_masks(graph, random_masks(graph, 0), OUT)
    assert "aux" not in plan.modules
    comp = apply_plan(model, plan)
    assert comp.aux.weight.shape == model.aux.weight.shape
    check_invariants(AuxHead())


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.grouped = cbr(8, 8, groups=4)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head((x + self.grouped(x)).mean((2, 3)))


def test_grouped_conv_says_why_it_is_kept_whole():
    model = randomize_bn(GroupedNet(), 1).eval()
    graph = build_channel_graph(model, (3, SIZE, SIZE))
    space = graph.find(graph.layer("grouped.0").out_space)
    assert graph.frozen_reasons[space] == "grouped conv grouped.0 (4 groups) is kept whole"
    comp = apply_plan(model, full_plan(graph)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    assert (run(comp, x) - run(model, x)).abs().max().item() <= TOL


class SameConv(nn.Conv2d):
    """timm's Conv2dSame: pads at run time, then ``F.conv2d`` on its own weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, [0, 1, 0, 1])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SubclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 6)
        self.conv = SameConv(6, 5, 2, stride=2)
        self.head = FLinear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(self.stem(x))).mean((2, 3)))


def test_layer_subclasses_calling_functionals_keep_their_class():
    graph = check_invariants(SubclassNet())
    assert [lay.name for lay in graph.layers] == ["stem.0", "conv", "head"]
    comp = apply_plan(randomize_bn(SubclassNet(), 1), plan_from_masks(
        graph, random_masks(graph, 0), OUT))
    assert type(comp.conv) is SameConv and type(comp.head) is FLinear


# --------------------------------------------------------------------------- refusals


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.proj(x).flatten(2).transpose(1, 2)
        t, _ = self.attn(t, t, t)
        return self.head(t.mean(1))


class ConvHead(nn.Module):
    """A 3 -> 4 channel conv and a 4 -> 5 linear head; subclasses say what lies between."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)


class BatchMix(ConvHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).transpose(0, 1)  # (C, N, H, W): channels where the samples were
        return self.head(y.transpose(0, 1).mean((2, 3)))


class ChannelMean(ConvHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y * torch.sigmoid(y.mean(1)).unsqueeze(1)  # spatial attention
        return self.head(y.mean((2, 3)))


class ChannelSoftmax(ConvHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).softmax(1).mean((2, 3))).log_softmax(-1)


class RowsOfChannels(ConvHead):
    """Every position as a sample of its own, then back: rows of channels stay whole."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1)
        z = torch.relu(y.reshape(-1, y.shape[-1]))  # (N*H*W, C)
        return self.head(z.view(x.shape[0], -1, z.shape[-1]).mean(1))


class FixedRows(RowsOfChannels):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.conv(x).permute(0, 2, 3, 1).reshape(-1, 4))
        return self.head(z.view(x.shape[0], -1, z.shape[-1]).mean(1))


class LayerOnFoldedRows(RowsOfChannels):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1)
        z = self.head(y.reshape(-1, y.shape[-1]))  # a layer on (N*H*W, C): not per image
        return z.view(x.shape[0], -1, z.shape[-1]).mean(1)


class StatisticGate(ConvHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y * torch.sigmoid(y.mean(1, keepdim=True))  # a gate from all channels
        return self.head(y.mean((2, 3)))


def test_rows_of_channels_folded_into_the_batch_are_followed():
    graph = assert_graph_invariants(RowsOfChannels(), (3, SIZE, SIZE), out=(1, 0))
    assert graph.frozen_spaces == graph.input_spaces
    graph = build_channel_graph(FixedRows(), (3, SIZE, SIZE))
    assert graph.frozen_reasons[graph.find(graph.layer("conv").out_space)] == \
        "reshape at reshape fixes the number of these channels"
    with pytest.raises(UnsupportedModelError, match="a linear layer reads rows that fold "
                                                    "positions into the batch dim"):
        build_channel_graph(LayerOnFoldedRows(), (3, SIZE, SIZE))


def test_a_softmax_over_channels_keeps_them_whole():
    graph = build_channel_graph(ChannelSoftmax(), (3, SIZE, SIZE))
    assert graph.frozen_reasons[graph.find(graph.layer("conv").out_space)] == \
        "softmax at softmax normalises over these channels"
    assert graph.output_space not in graph.frozen_spaces  # (the logits' log_softmax)


def test_a_statistic_over_the_channels_keeps_them_whole():
    graph = build_channel_graph(StatisticGate(), (3, SIZE, SIZE))
    assert graph.frozen_reasons[graph.find(graph.layer("conv").out_space)] == \
        "mean at mean takes a statistic over these channels"


def test_multihead_attention_is_kept_whole():
    graph = build_channel_graph(Attention(), (3, SIZE, SIZE))
    assert [lay.name for lay in graph.layers] == ["proj", "head"]
    assert graph.attention == {}
    assert graph.frozen_reasons[graph.find(graph.layer("proj").out_space)] == \
        "the input of attention attn (its q, k and v projections) is kept whole"
    out = graph.find(graph.layer("head").in_layout[0].space)
    assert graph.frozen_reasons[out] == (
        "attention attn (MultiheadAttention) is kept whole: it is not standard multi-head "
        "self-attention over its one input")


@pytest.mark.parametrize("cls, node, match", [
    (BatchMix, "transpose", "mixes the batch dim"),
    (ChannelMean, "mean", "reduction over the channel dimension"),
])
def test_refusals_name_the_node(cls, node, match):
    with pytest.raises(UnsupportedModelError, match=match) as info:
        build_channel_graph(cls(), (3, SIZE, SIZE))
    assert str(info.value).startswith(f"node {node!r} ")


class _BN1dHead(nn.Module):
    """BatchNorm1d where classifier heads hold it: over (N, C) features between linears, and
    over (N, C, L) tokens of a flattened map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.tokens = nn.BatchNorm1d(8)
        self.fc1 = nn.Linear(8, 12, bias=False)
        self.bn = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        t = self.tokens(torch.relu(self.conv(x)).flatten(2))     # (N, 8, H*W)
        return self.fc2(torch.relu(self.bn(self.fc1(t.mean(2)))))


def test_batchnorm1d_in_heads_is_sliced_with_its_channels():
    net = randomize_bn(_BN1dHead(), 1).eval()
    graph = assert_graph_invariants(net, (2, 6, 6), seeds=4, out=(3, 0))
    assert set(graph.norms) == {"tokens", "bn"}
    assert graph.norms["bn"] == graph.find(graph.layer("fc1").out_space)
    x, y = torch.randn(60, 2, 6, 6), torch.arange(60) % 5
    comp = disassemble_model(net, x, y, classes=(0, 3), output_classes=range(5),
                             config=DisassemblyConfig((0, 3), samples_per_class=4))
    kept = len(comp.plan.kept("fc1"))
    assert comp.model.bn.num_features == kept == comp.model.bn.running_mean.shape[0]
    with torch.no_grad():
        assert comp.model(x[:2]).shape == (2, 2)


def test_batchnorm1d_over_mixed_positions_is_refused_naming_the_node():
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.BatchNorm1d(4 * 36),
                        nn.Linear(4 * 36, 3)).eval()
    with pytest.raises(UnsupportedModelError, match="BatchNorm1d reads a tensor whose "
                                                    "channels are not laid along dim 1"):
        build_channel_graph(net, (2, 6, 6))


class _IndexedGain(nn.Module):
    """A per-channel gain indexed into shape (``g[None, :, None, None]``), and one indexed
    with an integer array (which moves values: refused)."""

    def __init__(self, fancy: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.g = nn.Parameter(torch.rand(8) + 0.5)
        self.fc = nn.Linear(8, 4)
        self.fancy = fancy

    def forward(self, x):
        g = self.g[[1, 0, 2, 3, 4, 5, 6, 7]] if self.fancy else self.g
        return self.fc((self.conv(x) * g[None, :, None, None]).mean((2, 3)))


def test_a_parameter_indexed_into_a_channel_vector_is_sliced_with_its_channels():
    graph = assert_graph_invariants(_IndexedGain().eval(), (2, 6, 6), seeds=4, out=(3, 0))
    (run,) = graph.channel_params["g"]
    assert graph.find(run.space) == graph.find(graph.layer("conv").out_space)
    assert (run.start, run.size, run.repeat) == (0, 8, 1)
    with pytest.raises(UnsupportedModelError, match="multiplies or adds a parameter that was "
                                                    "indexed, mixed with another"):
        build_channel_graph(_IndexedGain(fancy=True).eval(), (2, 6, 6))


def test_a_two_input_model_is_refused_naming_its_second_input():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x, mask):
            return self.fc((self.conv(x) * mask).mean((2, 3)))

    with pytest.raises(UnsupportedModelError) as info:
        build_channel_graph(TwoInputs().eval(), (2, 6, 6))
    assert str(info.value) == (
        "node 'mask' (placeholder): TwoInputs.forward takes 2 inputs (x, mask); modellego "
        "takes apart classifiers of one image input: wrap the model so that forward(x) takes "
        "the image alone")
