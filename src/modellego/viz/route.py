"""The decision route of classes through a network: which channels of every layer they use.

For each chosen class, component locating (:func:`modellego.analysis.locate.locate_class`)
marks the channels of every channel space the class relies on. A conv or linear layer's row
of the route is the mask of the space it writes (its output channels), for every class;
layers coupled by residual adds write one space and so show the same row.

Each layer's channels fall into: *shared* (used by every chosen class), *shared by some*
(used by two or more classes but not all; only with three or more classes), *specific to
class c* (used by ``c`` alone) and *unused*. :func:`plot_route` draws every layer as a bar
of fixed width split into those segments, i.e. its channels sorted by how many of the
chosen classes use them, so nets with hundreds of channels per layer stay readable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import torch
from torch import nn

from ..analysis.frat import GradientProfile, frat_class_masks
from ..analysis.locate import LocateConfig, locate_class, profiled_layers
from ..analysis.methods import get_method
from ..analysis.profile import ContributionProfile, contribution_profile, select_samples
from ..errors import ModelLegoError
from ..manifest import Manifest, as_manifest
from ..surgery.graph import ChannelGraph, Segment, build_channel_graph
from ..terminal import printable
from ..training import task_outputs
from .common import class_colors, new_figure, plain_text, save_figure, task_images

SHARED_COLOR = "#3a3a3a"
SOME_COLOR = "#9a9a9a"
UNUSED_COLOR = "#f2f2f2"


@dataclass(frozen=True)
class LayerRoute:
    """One conv/linear layer: ``masks[i, j]`` says whether class ``classes[i]`` uses output
    channel ``j``."""

    name: str
    kind: str
    space: int
    masks: torch.Tensor
    #: a grouped conv's channels are never pruned (kept whole by the component)
    frozen: bool = False
    #: why they are kept whole (:attr:`ChannelGraph.frozen_reasons`), when they are
    frozen_reason: str = ""

    @property
    def channels(self) -> int:
        return int(self.masks.shape[1])


@dataclass(frozen=True)
class RouteData:
    """The route of ``classes`` through every conv/linear layer, in topological order."""

    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    layers: tuple[LayerRoute, ...]
    locate: LocateConfig
    samples: dict[int, int]

    def counts(self) -> list[dict[str, Any]]:
        """Per layer, the channel counts of each segment (see :func:`route_counts`)."""
        return [{"layer": lay.name, "kind": lay.kind, "frozen": lay.frozen,
                 **({"frozen_reason": lay.frozen_reason} if lay.frozen_reason else {}),
                 **route_counts(lay.masks, self.classes)} for lay in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "class_names": list(self.class_names),
                "locate": self.locate.to_dict(),
                "samples": {str(c): n for c, n in self.samples.items()},
                "layers": self.counts()}


def route_counts(masks: torch.Tensor, classes: Sequence[int]) -> dict[str, Any]:
    """Segment sizes of one layer from its ``(classes, channels)`` boolean masks.

    ``shared``: channels used by every class (only counted with two or more classes);
    ``some``: used by at least two classes but not all; ``specific[c]``: used by class ``c``
    alone; ``unused``: used by none; ``used[c]``: all channels class ``c`` uses; ``any``:
    channels used by at least one class. The segments add up to ``channels``.
    """
    masks = masks.bool()
    k, n = masks.shape
    users = masks.sum(0)
    shared = int((users == k).sum()) if k >= 2 else 0
    some = int(((users >= 2) & (users < k)).sum())
    alone = users == 1
    specific = {int(c): int((alone & masks[i]).sum()) for i, c in enumerate(classes)}
    used = {int(c): int(masks[i].sum()) for i, c in enumerate(classes)}
    return {"channels": int(n), "shared": shared, "some": some, "specific": specific,
            "unused": int((users == 0).sum()), "used": used, "any": int((users > 0).sum())}


def route_from_profile(graph: ChannelGraph, profile: ContributionProfile,
                       classes: Sequence[int], output_classes: Sequence[int],
                       locate: LocateConfig | None = None,
                       class_names: Sequence[str] | None = None) -> RouteData:
    """The route from a profile already computed (e.g. by disassembly); no forward pass."""
    locate = locate or LocateConfig()
    locate.validate()
    classes, output_classes = task_outputs(classes, output_classes)
    per_class = [locate_class(graph, profile, output_classes.index(c), c, locate)
                 for c in classes]
    return _route(graph, classes, per_class, locate, class_names, profile.samples)


def route_from_gradients(graph: ChannelGraph, profile: GradientProfile,
                         classes: Sequence[int], output_classes: Sequence[int],
                         locate: LocateConfig,
                         class_names: Sequence[str] | None = None) -> RouteData:
    """The route of ``--method frat``: each class's critical channels (no forward pass)."""
    locate.validate()
    classes, output_classes = task_outputs(classes, output_classes)
    per_class = [frat_class_masks(graph, profile, c, locate, output_classes.index(c))
                 for c in classes]
    return _route(graph, classes, per_class, locate, class_names, profile.samples)


