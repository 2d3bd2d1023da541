"""What the commands share: argument types, the option groups several commands take, and
the checked outputs they write."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ModelLegoError
from ..terminal import printable

#: Most class ids one ``--classes`` list may name (CIFAR-100 has 100, ImageNet-21k 21,841).
MAX_CLASS_IDS = 100_000


def parse_classes(text: str) -> tuple[int, ...]:
    """``"0,2,4"`` or ranges ``"3-9"`` (inclusive) -> class ids in the given order.

    Lists of more than :data:`MAX_CLASS_IDS` ids are refused before any range is expanded.
    """
    ranges: list[range] = []
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
                ranges.append(range(lo_i, hi_i + 1))
            else:
                ranges.append(range(int(part), int(part) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid class list {text!r}: use ids like 0,2,4 or ranges like 3-9") from None
    total = sum(r.stop - r.start for r in ranges)  # len() overflows on huge ranges
    if total > MAX_CLASS_IDS:
        raise argparse.ArgumentTypeError(
            f"class list {text[:40]!r} names {total:,} class ids, more than the "
            f"{MAX_CLASS_IDS:,} allowed; name only ids of the model's classes, e.g. 0-9")
    out = [c for r in ranges for c in r]
    if not out:
        raise argparse.ArgumentTypeError("empty class list")
    return tuple(out)


def parse_size(text: str) -> tuple[int, int]:
    """``"224"`` or ``"224x192"`` (height x width) -> ``(H, W)``."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW in pixels, got {text!r}"
                                         ) from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or any(not 8 <= v <= 4096 for v in values):
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW with sides in 8..4096, got "
                                         f"{text!r}")
    return values[0], values[1]


def json_object(text: str | None, flag: str) -> dict[str, Any]:
    """``--kwargs '{"num_classes": 10}'`` as a dict (one-line error for anything else)."""
    if text is None:
        return {}
    from ..io import parse_json

    value = parse_json(text, what=f"{flag} value", source="the command line")
    if not isinstance(value, dict):
        raise ModelLegoError(f"{flag} must be a JSON object such as '{{\"num_classes\": 10}}', "
                             f"got {text[:60]!r}")
    return value


def print_json(obj: object) -> None:
    from ..records import json_default

    print(json.dumps(obj, indent=2, sort_keys=True, default=json_default))


def command_line(args: argparse.Namespace) -> str:
    """The command line as the file's provenance records it."""
    return "modellego " + shlex.join(args.argv)


def reconstruct_given(args: argparse.Namespace) -> int | None:
    """``--reconstruct N`` (``None``: not given) or ``--no-reconstruct`` (0)."""
    if args.no_reconstruct and args.reconstruct is not None:
        raise ModelLegoError("give one of --reconstruct and --no-reconstruct")
    return 0 if args.no_reconstruct else args.reconstruct


def outputs(args: argparse.Namespace, inputs: Sequence[str], *flags: str) -> dict[str, Path]:
    """The output paths of ``flags`` (e.g. ``"--out"``, ``"--report"``) given on the command
    line, checked before any work (see :func:`modellego.workflows.outputs.check_outputs`)."""
    from ..workflows.outputs import check_outputs

    named = {flag: getattr(args, flag[2:].replace("-", "_"), None) for flag in flags}
    inputs = list(inputs)
    if getattr(args, "layout", None) == "union":  # it also reads the components' source
        from ..assembly.union import union_sources

        inputs += [str(p) for p in union_sources(inputs)]
    return check_outputs(named, inputs, getattr(args, "force", False))


def finish(outs: dict[str, Path], model=None, manifest=None, report=None,
           html: Callable[[], str] | None = None, *, fingerprint=None) -> str:
    """Write the model file (with its router ``fingerprint`` tensors, by default those the
    verb kept with the model, see :func:`modellego.save_model`), the JSON report and the
    HTML page asked for, in that order; returns the ``wrote ...`` line. The page is rendered
    first: a figure that fails to draw leaves no file behind, not a model and a report
    without their page."""
    from ..files import save_model
    from ..viz.report import write_html
    from ..workflows.outputs import write_all, write_json

    page: str = html() if html is not None and outs.get("--html") is not None else ""
    done = write_all([
        (outs.get("--out"), lambda p: save_model(p, model, manifest, fingerprint=fingerprint)),
        (outs.get("--report"), lambda p: write_json(p, report)),
        (outs.get("--html"), lambda p: write_html(p, page)),
    ])
    return "wrote " + " and ".join(printable(p) for p in done)


