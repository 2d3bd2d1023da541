"""The channel graph on a representative dozen of real torchvision and timm networks.

One per family (SE, grouped, shuffle, LayerNorm, GroupNorm, dense, auxiliary heads, conv
classifier, stochastic depth, norm-act layers, slices), random weights, small inputs and, where the
builder allows, fewer blocks and channels. Each is checked by both invariants (see
``helpers.assert_graph_invariants``); transformers are in ``test_transformers.py``. The full
zoo is swept by ``benchmarks/zoo.py``.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from helpers import assert_graph_invariants, needs
from modellego.disassembly import DisassemblyConfig, disassemble_model
from modellego.surgery.graph import ChannelGraph, build_channel_graph
from modellego.surgery.reconstruct import layers_to_refit


def tv() -> Any:
    return needs("torchvision").models


def _resnext() -> torch.nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet
    return ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10)


def _regnet() -> torch.nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet
    params = BlockParams.from_init_params(depth=3, w_0=16, w_a=8.0, w_m=2.0, group_width=8,
                                          se_ratio=0.25)
    return RegNet(params, num_classes=10)


def _shufflenet() -> torch.nn.Module:
    from torchvision.models.shufflenetv2 import ShuffleNetV2
    return ShuffleNetV2([2, 2, 1], [8, 16, 32, 64, 64], num_classes=10)


def _convnext() -> torch.nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)],
                    stochastic_depth_prob=0.1, layer_scale=1.0, num_classes=10)


def _densenet() -> torch.nn.Module:
    from torchvision.models.densenet import DenseNet
    return DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                    num_classes=10)


TORCHVISION: dict[str, tuple[Callable[[], torch.nn.Module], int]] = {
    "mobilenet_v3_small (SE, hard-swish)":
        (lambda: tv().mobilenet_v3_small(num_classes=10, width_mult=0.5), 32),
    "resnext (grouped)": (_resnext, 32),
    "regnet_y (grouped, SE)": (_regnet, 32),
    "shufflenet_v2 (chunk, shuffle)": (_shufflenet, 32),
    "convnext (LayerNorm, layer scale)": (_convnext, 32),
    "densenet (BN over concat)": (_densenet, 32),
    "googlenet (aux heads)":
        (lambda: tv().googlenet(num_classes=10, aux_logits=True, init_weights=False), 32),
    "squeezenet1_1 (conv classifier)": (lambda: tv().squeezenet1_1(num_classes=10), 32),
    "efficientnet_b0 (SE, SiLU, stochastic depth)":
        (lambda: tv().efficientnet_b0(num_classes=10, stochastic_depth_prob=0.2), 32),
}
TIMM = {
    "mobilenetv3_small_050 (norm-act)": 32,
    "ghostnet_050 (slices, cheap ops)": 32,
    "convnext_atto (gamma via reshape)": 32,
    "resnet18 (GroupNorm)": 32,
}
TIMM_KWARGS: dict[str, Callable[[Any], dict]] = {
    "convnext_atto": lambda timm: {"ls_init_value": 1.0},  # (1e-6 would hide the blocks)
    "resnet18": lambda timm: {"norm_layer": timm.layers.GroupNorm},  # 32 groups each
}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_family(name):
    tv()
    build, size = TORCHVISION[name]
    model = build()
    graph = assert_graph_invariants(model, (3, size, size), seeds=3)
    _check_reasons(graph)
    _check_default(model, graph, (3, size, size))


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_family(name):
    timm = needs("timm")
    torch.manual_seed(0)
    arch = name.split()[0]
    model = timm.create_model(arch, pretrained=False, num_classes=10,
                              **TIMM_KWARGS.get(arch, lambda timm: {})(timm))
    graph = assert_graph_invariants(model, (3, TIMM[name], TIMM[name]), seeds=3)
    _check_reasons(graph)
    if "GroupNorm" in name:  # its groups are units: every norm is sliced, none kept whole
        assert len(graph.group_norms) == 20 and graph.frozen_spaces == graph.input_spaces
    _check_default(model, graph, (3, TIMM[name], TIMM[name]))


def _check_default(model: torch.nn.Module, graph: ChannelGraph,
                   shape: tuple[int, int, int]) -> None:
    """The default disassembly (threshold search with the confidence bound, every candidate
    repaired by reconstruction) on random images: it runs, repairs exactly the layers whose
    inputs lost channels (or says why one was left as cut), and the component answers for
    the task's two classes."""
    x = torch.randn(60, *shape, generator=torch.Generator().manual_seed(11))
    y = torch.arange(60) % 10
    comp = disassemble_model(model, x, y, classes=(2, 7), output_classes=range(10),
                             config=DisassemblyConfig((2, 7), samples_per_class=3,
                                                      batch_size=20), graph=graph)
    fit = comp.reconstruction
    assert fit is not None and comp.validation is not None
    assert sorted([f.name for f in fit.layers] + list(fit.skipped)) == \
        sorted(lay.name for lay in layers_to_refit(comp.graph, comp.plan))
    with torch.no_grad():
        out = comp.model(x[:2])
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def _check_reasons(graph: ChannelGraph) -> None:
    """Every frozen space says why (the image, a grouped conv, a LayerNorm, ...)."""
    assert set(graph.frozen_reasons) == graph.frozen_spaces
    assert all(graph.frozen_reasons.values())


def test_family_specifics():
    models = tv()
    # ResNeXt: the grouped convs are kept whole, and the reports can say so
    g = build_channel_graph(_resnext().eval(), (3, 32, 32))
    conv2 = g.find(g.layer("layer1.0.conv2").out_space)
    assert g.frozen_reasons[conv2] == "grouped conv layer1.0.conv2 (4 groups) is kept whole"
    assert g.find(g.layer("layer1.0.conv3").out_space) not in g.frozen_spaces
    # ConvNeXt: the residual stream is LayerNorm'd (frozen), the MLP hidden channels are not
    g = build_channel_graph(_convnext().eval(), (3, 32, 32))
    hidden = g.find(g.layer("features.1.0.block.3").out_space)
    assert hidden not in g.frozen_spaces
    stream = g.find(g.layer("features.1.0.block.5").out_space)
    assert "normalises over these channels" in g.frozen_reasons[stream]
    assert "features.1.0.layer_scale" in g.channel_params
    # GoogLeNet in eval mode: the auxiliary heads are not part of the graph
    g = build_channel_graph(models.googlenet(num_classes=10, aux_logits=True,
                                             init_weights=False).train(), (3, 32, 32))
    assert not any(lay.name.startswith("aux") for lay in g.layers)
