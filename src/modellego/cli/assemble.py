"""``assemble``: models and components into one classifier."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ModelLegoError
from .common import add_force, add_report, add_roots, add_trust, command_line, finish, outputs


def run(args: argparse.Namespace) -> int:
    from ..assembly import AssemblyConfig
    from ..runtime.distributed import distributed_from_env
    from ..training import check_seed
    from ..workflows import assemble, format_assembly

    check_seed(args.seed)  # before torch's generators raise on it
    if args.data_free:
        if args.scaling not in (None, "fingerprint"):
            raise ModelLegoError(f"--data-free routes with the parts' fingerprints (scaling "
                                 f"fingerprint); drop --scaling {args.scaling} or --data-free")
        args.scaling = "fingerprint"
    outs = outputs(args, args.files, "--out", "--report", "--html")
    config = AssemblyConfig(layout=args.layout, scaling=args.scaling,
                            on_duplicate=args.on_duplicate,
                            calibration_samples=args.calibration_samples, seed=args.seed)
    with distributed_from_env() as dist:
        model, manifest, report = assemble(args.files, config, data_dir=args.data_dir,
                                           command=command_line(args), dist=dist)
        if not dist.is_main:  # under torchrun only rank 0 evaluates and writes
            return 0
    result = report.evaluation
    assert result is not None  # assemble() evaluates on the main process

    def page() -> str:
        from ..viz.report import assembly_html

        return assembly_html(result, manifest, report)

    wrote = finish(outs, model, manifest, report, page)
    print(format_assembly(result, manifest))
    print(wrote)
    return 0


def add_parser(sub: Any) -> None:
    from ..assembly import DUPLICATES, LAYOUTS, SCALINGS

    s = sub.add_parser("assemble", help="assemble models/components into one classifier")
    s.add_argument("files", nargs="+", help="two or more model or component files")
    s.add_argument("--out", required=True)
    s.add_argument("--layout", choices=LAYOUTS, default="parallel",
                   help="parallel: parts side by side; padded: the paper's widened network "
                        "(same logits); union: components of one source merged by the "
                        "union of their channels")
    s.add_argument("--scaling", choices=SCALINGS, default=None,
                   help="default: concern when a part is a pan-rajan module (the highest "
                        "one-vs-rest score wins), else joint")
    s.add_argument("--on-duplicate", choices=DUPLICATES, default="error",
                   help="what to do when two parts classify the same label")
    s.add_argument("--calibration-samples", type=int, default=3000,
                   help="training images per class used to calibrate (all of a class's "
                        "images where it has fewer)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data-free", action="store_true",
                   help="route with the parts' router fingerprints alone (scaling "
                        "fingerprint): no dataset is read")
    add_roots(s)
    add_report(s)
    s.add_argument("--html", default=None, metavar="REPORT.html",
                   help="also write a self-contained HTML report (tables, figure, provenance)")
    add_force(s, "an input file")
    add_trust(s)
    s.set_defaults(func=run)
