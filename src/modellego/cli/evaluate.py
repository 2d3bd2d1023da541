"""``evaluate``: accuracy, params, FLOPs and latency of a model file."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from ..errors import ModelLegoError
from ..manifest import Manifest
from ..terminal import printable
from .common import add_device, add_roots, add_trust, parse_classes, print_json


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate
    from ..files import load_model

    model, manifest = load_model(args.file)
    if manifest.kind == "assembly":
        return _assembly(args, model, manifest)
    result = evaluate(model, manifest, dataset=args.dataset, classes=args.classes,
                      data_dir=args.data_dir, latency=not args.no_latency)
    if args.json:
        print_json(result)
        return 0
    names = dict(zip(manifest.classes, manifest.class_names))
    print(f"{printable(args.file)}: {manifest.kind} on "
          f"{printable(result.dataset)} "
          f"({result.split}, {result.n} images)")
    print(f"  accuracy            {result.accuracy:.4f}")
    if result.restricted_accuracy is not None:
        print(f"  restricted accuracy {result.restricted_accuracy:.4f}")
    print(f"  params              {result.params:,}")
    print(f"  FLOPs               {result.flops:,}")
    if result.latency_ms is not None:
        print(f"  CPU latency         {result.latency_ms:.3f} ms/image "
              f"({result.threads} threads)")
    for c, a in result.per_class.items():
        print(f"    class {c:>3} {printable(names.get(int(c), '')):<14s} {a:.4f}")
    return 0


def _assembly(args: argparse.Namespace, model, manifest: Manifest) -> int:
    from ..assembly import evaluate_assembly
    from ..metrics import cpu_latency_ms
    from ..workflows import format_assembly

    if args.dataset is not None or args.classes is not None:
        raise ModelLegoError("an assembled model is evaluated on the union of its parts' test "
                             "sets; drop --dataset and --classes")
    result = evaluate_assembly(model, manifest, data_dir=args.data_dir)
    if not args.no_latency:
        result = replace(result, latency_ms=cpu_latency_ms(model, manifest.input.shape))
    if args.json:
        print_json(result)
        return 0
    print(format_assembly(result, manifest))
    return 0


def add_parser(sub: Any) -> None:
    s = sub.add_parser("evaluate", help="accuracy, params, FLOPs and latency of a model file")
    s.add_argument("file")
    s.add_argument("--dataset", default=None, help="default: the model's own dataset")
    s.add_argument("--classes", type=parse_classes, default=None)
    add_roots(s)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    add_trust(s)
    add_device(s)
    s.set_defaults(func=run)
