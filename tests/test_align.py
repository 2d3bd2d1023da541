"""Channel alignment (``modellego.surgery.align``): a network's channel counts padded to
multiples of k by channels that change nothing, on every zoo architecture's random component
(residual adds, concatenations, depthwise layers, flatten -> linear), and left alone where
padding is not possible."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import graph_random_masks, needs, randomize_bn, run
from modellego.models import create_model, list_models
from modellego.surgery.align import align_channels
from modellego.surgery.extract import apply_plan
from modellego.surgery.graph import build_channel_graph
from modellego.surgery.plan import plan_from_masks

SHAPE = (1, 28, 28)


def _random_component(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = randomize_bn(create_model(arch, in_channels=1, num_classes=10, input_size=28,
                                      width=0.25), seed).eval()
    graph = build_channel_graph(model, SHAPE)
    plan = plan_from_masks(graph, graph_random_masks(graph, seed), range(10))
    return apply_plan(model, plan).eval()


def _widths(net: nn.Module) -> list[int]:
    out = []
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            out.append(m.out_channels)
        elif isinstance(m, nn.Linear):
            out.append(m.out_features)
    return out


@pytest.mark.parametrize("arch", list_models())
def test_padding_changes_no_output_and_aligns_every_free_width(arch):
    comp = _random_component(arch)
    before = {k: v.clone() for k, v in comp.state_dict().items()}
    padded, done = align_channels(comp, SHAPE, 8)
    assert done.reason == "" and done.multiple == 8 and done.channels_added > 0
    # the input network is untouched
    assert all(torch.equal(before[k], v) for k, v in comp.state_dict().items())
    x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(1))
    want = run(comp, x)
    assert (run(padded, x) - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    graph = build_channel_graph(padded, SHAPE)
    heads = {graph.find(h) for h in graph.attention.values()}  # (a copied head would count)
    free = [s for s in graph.spaces() if s not in graph.frozen_spaces
            and s not in graph.input_spaces and s != graph.find(graph.output_space)
            and s not in heads
            and not any(graph.find(seg.space) == s for pair in graph.ties for seg in pair)]
    assert free and all(graph.space_size[s] % 8 == 0 for s in free)
    assert _widths(padded)[-1] == 10  # the logits are not padded
    added = sum(graph.space_size[s] for s in free) - sum(
        build_channel_graph(comp, SHAPE).space_size[s] for s in free)
    assert added == done.channels_added


def test_what_needs_no_padding_or_cannot_be_padded_is_returned_as_it_is():
    full = create_model("resnet18", in_channels=1, num_classes=10, input_size=28).eval()
    same, done = align_channels(full, SHAPE, 8)  # 64, 128, 256, 512 channels
    assert same is full and done.reason == "every channel count is aligned already"
    assert align_channels(full, SHAPE, 1)[1].reason == "not asked for"

    class Ranked(nn.Module):  # data-dependent control flow: fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 5, 3)

        def forward(self, x):
            y = self.conv(x)
            return y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))

    net = Ranked().eval()
    same, done = align_channels(net, SHAPE, 8)
    assert same is net and done.channels_added == 0
    assert done.reason.startswith("the graph engine cannot follow it (")
    with pytest.raises(Exception, match="`align` must be at least 1, got 0"):
        align_channels(net, SHAPE, 0)


def test_a_network_that_sizes_channels_by_fixed_numbers_is_left_unpadded():
    """timm's GhostNet cuts ``cat([x1, cheap(x1)])[:, :out_chs]`` at the source's width: a
    no-op on the source and on a component, a cut once the widths grow. The padded network
    does not run, so the network is returned as it is, with the reason."""
    timm = needs("timm")
    torch.manual_seed(0)
    net = timm.create_model("ghostnet_050", pretrained=False, num_classes=5).eval()
    shape = (3, 32, 32)
    graph = build_channel_graph(net, shape)
    comp = apply_plan(net, plan_from_masks(graph, graph_random_masks(graph, 0), range(5))).eval()
    same, done = align_channels(comp, shape, 8)
    assert same is comp and done.channels_added == 0
    assert done.reason.startswith("the padded network does not run (RuntimeError: ")
    assert done.reason.endswith("; left as it was")
