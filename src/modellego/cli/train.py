"""``train``: a zoo architecture trained on a dataset."""

from __future__ import annotations

import argparse
from typing import Any

from ..terminal import printable
from ..training import OPTIMIZERS
from .common import (
    add_device,
    add_no_fingerprint,
    add_roots,
    command_line,
    outputs,
    parse_classes,
    parse_size,
)


def run(args: argparse.Namespace) -> int:
    from ..files import save_model
    from ..training import TrainConfig, train

    out = outputs(args, [], "--out")["--out"]
    config = TrainConfig(arch=args.arch, dataset=args.dataset, epochs=args.epochs,
                         classes=args.classes, width=args.width, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, augment=not args.no_augment,
                         data_dir=args.data_dir, image_size=args.image_size,
                         optimizer=args.optimizer)
    model, manifest = train(config, command=command_line(args), progress=not args.quiet,
                            fingerprint=not args.no_fingerprint)
    save_model(out, model, manifest)
    metrics = manifest.metrics.to_dict() if manifest.metrics else {}
    made = manifest.provenance.to_dict() if manifest.provenance else {}
    print(f"test accuracy {metrics['test_accuracy']:.4f} "
          f"(best val {metrics['val_accuracy']:.4f} at epoch "
          f"{made['best_epoch']}); wrote {printable(out)}")
    return 0


def add_parser(sub: Any) -> None:
    s = sub.add_parser("train", help="train a zoo architecture on a dataset")
    s.add_argument("arch")
    s.add_argument("--dataset", required=True)
    s.add_argument("--epochs", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--classes", type=parse_classes, default=None,
                   help="train on these classes only (e.g. 0,1,2,3,4 or 0-4)")
    s.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--optimizer", choices=("auto",) + tuple(OPTIMIZERS), default="auto",
                   help="auto (the default): AdamW for a network with attention layers, SGD "
                        "(Nesterov) for the others; both on a one-cycle schedule")
    s.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: " + ", ".join(
                       f"{lr:g} for {name}" for name, (lr, _) in OPTIMIZERS.items()) + ")")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-augment", action="store_true")
    s.add_argument("--image-size", type=parse_size, default=None, metavar="SIZE",
                   help="for folder:PATH: the size images are resized and centre-cropped "
                        "to (224 or HxW; default: their own size when all agree, else the "
                        "median shorter side, at most 224)")
    add_roots(s)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    add_no_fingerprint(s)
    add_device(s)
    s.set_defaults(func=run)
