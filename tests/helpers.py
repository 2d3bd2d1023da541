"""Helpers shared by several test modules (import as ``from helpers import ...``).

``tests/`` has no ``__init__.py``: pytest puts this folder on ``sys.path`` (it holds the
rootdir conftest), so the test modules can import this one by its bare name.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from types import ModuleType

import pytest
import torch
from torch import nn

from modellego.cli import main
from modellego.errors import PlanError
from modellego.surgery.extract import apply_plan
from modellego.surgery.graph import ChannelGraph, build_channel_graph
from modellego.surgery.plan import ComponentPlan, full_plan, plan_from_masks


def needs(module: str) -> ModuleType:
    """Import an optional dependency (``torchvision``, ``timm``) for a test: skipped when it
    is missing, but failed under ``CI=true``, where every extra must be installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{module} is not installed, and CI=true needs it")
        pytest.skip(f"{module} is not installed")


def run_cli(argv) -> tuple[int, str, str]:
    """Run ``modellego *argv`` in-process: ``(exit status, stdout, stderr)``.

    Every argument goes through ``str``, so paths may be passed as they are.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` without autograd."""
    with torch.no_grad():
        return model(x)


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm random running statistics and (if affine) affine parameters.

    Non-trivial BN statistics make BN handling matter. Draws come from a generator seeded
    with ``seed``, layer by layer in module order: mean, var, then weight and bias. Returns
    ``model`` itself; its train/eval mode is left unchanged.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if mod.affine:
                    mod.weight.copy_(torch.randn(n, generator=gen) * 0.5 + 1.0)
                    mod.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model


def masked_source_logits(model: nn.Module, graph: ChannelGraph, plan: ComponentPlan,
                         x: torch.Tensor) -> torch.Tensor:
    """The "masked source": ``model`` run (without autograd) with every conv/linear layer's
    input channels that ``plan`` removes set to zero (dim 1 of a conv's input, the last dim
    of a linear layer's). Hooks are removed afterwards."""
    def zero_removed(keep: torch.Tensor):
        def hook(module: nn.Module, args: tuple) -> tuple:
            inp = args[0]
            shape = [1] * inp.dim()
            shape[1 if isinstance(module, nn.Conv2d) else -1] = -1
            return (inp * keep.to(inp.dtype).view(shape),) + tuple(args[1:])
        return hook

    handles = []
    try:
        for layer in graph.layers:
            mod = layer.module
            n_in = mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
            keep = torch.zeros(n_in, dtype=torch.bool)
            keep[list(plan.kept(layer.name, "in"))] = True
            handles.append(mod.register_forward_pre_hook(zero_removed(keep)))
        return run(model, x)
    finally:
        for h in handles:
            h.remove()


class TwoLayer(nn.Module):
    """conv(1->6, 3x3) -> ReLU -> global mean -> linear(6->4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def varied_random_model(arch: str, noise: torch.Tensor
                        ) -> tuple[nn.Module, torch.Tensor, tuple[int, ...]]:
    """A seeded random zoo model (1x28x28 inputs, 10 classes, width 0.25, BatchNorm
    statistics randomised) whose logits are centred on ``noise``, so that it predicts
    variedly; with its predictions on ``noise`` and its two most predicted classes."""
    from modellego.models import create_model
    from modellego.surgery.graph import build_channel_graph

    torch.manual_seed(0)
    model = create_model(arch, in_channels=1, num_classes=10, input_size=28, width=0.25)
    randomize_bn(model, 1).eval()
    head = build_channel_graph(model, (1, 28, 28)).output_layer.module
    with torch.no_grad():
        head.bias -= model(noise).mean(0)
        y = model(noise).argmax(1)
    counts = torch.bincount(y, minlength=10)
    return model, y, tuple(int(c) for c in torch.sort(-counts, stable=True).indices[:2])


def graph_random_masks(graph: ChannelGraph, seed: int, p: float = 0.6
                       ) -> dict[int, torch.Tensor]:
    """Keep each channel with probability ``p``, at least one per space; frozen spaces whole."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for s in graph.spaces():
        n = graph.space_size[s]
        m = torch.rand(n, generator=gen) < p
        if s in graph.frozen_spaces:
            m[:] = True
        elif not m.any():
            m[int(torch.randint(n, (1,), generator=gen))] = True
        masks[s] = m
    return masks


def assert_graph_invariants(model: nn.Module, input_shape: tuple[int, int, int], *,
                            seeds: int = 4, out: tuple[int, ...] = (3, 0),
                            tol: float = 1e-5) -> ChannelGraph:
    """The channel graph's two invariants on ``model`` (BN statistics randomised, eval
    mode): the keep-everything plan reproduces the logits exactly, and random plans'
    components equal the masked source (within ``tol`` times the logit scale), at least one
    of them removing channels that mattered. Returns the graph."""
    torch.manual_seed(0)
    model = randomize_bn(model, 1).eval()
    graph = build_channel_graph(model, input_shape)
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(5))
    src = run(model, x)
    full = apply_plan(model, full_plan(graph)).eval()
    assert (run(full, x) - src).abs().max().item() <= tol * max(1.0, src.abs().max().item())
    changed, plans = False, 0
    for seed in range(seeds):
        try:
            plan = plan_from_masks(graph, graph_random_masks(graph, seed), list(out))
        except PlanError:  # a random mask emptied a layer (ties can do that): another seed
            continue
        plans += 1
        assert ComponentPlan.from_dict(plan.to_dict()) == plan
        comp = apply_plan(model, plan).eval()
        masked = masked_source_logits(model, graph, plan, x)[:, list(out)]
        scale = max(1.0, masked.abs().max().item())
        assert (run(comp, x) - masked).abs().max().item() <= tol * scale
        changed |= (src[:, list(out)] - masked).abs().max().item() > 1e-4 * scale
        build_channel_graph(comp, input_shape)  # a component is traceable again
    assert plans and changed, "no random plan removed a channel that mattered"
    return graph
