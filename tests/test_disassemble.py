"""Tests for disassembly: sample selection, contribution profile, locating and extraction."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from helpers import masked_source_logits, randomize_bn, run
from modellego.analysis.locate import LocateConfig
from modellego.analysis.profile import select_samples
from modellego.disassembly import Component, DisassemblyConfig, disassemble_model
from modellego.errors import ModelLegoError, PlanError
from modellego.models import create_model, list_models

TASK = (3, 1)
K = 20
TOL = 1e-5


# --------------------------------------------------------------------------- helpers


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_no_hooks(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        assert not mod._forward_hooks, name
        assert not mod._forward_pre_hooks, name
        assert not mod._backward_hooks, name


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def config(k: int = K, classes=TASK, **locate) -> DisassemblyConfig:
    # the plain cut with the given thresholds (the default preset would also reconstruct)
    return DisassemblyConfig(tuple(classes), samples_per_class=k, locate=LocateConfig(**locate),
                             preset="paper")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def component(trained, digits) -> Component:
    x, y = digits
    return disassemble_model(trained, x, y, classes=list(TASK), output_classes=range(10),
                             config=config())


# --------------------------------------------------------------------------- trained simnet


def test_trained_model_beats_chance(trained, digits):
    x, y = digits
    acc = (run(trained, x).argmax(1) == y).float().mean().item()
    assert acc > 0.5


def test_component_outputs_task_logits_in_order(component, trained, digits):
    x, _ = digits
    xs = x[:64]
    comp = run(component.model, xs)
    assert comp.shape == (64, 2)
    assert component.classes == TASK
    assert component.plan.kept("fc") == TASK  # logit 3 first, then logit 1
    masked = masked_source_logits(trained, component.graph, component.plan, xs)
    assert (comp - masked[:, list(TASK)]).abs().max().item() <= TOL
    assert not component.model.training


def test_task_order_only_permutes_the_logits(component, trained, digits):
    x, y = digits
    flipped = disassemble_model(trained, x, y, classes=[1, 3], output_classes=range(10),
                                config=config(classes=(1, 3)))
    assert flipped.plan.kept("fc") == (1, 3)
    for name, spec in component.plan.modules.items():
        if name != "fc":
            assert flipped.plan.modules[name] == spec
    a, b = run(component.model, x[:32]), run(flipped.model, x[:32])
    assert (a - b.flip(1)).abs().max().item() <= 1e-6


def test_component_is_smaller_with_default_thresholds(component, trained):
    assert n_params(component.model) < n_params(trained)
    kept = component.kept_channels()
    assert set(kept) == {lay.name for lay in component.graph.layers}
    assert kept["fc"] == [2, 10]
    assert any(k < total for k, total in kept.values())


def test_zero_mass_threshold_drops_exactly_the_inputs_without_positive_contribution(
        trained, digits):
    """rule='mass' with beta 0 drops exactly the fc inputs with no positive contribution."""
    x, y = digits
    comp = disassemble_model(trained, x, y, classes=list(TASK), output_classes=range(10),
                             config=config(rule="mass", beta_conv=0.0, beta_linear=0.0))
    fc = comp.graph.layer("fc")
    positive = torch.zeros(fc.module.in_features, dtype=torch.bool)
    for c in TASK:
        positive |= comp.profile.for_class("fc", c)[c] > 0
    assert set(comp.plan.kept("fc", "in")) == set(torch.nonzero(positive).flatten().tolist())
    masked = masked_source_logits(trained, comp.graph, comp.plan, x[:64])
    assert (run(comp.model, x[:64]) - masked[:, list(TASK)]).abs().max().item() <= TOL


def test_plan_keeping_everything_reproduces_source_logits(digits):
    """When every contribution is positive, rule='mass' with beta 0 keeps every channel,
    and the component's logits are exactly the source's logits of the task classes."""
    x, y = digits
    torch.manual_seed(1)
    model = create_model("simnet", in_channels=1, num_classes=10, input_size=28, width=0.25)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.abs_()
            if isinstance(mod, nn.BatchNorm2d):  # post-ReLU activations positive, moderate
                mod.weight.fill_(0.1)
                mod.bias.fill_(1.0)
    model.eval()
    comp = disassemble_model(model, x, y, classes=list(TASK), output_classes=range(10),
                             config=config(k=5, rule="mass", beta_conv=0.0, beta_linear=0.0))
    for lay in comp.graph.layers:
        if lay.name != "fc":
            assert len(comp.plan.kept(lay.name)) == lay.module.out_channels, lay.name
    assert n_params(comp.model) == n_params(model) - 8 * (model.fc.in_features + 1)
    src = run(model, x[:64])
    assert src.abs().max().item() < 100  # so that an absolute tolerance is meaningful
    assert (run(comp.model, x[:64]) - src[:, list(TASK)]).abs().max().item() <= TOL


# --------------------------------------------------------------------------- selection


def test_selection_picks_most_confident_samples(component, trained, digits):
    x, y = digits
    probs = torch.softmax(run(trained, x).double(), 1)
    sel = component.selection
    assert sel.classes == TASK and sel.k == K
    for c in TASK:
        idx = list(sel.indices[c])
        assert len(idx) == K == len(set(idx))
        assert all(int(y[i]) == c for i in idx)
        p = probs[:, c]
        scores = torch.tensor(sel.scores[c], dtype=torch.float64)
        assert torch.allclose(scores, p[idx], atol=1e-6)
        assert all(a >= b for a, b in zip(sel.scores[c], sel.scores[c][1:]))
        others = [i for i in torch.nonzero(y == c).flatten().tolist() if i not in set(idx)]
        assert p[others].max().item() <= min(sel.scores[c]) + 1e-6
        # the ranking agrees with an independent one wherever scores are not near-ties
        expected = sorted(torch.nonzero(y == c).flatten().tolist(),
                          key=lambda i: (-p[i].item(), i))[:K]
        gaps = [abs(p[a].item() - p[b].item()) for a, b in zip(idx, expected) if a != b]
        assert all(g <= 1e-6 for g in gaps)
    assert sel.all_indices().tolist() == list(sel.indices[3]) + list(sel.indices[1])


def test_selection_breaks_ties_by_index():
    torch.manual_seed(0)
    model = create_model("simnet", in_channels=1, num_classes=10, input_size=28, width=0.25)
    with torch.no_grad():
        model.fc.weight.zero_()  # every image gets the same logits (the bias)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, 28, 28, generator=gen)
    y = torch.randint(0, 4, (60,), generator=gen)
    sel = select_samples(model, x, y, [3, 1], range(10), k=5)
    for c in (3, 1):
        assert list(sel.indices[c]) == torch.nonzero(y == c).flatten().tolist()[:5]
        assert len(set(sel.scores[c])) == 1
    # fewer samples than k: all of them, in index order
    small = select_samples(model, x[:12], y[:12], [2], range(10), k=50)
    assert list(small.indices[2]) == torch.nonzero(y[:12] == 2).flatten().tolist()


def test_selection_of_a_class_without_samples_is_refused():
    torch.manual_seed(0)
    model = create_model("simnet", in_channels=1, num_classes=10, input_size=28, width=0.25)
    y = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ModelLegoError, match="class 4"):
        select_samples(model.eval(), torch.randn(8, 1, 28, 28), y, [0, 4], range(10), k=2)


# --------------------------------------------------------------------------- profile


def test_profile_counts_samples(component):
    assert component.profile.classes == TASK
    assert component.profile.samples == {3: K, 1: K}
    assert component.profile.seconds > 0


def test_linear_profile_equals_direct_computation(component, trained, digits):
    x, _ = digits
    W = trained.fc.weight.detach().double()
    for c in TASK:
        idx = list(component.selection.indices[c])
        with torch.no_grad():
            a = torch.flatten(trained.pool(trained.features(x[idx])), 1).double()
        direct = (W.unsqueeze(0) * a.unsqueeze(1)).clamp(min=0).sum(0)  # (Q, P)
        got = component.profile.for_class("fc", c)
        assert got.shape == W.shape and got.dtype == torch.float64
        assert torch.allclose(got, direct, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- hooks and modes


def test_hooks_removed_and_modes_restored_after_success(trained, digits):
    x, y = digits
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    trained.train()
    trained.features[5].eval()  # a mixed state must come back as it was
    expected = modes(trained)
    try:
        comp = disassemble_model(trained, x, y, classes=list(TASK), output_classes=range(10),
                                 config=config(k=5))
        assert modes(trained) == expected
        assert_no_hooks(trained)
        assert_no_hooks(comp.model)
        assert torch.is_grad_enabled()
        # nothing of the source changed (BN statistics included)
        after = trained.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        trained.eval()


class FailsWhileProfiled(nn.Module):
    """A simnet wrapper whose forward raises once analysis hooks are attached."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = create_model("simnet", in_channels=1, num_classes=10, input_size=28,
                                width=0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net.features(x)  # hooked convs run first
        if self.net.fc._forward_hooks:  # plain Python: only true while profiling
            raise RuntimeError("boom inside forward")
        return self.net.fc(torch.flatten(self.net.pool(h), 1))


