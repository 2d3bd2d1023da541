"""Closed-form reconstruction follows the graph's channel layout, not dim 1: a linear over a
channel-last map (ConvNeXt's MLP) or over the tokens of a sequence, bias-free layers, grouped
and depthwise convs, an input shared by two layers, layers after a concat and after a channel
shuffle. Each re-fitted layer equals an independent ``torch.linalg.lstsq`` on the component's
own inputs and the source's outputs, the staged pass equals the pass-per-layer one, and a plan
that removes nothing leaves the component equal to its source."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modellego.disassembly import DisassemblyConfig, disassemble_model
from modellego.runtime.hooks import forward_hooks, forward_pre_hooks
from modellego.surgery.extract import apply_plan
from modellego.surgery.graph import build_channel_graph
from modellego.surgery.plan import full_plan, plan_from_masks
from modellego.surgery.reconstruct import layers_to_refit, reconstruct_layers
from test_reconstruct import patches, ridge_lstsq


class ChannelLast(nn.Module):
    """conv -> permute -> Linear -> ReLU -> Linear -> permute -> mean -> Linear (ConvNeXt)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16, bias=bias)
        self.fc2 = nn.Linear(16, 8, bias=bias)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        x = self.fc2(torch.relu(self.fc1(x))).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class Tokens(nn.Module):
    """conv patches -> tokens (B, L, C) -> MLP over the last axis -> mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(2, 8, 2, stride=2)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.fc2(nn.functional.gelu(self.fc1(t))).mean(1))


class Grouped(nn.Module):
    """A grouped conv (kept whole), a depthwise conv, bias-free convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 8, 3, padding=1, bias=False)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b = nn.Conv2d(8, 12, 1, bias=False)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.c = nn.Conv2d(12, 10, 1)
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        x = self.g(torch.relu(self.a(x)))
        x = self.dw(torch.relu(self.b(torch.relu(x))))
        return self.head(torch.relu(self.c(torch.relu(x))).mean((2, 3)))


class Shared(nn.Module):
    """One map read by two convs (summed), then a concat, then a channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 6, 3, padding=1)
        self.b2 = nn.Conv2d(8, 6, 1)
        self.c = nn.Conv2d(8, 6, 1)
        self.d = nn.Conv2d(12, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        a = torch.relu(self.a(x))
        s = torch.relu(self.b1(a) + self.b2(a))
        x = torch.cat([s, torch.relu(self.c(a))], 1)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)  # shuffle
        return self.head(torch.relu(self.d(x)).mean((2, 3)))


class Tiny(nn.Module):
    """3x3 convs on maps smaller than their kernel: taps that read only padding."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 6, 3, padding=2, dilation=2)
        self.d = nn.Conv2d(6, 6, 3, padding=1, stride=2, bias=False)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.a(x)), 4)    # 8x8 -> 2x2
        x = torch.relu(self.c(torch.relu(self.b(x))))
        x = nn.functional.max_pool2d(x, 2)                          # 2x2 -> 1x1
        return self.head(torch.relu(self.d(x)).flatten(1))


PATTERNS = {"channel-last linears": (ChannelLast, {}),
            "bias-free channel-last linears": (ChannelLast, {"bias": False}),
            "linears over tokens": (Tokens, {}),
            "grouped, depthwise, bias-free convs": (Grouped, {}),
            "shared input, concat, shuffle": (Shared, {}),
            "kernels larger than the map": (Tiny, {})}


def random_plan(net, graph, seed):
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for space in graph.spaces():
        size = graph.space_size[space]
        m = torch.rand(size, generator=gen) < 0.6
        m[int(torch.randint(size, (1,), generator=gen))] = True
        whole = space in graph.frozen_spaces or space == graph.output_space or \
            space in graph.input_spaces
        masks[space] = torch.ones(size, dtype=torch.bool) if whole else m
    return plan_from_masks(graph, masks, list(range(5)))


