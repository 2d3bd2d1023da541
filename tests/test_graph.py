"""Tests for the channel graph, component plans and extraction (modellego.surgery).

The central invariant ("masked source"): a component extracted from a plan computes exactly
what the source computes when every conv/linear layer of the source has the input channels
the plan removes set to zero, restricted to the kept logits in plan order.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from helpers import assert_graph_invariants, masked_source_logits, randomize_bn, run
from modellego.errors import PlanError, UnsupportedModelError
from modellego.models import create_model, list_models
from modellego.surgery.extract import apply_plan
from modellego.surgery.graph import ChannelGraph, build_channel_graph
from modellego.surgery.plan import ComponentPlan, full_plan, plan_from_masks

ARCHS = list_models()
IN_CHANNELS, SIZE, WIDTH = 3, 32, 0.125
TOL = 1e-5
KEPT_LOGITS = [7, 2, 5]


# --------------------------------------------------------------------------- helpers


def make_model(name: str, *, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    opts = {"in_channels": IN_CHANNELS, "num_classes": 10, "input_size": SIZE, "width": WIDTH}
    opts.update(kwargs)
    return randomize_bn(create_model(name, **opts), seed + 1).eval()


def in_width(layer) -> int:
    """The number of input features a layer's input layout describes."""
    return sum(seg.size * seg.repeat for seg in layer.in_layout)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_masks(graph: ChannelGraph, seed: int, p: float = 0.6) -> dict[int, torch.Tensor]:
    """Keep each channel with probability ``p``, at least one per space; frozen spaces whole."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for s in graph.spaces():
        n = graph.space_size[s]
        if s in graph.frozen_spaces:
            masks[s] = torch.ones(n, dtype=torch.bool)
            continue
        m = torch.rand(n, generator=gen) < p
        if not m.any():
            m[int(torch.randint(n, (1,), generator=gen))] = True
        masks[s] = m
    return masks


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def zoo() -> dict[str, tuple[nn.Module, ChannelGraph]]:
    """One random-weight model (random BN statistics) and its graph per architecture."""
    out = {}
    for i, name in enumerate(ARCHS):
        model = make_model(name, seed=i)
        out[name] = (model, build_channel_graph(model, (IN_CHANNELS, SIZE, SIZE)))
    return out


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, IN_CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------- full plan


@pytest.mark.parametrize("arch", ARCHS)
def test_full_plan_reproduces_source(zoo, images, arch):
    model, graph = zoo[arch]
    plan = full_plan(graph)
    component = apply_plan(model, plan).eval()
    assert component is not model
    assert n_params(component) == n_params(model)
    src, comp = run(model, images), run(component, images)
    assert comp.shape == src.shape == (len(images), 10)
    assert (comp - src).abs().max().item() <= TOL
    torch.fx.symbolic_trace(component)  # the component stays fx-traceable
    # every conv/linear, BN, per-channel tensor and attention layer is in the plan, and the
    # plan round-trips through JSON form
    assert {lay.name for lay in graph.layers} | set(graph.norms) | \
        set(graph.channel_params) | set(graph.attention) == set(plan.modules)
    assert ComponentPlan.from_dict(plan.to_dict()) == plan


# --------------------------------------------------------------------------- masked source


@pytest.mark.parametrize("arch", ARCHS)
def test_component_equals_masked_source(zoo, images, arch):
    model, graph = zoo[arch]
    masks = random_masks(graph, seed=11)
    plan = plan_from_masks(graph, masks, KEPT_LOGITS)
    component = apply_plan(model, plan).eval()
    comp = run(component, images)
    assert comp.shape == (len(images), len(KEPT_LOGITS))
    masked = masked_source_logits(model, graph, plan, images)[:, KEPT_LOGITS]
    assert (comp - masked).abs().max().item() <= TOL
    # not vacuous: the removed channels did matter in the unmasked source
    assert (run(model, images)[:, KEPT_LOGITS] - masked).abs().max().item() > 1e-4
    torch.fx.symbolic_trace(component)
    # the extracted model has the kept channel counts
    for layer in graph.layers:
        mod = dict(component.named_modules())[layer.name]
        n_out = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
        n_in = mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
        assert n_out == len(plan.kept(layer.name, "out"))
        assert n_in == len(plan.kept(layer.name, "in"))
    assert n_params(component) < n_params(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_dropping_hidden_channels_strictly_reduces_params(zoo, arch):
    model, graph = zoo[arch]
    masks = random_masks(graph, seed=3)
    hidden = [s for s in graph.spaces() if s not in graph.frozen_spaces
              and s != graph.output_space]
    assert any(not masks[s].all() for s in hidden)
    plan = plan_from_masks(graph, masks, range(10))  # every logit kept
    assert n_params(apply_plan(model, plan)) < n_params(model)
    # dropping a single channel of a single hidden space is enough
    one = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    space = next(s for s in hidden if graph.space_size[s] > 1)
    one[space][0] = False
    assert n_params(apply_plan(model, plan_from_masks(graph, one, range(10)))) \
        < n_params(model)


def test_plan_refuses_to_empty_a_layer(zoo):
    """A plan leaving a layer without channels (e.g. a whole concatenated Inception branch,
    which the model's forward cannot drop) is refused, naming the first such layer."""
    _, graph = zoo["googlenet"]
    masks = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    masks[graph.layer("blocks.1.branch3.0.0").out_space][:] = False
    with pytest.raises(PlanError, match="'blocks.1.branch3.0.0' would keep no output"):
        plan_from_masks(graph, masks, KEPT_LOGITS)
    masks = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    with pytest.raises(PlanError, match="'fc' would keep no output"):
        plan_from_masks(graph, masks, [])


def test_plan_keeps_logits_in_requested_order(zoo, images):
    model, graph = zoo["simnet"]
    masks = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    component = apply_plan(model, plan_from_masks(graph, masks, KEPT_LOGITS))
    src = run(model, images)
    assert (run(component, images) - src[:, KEPT_LOGITS]).abs().max().item() <= TOL


def test_apply_plan_leaves_source_untouched(zoo, images):
    model, graph = zoo["resnet18"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, plan_from_masks(graph, random_masks(graph, 5), KEPT_LOGITS))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_apply_plan_keeps_each_module_mode():
    model = make_model("simnet")
    graph = build_channel_graph(model, (IN_CHANNELS, SIZE, SIZE))
    plan = plan_from_masks(graph, random_masks(graph, 1), KEPT_LOGITS)
    assert not any(m.training for m in apply_plan(model, plan).modules())
    model.train()
    model.features[1].eval()  # e.g. a frozen BN during fine-tuning
    comp = apply_plan(model, plan)
    assert [m.training for m in comp.modules()] == [m.training for m in model.modules()]


def test_graph_building_keeps_each_module_mode():
    model = make_model("resnet18")
    model.train()
    model.layer1[0].bn1.eval()
    before = [m.training for m in model.modules()]
    build_channel_graph(model, (IN_CHANNELS, SIZE, SIZE))
    assert [m.training for m in model.modules()] == before
    # the graph is built in eval mode: BN running statistics are not updated
    stats = model.stem[1].running_mean.clone()
    build_channel_graph(model, (IN_CHANNELS, SIZE, SIZE))
    assert torch.equal(model.stem[1].running_mean, stats)


# --------------------------------------------------------------------------- structure


def test_image_input_space_is_frozen(zoo):
    for name, (_, graph) in zoo.items():
        assert len(graph.input_spaces) == 1, name
        (inp,) = graph.input_spaces
        assert inp in graph.frozen_spaces, name
        assert graph.space_size[inp] == IN_CHANNELS, name
        assert graph.layers[0].in_layout[0].space == inp, name


def test_output_space_is_written_by_the_classifier(zoo):
    for name, (_, graph) in zoo.items():
        assert graph.space_size[graph.output_space] == 10, name
        assert graph.output_layer is graph.layers[-1], name
        assert graph.output_space not in graph.frozen_spaces, name


def test_resnet18_residual_adds_couple_spaces(zoo):
    _, graph = zoo["resnet18"]
    stem = graph.find(graph.layer("stem.0").out_space)
    # identity shortcuts: the stem's space is the space of every layer1 block output
    assert graph.find(graph.layer("layer1.0.conv2").out_space) == stem
    assert graph.find(graph.layer("layer1.1.conv2").out_space) == stem
    # both layer1 blocks' first convs read that coupled space
    assert graph.layer("layer1.0.conv1").in_layout[0].space == stem
    assert graph.layer("layer1.1.conv1").in_layout[0].space == stem
    # a projection shortcut is coupled with the block's last conv, not with the stem
    l2 = graph.find(graph.layer("layer2.0.conv2").out_space)
    assert graph.find(graph.layer("layer2.0.shortcut.0").out_space) == l2
    assert l2 != stem
    # the inner conv of a block has a space of its own
    assert graph.find(graph.layer("layer1.0.conv1").out_space) != stem
    # all BNs writing into the coupled space map to it
    assert graph.norms["stem.1"] == stem and graph.norms["layer1.0.bn2"] == stem


def test_resnet50_bottleneck_coupling(zoo):
    _, graph = zoo["resnet50"]
    space = graph.find(graph.layer("layer1.0.conv3").out_space)
    assert graph.find(graph.layer("layer1.0.shortcut.0").out_space) == space
    for j in (1, 2):
        assert graph.find(graph.layer(f"layer1.{j}.conv3").out_space) == space
        assert graph.layer(f"layer1.{j}.conv1").in_layout[0].space == space


def test_googlenet_concat_segments(zoo):
    model, graph = zoo["googlenet"]
    last = model.blocks[-1]
    fc = graph.layer("fc")
    assert fc.kind == "linear"
    branch_ends = ["branch1.0", "branch2.1.0", "branch3.2.0", "branch4.1.0"]
    prefix = f"blocks.{len(model.blocks) - 1}."
    assert len(fc.in_layout) == 4
    for seg, end in zip(fc.in_layout, branch_ends):
        writer = graph.layer(prefix + end)
        assert seg.space == writer.out_space
        assert seg.size == writer.module.out_channels
        assert seg.repeat == 1
    assert in_width(fc) == last.out_channels == fc.module.in_features
    # the next block's four readers all see the four segments of the previous block
    first_block = graph.layer("blocks.1.branch1.0").in_layout
    assert [s.space for s in first_block] == \
        [graph.layer("blocks.0." + e).out_space for e in branch_ends]


def test_vgg16_flatten_repeat_at_28_and_64():
    def first_linear(graph: ChannelGraph):
        return next(lay for lay in graph.layers if lay.kind == "linear")

    m28 = make_model("vgg16_bn", in_channels=1, input_size=28, width=0.125)
    lin = first_linear(build_channel_graph(m28, (1, 28, 28)))
    assert len(lin.in_layout) == 1 and lin.in_layout[0].repeat == 1
    m64 = make_model("vgg16_bn", in_channels=1, input_size=64, width=0.125)
    g64 = build_channel_graph(m64, (1, 64, 64))
    lin = first_linear(g64)
    (seg,) = lin.in_layout
    assert seg.repeat == 4  # 2 x 2 spatial positions per channel
    assert seg.space == g64.layers[12].out_space  # the last conv writes the flattened map
    assert in_width(lin) == lin.module.in_features == seg.size * 4
    # a channel dropped before the flatten removes its 4 consecutive features
    masks = {s: torch.ones(g64.space_size[s], dtype=torch.bool) for s in g64.spaces()}
    masks[seg.space][1] = False
    plan = plan_from_masks(g64, masks, range(10))
    kept = set(plan.kept(lin.name, "in"))
    assert kept == set(range(in_width(lin))) - {4, 5, 6, 7}
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    comp = run(apply_plan(m64, plan).eval(), x)
    assert (comp - masked_source_logits(m64, g64, plan, x)).abs().max().item() <= TOL


def test_lenet_flatten_repeat(zoo):
    _, graph = zoo["lenet5"]
    fc1 = graph.layer("classifier.0")
    (seg,) = fc1.in_layout
    assert seg.space == graph.layer("features.3").out_space
    assert seg.repeat == ((SIZE // 2 - 4) // 2) ** 2


def test_mobilenet_depthwise_layers_share_input_space(zoo):
    model, graph = zoo["mobilenet_v2"]
    depthwise = [lay for lay in graph.layers if lay.depthwise]
    expected = [name for name, mod in model.named_modules() if isinstance(mod, nn.Conv2d)
                and mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels]
    assert [lay.name for lay in depthwise] == expected and expected
    for lay in depthwise:
        assert lay.kind == "conv" and not lay.frozen
        assert len(lay.in_layout) == 1
        assert lay.out_space == lay.in_layout[0].space
    # an expanding block: 1x1 expand -> depthwise -> 1x1 project, one space for the first two
    expand = graph.layer("features.2.block.0.0")
    dw = graph.layer("features.2.block.1.0")
    assert dw.depthwise and dw.out_space == expand.out_space
    assert graph.layer("features.2.block.2").in_layout[0].space == expand.out_space
    # a depthwise plan slices input and output identically
    plan = plan_from_masks(graph, random_masks(graph, 2), KEPT_LOGITS)
    for lay in depthwise:
        assert plan.kept(lay.name, "in") == plan.kept(lay.name, "out")


# --------------------------------------------------------------------------- user-defined


class BranchNet(nn.Module):
    """Two conv branches added, concatenated with a third, channel gate, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5))
        self.b = nn.Sequential(nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5))
        self.c = nn.Conv2d(6, 4, 3, padding=1, bias=False)
        self.gate = nn.Conv2d(6, 1, 1)
        self.mix = nn.Conv2d(9, 7, 3, stride=2, padding=1)
        self.fc = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.relu(self.a(x) + self.b(x))
        y = torch.cat([y, self.c(x)], dim=1)
        y = y * torch.sigmoid(self.gate(x))  # broadcast over channels: no coupling
        y = F.relu(self.mix(y))
        return self.fc(y.mean((2, 3)))


class GroupedNet(nn.Module):
    """A grouped (not depthwise) conv: its channels are frozen, the rest can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.grouped(x))
        x = F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 4)
        return self.fc(x.flatten(1))


def _custom(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(cls(), 1).eval()


def test_user_defined_branch_model_structure_and_full_plan(images):
    model = _custom(BranchNet)
    graph = build_channel_graph(model, (3, SIZE, SIZE))
    a, b = graph.layer("a.0").out_space, graph.layer("b.0").out_space
    assert a == b  # the add couples them
    mix = graph.layer("mix")
    assert [(s.space, s.size) for s in mix.in_layout] == \
        [(a, 5), (graph.layer("c").out_space, 4)]
    gate = graph.layer("gate").out_space
    assert graph.space_size[gate] == 1 and gate != a
    assert graph.layer("fc").in_layout[0].space == mix.out_space
    component = apply_plan(model, full_plan(graph)).eval()
    assert (run(component, images) - run(model, images)).abs().max().item() <= TOL


@pytest.mark.parametrize("cls", [BranchNet, GroupedNet])
def test_user_defined_models_masked_source(images, cls):
    model = _custom(cls)
    graph = build_channel_graph(model, (3, SIZE, SIZE))
    out = [3, 0] if cls is BranchNet else KEPT_LOGITS
    for seed in range(3):
        plan = plan_from_masks(graph, random_masks(graph, seed), out)
        component = apply_plan(model, plan).eval()
        masked = masked_source_logits(model, graph, plan, images)[:, out]
        assert (run(component, images) - masked).abs().max().item() <= TOL


def test_grouped_conv_is_frozen():
    model = _custom(GroupedNet)
    graph = build_channel_graph(model, (3, SIZE, SIZE))
    grouped = graph.layer("grouped")
    assert grouped.frozen and not grouped.depthwise
    assert grouped.out_space in graph.frozen_spaces
    assert grouped.in_layout[0].space in graph.frozen_spaces
    assert graph.layer("conv2").out_space not in graph.frozen_spaces
    assert graph.layer("fc").in_layout[0].repeat == 16


# --------------------------------------------------------------------------- errors


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = -x
        return self.fc(x.mean((2, 3)))


class WithLayer(nn.Module):
    def __init__(self, odd: nn.Module, channels: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), odd, nn.ReLU())
        self.head = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1))