def route_from_method(graph: ChannelGraph, profile: Any, method: str,
                      classes: Sequence[int], output_classes: Sequence[int],
                      locate: LocateConfig, class_names: Sequence[str] | None = None
                      ) -> RouteData:
    """The route of a component made by ``method`` (see :mod:`modellego.analysis.methods`)
    from its profile and thresholds: each class's own keep-masks (no forward pass)."""
    rule = get_method(method)
    locate.validate()
    classes, output_classes = task_outputs(classes, output_classes)
    per_class = [rule.class_masks(graph, profile, c, output_classes, locate) for c in classes]
    return _route(graph, classes, per_class, locate, class_names, profile.samples)


def _route(graph: ChannelGraph, classes: Sequence[int], per_class: list[dict],
           locate: LocateConfig, class_names: Sequence[str] | None,
           samples: dict[int, int]) -> RouteData:
    layers = []
    for lay in graph.layers:
        # the layer's own output channels (a depthwise conv may write part of a space)
        runs = lay.out_layout or (Segment(lay.out_space, graph.space_size[lay.out_space]),)
        masks = torch.stack([torch.cat([m[r.space][r.start:r.start + r.size] for r in runs])
                             for m in per_class])
        frozen = lay.frozen or any(r.space in graph.frozen_spaces for r in runs)
        reason = next((graph.frozen_reasons[r.space] for r in runs
                       if r.space in graph.frozen_reasons), "")
        layers.append(LayerRoute(lay.name, lay.kind, lay.out_space, masks, frozen,
                                 reason if frozen else ""))
    names = tuple(class_names) if class_names is not None else tuple(str(c) for c in classes)
    return RouteData(tuple(classes), names, tuple(layers), locate,
                     {int(c): int(n) for c, n in samples.items()})


def compute_route(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                  classes: Sequence[int], output_classes: Sequence[int],
                  samples_per_class: int = 50, locate: LocateConfig | None = None,
                  class_names: Sequence[str] | None = None,
                  batch_size: int = 64) -> RouteData:
    """Select each class's most confident samples, profile them and locate every class.

    ``images`` are normalised inputs with class-id ``labels``; ``output_classes[i]`` is the
    class of logit ``i``. Works on any network the channel graph understands, of any depth.
    """
    classes, output_classes = task_outputs(classes, output_classes)
    locate = locate or LocateConfig()
    locate.validate()
    graph = build_channel_graph(model, tuple(images.shape[1:]))
    selection = select_samples(model, images, labels, classes, output_classes,
                               k=samples_per_class)
    idx = selection.all_indices()
    layers: dict[str, nn.Module] = {lay.name: lay.module for lay in profiled_layers(graph)}
    profile = contribution_profile(model, layers, images[idx], labels[idx], classes,
                                   batch_size=batch_size)
    return route_from_profile(graph, profile, classes, output_classes, locate, class_names)


