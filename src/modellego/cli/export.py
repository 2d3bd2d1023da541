"""``export``: a model, component or assembly as ONNX or a torch.export program."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ModelLegoError
from ..terminal import printable
from .common import add_report, add_roots, add_trust, outputs


def run(args: argparse.Namespace) -> int:
    from ..exporting import export
    from ..workflows.outputs import write_json

    if not 1 <= args.align <= 1024:
        raise ModelLegoError(f"--align must be between 1 and 1024, got {args.align}")
    outs = outputs(args, [args.file], "--out", "--report")
    report = export(args.file, outs["--out"], format=args.format,
                    check_images=args.check_images,
                    data_dir=args.data_dir, align=args.align)
    sizes = " and ".join(str(b) for b in report.batch_sizes)
    print(f"exported {printable(args.file)} to {report.format} with {report.exporter} "
          f"in {report.seconds:.1f} s; input: [0, 1] images (batch, "
          f"{', '.join(map(str, report.input_shape))}), normalised inside")
    print(f"checked on {report.check_images} {printable(report.check_source)} at batch sizes "
          f"{sizes}: max |logit difference| {report.max_abs_diff:.2g} (at most "
          f"{report.tolerance:.2g})")
    if report.channels_added:
        print(f"channel counts padded to multiples of {report.align}: {report.channels_added} "
              f"channels that change nothing, in {report.spaces_padded} channel groups")
    elif report.align > 1:
        print(f"channel counts not padded: {printable(report.align_note)}")
    if outs.get("--report") is not None:
        write_json(outs["--report"], report.to_dict())
    print("wrote " + " and ".join(printable(p) for p in outs.values() if p is not None))
    return 0


def add_parser(sub: Any) -> None:
    from ..exporting import ALIGN, CHECK_IMAGES, FORMATS

    s = sub.add_parser("export", help="write a model, component or assembly as ONNX or a "
                       "torch.export program, checked against modellego's outputs")
    s.add_argument("file")
    s.add_argument("--out", required=True,
                   help="the file to write (its suffix .onnx or .pt2 gives the format)")
    s.add_argument("--format", choices=FORMATS, default=None,
                   help="default: from the suffix of --out")
    s.add_argument("--align", type=int, default=ALIGN, metavar="K",
                   help=f"pad channel counts to multiples of K with channels that change "
                        f"nothing, for onnxruntime's fast kernels (default {ALIGN}; 1: off)")
    s.add_argument("--check-images", type=int, default=CHECK_IMAGES, metavar="N",
                   help=f"test images the export is checked on (default {CHECK_IMAGES}; "
                        "random images when the data cannot be read)")
    add_roots(s)
    add_report(s)
    s.add_argument("--force", action="store_true", help="allow overwriting an output file")
    add_trust(s)
    s.set_defaults(func=run)
