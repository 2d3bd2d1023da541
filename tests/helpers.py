"""Helpers shared by several test modules (import as ``from helpers import ...``).

``tests/`` has no ``__init__.py``: pytest puts this folder on ``sys.path`` (it holds the
rootdir conftest), so the test modules can import this one by its bare name.
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

from modellego.cli import main
from modellego.surgery.graph import ChannelGraph
from modellego.surgery.plan import ComponentPlan


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
    input channels that ``plan`` removes set to zero. Hooks are removed afterwards."""
    def zero_removed(keep: torch.Tensor):
        def hook(module: nn.Module, args: tuple) -> tuple:
            inp = args[0]
            shape = [1] * inp.dim()
            shape[1] = -1
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


def needs(module: str):
    """Import an optional dependency for a test: skipped when it is missing, except in CI
    (``CI=true``), where ``make test`` installs it, so that a missing one fails the test."""
    import importlib
    import os

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            raise AssertionError(f"{module} is not installed, but CI must test with it "
                                 "(make test installs modellego[torchvision,timm])") from None
        pytest.skip(f"{module} is not installed (pip install 'modellego[{module}]')")
