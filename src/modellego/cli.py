"""The ``modellego`` command line: parse, call one library function, write outputs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from ._version import __version__
from .errors import ModelLegoError
from .terminal import plain_warnings, printable, showing_progress

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


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def cmd_list_archs(args: argparse.Namespace) -> int:
    from .models import list_models, model_info
    from .models.sources import source_names

    if args.source != "modellego":
        for name in source_names(args.source, args.pattern):
            print(f"{args.source}:{name}")
        return 0
    for name in list_models(args.pattern):
        print(f"{name:14s} {model_info(name).description}")
    return 0


def cmd_list_datasets(args: argparse.Namespace) -> int:
    from .data import describe_datasets

    for name, text in describe_datasets():
        print(f"{name:14s} {text}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .files import save_model
    from .training import TrainConfig, train

    out = _outputs(args, [], "--out")["--out"]
    config = TrainConfig(arch=args.arch, dataset=args.dataset, epochs=args.epochs,
                         classes=args.classes, width=args.width, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, augment=not args.no_augment,
                         data_dir=args.data_dir, image_size=args.image_size)
    command = "modellego " + shlex.join(args.argv)
    model, manifest = train(config, command=command, progress=not args.quiet)
    manifest, fingerprint = _fingerprinted(args, model, manifest)
    save_model(out, model, manifest, fingerprint=fingerprint)
    print(f"test accuracy {manifest['metrics']['test_accuracy']:.4f} "
          f"(best val {manifest['metrics']['val_accuracy']:.4f} at epoch "
          f"{manifest['provenance']['best_epoch']}); wrote {printable(out)}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .workflows.importing import ImportConfig, format_import, import_model

    outs = _outputs(args, [args.weights], "--out", "--report")
    kwargs = _json_object(args.kwargs, "--kwargs")
    config = ImportConfig(architecture=args.architecture, dataset=args.dataset, kwargs=kwargs,
                          classes=args.classes, input_size=args.input_size, mean=args.mean,
                          std=args.std, evaluate=not args.no_evaluate)
    config.validate()  # before any file is read
    command = "modellego " + shlex.join(args.argv)
    model, manifest, report = import_model(args.weights, config, data_dir=args.data_dir,
                                           command=command)
    manifest, fingerprint = _fingerprinted(args, model, manifest)
    wrote = _finish(outs, model, manifest, report, fingerprint=fingerprint)
    print(format_import(report))
    print(wrote)
    return 0


def _json_object(text: str | None, flag: str) -> dict[str, Any]:
    """``--kwargs '{"num_classes": 10}'`` as a dict (one-line error for anything else)."""
    if text is None:
        return {}
    from .io import parse_json

    value = parse_json(text, what=f"{flag} value", source="the command line")
    if not isinstance(value, dict):
        raise ModelLegoError(f"{flag} must be a JSON object such as '{{\"num_classes\": 10}}', "
                             f"got {text[:60]!r}")
    return value


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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate
    from .files import load_model

    model, manifest = load_model(args.file)
    if manifest.get("kind") == "assembly":
        return _evaluate_assembly(args, model, manifest)
    result = evaluate(model, manifest, dataset=args.dataset, classes=args.classes,
                      data_dir=args.data_dir, latency=not args.no_latency)
    if args.json:
        _print_json(result)
        return 0
    names = dict(zip(manifest["classes"], manifest["class_names"]))
    print(f"{printable(args.file)}: {manifest.get('kind', 'model')} on "
          f"{printable(result['dataset'])} "
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
        print(f"    class {c:>3} {printable(names.get(int(c), '')):<14s} {a:.4f}")
    return 0


def _outputs(args: argparse.Namespace, inputs: Sequence[str], *flags: str) -> dict[str, Path]:
    """The output paths of ``flags`` (e.g. ``"--out"``, ``"--report"``) given on the command
    line, checked before any work (see :func:`modellego.workflows.outputs.check_outputs`)."""
    from .workflows.outputs import check_outputs

    named = {flag: getattr(args, flag[2:].replace("-", "_"), None) for flag in flags}
    inputs = list(inputs)
    if getattr(args, "layout", None) == "union":  # it also reads the components' source
        from .assembly.union import union_sources

        inputs += [str(p) for p in union_sources(inputs)]
    return check_outputs(named, inputs, getattr(args, "force", False))


def _fingerprinted(args: argparse.Namespace, model, manifest):
    """``(manifest, fingerprint tensors)`` of a model about to be written: with its router
    fingerprint made from its own training images, unless ``--no-fingerprint`` (or it is a
    one-vs-rest module, which scaling ``concern`` combines without one). ``import
    --no-evaluate`` reads no data, so it writes none either."""
    if getattr(args, "no_fingerprint", True) or getattr(args, "no_evaluate", False) \
            or manifest.get("head"):
        return manifest, None
    from .assembly.fingerprint import fingerprint_model

    return fingerprint_model(model, manifest, data_dir=args.data_dir)


def _finish(outs: dict[str, Path], model=None, manifest=None, report=None, html=None, *,
            fingerprint=None) -> str:
    """Write the model file (with its router ``fingerprint`` tensors, if any), the JSON
    report and the HTML page asked for, in that order; returns the ``wrote ...`` line. The
    page is rendered first: a figure that fails to draw leaves no file behind, not a model
    and a report without their page."""
    from .files import save_model
    from .viz.report import write_html
    from .workflows.outputs import write_all, write_json

    out = outs.get("--out")
    source = (manifest or {}).get("provenance", {}).get("source") or {}
    if out is not None and source.get("file") and not Path(source["file"]).is_absolute():
        # a relative source path is stored relative to the file written, so that it is
        # found from any working folder (see modellego.assembly.union.find_source)
        relative = os.path.relpath(Path(source["file"]).resolve(), Path(out).parent.resolve())
        provenance = {**manifest["provenance"], "source": {**source, "file": relative}}
        manifest = {**manifest, "provenance": provenance}
    page: str = html() if html is not None and outs.get("--html") is not None else ""
    done = write_all([
        (out, lambda p: save_model(p, model, manifest, fingerprint=fingerprint)),
        (outs.get("--report"), lambda p: write_json(p, report)),
        (outs.get("--html"), lambda p: write_html(p, page)),
    ])
    return "wrote " + " and ".join(printable(p) for p in done)


def cmd_disassemble(args: argparse.Namespace) -> int:
    from .disassembly import DEFAULT_BUDGET, DisassemblyConfig
    from .files import load_model
    from .runtime.distributed import distributed_from_env
    from .workflows import disassemble, format_report
    from .workflows.common import check_own_dataset

    outs = _outputs(args, [args.file], "--out", "--report", "--html")
    model, manifest = load_model(args.file)
    locate = _locate_config(args, args.method)
    budget = args.max_accuracy_drop
    if locate is not None and args.preset == "default" and args.method == "contribution" \
            and _thresholds_given(args) == {} and (budget, args.target_flops) == (None, None):
        budget = DEFAULT_BUDGET  # --rule alone: the default search along that rule's family
    if args.no_reconstruct and args.reconstruct is not None:
        raise ModelLegoError("give one of --reconstruct and --no-reconstruct")
    reconstruct = 0 if args.no_reconstruct else args.reconstruct
    config = DisassemblyConfig(tuple(args.classes), samples_per_class=args.samples_per_class,
                               locate=locate, compensate=args.compensate,
                               max_accuracy_drop=budget,
                               target_flops=args.target_flops, refine=args.refine,
                               recalibrate_bn=args.recalibrate_bn,
                               reconstruct=reconstruct, method=args.method,
                               preset=args.preset, confidence=args.confidence,
                               bisect=args.bisect)
    check_own_dataset(manifest, args.dataset, args.data_dir)
    command = "modellego " + shlex.join(args.argv)
    # under torchrun the profile runs data-parallel (same result); only rank 0 writes
    with distributed_from_env() as dist:
        comp, new_manifest, report = disassemble(model, manifest, config, source_path=args.file,
                                                 data_dir=args.data_dir, command=command,
                                                 dist=dist)
    if not dist.is_main:
        return 0

    def page() -> str:
        from .viz.report import disassembly_html
        from .viz.route import route_from_method

        names = dict(zip(manifest["classes"], manifest["class_names"]))
        class_names = [str(names[c]) for c in config.classes]
        route = route_from_method(comp.graph, comp.profile, comp.method, config.classes,
                                  manifest["classes"], comp.locate, class_names)
        return disassembly_html(report, new_manifest, route)

    new_manifest, fingerprint = _fingerprinted(args, comp.model, new_manifest)
    wrote = _finish(outs, comp.model, new_manifest, report, page, fingerprint=fingerprint)
    print(format_report(report))
    print(wrote)
    return 0


def _evaluate_assembly(args: argparse.Namespace, model, manifest: dict) -> int:
    from .assembly import evaluate_assembly
    from .metrics import cpu_latency_ms
    from .workflows import format_assembly

    if args.dataset is not None or args.classes is not None:
        raise ModelLegoError("an assembled model is evaluated on the union of its parts' test "
                             "sets; drop --dataset and --classes")
    result = evaluate_assembly(model, manifest, data_dir=args.data_dir)
    if not args.no_latency:
        result["latency_ms"] = cpu_latency_ms(model, manifest["input"]["shape"])
    if args.json:
        _print_json(result)
        return 0
    print(format_assembly(result, manifest))
    return 0


def cmd_assemble(args: argparse.Namespace) -> int:
    from .assembly import AssemblyConfig, assemble, evaluate_assembly
    from .runtime.distributed import distributed_from_env
    from .training import check_seed
    from .workflows import format_assembly

    check_seed(args.seed)  # before torch's generators raise on it
    if args.data_free:
        if args.scaling not in (None, "fingerprint"):
            raise ModelLegoError(f"--data-free routes with the parts' fingerprints (scaling "
                                 f"fingerprint); drop --scaling {args.scaling} or --data-free")
        args.scaling = "fingerprint"
    outs = _outputs(args, args.files, "--out", "--report", "--html")
    config = AssemblyConfig(layout=args.layout, scaling=args.scaling,
                            on_duplicate=args.on_duplicate,
                            calibration_samples=args.calibration_samples, seed=args.seed)
    command = "modellego " + shlex.join(args.argv)
    with distributed_from_env() as dist:
        model, manifest = assemble(args.files, config, data_dir=args.data_dir,
                                   command=command, dist=dist)
        if not dist.is_main:  # under torchrun only rank 0 evaluates and writes
            return 0
    result = evaluate_assembly(model, manifest, data_dir=args.data_dir)
    manifest["metrics"] = {"test_accuracy": result["accuracy"],
                           "test_balanced_accuracy": result["balanced_accuracy"],
                           "base": result["base"]}
    report = {"evaluation": result, "calibration": manifest["provenance"]["calibration"],
              "labels": manifest["labels"]}

    def page() -> str:
        from .viz.report import assembly_html

        return assembly_html(result, manifest, report)

    wrote = _finish(outs, model, manifest, report, page)
    print(format_assembly(result, manifest))
    print(wrote)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .distillation import DistillConfig, distill, format_distill
    from .files import load_model

    outs = _outputs(args, [args.teacher], "--out", "--report")
    config = DistillConfig(student=args.student, width=args.width, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr,
                           temperature=args.temperature, alpha=args.alpha, seed=args.seed,
                           augment=not args.no_augment)
    config.validate()  # before loading anything
    teacher, manifest = load_model(args.teacher)
    command = "modellego " + shlex.join(args.argv)
    student, new_manifest, report = distill(
        teacher, manifest, config, data_dir=args.data_dir, command=command,
        source_path=args.teacher, compare=not args.no_compare, progress=not args.quiet)
    wrote = _finish(outs, student, new_manifest, report)
    print(format_distill(report))
    print(wrote)
    return 0


def _thresholds_given(args: argparse.Namespace) -> dict[str, Any]:
    """The locating thresholds given on the command line."""
    return {k: getattr(args, k) for k in ("alpha_conv", "beta_conv", "alpha_linear",
                                          "beta_linear") if getattr(args, k) is not None}


def _locate_config(args: argparse.Namespace, method: str = "contribution"):
    """The locating thresholds given on the command line, the method's defaults for the
    others (see :func:`modellego.disassembly.default_locate`); ``None`` when neither a rule
    nor a threshold is given (the preset's, see :class:`~modellego.DisassemblyConfig`)."""
    from dataclasses import replace

    from .disassembly import default_locate

    given = _thresholds_given(args)
    if args.rule is None and not given and getattr(args, "preset", None) is not None:
        return None
    # the alphas are the count rule's (the mass rule reads the betas only)
    counting = getattr(args, "preset", None) == "paper" or method != "contribution" or \
        any(k.startswith("alpha") for k in given)
    rule = args.rule or ("count" if counting else "mass")
    return replace(default_locate(method), rule=rule, **given)


def _figure_outputs(args: argparse.Namespace, *flags: str) -> dict[str, Path]:
    from .viz.common import figure_format

    outs = _outputs(args, [args.file], "--out", *flags)
    figure_format(outs["--out"])
    return outs


def cmd_route(args: argparse.Namespace) -> int:
    from .files import load_model
    from .viz.route import format_route, plot_route, route_masks
    from .workflows.outputs import write_json

    outs = _figure_outputs(args, "--json")
    model, manifest = load_model(args.file)
    data = route_masks(model, manifest, args.classes, dataset=args.dataset,
                       data_dir=args.data_dir, samples_per_class=args.samples_per_class,
                       locate=_locate_config(args))
    plot_route(data, outs["--out"])
    if "--json" in outs:
        write_json(outs["--json"], data.to_dict())
    print(format_route(data))
    print(f"wrote {printable(args.out)}" + (f" and {printable(args.json)}" if args.json else ""))
    return 0


def cmd_heatmap(args: argparse.Namespace) -> int:
    from .files import load_model
    from .viz.heatmap import format_heatmap, heatmap_data, plot_heatmap

    out = _figure_outputs(args)["--out"]
    model, manifest = load_model(args.file)
    data = heatmap_data(model, manifest, args.layer, args.classes, dataset=args.dataset,
                        data_dir=args.data_dir, samples_per_class=args.samples_per_class,
                        per_sample=not args.no_samples)
    plot_heatmap(data, out, sort=not args.no_sort)
    print(format_heatmap(data))
    print(f"wrote {printable(out)}")
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from .assembly.fingerprint import fingerprint_model
    from .files import load_model
    from .training import check_seed

    check_seed(args.seed)
    if args.images_per_class < 2:
        raise ModelLegoError(f"--images-per-class must be at least 2, got "
                             f"{args.images_per_class}")
    outs = _outputs(args, [args.file], "--out")
    model, manifest = load_model(args.file)
    new_manifest, fingerprint = fingerprint_model(
        model, manifest, per_class=args.images_per_class, seed=args.seed,
        data_dir=args.data_dir)
    wrote = _finish(outs, model, new_manifest, fingerprint=fingerprint)
    fp = new_manifest["router_fingerprint"]
    size = sum(t.numel() for t in fingerprint.values()) * 4
    print(f"router fingerprint from {fp['images']} training images at {len(fp['taps'])} "
          f"layers ({', '.join(fp['taps'])}): {size / 1024:.0f} KB")
    print(wrote)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from .compression import DEFAULT_RECONSTRUCT, CompressConfig
    from .files import load_model
    from .workflows import compress, format_compress_report

    if args.no_reconstruct and args.reconstruct is not None:
        raise ModelLegoError("give one of --reconstruct and --no-reconstruct")
    reconstruct = 0 if args.no_reconstruct else args.reconstruct
    config = CompressConfig(criterion=args.criterion, target_flops=args.target_flops,
                            target_params=args.target_params,
                            max_accuracy_drop=args.max_accuracy_drop,
                            samples_per_class=args.samples_per_class, method=args.method,
                            recalibrate_bn=args.recalibrate_bn,
                            reconstruct=DEFAULT_RECONSTRUCT if reconstruct is None
                            else reconstruct)
    config.validate()  # before any file is read
    outs = _outputs(args, [args.file], "--out", "--report")
    model, manifest = load_model(args.file)
    command = "modellego " + shlex.join(args.argv)
    small, new_manifest, report = compress(model, manifest, config, source_path=args.file,
                                           data_dir=args.data_dir, command=command)
    new_manifest, fingerprint = _fingerprinted(args, small, new_manifest)
    wrote = _finish(outs, small, new_manifest, report, fingerprint=fingerprint)
    print(format_compress_report(report))
    print(wrote)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .exporting import export
    from .workflows.outputs import write_json

    if not 1 <= args.align <= 1024:
        raise ModelLegoError(f"--align must be between 1 and 1024, got {args.align}")
    outs = _outputs(args, [args.file], "--out", "--report")
    report = export(args.file, outs["--out"], format=args.format,
                    check_images=args.check_images,
                    data_dir=args.data_dir, align=args.align)
    sizes = " and ".join(str(b) for b in report.batch_sizes)
    print(f"exported {printable(args.file)} to {report.format} with {report.exporter} "
          f"in {report.seconds:.1f} s; input: [0, 1] images (batch, "
          f"{', '.join(map(str, report.input_shape))}), normalised inside")
    print(f"checked on {report.check_images} {printable(report.check_source)} at batch sizes "
          f"{sizes}: max |logit difference| {report.max_abs_diff:.2g} (at most "
          f"{report.tolerance:.2g})")
    if report.channels_added:
        print(f"channel counts padded to multiples of {report.align}: {report.channels_added} "
              f"channels that change nothing, in {report.spaces_padded} channel groups")
    elif report.align > 1:
        print(f"channel counts not padded: {printable(report.align_note)}")
    if outs.get("--report") is not None:
        write_json(outs["--report"], report.to_dict())
    print("wrote " + " and ".join(printable(p) for p in outs.values() if p is not None))
    return 0


def add_export_parser(sub: Any) -> None:
    from .exporting import ALIGN, CHECK_IMAGES, FORMATS

    s = sub.add_parser("export", help="write a model, component or assembly as ONNX or a "
                       "torch.export program, checked against modellego's outputs")
    s.add_argument("file")
    s.add_argument("--out", required=True,
                   help="the file to write (its suffix .onnx or .pt2 gives the format)")
    s.add_argument("--format", choices=FORMATS, default=None,
                   help="default: from the suffix of --out")
    s.add_argument("--align", type=int, default=ALIGN, metavar="K",
                   help=f"pad channel counts to multiples of K with channels that change "
                        f"nothing, for onnxruntime's fast kernels (default {ALIGN}; 1: off)")
    s.add_argument("--check-images", type=int, default=CHECK_IMAGES, metavar="N",
                   help=f"test images the export is checked on (default {CHECK_IMAGES}; "
                        "random images when the data cannot be read)")
    _add_roots(s)
    s.add_argument("--report", default=None, help="also write the report as JSON")
    s.add_argument("--force", action="store_true", help="allow overwriting an output file")
    _add_trust(s)
    s.set_defaults(func=cmd_export)


def _add_roots(s: argparse.ArgumentParser) -> None:
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


def _add_device(s: argparse.ArgumentParser) -> None:
    s.add_argument("--device", default="auto", metavar="DEVICE",
                   help="where the network runs: auto (CUDA when available, cuda:LOCAL_RANK "
                        "under torchrun, else mps or cpu), cpu, cuda, cuda:N or mps")


def _add_trust(s: argparse.ArgumentParser) -> None:
    s.add_argument("--trust-code", action="append", default=None, metavar="MODULE",
                   help="allow model files to import and run code of MODULE (and its "
                        "submodules) for python: architectures (repeatable; also "
                        "$MODELLEGO_TRUST_CODE, comma-separated)")


def _add_no_fingerprint(s: argparse.ArgumentParser) -> None:
    s.add_argument("--no-fingerprint", action="store_true",
                   help="do not write a router fingerprint into the file (the statistics of "
                        "its own training images that `assemble --data-free` routes with)")


def _add_data_args(s: argparse.ArgumentParser) -> None:
    """Where the images come from and how many per class the analysis selects."""
    s.add_argument("--dataset", default=None, help="default: the model's own dataset")
    _add_roots(s)
    s.add_argument("--samples-per-class", type=int, default=50)


def _add_locate_args(s: argparse.ArgumentParser, rule: str | None = None) -> None:
    """The locating thresholds, with disassemble's defaults (``rule``: the default rule;
    ``None``: the preset's)."""
    s.add_argument("--rule", choices=("count", "mass"), default=rule,
                   help="count: the paper's relevant-kernel counting; mass: contribution mass "
                        f"(default: {rule or 'mass; count with --preset paper or --alpha-*'})")
    s.add_argument("--alpha-conv", type=float, default=None,
                   help="default 0.3 (0.2 with --method frat)")
    s.add_argument("--beta-conv", type=float, default=None, help="default 0.2")
    s.add_argument("--alpha-linear", type=float, default=None,
                   help="default 0.4 (0.2 with --method frat)")
    s.add_argument("--beta-linear", type=float, default=None, help="default 0.3")


def build_parser() -> argparse.ArgumentParser:
    # the choices are the registries' names: a registered method, criterion, layout or
    # scaling is on the command line without further edits
    from .analysis.methods import METHODS
    from .assembly import LAYOUTS, SCALINGS
    from .compression import CRITERIA, DEFAULT_RECALIBRATE_BN, DEFAULT_RECONSTRUCT

    p = argparse.ArgumentParser(prog="modellego", description=__doc__)
    p.add_argument("--version", action="version", version=f"modellego {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list-archs", help="list registered architectures")
    s.add_argument("pattern", nargs="?", default=None, help="shell glob, e.g. 'resnet*'")
    s.add_argument("--source", choices=("modellego", "torchvision", "timm"),
                   default="modellego", help="whose builders to list (default: the zoo); "
                   "a file names them SOURCE:NAME")
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
    s.add_argument("--image-size", type=parse_size, default=None, metavar="SIZE",
                   help="for folder:PATH: the size images are resized and centre-cropped "
                        "to (224 or HxW; default: their own size when all agree, else the "
                        "median shorter side, at most 224)")
    _add_roots(s)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_no_fingerprint(s)
    _add_device(s)
    s.set_defaults(func=cmd_train)

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
    _add_roots(s)
    _add_trust(s)
    s.add_argument("--report", default=None, help="also write the report as JSON")
    s.add_argument("--force", action="store_true", help="allow overwriting the weights file")
    _add_no_fingerprint(s)
    _add_device(s)
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("evaluate", help="accuracy, params, FLOPs and latency of a model file")
    s.add_argument("file")
    s.add_argument("--dataset", default=None, help="default: the model's own dataset")
    s.add_argument("--classes", type=parse_classes, default=None)
    _add_roots(s)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    _add_trust(s)
    _add_device(s)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("disassemble", help="extract the component of a model for some classes")
    s.add_argument("file")
    s.add_argument("--classes", type=parse_classes, required=True,
                   help="task classes in output order, e.g. 0,2,4 or 3-9")
    s.add_argument("--out", required=True)
    s.add_argument("--report", default=None, help="also write the report as JSON")
    _add_data_args(s)
    _add_locate_args(s)
    s.add_argument("--method", choices=METHODS.names(), default="contribution",
                   help="contribution: Model LEGO's relative contribution (default); "
                        "contribution-2022: the ICLR'23 paradigm (correctly classified "
                        "samples only, normalised by the max); frat: CNN LEGO v1's gradients "
                        "of the predicted-class probability (thresholds --alpha-*); "
                        "pan-rajan: Pan & Rajan's one-vs-rest module (channels never active "
                        "on the class's samples removed, --alpha-* the activity threshold, "
                        "default 0.01; outputs are concern scores)")
    s.add_argument("--compensate", action="store_true",
                   help="fold the mean contribution of removed channels into biases")
    s.add_argument("--preset", choices=("default", "paper"), default="default",
                   help="default: the mass rule's threshold searched for the smallest "
                        "component within --max-accuracy-drop (0.5) of the restricted source "
                        "at --confidence (0.9), each candidate reconstructed; paper: the "
                        "published method exactly (count rule, its thresholds, no search, no "
                        "repair). Flags given override either")
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
    s.add_argument("--html", default=None, metavar="REPORT.html",
                   help="also write a self-contained HTML report (tables, route figure, "
                        "provenance)")
    s.add_argument("--force", action="store_true", help="allow overwriting the input file")
    _add_trust(s)
    _add_no_fingerprint(s)
    _add_device(s)
    s.set_defaults(func=cmd_disassemble)

    s = sub.add_parser("assemble", help="assemble models/components into one classifier")
    s.add_argument("files", nargs="+", help="two or more model or component files")
    s.add_argument("--out", required=True)
    s.add_argument("--layout", choices=LAYOUTS, default="parallel",
                   help="parallel: parts side by side; padded: the paper's widened network "
                        "(same logits); union: components of one source merged by the "
                        "union of their channels")
    s.add_argument("--scaling", choices=SCALINGS, default=None,
                   help="default: concern when a part is a pan-rajan module (the highest "
                        "one-vs-rest score wins), else joint")
    s.add_argument("--on-duplicate", choices=("error", "replace"), default="error",
                   help="what to do when two parts classify the same label")
    s.add_argument("--calibration-samples", type=int, default=3000,
                   help="training images per class used to calibrate (all of a class's "
                        "images where it has fewer)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data-free", action="store_true",
                   help="route with the parts' router fingerprints alone (scaling "
                        "fingerprint): no dataset is read")
    _add_roots(s)
    s.add_argument("--report", default=None, help="also write the report as JSON")
    s.add_argument("--html", default=None, metavar="REPORT.html",
                   help="also write a self-contained HTML report (tables, figure, provenance)")
    s.add_argument("--force", action="store_true", help="allow overwriting an input file")
    _add_trust(s)
    s.set_defaults(func=cmd_assemble)

    s = sub.add_parser("fingerprint", help="add a router fingerprint to a model or component "
                       "file, so that others can assemble it without its training data")
    s.add_argument("file")
    s.add_argument("--out", required=True)
    s.add_argument("--images-per-class", type=int, default=1000, metavar="N",
                   help="training images per class it is made from (default 1000)")
    s.add_argument("--seed", type=int, default=0)
    _add_roots(s)
    s.add_argument("--force", action="store_true", help="allow overwriting the input file")
    _add_trust(s)
    _add_device(s)
    s.set_defaults(func=cmd_fingerprint)

    s = sub.add_parser("route", help="draw which channels of every layer some classes use")
    s.add_argument("file")
    s.add_argument("--classes", type=parse_classes, required=True,
                   help="the classes to compare, e.g. 3,4 or 0-2")
    s.add_argument("--out", required=True, help="figure file, .png or .svg")
    _add_data_args(s)
    _add_locate_args(s, "count")
    s.add_argument("--json", default=None, metavar="FILE",
                   help="also write the per-layer channel counts as JSON")
    s.add_argument("--force", action="store_true", help="allow overwriting the input file")
    _add_trust(s)
    s.set_defaults(func=cmd_route)

    s = sub.add_parser("heatmap", help="per-class contribution of one layer's input channels")
    s.add_argument("file")
    s.add_argument("--layer", required=True, help="a conv or linear module name, e.g. fc")
    s.add_argument("--out", required=True, help="figure file, .png or .svg")
    s.add_argument("--classes", type=parse_classes, default=None,
                   help="default: all classes of the model")
    _add_data_args(s)
    s.add_argument("--no-samples", action="store_true",
                   help="only the per-class rows, not the per-sample panel")
    s.add_argument("--no-sort", action="store_true",
                   help="keep channels in index order (default: grouped by dominant class)")
    s.add_argument("--force", action="store_true", help="allow overwriting the input file")
    _add_trust(s)
    s.set_defaults(func=cmd_heatmap)

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
    _add_roots(s)
    s.add_argument("--report", default=None, help="also write the report as JSON")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--force", action="store_true", help="allow overwriting the input file")
    _add_trust(s)
    _add_device(s)
    s.set_defaults(func=cmd_distill)

    s = sub.add_parser("compress", help="a smaller model for all its classes, without "
                       "fine-tuning (class-aware components or channel pruning)")
    s.add_argument("file")
    s.add_argument("--out", required=True)
    s.add_argument("--criterion", choices=CRITERIA, default="contribution",
                   help="contribution: the component of all classes (ours); l1: L1-norm "
                        "filter pruning; fpgm: geometric-median filter pruning (both uniform)")
    s.add_argument("--target-flops", type=float, default=None, metavar="R",
                   help="keep at most this share of the source's FLOPs, in (0, 1]")
    s.add_argument("--target-params", type=float, default=None, metavar="R",
                   help="keep at most this share of the source's parameters, in (0, 1]")
    s.add_argument("--max-accuracy-drop", type=float, default=None, metavar="PP",
                   help="compress as far as the validation accuracy stays within PP points "
                        "of the source's")
    s.add_argument("--samples-per-class", type=int, default=50,
                   help="contribution: training samples profiled per class")
    s.add_argument("--method", choices=METHODS.names(), default="contribution",
                   help="contribution criterion: how channels are scored (as in disassemble)")
    s.add_argument("--recalibrate-bn", type=int, default=DEFAULT_RECALIBRATE_BN, metavar="N",
                   help="every criterion: re-estimate each candidate's BatchNorm statistics "
                        "on N training images, no labels, no gradients (default "
                        f"{DEFAULT_RECALIBRATE_BN}; 0: keep the source's)")
    s.add_argument("--reconstruct", type=int, default=None, metavar="N",
                   help="every criterion: re-fit each candidate's layers that read removed "
                        "channels by ridge least squares on N training images, to match the "
                        f"source's outputs, before --recalibrate-bn (default "
                        f"{DEFAULT_RECONSTRUCT})")
    s.add_argument("--no-reconstruct", action="store_true",
                   help="no reconstruction (with --recalibrate-bn 0: the plain cut)")
    _add_roots(s)
    s.add_argument("--report", default=None, help="also write the report as JSON")
    s.add_argument("--force", action="store_true", help="allow overwriting the input file")
    _add_no_fingerprint(s)
    _add_trust(s)
    _add_device(s)
    s.set_defaults(func=cmd_compress)

    add_export_parser(sub)
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
            if hasattr(args, "data"):  # one data_dir argument for the library
                from .data import reading, roots_from
                from .data.lazy import default_workers, parse_memory

                args.data_dir = roots_from(args.data, args.data_dir, args.allow_data_mismatch)
                settings.enter_context(reading(
                    workers=default_workers() if args.workers is None else args.workers,
                    max_memory=None if args.max_memory is None else parse_memory(args.max_memory)))
            if hasattr(args, "device"):  # networks run there (modellego.runtime.device)
                from .runtime.device import resolve_device, using_device
                from .runtime.distributed import env_settings

                local_rank = env_settings(os.environ)[2]
                settings.enter_context(using_device(resolve_device(args.device,
                                                                   local_rank=local_rank)))
            from .models.sources import trusted

            settings.enter_context(trusted(getattr(args, "trust_code", None)))
            settings.enter_context(showing_progress(not getattr(args, "quiet", False)))
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


if __name__ == "__main__":
    sys.exit(main())
