"""Property-based tests of the channel graph and extraction on randomly generated CNNs.

Hypothesis draws the structure of a small CNN: a stem conv, then a few blocks, each one of
plain conv-BN-ReLU (sometimes grouped), residual add (identity or 1x1 projection shortcut),
two-branch concatenation, or depthwise + pointwise; then a head (global average pool or
flatten) and a linear layer. For every such network

* the keep-everything plan gives a component with exactly the source's logits, and
* any random keep masks (frozen spaces kept whole) give a component that builds, traces and
  runs, has the planned channel counts, and computes exactly the *masked source*: the source
  with every conv/linear layer's removed input channels set to zero, restricted to the kept
  logits in plan order (the invariant of tests/test_graph.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import masked_source_logits, randomize_bn, run
from modellego.surgery.extract import apply_plan
from modellego.surgery.graph import build_channel_graph
from modellego.surgery.plan import ComponentPlan, full_plan, plan_from_masks

TOL = 1e-5
CHANNELS = st.integers(2, 8)
SETTINGS = settings(max_examples=25, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- the random CNN


@dataclass(frozen=True)
class Block:
    kind: str            # "plain" | "residual" | "concat" | "depthwise"
    out: int             # output channels (residual: ignored for an identity shortcut)
    second: int = 0      # concat: channels of the second branch; depthwise: expansion
    option: bool = False  # plain: grouped; residual: projection; concat: BN in branch a
    pool: bool = False   # 2x2 max pooling after the block


@dataclass(frozen=True)
class Spec:
    in_channels: int
    size: int
    stem: int
    stem_bias: bool
    blocks: tuple[Block, ...]
    head: str            # "gap" | "flatten"
    num_classes: int


def _conv_bn_relu(c_in: int, c_out: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False, groups=groups),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class PlainBlock(nn.Module):
    def __init__(self, c_in: int, block: Block) -> None:
        super().__init__()
        groups = 2 if block.option and c_in % 2 == 0 and block.out % 2 == 0 \
            and not c_in == block.out == 2 else 1  # 2 == 2 groups would be depthwise
        self.body = _conv_bn_relu(c_in, block.out, groups=groups)
        self.out_channels, self.concat = block.out, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, block: Block, input_is_concat: bool) -> None:
        super().__init__()
        # an identity shortcut cannot add a concatenation to a single conv output: project
        project = block.option or input_is_concat
        c_out = block.out if project else c_in
        self.conv1 = _conv_bn_relu(c_in, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False),
                                      nn.BatchNorm2d(c_out)) if project else nn.Identity()
        self.out_channels, self.concat = c_out, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


class ConcatBlock(nn.Module):
    def __init__(self, c_in: int, block: Block) -> None:
        super().__init__()
        a = [nn.Conv2d(c_in, block.out, 1, bias=not block.option)]
        if block.option:
            a.append(nn.BatchNorm2d(block.out))
        self.a = nn.Sequential(*a, nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c_in, block.second, 3, padding=1), nn.ReLU())
        self.out_channels, self.concat = block.out + block.second, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


class DepthwiseBlock(nn.Module):
    def __init__(self, c_in: int, block: Block, input_is_concat: bool) -> None:
        super().__init__()
        # a depthwise conv needs one channel group as input: expand (1x1) a concatenation
        if block.second or input_is_concat:
            mid = block.second or c_in
            self.expand: nn.Module = _conv_bn_relu(c_in, mid, k=1)
        else:
            mid, self.expand = c_in, nn.Identity()
        self.depthwise = _conv_bn_relu(mid, mid, groups=mid)
        self.pointwise = _conv_bn_relu(mid, block.out, k=1)
        self.out_channels, self.concat = block.out, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(self.expand(x)))


class RandomNet(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(spec.in_channels, spec.stem, 3, padding=1,
                                            bias=spec.stem_bias), nn.ReLU())
        blocks, pools = [], []
        c, concat, size = spec.stem, False, spec.size
        for block in spec.blocks:
            if block.kind == "plain":
                mod: nn.Module = PlainBlock(c, block)
            elif block.kind == "residual":
                mod = ResidualBlock(c, block, concat)
            elif block.kind == "concat":
                mod = ConcatBlock(c, block)
            else:
                mod = DepthwiseBlock(c, block, concat)
            blocks.append(mod)
            c, concat = mod.out_channels, mod.concat
            pool = block.pool and size >= 4
            pools.append(nn.MaxPool2d(2) if pool else nn.Identity())
            size = size // 2 if pool else size
        self.blocks = nn.ModuleList(blocks)
        self.pools = nn.ModuleList(pools)
        self.head = spec.head
        features = c if spec.head == "gap" else c * size * size
        self.fc = nn.Linear(features, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block, pool in zip(self.blocks, self.pools):
            x = pool(block(x))
        if self.head == "gap":
            x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


@st.composite
def blocks(draw) -> Block:
    kind = draw(st.sampled_from(["plain", "residual", "concat", "depthwise"]))
    second = 0
    if kind == "concat":
        second = draw(CHANNELS)
    elif kind == "depthwise":
        second = draw(st.sampled_from([0, 0, 2, 4, 6]))  # 0: no expansion conv
    return Block(kind, draw(CHANNELS), second, draw(st.booleans()), draw(st.booleans()))


SPECS = st.builds(Spec, in_channels=st.integers(1, 3), size=st.integers(8, 16), stem=CHANNELS,
                  stem_bias=st.booleans(), blocks=st.lists(blocks(), min_size=1,
                                                           max_size=4).map(tuple),
                  head=st.sampled_from(["gap", "gap", "flatten"]),
                  num_classes=st.integers(2, 6))


def build(spec: Spec, seed: int) -> nn.Module:
    """The network of ``spec`` with random weights and random BN statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomize_bn(RandomNet(spec), seed + 1).eval()


