"""Union layout: components cut from one source model merge by the union of their channels.

Shared channels are computed once: the result is the source restricted to the union of the
parts' channels, with one logit block per part. It needs the source model file, which each
component's manifest names (and whose SHA-256 it records).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, cast

import torch
from torch import nn

from ..errors import ModelLegoError
from ..files import load_model
from ..manifest import SourceRef
from ..surgery.extract import apply_plan
from ..surgery.graph import build_channel_graph
from ..surgery.plan import ComponentPlan
from .adapters import InputAdapter
from .parts import Part


def source_candidates(stored: str, part_file: str | Path | None) -> list[Path]:
    """Where the source file a component names (``stored``) may be, in the order tried: as
    is when absolute; else relative to the component file's folder (how modellego stores it
    now), then to the working folder (how 0.1.0 stored it)."""
    path = Path(stored)
    if path.is_absolute():
        return [path]
    found = [Path(part_file).parent / path] if part_file else []
    return found + ([path] if path not in found else [])


def find_source(stored: str | None, sha256: str | None, part_file: str | Path | None
                ) -> Path | None:
    """The first of :func:`source_candidates` that is a file with SHA-256 ``sha256``."""
    from ..io import file_sha256

    if not stored or not sha256:
        return None
    for path in source_candidates(stored, part_file):
        if path.is_file() and file_sha256(path) == sha256:
            return path
    return None


def union_sources(files: Sequence[str | Path]) -> list[Path]:
    """The source model files the components ``files`` name (those found): what
    ``--layout union`` reads besides the files it is given."""
    from ..io import read_manifest

    found = []
    for file in files:
        src = read_manifest(file).get("provenance", {}).get("source") or {}
        path = find_source(src.get("file"), src.get("sha256"), file)
        if path is not None:
            found.append(path)
    return found


def union_spec(parts: Sequence[Part]) -> dict[str, Any]:
    """Architecture and union plan of components of one source (read from the source file,
    found by :func:`find_source`; the spec records the path it was read from)."""
    sources = {p.entry.source.sha256 if p.entry.source else None for p in parts}
    if any(p.entry.kind != "component" for p in parts) or len(sources) != 1 or None in sources:
        raise ModelLegoError("`layout` union needs components cut from one source model "
                             "(their manifests name the same source file hash)")
    for k, p in enumerate(parts):
        # the union is the source cut by the union of the plans: a part whose weights were
        # repaired after the cut would silently lose its repair
        repairs = list(p.repairs)
        if repairs:
            raise ModelLegoError(
                f"`layout` union: part {k} was repaired after the cut ({', '.join(repairs)}), "
                "and the union is the source's plain cut; use `layout` parallel, or "
                "disassemble the parts without repairs (`reconstruct` 0)")
    ref = cast(SourceRef, parts[0].entry.source)
    sha = cast(str, ref.sha256)
    found = find_source(ref.file, sha, parts[0].entry.file)
    if found is None:
        raise ModelLegoError(f"`layout` union needs the source model file {ref.file!r} with "
                             f"SHA-256 {sha[:12]}...; it is missing or changed")
    path = str(found)
    src = {"file": path, "sha256": sha}
    source, manifest = load_model(path)
    if manifest.kind != "model":
        raise ModelLegoError(f"`layout` union: source {path} is not a plain model")
    graph = build_channel_graph(source, manifest.input.shape)
    last = graph.output_layer.name
    plans = [cast(ComponentPlan, p.entry.plan) for p in parts]
    merged: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, spec in plans[0].modules.items():
        merged[name] = {}
        for key in spec:
            if name == last and key == "out":
                merged[name][key] = tuple(i for pl in plans for i in pl.kept(name, key))
            else:
                merged[name][key] = tuple(sorted({i for pl in plans
                                                  for i in pl.kept(name, key)}))
    return {"architecture": manifest.own_architecture.to_dict(),
            "plan": ComponentPlan(merged).to_dict(), "source": src}


def union_net(spec: dict[str, Any], source: nn.Module | None = None) -> nn.Module:
    """The union network (from the source's weights, or an empty structure to load into)."""
    from ..kinds import build_from_manifest

    if source is None:
        source = build_from_manifest({"kind": "model", "architecture": spec["architecture"]})
    return apply_plan(source, ComponentPlan.from_dict(spec["plan"])).eval()


class UnionBody(nn.Module):
    """One network for all parts; its logits are split into the parts' blocks."""

    def __init__(self, adapter: InputAdapter, net: nn.Module, splits: Sequence[int]) -> None:
        super().__init__()
        self.adapters = nn.ModuleList([adapter])
        self.net = net
        self.splits = list(splits)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        logits = self.net(self.adapters[0](x))
        return [(piece, []) for piece in torch.split(logits, self.splits, 1)]