def figure_outputs(args: argparse.Namespace, *flags: str) -> dict[str, Path]:
    """The checked outputs of a command that draws a figure into ``--out``."""
    from ..viz.common import figure_format

    outs = outputs(args, [args.file], "--out", *flags)
    figure_format(outs["--out"])
    return outs


def add_roots(s: argparse.ArgumentParser) -> None:
    """Where the datasets' files are, and whether data unlike the model's may be used."""
    s.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the folder of the one dataset the command reads")
    s.add_argument("--data", action="append", default=None, metavar="NAME=PATH",
                   help="the folder of dataset NAME (repeatable: one per dataset); "
                        "$MODELLEGO_DATA/NAME is used when neither is given")
    s.add_argument("--allow-data-mismatch", action="store_true",
                   help="use data whose fingerprint differs from the one the model records")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes decoding the images of a streamed folder "
                        "(default: half the cores, at most 8; 0: decode in this process)")
    s.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="about how much memory a step may hold at once (decoded images, "
                        "class statistics), e.g. 4G (default 4G)")


def add_device(s: argparse.ArgumentParser) -> None:
    s.add_argument("--device", default="auto", metavar="DEVICE",
                   help="where the network runs: auto (CUDA when available, cuda:LOCAL_RANK "
                        "under torchrun, else mps or cpu), cpu, cuda, cuda:N or mps")


def add_trust(s: argparse.ArgumentParser) -> None:
    s.add_argument("--trust-code", action="append", default=None, metavar="MODULE",
                   help="allow model files to import and run code of MODULE (and its "
                        "submodules) for python: architectures (repeatable; also "
                        "$MODELLEGO_TRUST_CODE, comma-separated)")


def add_no_fingerprint(s: argparse.ArgumentParser) -> None:
    s.add_argument("--no-fingerprint", action="store_true",
                   help="do not write a router fingerprint into the file (the statistics of "
                        "its own training images that `assemble --data-free` routes with)")


def add_force(s: argparse.ArgumentParser, what: str = "the input file") -> None:
    s.add_argument("--force", action="store_true", help=f"allow overwriting {what}")


def add_report(s: argparse.ArgumentParser) -> None:
    s.add_argument("--report", default=None, help="also write the report as JSON")


def add_data_args(s: argparse.ArgumentParser) -> None:
    """Where the images come from and how many per class the analysis selects."""
    s.add_argument("--dataset", default=None, help="default: the model's own dataset")
    add_roots(s)
    s.add_argument("--samples-per-class", type=int, default=50)


def add_locate_args(s: argparse.ArgumentParser, rule: str | None = None) -> None:
    """The locating thresholds, with disassemble's defaults (``rule``: the default rule;
    ``None``: the preset's)."""
    from ..analysis.locate import RULES

    s.add_argument("--rule", choices=RULES, default=rule,
                   help="count: the paper's relevant-kernel counting; mass: contribution mass "
                        f"(default: {rule or 'mass; count with --preset paper or --alpha-*'})")
    s.add_argument("--alpha-conv", type=float, default=None,
                   help="default 0.3 (0.2 with --method frat)")
    s.add_argument("--beta-conv", type=float, default=None, help="default 0.2")
    s.add_argument("--alpha-linear", type=float, default=None,
                   help="default 0.4 (0.2 with --method frat)")
    s.add_argument("--beta-linear", type=float, default=None, help="default 0.3")


def thresholds_given(args: argparse.Namespace) -> dict[str, Any]:
    """The locating thresholds given on the command line."""
    return {k: getattr(args, k) for k in ("alpha_conv", "beta_conv", "alpha_linear",
                                          "beta_linear") if getattr(args, k) is not None}


def locate_config(args: argparse.Namespace, method: str = "contribution"):
    """The locating thresholds given on the command line, the method's defaults for the
    others (see :func:`modellego.disassembly.default_locate`); ``None`` when neither a rule
    nor a threshold is given (the preset's, see :class:`~modellego.DisassemblyConfig`)."""
    from dataclasses import replace

    from ..disassembly import default_locate

    given = thresholds_given(args)
    if args.rule is None and not given and getattr(args, "preset", None) is not None:
        return None
    # the alphas are the count rule's (the mass rule reads the betas only)
    counting = getattr(args, "preset", None) == "paper" or method != "contribution" or \
        any(k.startswith("alpha") for k in given)
    rule = args.rule or ("count" if counting else "mass")
    return replace(default_locate(method), rule=rule, **given)
