"""Tests for modellego.analysis.contribution against a naive, materialising reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modellego.analysis.contribution import (
    accumulate_class_contribution,
    conv2d_contribution,
    layer_class_sums,
    layer_contribution,
    linear_contribution,
    minmax_normalize,
    tap_sums,
)
from modellego.errors import UnsupportedModelError

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

RTOL = 1e-6
ATOL = 1e-9


def _same_pads(k: int, d: int) -> tuple[int, int]:
    total = d * (k - 1)
    return total // 2, total - total // 2


def naive_conv_contribution(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Materialise every per-position, per-(q, p) product, then sum over positions."""
    x = x.double()
    w = conv.weight.detach().double()
    q_total, p_g, kh, kw = w.shape
    groups = conv.groups
    if isinstance(conv.padding, str):
        if conv.padding == "same":
            (t, b), (lft, r) = _same_pads(kh, conv.dilation[0]), _same_pads(kw, conv.dilation[1])
        else:
            t = b = lft = r = 0
    else:
        t = b = conv.padding[0]
        lft = r = conv.padding[1]
    x = F.pad(x, (lft, r, t, b))
    cols = F.unfold(x, (kh, kw), dilation=conv.dilation, padding=0, stride=conv.stride)
    batch, _, positions = cols.shape
    cols = cols.reshape(batch, groups, p_g, kh * kw, positions)
    wg = w.reshape(groups, q_total // groups, p_g, kh * kw)
    products = torch.einsum("gqpk,bgpkl->bgqpl", wg, cols)  # (B, G, Q_g, P_g, L)
    return products.sum(-1).reshape(batch, q_total, p_g)


def bias_free_output_sum(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Spatial sum of the conv output without bias, computed by PyTorch itself."""
    y = F.conv2d(
        x.double(),
        conv.weight.detach().double(),
        None,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
    )
    return y.sum((2, 3))


def _check_conv(conv: nn.Conv2d, x: torch.Tensor) -> None:
    got = conv2d_contribution(x, conv)
    assert got.dtype == torch.float64
    assert got.shape == (x.shape[0], conv.out_channels, conv.in_channels // conv.groups)
    torch.testing.assert_close(got, naive_conv_contribution(x, conv), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got.sum(-1), bias_free_output_sum(x, conv), rtol=RTOL, atol=ATOL)


CONV_CASES = {
    "stride2": {"in_channels": 3, "out_channels": 5, "kernel_size": 3, "stride": 2},
    "padding1": {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1},
    "padding21": {"in_channels": 2, "out_channels": 3, "kernel_size": 3, "padding": (2, 1)},
    "stride2_padding1": {
        "in_channels": 3,
        "out_channels": 4,
        "kernel_size": 3,
        "stride": 2,
        "padding": 1,
    },
    "dilation2": {
        "in_channels": 3,
        "out_channels": 4,
        "kernel_size": 3,
        "dilation": 2,
        "padding": 1,
    },
    "groups1": {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 1},
    "groups2": {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 2, "padding": 1},
    "depthwise": {"in_channels": 5, "out_channels": 5, "kernel_size": 3, "groups": 5, "padding": 1},
    "depthwise_x2": {
        "in_channels": 4,
        "out_channels": 8,
        "kernel_size": 3,
        "groups": 4,
        "stride": 2,
    },
    "same_even": {"in_channels": 3, "out_channels": 4, "kernel_size": 4, "padding": "same"},
    "same_even_dil": {
        "in_channels": 3,
        "out_channels": 2,
        "kernel_size": (2, 3),
        "padding": "same",
        "dilation": (3, 2),
    },
    "valid": {"in_channels": 3, "out_channels": 2, "kernel_size": 3, "padding": "valid"},
    "non_square": {"in_channels": 3, "out_channels": 4, "kernel_size": (1, 3), "padding": (0, 1)},
    "non_square_strided": {
        "in_channels": 2,
        "out_channels": 3,
        "kernel_size": (3, 2),
        "stride": (2, 1),
        "padding": (1, 2),
    },
    "one_by_one": {"in_channels": 6, "out_channels": 3, "kernel_size": 1},
    "one_by_one_stride2": {"in_channels": 6, "out_channels": 3, "kernel_size": 1, "stride": 2},
    "big_padding": {
        "in_channels": 2,
        "out_channels": 2,
        "kernel_size": 3,
        "padding": 4,
        "stride": 3,
    },
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_matches_naive(case: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONV_CASES[case])
    x = torch.randn(3, conv.in_channels, 9, 8)
    _check_conv(conv, x)


def test_conv_float32_input_and_custom_dtype() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    got32 = conv2d_contribution(x, conv, dtype=torch.float32)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(
        got32.double(), naive_conv_contribution(x, conv), rtol=1e-4, atol=1e-5
    )


def test_conv_batch_chunking_gives_same_result() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    x = torch.randn(7, 4, 5, 5)
    whole = conv2d_contribution(x, conv)
    chunked = conv2d_contribution(x, conv, max_bytes=1)  # one sample per chunk
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_conv_does_not_track_grad() -> None:
    conv = nn.Conv2d(2, 3, 3)
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    assert not conv2d_contribution(x, conv).requires_grad
    with torch.inference_mode():
        assert conv2d_contribution(x.detach(), conv).shape == (1, 3, 2)


def test_hand_computed_conv() -> None:
    conv = nn.Conv2d(2, 1, kernel_size=2, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [0.0, 0.5]]]]))
        conv.bias.fill_(100.0)  # bias must be excluded
    x = torch.tensor(
        [
            [
                [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]],
                [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -2.0]],
            ]
        ]
    )
    # channel 0: outputs 37 + 47 + 67 + 77 = 228; channel 1: -1*1 + 0.5*(-2) = -2
    expected = torch.tensor([[[228.0, -2.0]]], dtype=torch.float64)
    torch.testing.assert_close(conv2d_contribution(x, conv), expected, rtol=0, atol=0)


def test_tap_sums_hand_example() -> None:
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    # 2x2 kernel, padding 1, stride 2: outputs at padded rows/cols {0, 2}
    u = tap_sums(x, 2, stride=2, padding=1, dilation=1)
    # tap (0,0) sees padded (0|2, 0|2) -> x[1,1] only = 5
    # tap (0,1) sees padded (0|2, 1|3) -> x[1,0] + x[1,2] = 4 + 6
    # tap (1,0) sees padded (1|3, 0|2) -> x[0,1] + x[2,1] = 2 + 8
    # tap (1,1) sees padded (1|3, 1|3) -> x[0,0] + x[0,2] + x[2,0] + x[2,2] = 1 + 3 + 7 + 9
    torch.testing.assert_close(u, torch.tensor([[[5.0, 10.0, 10.0, 20.0]]]))


def test_tap_sums_explicit_asymmetric_padding_matches_same() -> None:
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    u_same = tap_sums(x, (4, 2), padding="same", dilation=(1, 3))
    u_explicit = tap_sums(x, (4, 2), padding=((1, 2), (1, 2)), dilation=(1, 3))
    torch.testing.assert_close(u_same, u_explicit, rtol=0, atol=0)


def test_linear() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(5, 4)
    x = torch.randn(6, 5)
    got = linear_contribution(x, lin)
    expected = lin.weight.detach().double()[None] * x.double()[:, None, :]
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(
        got.sum(-1), (lin(x) - lin.bias).double().detach(), rtol=1e-5, atol=1e-6
    )


def test_linear_3d_input_sums_leading_dims() -> None:
    torch.manual_seed(4)
    lin = nn.Linear(5, 3)
    x = torch.randn(2, 7, 5)
    got = linear_contribution(x, lin, max_bytes=1)
    w = lin.weight.detach().double()
    expected = torch.einsum("qp,btp->bqp", w, x.double())
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def test_linear_hand_computed() -> None:
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -3.0]]))
    got = layer_contribution(torch.tensor([[1.5, 4.0]]), lin)
    torch.testing.assert_close(got, torch.tensor([[[3.0, -12.0]]], dtype=torch.float64))


def test_layer_contribution_dispatch() -> None:
    conv = nn.Conv2d(2, 3, 3)
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(layer_contribution(x, conv), conv2d_contribution(x, conv))


@pytest.mark.parametrize(
    "module",
    [nn.Conv1d(2, 3, 3), nn.Conv3d(2, 3, 3), nn.ConvTranspose2d(2, 3, 3), nn.ReLU()],
    ids=["conv1d", "conv3d", "convtranspose2d", "relu"],
)
def test_unsupported_module_names_the_layer(module: nn.Module) -> None:
    with pytest.raises(UnsupportedModelError, match=r"features\.7"):
        layer_contribution(torch.randn(1, 2, 5, 5), module, name="features.7")


def test_non_zero_padding_mode_unsupported() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    with pytest.raises(UnsupportedModelError, match=r"stem\.conv.*reflect"):
        conv2d_contribution(torch.randn(1, 2, 5, 5), conv, name="stem.conv")
    with pytest.raises(UnsupportedModelError, match="reflect"):
        layer_contribution(torch.randn(1, 2, 5, 5), conv)


def test_wrong_input_shape_raises() -> None:
    with pytest.raises(ValueError, match="expects input"):
        conv2d_contribution(torch.randn(1, 3, 5, 5), nn.Conv2d(2, 3, 3))
    with pytest.raises(ValueError, match="too small"):
        conv2d_contribution(torch.randn(1, 2, 2, 2), nn.Conv2d(2, 3, 3))


def test_accumulate_clamps_per_sample_before_summing() -> None:
    contrib = torch.tensor(
        [
            [[3.0, -1.0]],  # class 0
            [[-5.0, 2.0]],  # class 0
            [[-1.0, -1.0]],  # class 2
            [[4.0, 0.5]],  # class 1
        ]
    )
    labels = torch.tensor([0, 0, 2, 1])
    got = accumulate_class_contribution(contrib, labels, num_classes=3)
    expected = torch.tensor([[[3.0, 2.0]], [[4.0, 0.5]], [[0.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # clamping after summing would give class 0 -> [0, 1]: make sure we did not do that
    wrong = torch.zeros(3, 1, 2, dtype=torch.float64).index_add_(0, labels, contrib.double())
    assert not torch.equal(got, wrong.clamp(min=0))
    assert got.dtype == torch.float64


def test_accumulate_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        accumulate_class_contribution(torch.ones(2, 1, 1), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="labels"):
        accumulate_class_contribution(torch.ones(2, 1, 1), torch.tensor([0]), 3)


def test_minmax_normalize() -> None:
    s = torch.tensor([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    got = minmax_normalize(s)
    eps = 1e-5
    expected = torch.tensor(
        [[0.0, 2.0 / (4.0 + eps), 4.0 / (4.0 + eps)], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    got0 = minmax_normalize(s, dim=0, eps=0.0)
    torch.testing.assert_close(got0, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]).double())


@st.composite
def conv_configs(draw: st.DrawFn) -> tuple[dict, tuple[int, int]]:
    groups = draw(st.sampled_from([1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if stride == (1, 1) and draw(st.booleans()):
        padding: object = draw(st.sampled_from(["same", "valid"]))
    else:
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    # input big enough for at least one output position
    pads = (0, 0) if isinstance(padding, str) else padding
    min_h = max(1, dh * (kh - 1) + 1 - 2 * pads[0])
    min_w = max(1, dw * (kw - 1) + 1 - 2 * pads[1])
    h = draw(st.integers(min_h, min_h + 6))
    w = draw(st.integers(min_w, min_w + 6))
    cfg = {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "kernel_size": (kh, kw),
        "stride": stride,
        "padding": padding,
        "dilation": (dh, dw),
        "groups": groups,
    }
    return cfg, (h, w)


@settings(max_examples=30, deadline=None)
@given(conv_configs(), st.integers(0, 2**31 - 1))
def test_conv_property_random_hyperparameters(config, seed: int) -> None:
    cfg, (h, w) = config
    torch.manual_seed(seed)
    conv = nn.Conv2d(**cfg)
    x = torch.randn(2, cfg["in_channels"], h, w)
    _check_conv(conv, x)


def naive_class_sums(x: torch.Tensor, module: nn.Module, rows: torch.Tensor, n: int):
    """The definition: per-sample contributions (naive unfold), clamped, summed by row."""
    if isinstance(module, nn.Conv2d):
        s = naive_conv_contribution(x, module)
    else:
        xs = x.double().reshape(x.shape[0], -1, x.shape[-1]).sum(1)
        s = module.weight.detach().double().unsqueeze(0) * xs.unsqueeze(1)
    sums = torch.zeros((n, *s.shape[1:]), dtype=torch.float64)
    for b in range(len(rows)):
        sums[rows[b]] += s[b].clamp(min=0)
    return sums, s.sum(0)


def _check_class_sums(module: nn.Module, x: torch.Tensor, rows: torch.Tensor, n: int,
                      rtol: float = 1e-6) -> None:
    sums, signed = layer_class_sums(x, module, rows, n)
    ref_sums, ref_signed = naive_class_sums(x, module, rows, n)
    assert sums.dtype == signed.dtype == torch.float64
    assert sums.shape == ref_sums.shape and signed.shape == ref_signed.shape
    # float32 per-sample products: relative to the largest value of each tensor
    torch.testing.assert_close(sums, ref_sums, rtol=0, atol=rtol * float(ref_sums.abs().max()))
    torch.testing.assert_close(signed, ref_signed, rtol=0,
                               atol=rtol * float(ref_signed.abs().max()))


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_class_sums_match_definition(case: str) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(**CONV_CASES[case])
    x = torch.randn(11, conv.in_channels, 9, 8)
    rows = torch.tensor([2, 0, 0, 3, 2, 0, 2, 3, 3, 0, 2])  # unsorted; row 1 has no sample
    _check_class_sums(conv, x, rows, 4)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_class_sums_on_tiny_maps_drop_taps_that_see_only_padding(size: int) -> None:
    # on a 1x1 map with padding 1 only the centre tap sees data: the exact closed form runs
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(7, 6, size, size)
    rows = torch.tensor([0, 1, 0, 1, 1, 0, 0])
    _check_class_sums(conv, x, rows, 2, rtol=1e-12 if size == 1 else 1e-6)


def test_class_sums_linear_is_exact_in_float64() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(9, 4)
    rows = torch.tensor([1, 0, 1, 1, 0])
    _check_class_sums(lin, torch.randn(5, 9), rows, 2, rtol=1e-12)
    _check_class_sums(lin, torch.randn(5, 3, 9), rows, 2, rtol=1e-6)  # tokens summed first


def test_class_sums_hand_computed_one_tap() -> None:
    # max(w * u, 0) summed over samples: w = -2 picks the negative inputs only
    lin = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0], [-2.0]]))
    x = torch.tensor([[1.0], [-4.0], [2.0]])
    sums, signed = layer_class_sums(x, lin, torch.tensor([0, 0, 0]), 1)
    assert sums.tolist() == [[[9.0], [8.0]]]
    assert signed.tolist() == [[-3.0], [2.0]]


def test_class_sums_of_an_all_zero_input_are_zero() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    sums, signed = layer_class_sums(torch.zeros(2, 3, 5, 5), conv, torch.tensor([0, 1]), 2)
    assert sums.shape == (2, 4, 3) and not sums.any() and not signed.any()


@settings(max_examples=30, deadline=None)
@given(conv_configs(), st.integers(0, 2**31 - 1))
def test_class_sums_property_random_hyperparameters(config, seed: int) -> None:
    cfg, (h, w) = config
    torch.manual_seed(seed)
    conv = nn.Conv2d(**cfg)
    x = torch.randn(5, conv.in_channels, h, w)
    rows = torch.randint(0, 3, (5,))
    _check_class_sums(conv, x, rows, 3, rtol=2e-6)


@pytest.mark.parametrize("case", ["groups2", "depthwise", "padding1", "groups2_of3"])
@pytest.mark.parametrize("size", [5, 12])  # one product of tap sums (<= 100 px), and two
def test_class_sums_in_small_blocks(case: str, size: int, monkeypatch) -> None:
    # blocks of 2 input channels: several whole groups per block (depthwise), one group
    # (groups2), or parts of a group (padding1, groups2_of3: 3 input channels per group)
    import modellego.analysis.contribution as contribution

    torch.manual_seed(4)
    conv = nn.Conv2d(6, 4, 3, padding=1, groups=2) if case == "groups2_of3" \
        else nn.Conv2d(**CONV_CASES[case])
    x = torch.randn(6, conv.in_channels, size, size)
    q_g = conv.out_channels // conv.groups
    monkeypatch.setattr(contribution, "_BLOCK_BYTES", 2 * len(x) * q_g * 4)
    _check_class_sums(conv, x, torch.tensor([1, 0, 1, 2, 2, 0]), 3)


def test_class_sums_cache_keeps_weight_layouts_for_a_pass() -> None:
    torch.manual_seed(5)
    conv, lin = nn.Conv2d(4, 6, 3, padding=1), nn.Linear(7, 3)
    x, z = torch.randn(5, 4, 6, 6), torch.randn(5, 7)
    rows = torch.tensor([0, 1, 1, 0, 1])
    cache: dict = {}
    for module, inp in ((conv, x), (lin, z)):
        plain = layer_class_sums(inp, module, rows, 2)
        first = layer_class_sums(inp, module, rows, 2, cache=cache)
        kept = dict(cache)
        again = layer_class_sums(inp, module, rows, 2, cache=cache)
        assert all(v is kept[k] for k, v in cache.items()) and cache.keys() == kept.keys()
        for got in (first, again):
            assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    assert len(cache) == 2  # one entry per layer (and geometry)
    # a 1x1 map keeps only the centre tap: a layout of its own, still exact
    tiny = torch.randn(5, 4, 1, 1)
    layer_class_sums(tiny, conv, rows, 2, cache=cache)
    assert len(cache) == 3
    _check_class_sums(conv, tiny, rows, 2, rtol=1e-12)
