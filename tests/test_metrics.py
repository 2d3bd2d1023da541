"""Tests for modellego.metrics and the clean-up guarantees of modellego.runtime.hooks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modellego.metrics import (
    Accuracy,
    accuracy_from_logits,
    count_flops,
    count_macs,
    count_params,
    cpu_latency_ms,
    predict_logits,
)
from modellego.models import create_model
from modellego.runtime.hooks import forward_hooks, preserved_state


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(50, 3))


# --------------------------------------------------------------------------- counting


def test_macs_of_tiny_model() -> None:
    model = _tiny()
    # conv: 2 x 5 x 5 outputs, each 1 x 3 x 3 MACs; linear: 3 outputs x 50 inputs
    assert count_macs(model, (1, 5, 5)) == 2 * 5 * 5 * 9 + 150 == 600
    assert count_flops(model, (1, 5, 5)) == 1200


def test_params_of_tiny_model() -> None:
    # conv 1*2*9 + 2, BN weight+bias 2+2 (running stats are buffers), linear 50*3 + 3
    assert count_params(_tiny()) == 20 + 4 + 153 == 177


def test_macs_of_depthwise_conv() -> None:
    model = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    assert count_macs(model, (4, 6, 6)) == 4 * 6 * 6 * 9 == 1296
    assert count_params(model) == 36


def test_macs_of_grouped_conv() -> None:
    model = nn.Conv2d(8, 6, 1, groups=2)
    assert count_macs(model, (8, 3, 3)) == 6 * 9 * 4 == 216
    assert count_params(model) == 6 * 4 + 6


def test_macs_of_stride_2_conv() -> None:
    model = nn.Conv2d(1, 3, 3, stride=2, padding=1)
    # 8x8 input, stride 2, padding 1 -> 4x4 output
    assert count_macs(model, (1, 8, 8)) == 3 * 4 * 4 * 9 == 432
    assert count_flops(model, (1, 8, 8)) == 864


def test_macs_rectangular_kernel_and_no_padding() -> None:
    model = nn.Sequential(nn.Conv2d(2, 5, (3, 1)), nn.Flatten(), nn.Linear(5 * 4 * 6, 2))
    # 6x6 input, 3x1 kernel -> 4x6 output, each 2*3*1 MACs
    assert count_macs(model, (2, 6, 6)) == 5 * 4 * 6 * 6 + 2 * 120 == 960


def test_shared_layer_is_counted_per_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    assert count_macs(Twice(), (4,)) == 2 * 16
    assert count_params(Twice()) == 20


def test_counts_of_a_zoo_model_are_consistent() -> None:
    model = create_model("lenet5", in_channels=1, num_classes=10, input_size=28, width=1.0)
    # LeNet-5 on 28x28 (padding 2): conv1 6x28x28x25, conv2 16x10x10x150, fc 400*120+120*84+84*10
    expected = 6 * 28 * 28 * 25 + 16 * 10 * 10 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    assert count_macs(model, (1, 28, 28)) == expected
    assert count_flops(model, (1, 28, 28)) == 2 * expected
    assert count_params(model) == (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) \
        + (120 * 84 + 84) + (84 * 10 + 10)


def test_counting_keeps_modes_and_leaves_no_hooks() -> None:
    model = _tiny().train()
    model[1].eval()
    count_macs(model, (1, 5, 5))
    assert model.training and model[0].training and not model[1].training
    assert torch.is_grad_enabled()
    assert all(not m._forward_hooks for m in model.modules())
    # BN running stats untouched: counting runs in eval mode
    assert torch.equal(model[1].running_mean, torch.zeros(2))
    assert int(model[1].num_batches_tracked) == 0


# --------------------------------------------------------------------------- accuracy

# output index i means class OUT[i]; classes deliberately not sorted
OUT = [5, 2, 7]
LOGITS = torch.tensor([
    [3.0, 1.0, 0.0],  # -> 5
    [0.0, 2.0, 1.0],  # -> 2
    [1.0, 0.0, 4.0],  # -> 7
    [5.0, 0.0, 1.0],  # -> 5   (restricted to {7, 2}: 7)
    [9.0, 1.0, 2.0],  # -> 5   (restricted: 7)
    [6.0, 3.0, 0.0],  # -> 5   (restricted: 2)
])
LABELS = torch.tensor([5, 2, 7, 7, 2, 2])


def test_accuracy_with_unsorted_output_classes() -> None:
    acc = accuracy_from_logits(LOGITS, LABELS, OUT)
    assert isinstance(acc, Accuracy)
    assert acc.n == 6
    assert acc.accuracy == 3 / 6
    assert acc.per_class == {2: 1 / 3, 5: 1.0, 7: 1 / 2}
    assert list(acc.per_class) == [2, 5, 7]
    assert acc.counts == {2: 3, 5: 1, 7: 2}
    assert acc.to_dict() == {"accuracy": 0.5, "per_class": {2: 1 / 3, 5: 1.0, 7: 0.5},
                             "n": 6, "counts": {2: 3, 5: 1, 7: 2}}


def test_accuracy_with_restrict_to() -> None:
    sel = LABELS != 5
    acc = accuracy_from_logits(LOGITS[sel], LABELS[sel], OUT, restrict_to=[7, 2])
    # rows 1..5: restricted predictions 2, 7, 7, 7, 2 against labels 2, 7, 7, 2, 2
    assert acc.n == 5
    assert acc.accuracy == 4 / 5
    assert acc.per_class == {2: 2 / 3, 7: 1.0}
    same = accuracy_from_logits(LOGITS[sel], LABELS[sel], OUT, restrict_to=[2, 7])
    assert same == acc  # the order of restrict_to does not matter
    unrestricted = accuracy_from_logits(LOGITS[sel], LABELS[sel], OUT)
    assert unrestricted.accuracy == 2 / 5


def test_restrict_to_a_single_class_predicts_it_always() -> None:
    acc = accuracy_from_logits(LOGITS, LABELS, OUT, restrict_to=[7])
    assert acc.accuracy == 2 / 6
    assert acc.per_class == {2: 0.0, 5: 0.0, 7: 1.0}


def test_label_that_no_output_predicts_is_wrong() -> None:
    acc = accuracy_from_logits(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([3, 9]),
                               [3, 4])
    assert acc.accuracy == 0.5
    assert acc.per_class == {3: 1.0, 9: 0.0}


def test_accuracy_of_no_images_is_nan() -> None:
    acc = accuracy_from_logits(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), OUT)
    assert acc.n == 0
    assert math.isnan(acc.accuracy)
    assert acc.per_class == {} and acc.counts == {}


def test_predict_logits_batches_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = create_model("simnet", in_channels=1, num_classes=4, input_size=16, width=0.125)
    model.train()
    x = torch.randn(7, 1, 16, 16)
    with torch.no_grad():
        reference = model.eval()(x)
    model.train()
    out = predict_logits(model, x, batch_size=3)
    assert out.shape == (7, 4)
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)
    assert all(m.training for m in model.modules())
    assert torch.is_grad_enabled()


def test_cpu_latency_is_positive_and_restores_mode() -> None:
    model = _tiny().train()
    ms = cpu_latency_ms(model, (1, 5, 5), repeats=3, warmup=1)
    assert ms > 0 and math.isfinite(ms)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, torch.zeros(2))


# --------------------------------------------------------------------------- clean-up


class _Boom(nn.Module):
    """A model whose forward raises after its first layer ran (and got a hook call)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bn(self.conv(x))
        raise RuntimeError("boom in forward")


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def test_preserved_state_restores_after_exception() -> None:
    model = _Boom().train()
    model.bn.eval()
    before = [m.training for m in model.modules()]
    assert before == [True, True, False, True]
    with torch.enable_grad():
        with pytest.raises(RuntimeError, match="boom"):
            with preserved_state(model):
                torch.set_grad_enabled(False)
                model.eval()
                model(torch.zeros(1, 1, 5, 5))
        assert [m.training for m in model.modules()] == before
        assert torch.is_grad_enabled()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"):
            with preserved_state(model):
                torch.set_grad_enabled(True)
                model.train()
                model(torch.zeros(1, 1, 5, 5))
        assert not torch.is_grad_enabled()
        assert [m.training for m in model.modules()] == before


