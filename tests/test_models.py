"""Tests for the model zoo registry and every registered architecture."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from modellego.errors import ModelLegoError
from modellego.models import create_model, list_models, model_info, register_model
from modellego.models import registry as registry_module

ALL = list_models()
WIDTH = 0.125


def _perturb_bn(model: nn.Module, seed: int) -> None:
    """Give BN layers non-trivial statistics and affine parameters (a fresh BN is identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def test_zoo_has_the_documented_architectures() -> None:
    documented = {"googlenet", "lenet5", "mobilenet_v2", "resnet18", "resnet50", "simnet",
                  "vgg11_bn", "vgg16_bn"}
    assert documented <= set(ALL)
    assert ALL == sorted(set(ALL))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("in_channels,input_size", [(1, 28), (3, 32)])
def test_forward_shape(name: str, in_channels: int, input_size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=in_channels, num_classes=7, input_size=input_size,
                         width=WIDTH).eval()
    x = torch.randn(2, in_channels, input_size, input_size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_model_info_matches_registry(name: str) -> None:
    info = model_info(name)
    assert info.name == name
    assert info.description
    assert info.family
    assert callable(info.builder)


@pytest.mark.parametrize("name", ALL)
def test_fx_trace_is_bit_identical(name: str) -> None:
    torch.manual_seed(1)
    model = create_model(name, in_channels=3, num_classes=7, input_size=32, width=WIDTH)
    _perturb_bn(model, 2)
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    traced.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
        got = traced(x)
    assert torch.equal(expected, got)
    # the trace really contains the convolutions (it is not an opaque leaf)
    convs = [n for n in traced.graph.nodes if n.op == "call_module"
             and isinstance(traced.get_submodule(n.target), nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_duplicate_registration_raises() -> None:
    before = list_models()
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet5", description="dup", family="x")(lambda **kw: nn.Identity())
    assert list_models() == before
    assert model_info("lenet5").description == "LeNet-5 (ReLU, max pooling)"


def test_register_new_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    seen = {}

    def builder(**kwargs) -> nn.Module:
        seen.update(kwargs)
        return nn.Sequential(nn.Flatten(), nn.Linear(kwargs["in_channels"]
                                                     * kwargs["input_size"] ** 2,
                                                     kwargs["num_classes"]))

    returned = register_model("zz_tiny", description="tiny", family="test")(builder)
    assert returned is builder
    assert "zz_tiny" in list_models()
    assert list_models("zz_*") == ["zz_tiny"]
    model = create_model("zz_tiny", in_channels=2, num_classes=4, input_size=9, width=0.5)
    assert seen == {"in_channels": 2, "num_classes": 4, "input_size": 9, "width": 0.5}
    assert isinstance(seen["width"], float)
    assert model(torch.zeros(1, 2, 9, 9)).shape == (1, 4)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ModelLegoError) as exc:
        create_model("resnet19")
    msg = str(exc.value)
    assert "'resnet19'" in msg
    for name in ALL:
        assert name in msg
    with pytest.raises(ModelLegoError, match="unknown architecture 'nope'"):
        model_info("nope")


def test_list_models_pattern() -> None:
    assert list_models("resnet*") == ["resnet18", "resnet50"]
    assert list_models("vgg*") == ["vgg11_bn", "vgg16_bn"]
    assert list_models("nothing*") == []
    assert list_models() == sorted(list_models())
    assert list_models(None) == list_models()


@pytest.mark.parametrize("kwargs,words", [
    ({"num_classes": 0}, "num_classes must be an integer >= 1, got 0"),
    ({"num_classes": -3}, "num_classes must be an integer >= 1"),
    ({"num_classes": 2.5}, "num_classes must be an integer >= 1, got 2.5"),
    ({"in_channels": 0}, "in_channels must be an integer >= 1"),
    ({"input_size": 4}, "input_size must be an integer >= 8, got 4"),
    ({"width": 0}, "width must be > 0, got 0"),
    ({"width": -0.5}, "width must be > 0"),
    ({"width": float("nan")}, "width must be > 0"),
])
def test_create_model_validation(kwargs: dict, words: str) -> None:
    with pytest.raises(ModelLegoError) as exc:
        create_model("simnet", **kwargs)
    assert words in str(exc.value)


def test_width_scales_channels_with_a_floor() -> None:
    full = create_model("simnet", in_channels=1, num_classes=3, input_size=28, width=1.0)
    half = create_model("simnet", in_channels=1, num_classes=3, input_size=28, width=0.5)
    tiny = create_model("simnet", in_channels=1, num_classes=3, input_size=28, width=0.01)
    outs = [[m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
            for net in (full, half, tiny)]
    assert outs == [[32, 64, 128], [16, 32, 64], [4, 4, 4]]


def test_fresh_models_differ_by_seed_only() -> None:
    torch.manual_seed(5)
    a = create_model("lenet5", in_channels=1, num_classes=10, input_size=28, width=0.5)
    torch.manual_seed(5)
    b = create_model("lenet5", in_channels=1, num_classes=10, input_size=28, width=0.5)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
