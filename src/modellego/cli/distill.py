"""``distill``: a small student trained to mimic a model or component."""

from __future__ import annotations

import argparse
from typing import Any

from .common import (
    add_device,
    add_force,
    add_report,
    add_roots,
    add_trust,
    command_line,
    finish,
    outputs,
)


def run(args: argparse.Namespace) -> int:
    from ..distillation import DistillConfig, distill, format_distill
    from ..files import load_model

    outs = outputs(args, [args.teacher], "--out", "--report")
    config = DistillConfig(student=args.student, width=args.width, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr,
                           temperature=args.temperature, alpha=args.alpha, seed=args.seed,
                           augment=not args.no_augment)
    config.validate()  # before loading anything
    teacher, manifest = load_model(args.teacher)
    student, new_manifest, report = distill(
        teacher, manifest, config, data_dir=args.data_dir, command=command_line(args),
        source_path=args.teacher, compare=not args.no_compare, progress=not args.quiet)
    wrote = finish(outs, student, new_manifest, report)
    print(format_distill(report))
    print(wrote)
    return 0


def add_parser(sub: Any) -> None:
    s = sub.add_parser("distill", help="train a small student to mimic a model or component")
    s.add_argument("teacher", help="a model or component file")
    s.add_argument("--student", required=True, help="student architecture (list-archs)")
    s.add_argument("--out", required=True)
    s.add_argument("--width", type=float, default=1.0, help="student channel width multiplier")
    s.add_argument("--epochs", type=int, default=3)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, default=0.05)
    s.add_argument("--temperature", type=float, default=4.0, help="softmax temperature T")
    s.add_argument("--alpha", type=float, default=0.9,
                   help="weight of the distillation term (0: cross-entropy only)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-augment", action="store_true")
    s.add_argument("--no-compare", action="store_true",
                   help="skip training the same student without the teacher")
    add_roots(s)
    add_report(s)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    add_force(s)
    add_trust(s)
    add_device(s)
    s.set_defaults(func=run)
