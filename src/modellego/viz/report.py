"""Self-contained HTML reports of a disassembly or an assembly.

One page, no external resources: styles inline, figures embedded as base64 PNG data URIs.
The tables show the numbers of the JSON report (rounded), the full JSON report and the
manifest's provenance follow verbatim.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ModelLegoError
from ..manifest import Manifest, as_manifest
from ..records import AssemblyEvaluation, AssemblyReport, DisassemblyReport
from .common import new_figure, plain_text, png_data_uri
from .route import RouteData, format_route, route_figure

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #d4d4d4; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
pre { background: #f7f7f7; border: 1px solid #e2e2e2; padding: .8em; overflow-x: auto;
      font-size: .82em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.muted { color: #666; font-size: .9em; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return _esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _esc(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
           left: Sequence[int] = (0,)) -> str:
    head = "".join(f'<th class="{"l" if i in left else ""}">{_esc(h)}</th>'
                   for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = "".join(f'<td class="{"l" if i in left else ""}">{_num(v)}</td>'
                        for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _pre(obj: Any) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, indent=2, sort_keys=True)
    return f"<pre>{_esc(text)}</pre>"


def _provenance(manifest: Manifest) -> str:
    prov = manifest.provenance.to_dict() if manifest.provenance is not None else {}
    scalars = [(k, v) for k, v in sorted(prov.items())
               if isinstance(v, (str, int, float, bool)) or v is None]
    nested = {k: v for k, v in prov.items() if k not in dict(scalars)}
    parts = [_table(["key", "value"], [(k, "" if v is None else v) for k, v in scalars],
                    left=(0, 1))]
    if nested:
        parts.append(_pre(nested))
    return "".join(parts)


def _page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{_esc(h)}</h2>\n{content}\n" for h, content in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{_esc(title)}</h1>\n{body}</body>\n</html>\n")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_esc(alt)}">'


def _class_label(c: Any, name: Any) -> str:
    return str(c) if str(name) == str(c) else f"{c} {name}"


def accuracy_figure(labels: Sequence[str], series: dict[str, Sequence[float]],
                    title: str):
    """Grouped bars of per-class accuracies, one colour per series."""
    from .common import class_colors

    n, m = len(labels), len(series)
    fig = new_figure(min(16.0, max(7.0, 2.5 + 0.3 * n * max(1, m))), 3.4)
    ax = fig.add_subplot()
    width = 0.8 / max(1, m)
    colors: Sequence[str | tuple[float, float, float, float]] = [
        "#9a9a9a", "#5b8def", "#e8743b", "#3aa17e"]
    if m > len(colors):
        colors = class_colors(m)
    for j, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(n)]
        bars = ax.bar(xs, values, width=width * 0.95, color=colors[j], label=plain_text(name))
        if n * m <= 24:
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=6.5, padding=1)
    ax.set_xticks(range(n))
    ax.set_xticklabels([plain_text(lab) for lab in labels], fontsize=8, rotation=30 if n > 8 else 0,
                       ha="right" if n > 8 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy", fontsize=9)
    ax.grid(axis="y", color="#e6e6e6", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=10)
    return fig


def disassembly_html(report: DisassemblyReport, manifest: Manifest | Mapping[str, Any],
                     route: RouteData | None = None) -> str:
    """The page of a disassembly: summary, per-class table, route, provenance, raw report."""
    manifest = as_manifest(manifest)
    r = report
    classes = r.classes
    drop = 100 * (r.component_accuracy - r.restricted_accuracy)
    summary = _table(["", "value"], [
        ("task classes", ", ".join(map(str, classes))),
        ("test images", r.n),
        ("source accuracy (all classes)", r.source_accuracy),
        ("source accuracy (restricted to the task)", r.restricted_accuracy),
        ("component accuracy", r.component_accuracy),
        ("change against restricted source (pp)", f"{drop:+.2f}"),
        ("params", f"{r.source_params:,} \u2192 {r.component_params:,} "
                   f"({100 * r.params_ratio:.1f} %)"),
        ("FLOPs", f"{r.source_flops:,} \u2192 {r.component_flops:,} "
                  f"({100 * r.flops_ratio:.1f} %)"),
        ("profile pass (s)", r.profile_seconds), ("total (s)", r.total_seconds)])
    rows = [(c.class_id, c.name, c.n, c.source_accuracy, c.restricted_accuracy,
             c.component_accuracy) for c in r.per_class]
    per_class = _table(["class", "name", "n", "source", "restricted", "component"], rows,
                       left=(1,))
    fig = accuracy_figure([_class_label(c.class_id, c.name) for c in r.per_class],
                          {"source (restricted)": [c.restricted_accuracy for c in r.per_class],
                           "component": [c.component_accuracy for c in r.per_class]},
                          "per-class test accuracy")
    sections = [("Summary", summary), ("Per class", per_class + _img(png_data_uri(fig),
                                                                     "per-class accuracy"))]
    if route is not None:
        rfig, _ = route_figure(route)
        sections.append(("Decision route", _img(png_data_uri(rfig), "decision route")
                         + '<p class="muted">Each bar is one conv/linear layer (outputs), '
                           "its channels sorted by how many task classes use them.</p>"
                         + _pre(format_route(route))))
    kept = manifest.provenance.to_dict().get("kept_channels") if manifest.provenance else None
    if kept:
        sections.append(("Kept channels", _table(
            ["layer", "kept", "of", "share"],
            [(name, k, t, f"{100 * k / t:.1f} %") for name, (k, t) in kept.items()])))
    sections.append(("Provenance", _provenance(manifest)))
    sections.append(("JSON report", _pre(report.to_dict())))
    return _page(f"modellego disassembly: classes {', '.join(map(str, classes))} "
                 f"of {manifest.own_dataset.name}", sections)


def assembly_html(result: AssemblyEvaluation, manifest: Manifest | Mapping[str, Any],
                  report: AssemblyReport | None = None) -> str:
    """The page of an assembly: summary, per-label table and figure, parts, provenance.

    ``result`` is :func:`modellego.assembly.evaluate_assembly`'s; ``report`` the JSON
    report written next to it (shown verbatim; default: ``{"evaluation": result}``).
    """
    manifest = as_manifest(manifest)
    spec = manifest.assembly
    if spec is None:
        raise ModelLegoError(f"assembly_html: the manifest is a {manifest.kind}, not an "
                             "assembly")
    summary = _table(["", "value"], [
        ("parts", len(spec.parts)),
        ("layout", spec.layout),
        ("scaling", spec.scaling),
        ("outputs", len(spec.labels)),
        ("test images", result.n),
        ("accuracy", result.accuracy),
        ("balanced accuracy (mean per class)", result.balanced_accuracy),
        ("Base (parts alone, own classes)", result.base),
        ("params", result.params),
        ("FLOPs", result.flops),
    ] + ([("CPU latency (ms/image)", result.latency_ms)]
         if result.latency_ms is not None else []))
    keys = list(result.per_class)
    rows = []
    for lab, key in zip(spec.labels, keys):
        rows.append((key, lab.name, lab.part, result.base_per_class.get(key),
                     result.per_class[key]))
    per_label = _table(["label", "name", "part", "Base", "assembled"], rows, left=(0, 1))
    fig = accuracy_figure([f"{lab.name} (p{lab.part})" for lab in spec.labels],
                          {"Base (part alone)": [result.base_per_class.get(k, 0.0)
                                                 for k in keys],
                           "assembled": [result.per_class[k] for k in keys]},
                          "per-label test accuracy")
    parts = []
    for i, p in enumerate(spec.parts):
        parts.append((i, p.kind, p.architecture.name, p.dataset.name,
                      ", ".join(map(str, p.classes)), p.file or ""))
    sections = [
        ("Summary", summary),
        ("Per label", per_label + _img(png_data_uri(fig), "per-label accuracy")),
        ("Parts", _table(["part", "kind", "architecture", "dataset", "classes", "file"],
                         parts, left=(1, 2, 3, 4, 5))),
        ("Provenance", _provenance(manifest)),
        ("JSON report", _pre(report.to_dict() if report is not None
                             else {"evaluation": result.to_dict()})),
    ]
    return _page(f"modellego assembly of {len(spec.parts)} parts", sections)


def write_html(path: str | Path, text: str) -> None:
    """Write a page atomically (UTF-8)."""
    from ..io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)
