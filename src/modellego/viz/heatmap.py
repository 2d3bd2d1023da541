"""Per-class relative contribution of one layer's input channels, as a heatmap.

For class ``c`` the profile holds ``S_c[q, p]``: the summed (per sample clamped at 0)
contribution of input feature ``p`` to output ``q`` over the class's samples. A channel's
total is ``t_c[p] = sum_q S_c[q, p]``; a linear layer that reads a flattened ``C x H x W``
map has ``H * W`` features per channel, which are summed into the channel. Each class's
row is min-max normalised, ``(t - min t) / (max t - min t)`` (all zeros when constant), so
rows compare the *pattern* of channels a class relies on: similar within a class, distinct
across classes.

The per-sample version does the same for every profiled sample alone (its clamped
contributions summed over the outputs), samples grouped by class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..analysis.contribution import layer_contribution
from ..analysis.locate import profiled_layers
from ..analysis.profile import ContributionProfile, contribution_profile, select_samples
from ..errors import ModelLegoError
from ..manifest import Manifest, as_manifest
from ..runtime.hooks import forward_hooks, preserved_state
from ..surgery.graph import ChannelGraph, Layer, build_channel_graph
from ..training import task_outputs
from .common import new_figure, plain_text, save_figure, task_images


@dataclass(frozen=True)
class HeatmapData:
    """``matrix[i, p]``: normalised contribution of input channel ``p`` for ``classes[i]``;
    ``totals`` the same before normalising; ``samples[j]`` the normalised per-sample row of
    a sample of class ``sample_labels[j]`` (grouped by class, most confident first) and
    ``sample_totals[j]`` the same before normalising (a class's rows add up to its
    ``totals`` row)."""

    layer: str
    kind: str
    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    matrix: np.ndarray
    totals: np.ndarray
    samples: np.ndarray | None
    sample_labels: np.ndarray | None
    profile: ContributionProfile
    sample_totals: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return int(self.matrix.shape[1])


def layer_names(graph: ChannelGraph) -> list[str]:
    """Names of the layers with a contribution profile (conv and linear, not depthwise)."""
    return [lay.name for lay in profiled_layers(graph)]


def find_layer(graph: ChannelGraph, name: str) -> Layer:
    """The profiled layer ``name``; a :class:`ModelLegoError` listing valid names otherwise."""
    valid = layer_names(graph)
    if name not in valid:
        extra = ""
        if any(lay.name == name for lay in graph.layers):
            extra = " (it is a depthwise or grouped conv, which has no class profile)"
        raise ModelLegoError(f"`layer` {name!r} is not a conv or linear layer of this "
                             f"model{extra}; valid layer names: {', '.join(valid)}")
    return graph.layer(name)


def fold_channels(values: torch.Tensor, layer: Layer) -> torch.Tensor:
    """Sum the last axis (a layer's input features) into input channels, segment by segment
    of its input layout (a flattened map repeats each channel ``H * W`` times)."""
    parts, offset = [], 0
    for seg in layer.in_layout:
        block = values[..., offset:offset + seg.size * seg.repeat]
        offset += seg.size * seg.repeat
        parts.append(block.reshape(*block.shape[:-1], seg.size, seg.repeat).sum(-1))
    return torch.cat(parts, -1)


def normalize_rows(values: np.ndarray) -> np.ndarray:
    """Min-max normalise each row to [0, 1]; a constant row becomes zeros."""
    values = np.asarray(values, dtype=np.float64)
    lo = values.min(axis=1, keepdims=True)
    span = values.max(axis=1, keepdims=True) - lo
    return np.divide(values - lo, span, out=np.zeros_like(values), where=span > 0)


def class_matrix(profile: ContributionProfile, layer: Layer, classes: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(normalised, totals)``: per class the channel totals ``sum_q S_c[q, p]``."""
    rows = []
    for c in classes:
        S = profile.for_class(layer.name, int(c))
        S = S.reshape(S.shape[0], -1)
        rows.append(fold_channels(S.sum(0), layer))
    totals = torch.stack(rows).double().numpy()
    return normalize_rows(totals), totals


@torch.inference_mode()
def sample_matrix(model: nn.Module, layer: Layer, images: torch.Tensor, *,
                  batch_size: int = 16) -> np.ndarray:
    """Per sample the channel totals of its clamped contributions (not normalised)."""
    out: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        contrib = layer_contribution(inputs[0], module, name=layer.name)
        out.append(fold_channels(contrib.clamp(min=0).sum(1), layer))

    with preserved_state(model), forward_hooks([layer.module], hook):
        model.eval()
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    return torch.cat(out).double().numpy()


def compute_heatmap(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                    layer: str, classes: Sequence[int], output_classes: Sequence[int],
                    samples_per_class: int = 50, class_names: Sequence[str] | None = None,
                    per_sample: bool = True, batch_size: int = 64) -> HeatmapData:
    """Profile ``layer`` on each class's most confident samples (as disassembly does).

    ``images`` are normalised inputs with class-id ``labels``; ``output_classes[i]`` is the
    class of logit ``i``.
    """
    classes, output_classes = task_outputs(classes, output_classes)
    if samples_per_class < 1:
        raise ModelLegoError(f"`samples_per_class` must be >= 1, got {samples_per_class}")
    graph = build_channel_graph(model, tuple(images.shape[1:]))
    lay = find_layer(graph, layer)
    selection = select_samples(model, images, labels, classes, output_classes,
                               k=samples_per_class)
    idx = selection.all_indices()
    profile = contribution_profile(model, {lay.name: lay.module}, images[idx], labels[idx],
                                   classes, batch_size=batch_size)
    matrix, totals = class_matrix(profile, lay, classes)
    samples = sample_labels = sample_totals = None
    if per_sample:
        sample_totals = sample_matrix(model, lay, images[idx])
        samples = normalize_rows(sample_totals)
        sample_labels = labels[idx].numpy()
    names = tuple(class_names) if class_names is not None else tuple(str(c) for c in classes)
    return HeatmapData(lay.name, lay.kind, classes, names, matrix, totals, samples,
                       sample_labels, profile, sample_totals)


def heatmap_data(model: nn.Module, manifest: Manifest | Mapping[str, Any], layer: str,
                 classes: Sequence[int] | None = None, *, dataset: str | None = None,
                 data_dir: str | None = None, samples_per_class: int = 50,
                 per_sample: bool = True) -> HeatmapData:
    """The heatmap of ``layer`` of a loaded model file (``classes=None``: all its classes).

    The layer name is checked before any image is loaded.
    """
    manifest = as_manifest(manifest)
    find_layer(build_channel_graph(model, manifest.input.shape), layer)
    x, y, classes, names = task_images(manifest, classes, dataset=dataset, data_dir=data_dir)
    return compute_heatmap(model, x, y, layer=layer, classes=classes,
                           output_classes=manifest.classes,
                           samples_per_class=samples_per_class, class_names=names,
                           per_sample=per_sample)


def channel_order(matrix: np.ndarray) -> np.ndarray:
    """Channels grouped by the class they matter most to (rows in order), strongest first."""
    dominant = matrix.argmax(0)
    strength = matrix.max(0)
    return np.lexsort((-strength, dominant))


def plot_heatmap(data: HeatmapData, path: str | Path | BinaryIO, *, fmt: str | None = None,
                 sort: bool = True) -> dict[str, Any]:
    """Draw the heatmap (class rows on top, per-sample rows below if computed) and write it.

    Returns what was drawn: ``matrix`` (the class panel's image, columns in ``order``),
    ``order`` (input channel of each column) and ``samples`` (the per-sample image or None).
    """
    order = channel_order(data.matrix) if sort else np.arange(data.channels)
    k, n = data.matrix.shape
    samples = data.samples if data.samples is not None and len(data.samples) > 0 else None
    has_samples = samples is not None
    width = float(np.clip(3.5 + 0.09 * n, 7.0, 16.0))
    height = 1.6 + 0.28 * k + (3.2 if has_samples else 0.0)
    fig = new_figure(width, height)
    ratios = [max(1.0, 0.28 * k)] + ([3.0] if has_samples else [])
    grid = fig.add_gridspec(len(ratios), 1, height_ratios=ratios)
    ax = fig.add_subplot(grid[0, 0])
    shown = data.matrix[:, order]
    img = ax.imshow(shown, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                    interpolation="nearest")
    ax.set_yticks(range(k))
    ax.set_yticklabels([f"{c} ({plain_text(name)})" if name != str(c) else f"class {c}"
                        for c, name in zip(data.classes, data.class_names)], fontsize=8)
    ax.set_title(f"per-class contribution of the input channels of {data.layer} "
                 f"({data.kind}, {n} channels)", fontsize=10)
    what = "input channel" + (" (sorted by the class it matters most to)" if sort else "")
    drawn_samples = None
    bottom = ax
    if samples is not None:
        ax.tick_params(axis="x", labelbottom=False)
        bottom = ax2 = fig.add_subplot(grid[1, 0], sharex=ax)
        drawn_samples = samples[:, order]
        ax2.imshow(drawn_samples, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                   interpolation="nearest")
        labels = np.asarray(data.sample_labels)
        ticks, names = [], []
        start = 0
        for c in data.classes:
            count = int((labels == c).sum())
            if count:
                ticks.append(start + (count - 1) / 2)
                names.append(f"class {c}")
                if start:
                    ax2.axhline(start - 0.5, color="white", linewidth=1.2)
            start += count
        ax2.set_yticks(ticks)
        ax2.set_yticklabels(names, fontsize=8)
        ax2.set_ylabel("samples", fontsize=8.5)
        ax2.set_title("per sample (each row normalised)", fontsize=9)
    if n <= 64:
        bottom.set_xticks(range(n))
        bottom.set_xticklabels([str(int(p)) for p in order], fontsize=6 if n > 32 else 7,
                               rotation=90 if n > 16 else 0)
    elif sort:
        bottom.set_xticks([])  # column positions are not channel ids once sorted
    bottom.set_xlabel(what, fontsize=8.5)
    cbar = fig.colorbar(img, ax=fig.axes, shrink=0.8, pad=0.01)
    cbar.set_label("min-max normalised contribution", fontsize=8)
    save_figure(fig, path, fmt)
    return {"matrix": np.asarray(img.get_array()), "order": order, "samples": drawn_samples}


def format_heatmap(data: HeatmapData) -> str:
    """Plain text: per class its strongest channels, and how alike the classes' rows are."""
    lines = [f"{data.layer} ({data.kind}): {data.channels} input channels, "
             f"classes {list(data.classes)}"]
    for i, c in enumerate(data.classes):
        top = np.argsort(-data.matrix[i], kind="stable")[:8]
        lines.append(f"  class {c:>3} strongest channels: "
                     + ", ".join(str(int(p)) for p in top))
    if len(data.classes) >= 2:
        m = data.matrix - data.matrix.mean(1, keepdims=True)
        norm = np.linalg.norm(m, axis=1, keepdims=True)
        unit = np.divide(m, norm, out=np.zeros_like(m), where=norm > 0)
        corr = unit @ unit.T
        off = corr[~np.eye(len(corr), dtype=bool)]
        lines.append(f"  correlation between class rows: mean {off.mean():.3f}, "
                     f"max {off.max():.3f}")
    if data.samples is not None and len(data.classes) >= 2:
        within, across = _sample_similarity(data.samples, np.asarray(data.sample_labels))
        lines.append(f"  per-sample correlation: within a class {within:.3f}, "
                     f"across classes {across:.3f}")
    return "\n".join(lines)


def _sample_similarity(samples: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    m = samples - samples.mean(1, keepdims=True)
    norm = np.linalg.norm(m, axis=1, keepdims=True)
    unit = np.divide(m, norm, out=np.zeros_like(m), where=norm > 0)
    corr = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    within = corr[same & off]
    across = corr[~same]
    return (float(within.mean()) if within.size else float("nan"),
            float(across.mean()) if across.size else float("nan"))
