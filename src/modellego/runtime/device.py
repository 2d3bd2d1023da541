"""Which device networks run on: ``--device auto|cpu|cuda|cuda:N|mps``.

:func:`resolve_device` turns the spelling into a :class:`torch.device`, checking that it
exists (a one-line error otherwise); ``auto`` is the process's GPU when CUDA is available
(``cuda:LOCAL_RANK`` under torchrun), else Apple's ``mps``, else the CPU.
:func:`using_device` makes it the device of the workflows inside the block
(:func:`current_device`; without it networks stay where they are); they move the network
there for the work (:func:`placed`) and back after it, and every pass over images moves each
batch to the network's device (:func:`to_device_of`) and its results back to the CPU.
Statistics accumulate in float64 on the network's device and come back to the CPU once, at
the end of a pass. On the CPU nothing is moved, so results are those of a run without
``--device``.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ModelLegoError

SPELLINGS = "auto, cpu, cuda, cuda:N or mps"

_DEVICE: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar(
    "modellego_device", default=None)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | torch.device | None, *, local_rank: int = 0) -> torch.device:
    """The device ``spec`` names (``None`` is ``auto``), checked to exist here.
    ``local_rank`` picks the GPU of ``auto`` and ``cuda`` (torchrun's ``LOCAL_RANK``)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return resolve_device(f"cuda:{local_rank}")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise ModelLegoError("`device` mps: this machine has no usable Apple GPU (MPS); "
                                 "use `device` cpu or auto")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d{1,4}))?", text)
    if match is None:
        raise ModelLegoError(f"`device` {spec!r} is not a device; use {SPELLINGS}")
    if not torch.cuda.is_available():
        raise ModelLegoError(f"`device` {text}: CUDA is not available here (no GPU, driver or "
                             "CUDA build of torch); use `device` cpu or auto")
    index = int(match[1]) if match[1] is not None else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise ModelLegoError(f"`device` {text}: this machine has {count} CUDA device(s) "
                             f"(cuda:0..cuda:{count - 1}); pick one of them")
    return torch.device("cuda", index)


@contextlib.contextmanager
def using_device(device: torch.device) -> Iterator[None]:
    """Within the block, workflows run networks on ``device``."""
    token = _DEVICE.set(device)
    try:
        yield
    finally:
        _DEVICE.reset(token)


def current_device() -> torch.device | None:
    """The device :func:`using_device` set, or ``None``: networks stay where they are."""
    return _DEVICE.get()


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters (or buffers) are; the CPU for a network with none."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def to_device_of(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``x`` on ``model``'s device (``x`` itself when it is there already)."""
    device = device_of(model)
    return x if x.device == device else x.to(device, non_blocking=True)


def on_current_device(model: nn.Module) -> nn.Module:
    """``model`` moved to :func:`current_device` when one is set (in place; returned)."""
    device = current_device()
    return model if device is None or device_of(model) == device else model.to(device)


@contextlib.contextmanager
def placed(*models: nn.Module) -> Iterator[None]:
    """Within the block ``models`` are on :func:`current_device` (when one is set); after
    it, each is back where it was."""
    homes = [device_of(m) for m in models]
    try:
        for m in models:
            on_current_device(m)
        yield
    finally:
        for m, home in zip(models, homes):
            if device_of(m) != home:
                m.to(home)