def test_hooks_removed_and_modes_restored_after_exception(digits):
    x, y = digits
    model = FailsWhileProfiled()
    model.train()
    expected = modes(model)
    with pytest.raises(RuntimeError, match="boom inside forward"):
        disassemble_model(model, x, y, classes=list(TASK), output_classes=range(10),
                          config=config(k=5))
    assert modes(model) == expected and model.training
    assert_no_hooks(model)
    assert torch.is_grad_enabled()


# --------------------------------------------------------------------------- errors


def test_repeated_classes_are_refused(trained, digits):
    x, y = digits
    with pytest.raises(ModelLegoError, match="repeat"):
        disassemble_model(trained, x, y, classes=[3, 1, 3], output_classes=range(10))


def test_classes_that_are_not_outputs_are_refused(trained, digits):
    x, y = digits
    with pytest.raises(ModelLegoError, match=r"\[7\]"):
        disassemble_model(trained, x, y, classes=[3, 7], output_classes=[0, 1, 2, 3, 4, 5,
                                                                          6, 8, 9, 10])
    with pytest.raises(ModelLegoError):
        disassemble_model(trained, x, y, classes=[12], output_classes=range(10))


def test_empty_class_list_is_refused(trained, digits):
    x, y = digits
    with pytest.raises(ModelLegoError):
        disassemble_model(trained, x, y, classes=[], output_classes=range(10))


