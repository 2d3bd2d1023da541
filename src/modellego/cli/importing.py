"""``import``: a torchvision, timm or own network's state dict as a model file."""

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
    json_object,
    outputs,
    parse_classes,
    parse_size,
)


def run(args: argparse.Namespace) -> int:
    from ..workflows.importing import ImportConfig, format_import, import_model

    outs = outputs(args, [args.weights], "--out", "--report")
    kwargs = json_object(args.kwargs, "--kwargs")
    config = ImportConfig(architecture=args.architecture, dataset=args.dataset, kwargs=kwargs,
                          classes=args.classes, input_size=args.input_size, mean=args.mean,
                          std=args.std, evaluate=not args.no_evaluate)
    config.validate()  # before any file is read
    model, manifest, report = import_model(args.weights, config, data_dir=args.data_dir,
                                           command=command_line(args),
                                           fingerprint=not args.no_fingerprint)
    wrote = finish(outs, model, manifest, report)
    print(format_import(report))
    print(wrote)
    return 0


def add_parser(sub: Any) -> None:
    s = sub.add_parser("import", help="wrap a torchvision, timm or own network's state dict "
                       "as a model file")
    s.add_argument("architecture", metavar="ARCH_SOURCE",
                   help="torchvision:NAME, timm:NAME, python:package.module:callable (needs "
                        "--trust-code), or a zoo name (modellego:NAME)")
    s.add_argument("--weights", required=True, metavar="STATE",
                   help="the state dict: .safetensors, or .pt/.pth read with torch's "
                        "weights-only loader")
    s.add_argument("--out", required=True)
    s.add_argument("--dataset", required=True, help="the dataset the network classifies")
    s.add_argument("--classes", type=parse_classes, default=None,
                   help="the dataset's class ids in output order (default: all)")
    s.add_argument("--input-size", type=parse_size, default=None, metavar="SIZE",
                   help="the image size the network was trained at, e.g. 224 or 224x192 "
                        "(default: the dataset's)")
    s.add_argument("--mean", type=float, nargs="+", default=None,
                   help="per-channel normalisation mean (default: the dataset's; "
                        "ImageNet's for colour photo folders)")
    s.add_argument("--std", type=float, nargs="+", default=None,
                   help="per-channel normalisation std (default as for --mean)")
    s.add_argument("--kwargs", default=None, metavar="JSON",
                   help="builder arguments, e.g. '{\"num_classes\": 10}' (num_classes "
                        "defaults to the number of classes)")
    s.add_argument("--no-evaluate", action="store_true",
                   help="do not measure the test accuracy after importing")
    add_roots(s)
    add_trust(s)
    add_report(s)
    add_force(s, "the weights file")
    add_no_fingerprint(s)
    add_device(s)
    s.set_defaults(func=run)