def route_masks(model: nn.Module, manifest: Manifest | Mapping[str, Any],
                classes: Sequence[int], *,
                dataset: str | None = None, data_dir: str | None = None,
                samples_per_class: int = 50, locate: LocateConfig | None = None,
                batch_size: int = 64) -> RouteData:
    """The route of ``classes`` through a loaded model file, profiled on its training images.

    >>> data = route_masks(model, manifest, [3, 4])
    >>> data.layers[0].masks.shape     # (2 classes, channels of the first layer)
    torch.Size([2, 16])
    """
    if samples_per_class < 1:
        raise ModelLegoError(f"`samples_per_class` must be >= 1, got {samples_per_class}")
    manifest = as_manifest(manifest)
    x, y, classes, names = task_images(manifest, classes, dataset=dataset, data_dir=data_dir)
    return compute_route(model, x, y, classes=classes, output_classes=manifest.classes,
                         samples_per_class=samples_per_class, locate=locate,
                         class_names=names, batch_size=batch_size)


def format_route(data: RouteData) -> str:
    """A plain-text table: per layer the channels each class uses and the shared share."""
    counts = data.counts()
    width = max([len("layer")] + [len(c["layer"]) for c in counts])
    heads = [f"c{c}" for c in data.classes]
    lines = [f"route of classes {list(data.classes)} "
             f"({', '.join(map(printable, data.class_names))}); shared = used by all of them",
             f"  {'layer':<{width}} {'ch':>5} {'used':>5} {'shared':>6} {'%ch':>6} "
             f"{'%used':>6} " + " ".join(f"{h:>5}" for h in heads) + f" {'unused':>6}"]
    for c in counts:
        pct_ch = 100 * c["shared"] / c["channels"]
        pct_used = 100 * c["shared"] / c["any"] if c["any"] else 0.0
        mark = " (kept whole)" if c["frozen"] else ""
        lines.append(
            f"  {c['layer']:<{width}} {c['channels']:>5} {c['any']:>5} {c['shared']:>6} "
            f"{pct_ch:>5.1f}% {pct_used:>5.1f}% "
            + " ".join(f"{c['used'][k]:>5}" for k in data.classes)
            + f" {c['unused']:>6}{mark}")
    total_ch = sum(c["channels"] for c in counts)
    total_shared = sum(c["shared"] for c in counts)
    total_any = sum(c["any"] for c in counts)
    lines.append(f"  all layers: {total_shared} of {total_ch} channels shared "
                 f"({100 * total_shared / max(1, total_ch):.1f} %; "
                 f"{100 * total_shared / max(1, total_any):.1f} % of the used ones)")
    return "\n".join(lines)


def _segments(data: RouteData, counts: dict[str, Any]) -> list[tuple[str, int]]:
    """``(key, channels)`` of one bar from left to right."""
    segs = [("shared", counts["shared"]), ("some", counts["some"])]
    segs += [(f"class {c}", counts["specific"][c]) for c in data.classes]
    segs.append(("unused", counts["unused"]))
    return segs


def plot_route(data: RouteData, path: str | Path | BinaryIO, *, fmt: str | None = None,
               title: str | None = None) -> list[dict[str, Any]]:
    """Draw the route and write it to ``path`` (``.png`` or ``.svg``, or a binary file with
    ``fmt``). Returns what was drawn, read back from the bars on the figure: per layer (top
    to bottom) ``{"layer", "channels", "segments": {key: channels}}`` with keys ``shared``,
    ``some``, ``class <c>`` and ``unused`` (empty segments are not drawn and count 0)."""
    fig, drawn = route_figure(data, title=title)
    save_figure(fig, path, fmt)
    return drawn


def _draw_use(ax_use: Any, data: RouteData, counts: list[dict[str, Any]],
              colors: Sequence[Any]) -> None:
    """The right panel: the share of each layer's channels every class uses."""
    n = len(counts)
    for i, cls in enumerate(data.classes):
        share = [cnt["used"][cls] / cnt["channels"] for cnt in counts]
        ax_use.plot(share, range(n), marker="o", markersize=3, linewidth=1.1,
                    color=colors[i], label=f"class {cls}")
    ax_use.set_xlim(0, 1.02)
    ax_use.set_xticks([0, 0.5, 1.0])
    ax_use.set_xticklabels(["0", "50%", "100%"], fontsize=8)
    ax_use.set_xlabel("share of the layer's channels used", fontsize=8.5)
    ax_use.set_title("per class", fontsize=9)
    ax_use.grid(axis="x", color="#e0e0e0", linewidth=0.6)
    ax_use.tick_params(axis="y", labelleft=False, length=0)
    for side in ("top", "right"):
        ax_use.spines[side].set_visible(False)


