"""``fingerprint``: a router fingerprint added to a model or component file."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ModelLegoError
from .common import add_device, add_force, add_roots, add_trust, finish, outputs


def run(args: argparse.Namespace) -> int:
    from ..assembly.fingerprint import fingerprint_model
    from ..files import load_model
    from ..training import check_seed

    check_seed(args.seed)
    if args.images_per_class < 2:
        raise ModelLegoError(f"--images-per-class must be at least 2, got "
                             f"{args.images_per_class}")
    outs = outputs(args, [args.file], "--out")
    model, manifest = load_model(args.file)
    new_manifest, fingerprint = fingerprint_model(
        model, manifest, per_class=args.images_per_class, seed=args.seed,
        data_dir=args.data_dir)
    wrote = finish(outs, model, new_manifest, fingerprint=fingerprint)
    fp = new_manifest.router_fingerprint
    assert fp is not None  # fingerprint_model gives one
    size = sum(t.numel() for t in fingerprint.values()) * 4
    print(f"router fingerprint from {fp.images} training images at {len(fp.taps)} "
          f"layers ({', '.join(fp.taps)}): {size / 1024:.0f} KB")
    print(wrote)
    return 0


def add_parser(sub: Any) -> None:
    from ..assembly.fingerprint import FINGERPRINT_IMAGES

    s = sub.add_parser("fingerprint", help="add a router fingerprint to a model or component "
                       "file, so that others can assemble it without its training data")
    s.add_argument("file")
    s.add_argument("--out", required=True)
    s.add_argument("--images-per-class", type=int, default=FINGERPRINT_IMAGES, metavar="N",
                   help=f"training images per class it is made from (default "
                        f"{FINGERPRINT_IMAGES})")
    s.add_argument("--seed", type=int, default=0)
    add_roots(s)
    add_force(s)
    add_trust(s)
    add_device(s)
    s.set_defaults(func=run)