def pattern(name, seed, images):
    """The network of pattern ``name`` (seeded), ``images`` random inputs and its graph."""
    cls, kwargs = PATTERNS[name]
    torch.manual_seed(seed)
    net = cls(**kwargs).eval()
    return net, torch.randn(images, 2, 8, 8), build_channel_graph(net, (2, 8, 8))


def design_rows(mod, x):
    """Every row of ``mod``'s design matrix on input ``x`` (no sampling)."""
    if isinstance(mod, nn.Conv2d):
        return patches(mod, x)
    return x.reshape(-1, x.shape[-1])


def target_rows(mod, out, keep):
    if isinstance(mod, nn.Conv2d):
        return out[:, keep].permute(0, 2, 3, 1).reshape(-1, len(keep))
    return out[..., keep].reshape(-1, len(keep))


@pytest.mark.parametrize("name", list(PATTERNS))
def test_each_refit_equals_an_independent_lstsq(name):
    net, x, graph = pattern(name, 0, 12)
    plan = random_plan(net, graph, seed=3)
    todo = layers_to_refit(graph, plan)
    assert todo, "the plan must remove some layer's inputs"
    comp = apply_plan(net, plan).eval()
    fit = reconstruct_layers(comp, net, graph, plan, x, max_rows=10**6, batch_size=5)
    assert [f.name for f in fit.layers] == [lay.name for lay in todo]
    # the component's inputs to each re-fitted layer (its upstream layers re-fitted) and the
    # source's outputs there, captured independently
    cmods, smods = dict(comp.named_modules()), dict(net.named_modules())
    ins, outs = {}, {}
    with forward_pre_hooks([(cmods[lay.name], lambda m, a, n=lay.name: ins.__setitem__(n, a[0]))
                            for lay in todo]), torch.no_grad():
        comp(x)
    with forward_hooks([smods[lay.name] for lay in todo],
                       lambda m, a, o: outs.__setitem__(id(m), o)), torch.no_grad():
        net(x)
    for lay, f in zip(todo, fit.layers):
        mod = cmods[lay.name]
        keep = list(plan.kept(lay.name))
        rows = design_rows(mod, ins[lay.name])
        y = target_rows(mod, outs[id(smods[lay.name])], keep)
        assert f.rows == len(rows)
        intercept = mod.bias is not None
        assert f.intercept == ("bias" if intercept else "none")
        want = ridge_lstsq(rows, y, intercept=intercept)
        got = mod.weight.reshape(len(keep), -1).T.double()
        if intercept:
            got = torch.cat([got, mod.bias.double()[None]])
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), lay.name


@pytest.mark.parametrize("name", list(PATTERNS))
def test_staged_pass_equals_a_pass_per_layer(name):
    net, x, graph = pattern(name, 1, 10)
    plan = random_plan(net, graph, seed=5)
    a, b = apply_plan(net, plan).eval(), apply_plan(net, plan).eval()
    fa = reconstruct_layers(a, net, graph, plan, x, max_rows=40, batch_size=4)
    fb = reconstruct_layers(b, net, graph, plan, x, max_rows=40, batch_size=4, staged=False)
    assert [f.to_dict() for f in fa.layers] == [f.to_dict() for f in fb.layers]
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.parametrize("name", list(PATTERNS))
def test_nothing_removed_leaves_the_source(name):
    net, x, graph = pattern(name, 2, 6)
    plan = full_plan(graph)
    comp = apply_plan(net, plan).eval()
    fit = reconstruct_layers(comp, net, graph, plan, x)
    assert fit.layers == () and fit.skipped == {}
    with torch.no_grad():
        assert torch.equal(comp(x), net(x))


