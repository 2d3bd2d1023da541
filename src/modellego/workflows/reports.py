"""Plain-text tables of the reports the verbs return (what the command line prints)."""

from __future__ import annotations

from typing import Any

from ..disassembly import BISECT_MIN_IMAGES_IN_BUDGET
from ..terminal import printable


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of a disassembly report."""
    lines = [
        f"task classes {report['classes']} ({report['n']} test images)",
        f"  source accuracy (all classes)     {report['source_accuracy']:.4f}",
        f"  source accuracy (restricted)      {report['restricted_accuracy']:.4f}",
        f"  component accuracy                {report['component_accuracy']:.4f}  "
        f"({100 * (report['component_accuracy'] - report['restricted_accuracy']):+.2f} pp)",
        f"  params  {report['source_params']:>12,} -> {report['component_params']:>12,}  "
        f"({100 * report['params_ratio']:.1f} %)",
        f"  FLOPs   {report['source_flops']:>12,} -> {report['component_flops']:>12,}  "
        f"({100 * report['flops_ratio']:.1f} %)",
    ]
    if "profile_seconds" in report:
        lines.append(f"  profile pass {report['profile_seconds']:.2f} s, "
                     f"total {report['total_seconds']:.2f} s")
    if report.get("reconstruction"):
        fit = report["reconstruction"]
        lines.append(f"  reconstruction: {len(fit['layers'])} layers re-fitted on "
                     f"{fit['images']} training images ({fit['seconds']:.2f} s)")
    if report.get("validation"):
        v = report["validation"]
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
    for r in report["per_class"]:
        lines.append(f"  {r['class']:>5} {printable(r['name']):<14} {r['n']:>5} "
                     f"{r['source_accuracy']:>7.4f} {r['restricted_accuracy']:>7.4f} "
                     f"{r['component_accuracy']:>7.4f}")
    return "\n".join(lines)


def format_compress_report(report: dict[str, Any]) -> str:
    """A plain-text table of a compression report."""
    target = next(f"{flag} {report[key]}" for flag, key in (
        ("--target-flops", "target_flops"), ("--target-params", "target_params"),
        ("--max-accuracy-drop", "max_accuracy_drop")) if report[key] is not None)
    how = (f"{100 * report['fraction']:.1f} % of the channels of every prunable layer removed"
           if report["fraction"] is not None else
           f"mass rule, beta conv {report['locate']['beta_conv']} / linear "
           f"{report['locate']['beta_linear']} (inputs kept until they carry 1 - beta of "
           "the contribution)")
    lines = [
        f"compressed by {report['criterion']} ({target}): {how}",
        f"  test images {report['n']} of all {len(report['classes'])} classes, no fine-tuning",
        f"  accuracy  source {report['source_accuracy']:.4f} -> compressed "
        f"{report['component_accuracy']:.4f}  "
        f"({100 * (report['component_accuracy'] - report['source_accuracy']):+.2f} pp)",
        f"  params  {report['source_params']:>12,} -> {report['component_params']:>12,}  "
        f"({100 * report['params_ratio']:.1f} %)",
        f"  FLOPs   {report['source_flops']:>12,} -> {report['component_flops']:>12,}  "
        f"({100 * report['flops_ratio']:.1f} %)",
        f"  {report['seconds']:.2f} s",
        f"  {'class':>5} {'name':<14} {'n':>5} {'source':>7} {'compr.':>7}",
    ]
    for r in report["per_class"]:
        lines.append(f"  {r['class']:>5} {printable(r['name']):<14} {r['n']:>5} "
                     f"{r['source_accuracy']:>7.4f} {r['component_accuracy']:>7.4f}")
    return "\n".join(lines)


def format_assembly(result: dict[str, Any], manifest: dict[str, Any]) -> str:
    """A plain-text table of an assembled model's evaluation."""
    lines = [f"assembly of {len(manifest['parts'])} parts, layout {manifest['layout']}, "
             f"scaling {manifest['scaling']}: {len(manifest['labels'])} outputs, "
             f"{result['n']} test images",
             f"  accuracy            {result['accuracy']:.4f}",
             f"  balanced accuracy   {result['balanced_accuracy']:.4f}  (mean per class)",
             f"  Base                {result['base']:.4f}  (mean per-class accuracy of the "
             "parts on their own classes)",
             f"  params              {result['params']:,}",
             f"  FLOPs               {result['flops']:,}"]
    routing = result.get("routing")
    if routing:
        pairs = ", ".join(f"{k} {v:.4f}" for k, v in routing["auroc_pairs"].items())
        lines += [f"  routing accuracy    {routing['routing_accuracy']:.4f}  (images sent to "
                  "the part owning their class)",
                  f"  perfect routing     {routing['oracle_balanced_accuracy']:.4f}  "
                  f"(balanced; loss: routing {routing['routing_loss_pp']:.2f} pp, the parts' "
                  f"own {routing['classification_loss_pp']:.2f} pp)",
                  f"  routing AUROC       {pairs}  (part pairs)"]
    if "latency_ms" in result:
        lines.append(f"  CPU latency         {result['latency_ms']:.3f} ms/image")
    for lab, (key, acc) in zip(manifest["labels"], result["per_class"].items()):
        lines.append(f"    {printable(key):<18s} {printable(lab['name']):<14s} "
                     f"part {lab['part']}  {acc:.4f}")
    return "\n".join(lines)