def route_figure(data: RouteData, *, title: str | None = None
                 ) -> tuple[Any, list[dict[str, Any]]]:
    """The route as a matplotlib figure and what its bars show (see :func:`plot_route`)."""
    from matplotlib.patches import Patch

    counts = data.counts()
    n = len(counts)
    k = len(data.classes)
    colors = class_colors(k)
    seg_color: dict[str, str | tuple[float, float, float, float]] = {
        "shared": SHARED_COLOR, "some": SOME_COLOR, "unused": UNUSED_COLOR}
    seg_color.update({f"class {c}": colors[i] for i, c in enumerate(data.classes)})
    label_width = max(len(c["layer"]) for c in counts) + 8
    fig = new_figure(max(9.0, 6.0 + 0.09 * label_width), max(3.2, 1.9 + 0.3 * n))
    grid = fig.add_gridspec(1, 2, width_ratios=[3.2, 1.4])
    ax = fig.add_subplot(grid[0, 0])
    ax_use = fig.add_subplot(grid[0, 1], sharey=ax)
    for row, c in enumerate(counts):
        left = 0.0
        for key, size in _segments(data, c):
            if size:
                width = size / c["channels"]
                ax.barh(row, width, left=left, height=0.78, color=seg_color[key],
                        edgecolor="#bdbdbd" if key == "unused" else "white", linewidth=0.4,
                        gid=f"{row}|{key}")
                left += width
        share = 100 * c["shared"] / c["any"] if c["any"] else 0.0
        text = f"{share:.0f}%" if k >= 2 else f"{c['any']}"
        ax.text(1.015, row, text, va="center", ha="left", fontsize=7.5,
                transform=ax.get_yaxis_transform())
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{c['layer']} ({c['channels']}{', whole' if c['frozen'] else ''})"
                        for c in counts], fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)  # first layer on top
    ax.set_xlim(0, 1)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xticklabels(["0", "25%", "50%", "75%", "100%"], fontsize=8)
    ax.set_xlabel("channels of the layer, sorted by how many chosen classes use them",
                  fontsize=8.5)
    head = "shared % of used" if k >= 2 else "used"
    ax.text(1.015, -0.75, head, ha="left", va="bottom", fontsize=7,
            transform=ax.get_yaxis_transform(), color="#555555")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    _draw_use(ax_use, data, counts, colors)
    handles = []
    if k >= 2:
        handles.append(Patch(color=SHARED_COLOR, label="shared by all"))
    if k >= 3:
        handles.append(Patch(color=SOME_COLOR, label="shared by some"))
    for i, (cls, name) in enumerate(zip(data.classes, data.class_names)):
        only = " only" if k >= 2 else ""
        label = f"class {cls}{only}" + (f" ({plain_text(name)})" if name != str(cls) else "")
        handles.append(Patch(color=colors[i], label=label))
    handles.append(Patch(facecolor=UNUSED_COLOR, edgecolor="#bdbdbd", label="unused"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5),
               fontsize=8, frameon=False)
    fig.suptitle(title or f"decision route of classes {', '.join(map(str, data.classes))}",
                 fontsize=11)
    # read the segments back from the bars actually on the axes
    drawn = [{"layer": c["layer"], "channels": c["channels"],
              "segments": {key: 0 for key, _ in _segments(data, c)}} for c in counts]
    for patch in ax.patches:
        gid = patch.get_gid()
        if gid:
            row, key = gid.split("|", 1)
            entry = drawn[int(row)]
            entry["segments"][key] += round(patch.get_width() * entry["channels"])
    return fig, drawn