def test_thresholds_that_prune_everything_raise_plan_error(component, trained, digits):
    x, y = digits
    with pytest.raises(PlanError) as info:
        disassemble_model(trained, x, y, classes=list(TASK), output_classes=range(10),
                          config=config(k=5, alpha_conv=1.0, beta_conv=1.0,
                                        alpha_linear=1.0, beta_linear=1.0))
    names = [lay.name for lay in component.graph.layers]
    assert any(f"layer {n!r}" in str(info.value) for n in names)
    assert_no_hooks(trained)


def test_out_of_range_thresholds_are_refused(trained, digits):
    x, y = digits
    with pytest.raises(ModelLegoError, match="beta-conv"):
        disassemble_model(trained, x, y, classes=list(TASK), output_classes=range(10),
                          config=config(k=5, beta_conv=1.5))
    with pytest.raises(ModelLegoError, match="rule"):
        disassemble_model(trained, x, y, classes=list(TASK), output_classes=range(10),
                          config=config(k=5, rule="magic"))


# --------------------------------------------------------------------------- every architecture


@pytest.fixture(scope="module")
def noise() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(40, 1, 28, 28, generator=gen), torch.arange(40) % 4


@pytest.mark.parametrize("rule", ["mass", "count"])
@pytest.mark.parametrize("arch", list_models())
def test_every_architecture_disassembles(arch, rule, noise):
    # Width 0.25: at width 0.125 random-weight googlenet gives whole 4-channel Inception
    # branches no contribution at all, and the plan (which cannot drop a concatenated branch
    # entirely) is refused with a PlanError naming the branch (see tests/test_graph.py).
    x, y = noise
    torch.manual_seed(0)
    model = create_model(arch, in_channels=1, num_classes=10, input_size=28, width=0.25)
    randomize_bn(model, 1).eval()
    comp = disassemble_model(model, x, y, classes=[0, 1], output_classes=range(10),
                             config=config(k=5, classes=(0, 1), rule=rule))
    assert comp.profile.samples == {0: 5, 1: 5}
    assert comp.plan.kept(comp.graph.output_layer.name) == (0, 1)
    out = run(comp.model, x[:6])
    assert out.shape == (6, 2)
    assert n_params(comp.model) < n_params(model)
    masked = masked_source_logits(model, comp.graph, comp.plan, x[:6])[:, [0, 1]]
    assert (out - masked).abs().max().item() <= TOL
    assert_no_hooks(model)


def test_reuse_takes_the_selection_and_profile_of_an_earlier_component(
        component, trained, digits, monkeypatch):
    mod = sys.modules["modellego.disassembly"]  # the module, not the function of that name

    x, y = digits

    def fail(*args, **kwargs):
        raise AssertionError("selection or profile computed again")

    monkeypatch.setattr(mod, "select_samples", fail)
    monkeypatch.setattr(mod, "contribution_profile", fail)
    import modellego.analysis.methods as methods  # where the methods call it now
    monkeypatch.setattr(methods, "contribution_profile", fail)
    again = disassemble_model(trained, x, y, classes=list(TASK), output_classes=range(10),
                              config=config(), reuse=component)
    assert again.plan == component.plan and again.profile is component.profile
    for a, b in zip(again.model.state_dict().values(), component.model.state_dict().values()):
        assert torch.equal(a, b)
    # another sample count (or other classes) cannot reuse it: computed afresh
    with pytest.raises(AssertionError, match="computed again"):
        disassemble_model(trained, x, y, classes=list(TASK), output_classes=range(10),
                          config=config(k=K + 1), reuse=component)


def test_a_graph_of_another_model_object_is_refused(trained, digits):
    import copy

    from modellego.surgery.graph import build_channel_graph

    x, y = digits
    other = build_channel_graph(copy.deepcopy(trained), tuple(x.shape[1:]))
    with pytest.raises(ModelLegoError, match="another model object"):
        disassemble_model(trained, x, y, classes=list(TASK), output_classes=range(10),
                          config=config(), graph=other)
    mine = build_channel_graph(trained, tuple(x.shape[1:]))
    comp = disassemble_model(trained, x, y, classes=list(TASK), output_classes=range(10),
                             config=config(), graph=mine)
    assert comp.graph is mine
    # a component of another model object cannot lend its profile either
    with pytest.raises(ModelLegoError, match="another model object"):
        disassemble_model(copy.deepcopy(trained), x, y, classes=list(TASK),
                          output_classes=range(10), config=config(), reuse=comp)
