"""Shared pieces of the figures: headless matplotlib figures, saving, the task's images.

Figures are made with :class:`matplotlib.figure.Figure` on an explicit Agg canvas and
never through ``pyplot``, so no GUI window can open and no global backend state is touched;
``matplotlib.use("Agg")`` is still set when ``pyplot`` has not been imported yet, so that
code which later imports ``pyplot`` in the same process stays headless too.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path
from typing import BinaryIO, Sequence

import torch

from ..data.lazy import as_tensor
from ..errors import ModelLegoError
from ..manifest import Manifest
from ..terminal import printable

FIGURE_FORMATS = ("png", "svg")


def _mpl():
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def new_figure(width: float, height: float):
    """A headless figure of ``width x height`` inches (Agg canvas attached)."""
    Figure, FigureCanvasAgg = _mpl()
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plain_text(value: object) -> str:
    """``value`` as matplotlib shows it literally: control characters escaped (as
    :func:`modellego.terminal.printable`; raw, they are not valid in an SVG file) and every
    ``$`` escaped, so a name such as ``$\\frac{$`` is never parsed as math text."""
    return printable(value).replace("$", r"\$")


def figure_format(path: str | Path) -> str:
    """``png`` or ``svg`` from the file name; anything else is refused."""
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in FIGURE_FORMATS:
        raise ModelLegoError(f"`out` {path}: the figure format is taken from the file name; "
                             f"use a name ending in .png or .svg")
    return ext


def save_figure(fig, target: str | Path | BinaryIO, fmt: str | None = None) -> None:
    """Write ``fig`` to a path (atomically; format from the suffix) or a binary file object."""
    if isinstance(target, (str, Path)):
        from ..io import atomic_write

        fmt = fmt or figure_format(target)
        atomic_write(target, lambda tmp: fig.savefig(tmp, format=fmt))
    else:
        fig.savefig(target, format=fmt or "png")


def png_data_uri(fig) -> str:
    """``data:image/png;base64,...`` of ``fig``, to embed in a self-contained page."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def class_colors(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct colours for classes; never grey (grey means shared or unused)."""
    from matplotlib import colormaps

    tab10 = colormaps["tab10"]
    base = [tab10(i) for i in range(10) if i != 7]  # 7 is tab10's grey
    if n <= len(base):
        return base[:n]
    tab20 = colormaps["tab20"]
    more = [tab20(i) for i in range(20) if i not in (14, 15)]
    return [more[i % len(more)] for i in range(n)]


def task_images(manifest: Manifest, classes: Sequence[int] | None, *,
                dataset: str | None = None, data_dir: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], list[str]]:
    """Normalised training images and labels of ``classes`` of the model ``manifest``
    describes, with the same checks as disassembly. Returns
    ``(images, labels, classes, class names)``; ``classes=None`` means all of the model's."""
    from ..provenance import require_single
    from ..workflows.common import check_own_dataset, task_data

    require_single(manifest, "analyse", hint="; analyse its parts one by one")
    check_own_dataset(manifest, dataset, data_dir)
    data = task_data(manifest, classes, data_dir=data_dir, what="the analysis")
    own, classes = list(manifest.classes), data.classes
    names = dict(zip(own, manifest.class_names))
    return (as_tensor(data.images, "the analysis"), data.labels, classes,
            [str(names[c]) for c in classes])
