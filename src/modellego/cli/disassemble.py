"""``disassemble``: the component of a model for some classes."""

from __future__ import annotations

import argparse
from typing import Any

from .common import (
    add_data_args,
    add_device,
    add_force,
    add_locate_args,
    add_no_fingerprint,
    add_report,
    add_trust,
    command_line,
    finish,
    locate_config,
    outputs,
    parse_classes,
    reconstruct_given,
    thresholds_given,
)


def config_from(args: argparse.Namespace):
    """The :class:`~modellego.DisassemblyConfig` the flags describe."""
    from ..disassembly import DEFAULT_BUDGET, DisassemblyConfig

    locate = locate_config(args, args.method)
    budget = args.max_accuracy_drop
    if locate is not None and args.preset == "default" and args.method == "contribution" \
            and thresholds_given(args) == {} and (budget, args.target_flops) == (None, None):
        budget = DEFAULT_BUDGET  # --rule alone: the default search along that rule's family
    return DisassemblyConfig(tuple(args.classes), samples_per_class=args.samples_per_class,
                             locate=locate, compensate=args.compensate,
                             max_accuracy_drop=budget, target_flops=args.target_flops,
                             refine=args.refine, recalibrate_bn=args.recalibrate_bn,
                             reconstruct=reconstruct_given(args), method=args.method,
                             preset=args.preset, confidence=args.confidence,
                             bisect=args.bisect)


def run(args: argparse.Namespace) -> int:
    from ..files import load_model
    from ..runtime.distributed import distributed_from_env
    from ..workflows import disassemble, format_report
    from ..workflows.common import check_own_dataset

    outs = outputs(args, [args.file], "--out", "--report", "--html")
    model, manifest = load_model(args.file)
    config = config_from(args)
    check_own_dataset(manifest, args.dataset, args.data_dir)
    # under torchrun the profile runs data-parallel (same result); only rank 0 writes
    with distributed_from_env() as dist:
        comp, new_manifest, report = disassemble(
            model, manifest, config, source_path=args.file, data_dir=args.data_dir,
            command=command_line(args), dist=dist, fingerprint=not args.no_fingerprint)
    if not dist.is_main:
        return 0

    def page() -> str:
        from ..viz.report import disassembly_html
        from ..viz.route import route_from_method

        names = dict(zip(manifest.classes, manifest.class_names))
        class_names = [str(names[c]) for c in config.classes]
        route = route_from_method(comp.graph, comp.profile, comp.method, config.classes,
                                  manifest.classes, comp.locate, class_names)
        return disassembly_html(report, new_manifest, route)

    wrote = finish(outs, comp.model, new_manifest, report, page)
    print(format_report(report))
    print(wrote)
    return 0


def add_parser(sub: Any) -> None:
    from ..disassembly import METHODS, PRESETS

    s = sub.add_parser("disassemble", help="extract the component of a model for some classes")
    s.add_argument("file")
    s.add_argument("--classes", type=parse_classes, required=True,
                   help="task classes in output order, e.g. 0,2,4 or 3-9")
    s.add_argument("--out", required=True)
    add_report(s)
    add_data_args(s)
    add_locate_args(s)
    s.add_argument("--method", choices=METHODS, default="contribution",
                   help="contribution: Model LEGO's relative contribution (default); "
                        "contribution-2022: the ICLR'23 paradigm (correctly classified "
                        "samples only, normalised by the max); frat: CNN LEGO v1's gradients "
                        "of the predicted-class probability (thresholds --alpha-*); "
                        "pan-rajan: Pan & Rajan's one-vs-rest module (channels never active "
                        "on the class's samples removed, --alpha-* the activity threshold, "
                        "default 0.01; outputs are concern scores)")
    s.add_argument("--compensate", action="store_true",
                   help="fold the mean contribution of removed channels into biases")
    s.add_argument("--preset", choices=PRESETS, default="default",
                   help="default: the mass rule's threshold searched for the smallest "
                        "component within --max-accuracy-drop (0.5) of the restricted source "
                        "at --confidence (0.9), each candidate reconstructed; paper: the "
                        "published method exactly (count rule, its thresholds, no search, no "
                        "repair). Flags given override either")
    _add_search(s)
    _add_repairs(s)
    s.add_argument("--html", default=None, metavar="REPORT.html",
                   help="also write a self-contained HTML report (tables, route figure, "
                        "provenance)")
    add_force(s)
    add_trust(s)
    add_no_fingerprint(s)
    add_device(s)
    s.set_defaults(func=run)


def _add_search(s: argparse.ArgumentParser) -> None:
    s.add_argument("--max-accuracy-drop", type=float, default=None, metavar="PP",
                   help="search thresholds on the validation split: lose at most PP points "
                        "against the restricted source (default 0.5 unless thresholds or "
                        "--target-flops are given or --preset paper)")
    s.add_argument("--confidence", type=float, default=None, metavar="C",
                   help="with --max-accuracy-drop: a candidate passes when the one-sided "
                        "C upper bound of its paired drop is within PP (default 0.9; 0: its "
                        "observed validation accuracy, the paper preset's criterion)")
    s.add_argument("--target-flops", type=float, default=None, metavar="R",
                   help="search thresholds: keep at most this share of the source's FLOPs")
    s.add_argument("--bisect", type=int, default=None, metavar="N",
                   help="with --max-accuracy-drop: after the family's steps, halve the gap "
                        "between the candidate found and its failing neighbour N times "
                        "(default 2; 0 with --preset paper)")
    s.add_argument("--refine", action="store_true",
                   help="with --max-accuracy-drop: also tighten the costliest layers one by "
                        "one on the validation split (slower, smaller components)")


def _add_repairs(s: argparse.ArgumentParser) -> None:
    s.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                   help="re-estimate the component's BatchNorm statistics on N training "
                        "images of all the model's classes (no labels, no gradients)")
    s.add_argument("--reconstruct", type=int, default=None, metavar="N",
                   help="re-fit each layer that reads removed channels by ridge least squares "
                        "on N training images of the task, to match the source's outputs "
                        "(no labels, no gradients; before --recalibrate-bn; default 1000, "
                        "0 with --compensate or --preset paper)")
    s.add_argument("--no-reconstruct", action="store_true",
                   help="the plain cut: no reconstruction")