def test_forward_hooks_removed_after_exception() -> None:
    model = _Boom()
    calls = []
    with pytest.raises(RuntimeError, match="boom"):
        with forward_hooks(model.modules(), lambda m, i, o: calls.append(type(m).__name__)):
            assert all(len(m._forward_hooks) == 1 for m in model.modules())
            model(torch.zeros(1, 1, 5, 5))
    assert calls == ["Conv2d", "BatchNorm2d"]
    assert _no_hooks(model)


def test_forward_hooks_removed_when_registration_fails() -> None:
    class NotAModule:
        def register_forward_hook(self, hook):
            raise TypeError("cannot hook this")

    model = _Boom()
    with pytest.raises(TypeError, match="cannot hook"):
        with forward_hooks([model.conv, model.bn, NotAModule()], lambda *a: None):
            pass  # pragma: no cover
    assert _no_hooks(model)


@pytest.mark.parametrize("measure", [
    lambda m: count_macs(m, (1, 5, 5)),
    lambda m: count_flops(m, (1, 5, 5)),
    lambda m: predict_logits(m, torch.zeros(2, 1, 5, 5)),
    lambda m: cpu_latency_ms(m, (1, 5, 5), repeats=1, warmup=0),
])
def test_metrics_clean_up_after_a_failing_model(measure) -> None:
    model = _Boom().train()
    model.fc.eval()
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        measure(model)
    assert [m.training for m in model.modules()] == before
    assert torch.is_grad_enabled()
    assert not torch.is_inference_mode_enabled()
    assert _no_hooks(model)


def test_predict_logits_batches_by_the_largest_activation():
    """Without a batch size, batches hold about 8 MiB of the network's largest activation,
    measured on the first two images; a network that fails that probe is batched by the
    image size alone, and the pass proper says what it cannot do."""
    from modellego.data.lazy import ACTIVATION_BYTES
    from modellego.metrics import largest_activation, predict_logits

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(64 * 28 * 28, 3)).eval()
    x = torch.randn(100, 1, 28, 28)
    per_image = 64 * 28 * 28 * 4
    assert largest_activation(net, x[:2]) == per_image
    sizes = []
    net.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    out = predict_logits(net, x)
    size = ACTIVATION_BYTES // per_image
    assert sizes == [2] + [size] * (100 // size) + [100 % size]  # the probe, then the pass
    with torch.no_grad():
        assert torch.allclose(out, net(x), atol=1e-5)

    class FailsOnTwo(torch.nn.Module):
        def forward(self, z):
            if len(z) == 2:
                raise RuntimeError("no")
            return z.flatten(1)[:, :3]

    assert largest_activation(FailsOnTwo(), x[:2]) is None
    assert predict_logits(FailsOnTwo(), x).shape == (100, 3)