def images(spec: Spec, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 2)
    return torch.randn(3, spec.in_channels, spec.size, spec.size, generator=gen)


# --------------------------------------------------------------------------- helpers


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(spec=SPECS, seed=st.integers(0, 2**16))
def test_full_plan_is_exact(spec: Spec, seed: int) -> None:
    model = build(spec, seed)
    shape = (spec.in_channels, spec.size, spec.size)
    graph = build_channel_graph(model, shape)
    plan = full_plan(graph)
    assert set(plan.modules) == {lay.name for lay in graph.layers} | set(graph.norms)
    component = apply_plan(model, plan).eval()
    assert n_params(component) == n_params(model)
    x = images(spec, seed)
    src, comp = run(model, x), run(component, x)
    assert comp.shape == src.shape == (len(x), spec.num_classes)
    assert (comp - src).abs().max().item() <= TOL
    assert ComponentPlan.from_dict(plan.to_dict()) == plan


@SETTINGS
@given(spec=SPECS, seed=st.integers(0, 2**16), data=st.data())
def test_random_masks_give_the_masked_source(spec: Spec, seed: int, data) -> None:
    model = build(spec, seed)
    shape = (spec.in_channels, spec.size, spec.size)
    graph = build_channel_graph(model, shape)
    masks = {}
    for s in graph.spaces():
        n = graph.space_size[s]
        if s in graph.frozen_spaces:
            masks[s] = torch.ones(n, dtype=torch.bool)
            continue
        keep = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label=f"space {s}")
        mask = torch.tensor(keep, dtype=torch.bool)
        if not mask.any():
            mask[data.draw(st.integers(0, n - 1), label=f"space {s} forced")] = True
        masks[s] = mask
    order = data.draw(st.permutations(range(spec.num_classes)), label="logit order")
    outputs = order[:data.draw(st.integers(1, spec.num_classes), label="kept logits")]
    plan = plan_from_masks(graph, masks, outputs)

    component = apply_plan(model, plan).eval()
    x = images(spec, seed)
    comp = run(component, x)
    assert comp.shape == (len(x), len(outputs))
    expected = masked_source_logits(model, graph, plan, x)[:, list(outputs)]
    assert (comp - expected).abs().max().item() <= TOL

    # consistent: every layer has the planned channels, and the component is itself a
    # well-formed network the graph builder accepts (and reproduces with its full plan)
    modules = dict(component.named_modules())
    for layer in graph.layers:
        mod = modules[layer.name]
        n_out = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
        n_in = mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
        assert (n_out, n_in) == (len(plan.kept(layer.name, "out")),
                                 len(plan.kept(layer.name, "in"))), layer.name
    for name in graph.norms:
        assert modules[name].num_features == len(plan.kept(name)), name
    torch.fx.symbolic_trace(component)
    again = build_channel_graph(component, shape)
    assert (run(apply_plan(component, full_plan(again)), x) - comp).abs().max().item() <= TOL
    # frozen spaces (the image input, grouped convs) were kept whole
    for s in graph.frozen_spaces:
        assert bool(masks[s].all())
