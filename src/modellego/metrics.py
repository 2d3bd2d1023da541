"""Accuracy, parameter count, FLOPs and CPU latency of a classifier."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence, cast

import torch
from torch import nn

from .data.lazy import MIN_BATCH, Inputs, default_batch, iter_slices, streamed
from .models.attention import macs_counter
from .runtime.device import device_of, to_device_of
from .runtime.hooks import forward_hooks, preserved_state
from .terminal import Progress


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass of one image, over conv and linear layers
    and the token-by-token products of attention layers.

    Counted with forward hooks, so it works for any model, traceable or not. Operations
    other than these (BN, activations, pooling, adds, softmax) are not counted, as usual.
    """
    return sum(macs_by_layer(model, input_shape).values())


def macs_by_layer(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Multiply-accumulates of each conv/linear layer (by module name) for one image."""
    macs: dict[str, int] = {}
    names = {id(m): n for n, m in model.named_modules()}

    # attention layers, each checked once (see macs_counter)
    counters = {id(m): count for m in model.modules()
                if not isinstance(m, (nn.Conv2d, nn.Linear))
                and (count := macs_counter(m)) is not None}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if id(module) in counters:  # an attention layer
            n = counters[id(module)](tuple(inputs[0].shape))
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            n = output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            n = output.numel() * cast(nn.Linear, module).in_features
        name = names[id(module)]
        macs[name] = macs.get(name, 0) + int(n)

    layers = [m for m in model.modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) or id(m) in counters]
    x = torch.zeros(1, *input_shape, device=device_of(model))
    with preserved_state(model), forward_hooks(layers, hook), torch.inference_mode():
        model.eval()
        model(x)
    return macs


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one image: 2 x :func:`count_macs` (a multiply and an add per MAC)."""
    return 2 * count_macs(model, input_shape)


def cpu_latency_ms(model: nn.Module, input_shape: Sequence[int], *, repeats: int = 30,
                   warmup: int = 5) -> float:
    """Median wall time in milliseconds of one forward pass of a single image on the CPU
    (a network on another device is timed on a CPU copy)."""
    if device_of(model).type != "cpu":
        import copy

        model = copy.deepcopy(model).cpu()
    x = torch.randn(1, *input_shape)
    times = []
    with preserved_state(model), torch.inference_mode():
        model.eval()
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def predict_logits(model: nn.Module, images: Inputs, *, batch_size: int | None = None
                   ) -> torch.Tensor:
    """Logits for ``images`` (already normalised; lazy inputs are streamed), computed in
    eval mode in batches (default: :func:`~modellego.data.lazy.default_batch` of the image
    shape and of the network's largest activation per image, measured on the first two
    images when there are more than a few)."""
    outs = []
    with preserved_state(model):
        model.eval()
        if batch_size is None:
            batch_size = default_batch(images.shape[1:])
            if len(images) > MIN_BATCH:
                first = to_device_of(next(iter_slices(images, 2)), model)
                batch_size = default_batch(images.shape[1:],
                                           sample_bytes=largest_activation(model, first))
        steps = -(-len(images) // batch_size)
        with Progress(steps, f"forward pass over {len(images)} images",
                      enabled=streamed(images)) as bar:
            for x in iter_slices(images, batch_size):
                outs.append(model(to_device_of(x, model)).float().cpu())
                bar.update(1)
    return torch.cat(outs) if outs else torch.zeros(0)


@torch.no_grad()
def largest_activation(model: nn.Module, x: torch.Tensor) -> int | None:
    """The bytes per input of the largest tensor any module of ``model`` returns on the
    batch ``x``, by one forward pass with hooks (removed afterwards); ``None`` when that
    pass fails (the caller then sizes its batches without it)."""
    peak = 0

    def hook(module: nn.Module, args: tuple, out) -> None:
        nonlocal peak
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                peak = max(peak, t.numel() * t.element_size())

    try:
        with forward_hooks(list(model.modules()), hook):
            model(x)
    except Exception:  # (the pass proper reports what a network cannot do)
        return None
    return peak // max(1, len(x))


@dataclass(frozen=True)
class Accuracy:
    """Overall and per-class accuracy (class id -> accuracy) on ``n`` images."""

    accuracy: float
    per_class: dict[int, float]
    n: int
    counts: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def correct_flags(logits: torch.Tensor, labels: torch.Tensor, output_classes: Sequence[int],
                  restrict_to: Sequence[int] | None = None) -> torch.Tensor:
    """Per image: whether the ``argmax`` prediction (over ``restrict_to``'s outputs only,
    when given) is its label; output index ``i`` means class ``output_classes[i]``."""
    output_classes = list(output_classes)
    columns = list(range(len(output_classes)))
    if restrict_to is not None:
        columns = [output_classes.index(c) for c in restrict_to]
    pred_col = logits[:, columns].argmax(1)
    pred = torch.tensor([output_classes[c] for c in columns], dtype=torch.long)[pred_col]
    return pred == labels


def accuracy_from_logits(logits: torch.Tensor, labels: torch.Tensor,
                         output_classes: Sequence[int],
                         restrict_to: Sequence[int] | None = None) -> Accuracy:
    """Accuracy of ``argmax`` predictions, output index ``i`` meaning class ``output_classes[i]``.

    With ``restrict_to`` (class ids), the argmax is taken over those classes' outputs only.
    """
    correct = correct_flags(logits, labels, output_classes, restrict_to)
    per_class, counts = {}, {}
    for c in sorted(set(labels.tolist())):
        sel = labels == c
        counts[int(c)] = int(sel.sum())
        per_class[int(c)] = float(correct[sel].double().mean())
    acc = float(correct.double().mean()) if len(labels) else float("nan")
    return Accuracy(acc, per_class, int(len(labels)), counts)
