"""``route`` and ``heatmap``: figures of which channels serve which classes."""

from __future__ import annotations

import argparse
from typing import Any

from ..terminal import printable
from .common import (
    add_data_args,
    add_force,
    add_locate_args,
    add_trust,
    figure_outputs,
    locate_config,
    parse_classes,
)


def run_route(args: argparse.Namespace) -> int:
    from ..files import load_model
    from ..viz.route import format_route, plot_route, route_masks
    from ..workflows.outputs import write_json

    outs = figure_outputs(args, "--json")
    model, manifest = load_model(args.file)
    data = route_masks(model, manifest, args.classes, dataset=args.dataset,
                       data_dir=args.data_dir, samples_per_class=args.samples_per_class,
                       locate=locate_config(args))
    plot_route(data, outs["--out"])
    if "--json" in outs:
        write_json(outs["--json"], data.to_dict())
    print(format_route(data))
    print(f"wrote {printable(args.out)}" + (f" and {printable(args.json)}" if args.json else ""))
    return 0


def run_heatmap(args: argparse.Namespace) -> int:
    from ..files import load_model
    from ..viz.heatmap import format_heatmap, heatmap_data, plot_heatmap

    out = figure_outputs(args)["--out"]
    model, manifest = load_model(args.file)
    data = heatmap_data(model, manifest, args.layer, args.classes, dataset=args.dataset,
                        data_dir=args.data_dir, samples_per_class=args.samples_per_class,
                        per_sample=not args.no_samples)
    plot_heatmap(data, out, sort=not args.no_sort)
    print(format_heatmap(data))
    print(f"wrote {printable(out)}")
    return 0


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("route", help="draw which channels of every layer some classes use")
    s.add_argument("file")
    s.add_argument("--classes", type=parse_classes, required=True,
                   help="the classes to compare, e.g. 3,4 or 0-2")
    s.add_argument("--out", required=True, help="figure file, .png or .svg")
    add_data_args(s)
    add_locate_args(s, "count")
    s.add_argument("--json", default=None, metavar="FILE",
                   help="also write the per-layer channel counts as JSON")
    add_force(s)
    add_trust(s)
    s.set_defaults(func=run_route)

    s = sub.add_parser("heatmap", help="per-class contribution of one layer's input channels")
    s.add_argument("file")
    s.add_argument("--layer", required=True, help="a conv or linear module name, e.g. fc")
    s.add_argument("--out", required=True, help="figure file, .png or .svg")
    s.add_argument("--classes", type=parse_classes, default=None,
                   help="default: all classes of the model")
    add_data_args(s)
    s.add_argument("--no-samples", action="store_true",
                   help="only the per-class rows, not the per-sample panel")
    s.add_argument("--no-sort", action="store_true",
                   help="keep channels in index order (default: grouped by dominant class)")
    add_force(s)
    add_trust(s)
    s.set_defaults(func=run_heatmap)
