"""Hooks and mode handling that always clean up, even when the model raises."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def forward_hooks(modules: Iterable[nn.Module], hook: Callable) -> Iterator[None]:
    """Register ``hook`` as a forward hook on each module; remove all of them on exit."""
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag and the grad mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    grad = torch.is_grad_enabled()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        torch.set_grad_enabled(grad)


@contextlib.contextmanager
def forward_pre_hooks(pairs: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Register each ``(module, hook)`` pair as a forward pre-hook; remove them all on exit."""
    handles = []
    try:
        for m, hook in pairs:
            handles.append(m.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
