"""The ``modellego`` command line: parse, call one library function, write outputs.

Each command lives in its own module beside its parser (``add_parser``); this module
builds the parser from them and runs the chosen command with the settings every command
shares (data roots, device, trusted code, progress bars) and one-line errors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
from typing import Any, Sequence

from .._version import __version__
from ..errors import ModelLegoError
from ..terminal import plain_warnings, printable, showing_progress
from . import (
    assemble,
    compress,
    disassemble,
    distill,
    evaluate,
    export,
    figures,
    fingerprint,
    importing,
    listing,
    train,
)
from .common import MAX_CLASS_IDS, parse_classes, parse_size

#: the commands' parser builders, in the order ``--help`` lists them
PARSERS = (listing.add_parsers, train.add_parser, importing.add_parser, evaluate.add_parser,
           disassemble.add_parser, assemble.add_parser, fingerprint.add_parser,
           figures.add_parsers, distill.add_parser, compress.add_parser, export.add_parser)

__all__ = ["MAX_CLASS_IDS", "build_parser", "cli_message", "flag_names", "main",
           "parse_classes", "parse_size", "reference_markdown"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modellego", description="Take trained classifiers apart into class-aware "
        "components and assemble components into new classifiers, without training.")
    p.add_argument("--version", action="version", version=f"modellego {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return p


def flag_names(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """``{parameter: flag}`` of one sub-command: each option's ``dest`` and its long form."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: max(a.option_strings, key=len)
            for a in sub.choices[command]._actions if a.option_strings}


def cli_message(message: str, flags: dict[str, str]) -> str:
    """A library message as the command line says it: a parameter named as `` `name` `` is
    written as its flag (``--name``) when the command has one, else as ``name``."""
    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", lambda m: flags.get(m[1], m[1]), message)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    previous = _on_sigterm()
    try:
        with plain_warnings(), contextlib.ExitStack() as settings:
            _enter_settings(args, settings)
            return args.func(args)
    except ModelLegoError as exc:
        message = cli_message(printable(exc), flag_names(parser, args.command))
        print(f"modellego {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _enter_settings(args: argparse.Namespace, settings: contextlib.ExitStack) -> None:
    """The settings the command's options give for the whole command: where the data is
    and how it is read, the device, the trusted code, the progress bars."""
    if hasattr(args, "data"):  # one data_dir argument for the library
        from ..data import reading, roots_from
        from ..data.lazy import default_workers, parse_memory

        args.data_dir = roots_from(args.data, args.data_dir, args.allow_data_mismatch)
        settings.enter_context(reading(
            workers=default_workers() if args.workers is None else args.workers,
            max_memory=None if args.max_memory is None else parse_memory(args.max_memory)))
    if hasattr(args, "device"):  # networks run there (modellego.runtime.device)
        from ..runtime.device import resolve_device, using_device
        from ..runtime.distributed import env_settings

        local_rank = env_settings(os.environ)[2]
        settings.enter_context(using_device(resolve_device(args.device,
                                                           local_rank=local_rank)))
    from ..models.sources import trusted

    settings.enter_context(trusted(getattr(args, "trust_code", None)))
    settings.enter_context(showing_progress(not getattr(args, "quiet", False)))


class Terminated(BaseException):
    """SIGTERM arrived: raised where the command is, so that it unwinds as for Ctrl-C (a
    half-written output's temporary file is removed, see :func:`modellego.io.atomic_write`)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _on_sigterm() -> Any:
    """Handle SIGTERM as :class:`Terminated` (main thread only; returns the old handler)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)



def reference_markdown(width: int = 96) -> str:
    """The command line reference (docs/cli-reference.md): every command's ``--help``, as
    the parsers give it at ``width`` columns."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps help text to the terminal's width
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        blocks = ["# Command line reference", "",
                  "Every command's `--help`, generated from the parsers by",
                  "`python scripts/cli-reference.py` (a test checks that this page is up to",
                  "date). The [Command line](commands.md) page is the tour.", "",
                  "```text", parser.format_help().rstrip(), "```", ""]
        for name, command in sub.choices.items():
            blocks += [f"## {name}", "", "```text", command.format_help().rstrip(), "```", ""]
        return "\n".join(blocks)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
