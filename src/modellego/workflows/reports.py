"""Plain-text tables of the reports the verbs return (what the command line prints)."""

from __future__ import annotations

from ..disassembly import BISECT_MIN_IMAGES_IN_BUDGET
from ..errors import ModelLegoError
from ..manifest import Manifest
from ..records import AssemblyEvaluation, CompressionReport, DisassemblyReport
from ..terminal import printable


def format_report(report: DisassemblyReport) -> str:
    """A plain-text table of a disassembly report."""
    r = report
    lines = [
        f"task classes {list(r.classes)} ({r.n} test images)",
        f"  source accuracy (all classes)     {r.source_accuracy:.4f}",
        f"  source accuracy (restricted)      {r.restricted_accuracy:.4f}",
        f"  component accuracy                {r.component_accuracy:.4f}  "
        f"({100 * (r.component_accuracy - r.restricted_accuracy):+.2f} pp)",
        f"  params  {r.source_params:>12,} -> {r.component_params:>12,}  "
        f"({100 * r.params_ratio:.1f} %)",
        f"  FLOPs   {r.source_flops:>12,} -> {r.component_flops:>12,}  "
        f"({100 * r.flops_ratio:.1f} %)",
        f"  profile pass {r.profile_seconds:.2f} s, total {r.total_seconds:.2f} s",
    ]
    if r.reconstruction:
        fit = r.reconstruction
        lines.append(f"  reconstruction: {len(fit['layers'])} layers re-fitted on "
                     f"{fit['images']} training images ({fit['seconds']:.2f} s)")
    if r.validation:
        v = r.validation
        lines.append(f"  search: the smallest candidate whose drop is within "
                     f"{v['budget_pp']:g} pp at {v['confidence']:.0%} confidence, on "
                     f"{v['images']} validation images ({v['from_training_split']} from the "
                     f"training split; one image = {v['resolution_pp']:.3f} pp)")
        if "bisect" in v:  # reports of earlier releases have no bisection
            lines.append(f"  steps: the family's, then up to {v['bisect']} halving"
                         f"{'s' if v['bisect'] > 1 else ''} of the gap to the failing "
                         "neighbour" if v["bisect"] else
                         "  steps: the family's only (no halving: the budget is worth fewer "
                         f"than {BISECT_MIN_IMAGES_IN_BUDGET} validation images, the profile "
                         "was made in chunks of classes, or --bisect 0)")
        lines.append(f"  chosen: {v['chosen']}" + ("" if v["chosen_passes"] else
                     " -- no candidate passed: the least aggressive is kept"))
    lines.append(f"  {'class':>5} {'name':<14} {'n':>5} {'source':>7} {'restr.':>7} "
                 f"{'comp.':>7}")
    for row in r.per_class:
        lines.append(f"  {row.class_id:>5} {printable(row.name):<14} {row.n:>5} "
                     f"{row.source_accuracy:>7.4f} {row.restricted_accuracy:>7.4f} "
                     f"{row.component_accuracy:>7.4f}")
    return "\n".join(lines)


def format_compress_report(report: CompressionReport) -> str:
    """A plain-text table of a compression report."""
    r = report
    target = next(f"{flag} {value}" for flag, value in (
        ("--target-flops", r.target_flops), ("--target-params", r.target_params),
        ("--max-accuracy-drop", r.max_accuracy_drop)) if value is not None)
    locate = r.locate or {}
    how = (f"{100 * r.fraction:.1f} % of the channels of every prunable layer removed"
           if r.fraction is not None else
           f"mass rule, beta conv {locate.get('beta_conv')} / linear "
           f"{locate.get('beta_linear')} (inputs kept until they carry 1 - beta of "
           "the contribution)")
    lines = [
        f"compressed by {r.criterion} ({target}): {how}",
        f"  test images {r.n} of all {len(r.classes)} classes, no fine-tuning",
        f"  accuracy  source {r.source_accuracy:.4f} -> compressed "
        f"{r.component_accuracy:.4f}  "
        f"({100 * (r.component_accuracy - r.source_accuracy):+.2f} pp)",
        f"  params  {r.source_params:>12,} -> {r.component_params:>12,}  "
        f"({100 * r.params_ratio:.1f} %)",
        f"  FLOPs   {r.source_flops:>12,} -> {r.component_flops:>12,}  "
        f"({100 * r.flops_ratio:.1f} %)",
        f"  {r.seconds:.2f} s",
        f"  {'class':>5} {'name':<14} {'n':>5} {'source':>7} {'compr.':>7}",
    ]
    for row in r.per_class:
        lines.append(f"  {row.class_id:>5} {printable(row.name):<14} {row.n:>5} "
                     f"{row.source_accuracy:>7.4f} {row.component_accuracy:>7.4f}")
    return "\n".join(lines)


def format_assembly(result: AssemblyEvaluation, manifest: Manifest) -> str:
    """A plain-text table of an assembled model's evaluation."""
    spec = manifest.assembly
    if spec is None:
        raise ModelLegoError(f"format_assembly: the manifest is a {manifest.kind}, not an "
                             "assembly")
    lines = [f"assembly of {len(spec.parts)} parts, layout {spec.layout}, "
             f"scaling {spec.scaling}: {len(spec.labels)} outputs, "
             f"{result.n} test images",
             f"  accuracy            {result.accuracy:.4f}",
             f"  balanced accuracy   {result.balanced_accuracy:.4f}  (mean per class)",
             f"  Base                {result.base:.4f}  (mean per-class accuracy of the "
             "parts on their own classes)",
             f"  params              {result.params:,}",
             f"  FLOPs               {result.flops:,}"]
    routing = result.routing
    if routing:
        pairs = ", ".join(f"{k} {v:.4f}" for k, v in routing["auroc_pairs"].items())
        lines += [f"  routing accuracy    {routing['routing_accuracy']:.4f}  (images sent to "
                  "the part owning their class)",
                  f"  perfect routing     {routing['oracle_balanced_accuracy']:.4f}  "
                  f"(balanced; loss: routing {routing['routing_loss_pp']:.2f} pp, the parts' "
                  f"own {routing['classification_loss_pp']:.2f} pp)",
                  f"  routing AUROC       {pairs}  (part pairs)"]
    if result.latency_ms is not None:
        lines.append(f"  CPU latency         {result.latency_ms:.3f} ms/image")
    for lab, (key, acc) in zip(spec.labels, result.per_class.items()):
        lines.append(f"    {printable(key):<18s} {printable(lab.name):<14s} "
                     f"part {lab.part}  {acc:.4f}")
    return "\n".join(lines)
