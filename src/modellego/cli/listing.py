"""``list-archs`` and ``list-datasets``: what the registries hold."""

from __future__ import annotations

import argparse
from typing import Any


def run_archs(args: argparse.Namespace) -> int:
    from ..models import list_models, model_info
    from ..models.sources import source_names

    if args.source != "modellego":
        for name in source_names(args.source, args.pattern):
            print(f"{args.source}:{name}")
        return 0
    for name in list_models(args.pattern):
        print(f"{name:14s} {model_info(name).description}")
    return 0


def run_datasets(args: argparse.Namespace) -> int:
    from ..data import describe_datasets

    for name, text in describe_datasets():
        print(f"{name:14s} {text}")
    return 0


def add_parsers(sub: Any) -> None:
    from ..models.sources import LISTED_SOURCES

    s = sub.add_parser("list-archs", help="list registered architectures")
    s.add_argument("pattern", nargs="?", default=None, help="shell glob, e.g. 'resnet*'")
    s.add_argument("--source", choices=LISTED_SOURCES, default="modellego",
                   help="whose builders to list (default: the zoo); a file names them "
                        "SOURCE:NAME")
    s.set_defaults(func=run_archs)

    s = sub.add_parser("list-datasets", help="list registered datasets")
    s.set_defaults(func=run_datasets)
