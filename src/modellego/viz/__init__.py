"""Figures and reports: decision routes, contribution heatmaps, self-contained HTML pages.

Everything draws on headless matplotlib figures (Agg canvas, never ``pyplot``), so no GUI
window opens.
"""

from .heatmap import (
    HeatmapData,
    class_matrix,
    compute_heatmap,
    format_heatmap,
    heatmap_data,
    layer_names,
    plot_heatmap,
)
from .report import assembly_html, disassembly_html, write_html
from .route import (
    LayerRoute,
    RouteData,
    compute_route,
    format_route,
    plot_route,
    route_counts,
    route_figure,
    route_from_profile,
    route_masks,
)

__all__ = [
    "HeatmapData",
    "LayerRoute",
    "RouteData",
    "assembly_html",
    "class_matrix",
    "compute_heatmap",
    "compute_route",
    "disassembly_html",
    "format_heatmap",
    "format_route",
    "heatmap_data",
    "layer_names",
    "plot_heatmap",
    "plot_route",
    "route_counts",
    "route_figure",
    "route_from_profile",
    "route_masks",
    "write_html",
]