@pytest.mark.parametrize("name", list(PATTERNS))
def test_the_default_runs_and_repairs_every_cut_layer(name):
    cls, kwargs = PATTERNS[name]
    torch.manual_seed(3)
    net = cls(**kwargs).eval()
    x = torch.randn(100, 2, 8, 8)
    y = torch.arange(100) % 5
    comp = disassemble_model(net, x, y, classes=(0, 2), output_classes=range(5),
                             config=DisassemblyConfig((0, 2), samples_per_class=8))
    assert comp.reconstruction is not None and comp.validation is not None
    assert [f.name for f in comp.reconstruction.layers] == \
        [lay.name for lay in layers_to_refit(comp.graph, comp.plan)]
    with torch.no_grad():
        assert comp.model(x[:3]).shape == (3, 2)


def test_taps_that_read_only_padding():
    from modellego.surgery.reconstruct import _used_taps
    conv = nn.Conv2d(1, 1, 3, padding=1)
    assert _used_taps(conv, 1, 1) == [(1, 1)]
    assert _used_taps(conv, 2, 2) == [(u, v) for u in range(3) for v in range(3)]
    assert _used_taps(conv, 1, 3) == [(1, 0), (1, 1), (1, 2)]
    assert _used_taps(nn.Conv2d(1, 1, 3, padding=2, dilation=2), 2, 2) == [(1, 1)]
    assert _used_taps(nn.Conv2d(1, 1, 3, padding="same"), 1, 1) == [(1, 1)]
    assert _used_taps(nn.Conv2d(1, 1, 3, padding=1, stride=2), 1, 1) == [(1, 1)]
    assert len(_used_taps(nn.Conv2d(1, 1, 3), 5, 5)) == 9


@pytest.mark.parametrize("rows", [5, 40])
@pytest.mark.parametrize("intercept", [True, False])
def test_dual_and_normal_equations_give_the_lstsq_solution(rows, intercept):
    """Fewer rows than columns: the rows are kept and the dual form solved; more: the
    normal equations. Both equal the independent lstsq, in batches of any size."""
    from modellego.surgery.reconstruct import _Normal
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 12, generator=gen, dtype=torch.float64)
    y = torch.randn(rows, 3, generator=gen, dtype=torch.float64)
    normal = _Normal(12, 3, intercept)
    for a in range(0, rows, 4):
        normal.add(x[a:a + 4], y[a:a + 4])
    assert (normal.xtx is None) == (rows < 13 + int(intercept))
    w, _ = normal.solve(1e-4)
    want = ridge_lstsq(x, y, intercept=intercept)
    assert torch.allclose(w, want, rtol=1e-6, atol=1e-8)
    x1 = torch.cat([x, torch.ones(rows, 1, dtype=torch.float64)], 1) if intercept else x
    direct = float((x1 @ w - y).pow(2).sum() / y.pow(2).sum())
    assert normal.error(w) == pytest.approx(direct, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("intercept", [True, False])
def test_the_blocked_products_equal_the_whole_normal_equations(intercept, monkeypatch):
    """``X^T X`` summed over the blocks on and above the diagonal only (blocks of 5 columns
    here, the last one short), and the intercept kept as column sums, gives the full
    products and the lstsq solution."""
    from modellego.surgery import reconstruct
    monkeypatch.setattr(reconstruct, "GRAM_BLOCK", 5)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(60, 12, generator=gen, dtype=torch.float64)
    y = torch.randn(60, 3, generator=gen, dtype=torch.float64)
    normal = reconstruct._Normal(12, 3, intercept)
    for a in range(0, 60, 7):
        normal.add(x[a:a + 7], y[a:a + 7])
    x1 = torch.cat([x, torch.ones(60, 1, dtype=torch.float64)], 1) if intercept else x
    assert torch.allclose(normal.xtx, x1.T @ x1, rtol=1e-12, atol=1e-10)
    assert torch.allclose(normal.xty, x1.T @ y, rtol=1e-12, atol=1e-10)
    w, _ = normal.solve(1e-4)
    assert torch.allclose(w, ridge_lstsq(x, y, intercept=intercept), rtol=1e-6, atol=1e-8)