class CatDim2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], dim=2)
        return self.fc(y.mean((2, 3)))


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.conv(self.first(x)))
        return self.fc(x.mean((2, 3)))


class ChannelSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(SIZE * SIZE, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).sum(1).flatten(1))


def test_data_dependent_control_flow_is_refused():
    with pytest.raises(UnsupportedModelError, match="torch.fx") as info:
        build_channel_graph(DataDependent(), (3, SIZE, SIZE))
    assert "DataDependent" in str(info.value)


@pytest.mark.parametrize("odd, kind", [
    (nn.ConvTranspose2d(4, 4, 3, padding=1), "ConvTranspose2d"),
    (nn.LocalResponseNorm(2), "LocalResponseNorm"),
    (nn.InstanceNorm2d(4), "InstanceNorm2d"),
])
def test_unsupported_layer_is_named(odd, kind):
    with pytest.raises(UnsupportedModelError) as info:
        build_channel_graph(WithLayer(odd), (3, SIZE, SIZE))
    msg = str(info.value)
    assert "body.1" in msg and kind in msg


def test_lstm_is_refused():
    class WithLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.rnn = nn.LSTM(SIZE, 4, batch_first=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(self.conv(x).mean(2))  # a sequence of 4 steps of SIZE values
            return self.fc(out[:, -1])

    with pytest.raises(UnsupportedModelError) as info:
        build_channel_graph(WithLSTM(), (3, SIZE, SIZE))
    assert "rnn" in str(info.value) and "LSTM" in str(info.value)


def test_concat_along_spatial_dim_couples_the_parts_channels():
    """Two maps stacked along the height: channel c of one lies on channel c of the other,
    so their channels are kept or removed together."""
    graph = assert_graph_invariants(CatDim2(), (3, SIZE, SIZE), out=(1, 0))
    assert graph.find(graph.layer("a").out_space) == graph.find(graph.layer("b").out_space)


def test_shared_weights_are_refused():
    with pytest.raises(UnsupportedModelError, match="more than once"):
        build_channel_graph(SharedConv(), (3, SIZE, SIZE))


def test_reduction_over_channels_is_refused():
    with pytest.raises(UnsupportedModelError, match="reduction over the channel"):
        build_channel_graph(ChannelSum(), (3, SIZE, SIZE))


def test_wrong_input_shape_is_refused():
    model = make_model("simnet")
    with pytest.raises(UnsupportedModelError, match="shape"):
        build_channel_graph(model, (1, SIZE, SIZE))  # the model expects 3 channels
