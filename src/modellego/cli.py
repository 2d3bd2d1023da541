"""The ``modellego`` command line: parse, call one library function, write outputs."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import ModelLegoError


def parse_classes(text: str) -> tuple[int, ...]:
    """``"0,2,4"`` or ranges ``"3-9"`` (inclusive) -> class ids in the given order."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                out.extend(range(lo_i, hi_i + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid class list {text!r}: use ids like 0,2,4 or ranges like 3-9") from None
    if not out:
        raise argparse.ArgumentTypeError("empty class list")
    return tuple(out)


def _check_output(out: str, inputs: Sequence[str], force: bool) -> Path:
    path = Path(out)
    if not path.parent.exists():
        raise ModelLegoError(f"--out {out}: folder {path.parent} does not exist; create it "
                             "or choose another path")
    if not force:
        for inp in inputs:
            if path.exists() and path.resolve() == Path(inp).resolve():
                raise ModelLegoError(f"--out {out} would overwrite the input {inp}; choose "
                                     "another path or pass --force")
    return path


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def cmd_list_archs(args: argparse.Namespace) -> int:
    from .models import list_models, model_info

    for name in list_models(args.pattern):
        print(f"{name:14s} {model_info(name).description}")
    return 0


def cmd_list_datasets(args: argparse.Namespace) -> int:
    from .data import describe_datasets

    for name, text in describe_datasets():
        print(f"{name:14s} {text}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .io import save_model
    from .train import TrainConfig, train

    out = _check_output(args.out, [], True)
    config = TrainConfig(arch=args.arch, dataset=args.dataset, epochs=args.epochs,
                         classes=args.classes, width=args.width, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, augment=not args.no_augment,
                         data_dir=args.data_dir)
    command = "modellego " + shlex.join(args.argv)
    model, manifest = train(config, command=command, progress=not args.quiet)
    save_model(out, model, manifest)
    print(f"test accuracy {manifest['metrics']['test_accuracy']:.4f} "
          f"(best val {manifest['metrics']['val_accuracy']:.4f} at epoch "
          f"{manifest['provenance']['best_epoch']}); wrote {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .io import load_model

    model, manifest = load_model(args.file)
    result = evaluate(model, manifest, dataset=args.dataset, classes=args.classes,
                      data_dir=args.data_dir, latency=not args.no_latency)
    if args.json:
        _print_json(result)
        return 0
    names = dict(zip(manifest["classes"], manifest["class_names"]))
    print(f"{args.file}: {manifest.get('kind', 'model')} on {result['dataset']} "
          f"({result['split']}, {result['n']} images)")
    print(f"  accuracy            {result['accuracy']:.4f}")
    if "restricted_accuracy" in result:
        print(f"  restricted accuracy {result['restricted_accuracy']:.4f}")
    print(f"  params              {result['params']:,}")
    print(f"  FLOPs               {result['flops']:,}")
    if "latency_ms" in result:
        print(f"  CPU latency         {result['latency_ms']:.3f} ms/image "
              f"({result['threads']} threads)")
    for c, a in result["per_class"].items():
        print(f"    class {c:>3} {names.get(int(c), ''):<14s} {a:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modellego", description=__doc__)
    p.add_argument("--version", action="version", version=f"modellego {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list-archs", help="list registered architectures")
    s.add_argument("pattern", nargs="?", default=None, help="shell glob, e.g. 'resnet*'")
    s.set_defaults(func=cmd_list_archs)

    s = sub.add_parser("list-datasets", help="list registered datasets")
    s.set_defaults(func=cmd_list_datasets)

    s = sub.add_parser("train", help="train a zoo architecture on a dataset")
    s.add_argument("arch")
    s.add_argument("--dataset", required=True)
    s.add_argument("--epochs", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--classes", type=parse_classes, default=None,
                   help="train on these classes only (e.g. 0,1,2,3,4 or 0-4)")
    s.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, default=0.05)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-augment", action="store_true")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="accuracy, params, FLOPs and latency of a model file")
    s.add_argument("file")
    s.add_argument("--dataset", default=None, help="default: the model's own dataset")
    s.add_argument("--classes", type=parse_classes, default=None)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    s.set_defaults(func=cmd_evaluate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except ModelLegoError as exc:
        print(f"modellego {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
