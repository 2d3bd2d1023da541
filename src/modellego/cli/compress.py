"""``compress``: a smaller model for all its classes, without fine-tuning."""

from __future__ import annotations

import argparse
from typing import Any

from .common import (
    add_device,
    add_force,
    add_no_fingerprint,
    add_report,
    add_roots,
    add_trust,
    command_line,
    finish,
    outputs,
    reconstruct_given,
)


def run(args: argparse.Namespace) -> int:
    from ..compression import DEFAULT_RECONSTRUCT, CompressConfig
    from ..files import load_model
    from ..workflows import compress, format_compress_report

    reconstruct = reconstruct_given(args)
    config = CompressConfig(criterion=args.criterion, target_flops=args.target_flops,
                            target_params=args.target_params,
                            max_accuracy_drop=args.max_accuracy_drop,
                            samples_per_class=args.samples_per_class, method=args.method,
                            recalibrate_bn=args.recalibrate_bn,
                            reconstruct=DEFAULT_RECONSTRUCT if reconstruct is None
                            else reconstruct)
    config.validate()  # before any file is read
    outs = outputs(args, [args.file], "--out", "--report")
    model, manifest = load_model(args.file)
    small, new_manifest, report = compress(model, manifest, config, source_path=args.file,
                                           data_dir=args.data_dir, command=command_line(args),
                                           fingerprint=not args.no_fingerprint)
    wrote = finish(outs, small, new_manifest, report)
    print(format_compress_report(report))
    print(wrote)
    return 0


def add_parser(sub: Any) -> None:
    from ..compression import (
        CRITERIA,
        DEFAULT_CRITERION,
        DEFAULT_RECALIBRATE_BN,
        DEFAULT_RECONSTRUCT,
    )
    from ..disassembly import METHODS

    s = sub.add_parser("compress", help="a smaller model for all its classes, without "
                       "fine-tuning (class-aware components or channel pruning)")
    s.add_argument("file")
    s.add_argument("--out", required=True)
    s.add_argument("--criterion", choices=CRITERIA, default=DEFAULT_CRITERION,
                   help="fpgm (default): geometric-median filter pruning, uniform; l1: "
                        "L1-norm filter pruning, uniform; contribution: the component of all "
                        "classes (see the Results page for how they compare)")
    s.add_argument("--target-flops", type=float, default=None, metavar="R",
                   help="keep at most this share of the source's FLOPs, in (0, 1]")
    s.add_argument("--target-params", type=float, default=None, metavar="R",
                   help="keep at most this share of the source's parameters, in (0, 1]")
    s.add_argument("--max-accuracy-drop", type=float, default=None, metavar="PP",
                   help="compress as far as the validation accuracy stays within PP points "
                        "of the source's")
    s.add_argument("--samples-per-class", type=int, default=50,
                   help="contribution: training samples profiled per class")
    s.add_argument("--method", choices=METHODS, default="contribution",
                   help="with --criterion contribution: how channels are scored (as in "
                        "disassemble)")
    s.add_argument("--recalibrate-bn", type=int, default=DEFAULT_RECALIBRATE_BN, metavar="N",
                   help="every criterion: re-estimate each candidate's BatchNorm statistics "
                        "on N training images, no labels, no gradients (default "
                        f"{DEFAULT_RECALIBRATE_BN}; 0: keep the source's)")
    s.add_argument("--reconstruct", type=int, default=None, metavar="N",
                   help="every criterion: re-fit each candidate's layers that read removed "
                        "channels by ridge least squares on N training images, to match the "
                        f"source's outputs, before --recalibrate-bn (default "
                        f"{DEFAULT_RECONSTRUCT})")
    s.add_argument("--no-reconstruct", action="store_true",
                   help="no reconstruction (with --recalibrate-bn 0: the plain cut)")
    add_roots(s)
    add_report(s)
    add_force(s)
    add_no_fingerprint(s)
    add_trust(s)
    add_device(s)
    s.set_defaults(func=run)
