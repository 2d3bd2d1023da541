"""The part record: one model or component as an assembly holds it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..manifest import Manifest, as_manifest

#: what an assembly's manifest records of each part's manifest
PART_KEYS = ("kind", "architecture", "plan", "head", "dataset", "classes", "class_names",
             "input")
#: the repairs that change a component's weights after the cut, by their configuration key
REPAIRS = ("reconstruct", "compensate", "recalibrate_bn")


@dataclass(frozen=True, eq=False)
class Part(Mapping[str, Any]):
    """One part of an assembly: its network and what the assembly's manifest records of it
    (``entry``, read as the part's mapping: ``part["classes"]``), with what assembling it
    needs beyond that: its router fingerprint (the manifest entry ``fingerprint_spec`` and
    its tensors) and the repairs that changed its weights after the cut."""

    net: nn.Module
    entry: Mapping[str, Any]
    fingerprint: Mapping[str, torch.Tensor] | None = None
    fingerprint_spec: Mapping[str, Any] | None = None
    repairs: tuple[str, ...] = ()

    def __getitem__(self, key: str) -> Any:
        return self.entry[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entry)

    def __len__(self) -> int:
        return len(self.entry)

    @property
    def num_outputs(self) -> int:
        """The part network's number of logits (one per class of its manifest)."""
        return len(self.entry["classes"])

    @classmethod
    def of(cls, net: nn.Module, manifest: Manifest | Mapping[str, Any], *,
           path: str | Path | None = None,
           fingerprint: Mapping[str, torch.Tensor] | None = None) -> Part:
        """The part of a model or component (``manifest``), read from file ``path`` (whose
        name and SHA-256 the entry records) or given in memory; its router fingerprint's
        tensors are ``fingerprint``, else those kept with ``net`` (see
        :func:`modellego.files.attach_fingerprint`)."""
        from ..files import attached_fingerprint
        from ..io import file_sha256

        if fingerprint is None:
            fingerprint = attached_fingerprint(net)
        manifest = as_manifest(manifest, source=str(path) if path else "a part's manifest")
        data = manifest.to_dict()
        entry = {k: data[k] for k in PART_KEYS if k in data}
        entry["file"] = str(path) if path else None
        entry["sha256"] = file_sha256(path) if path else None
        if manifest.kind == "component":
            source = manifest.file_source
            entry["source"] = {"file": None, "sha256": None} if source is None \
                else source.to_dict()
        spec = None if manifest.router_fingerprint is None \
            else manifest.router_fingerprint.to_dict()
        made = (manifest.provenance.data.get("config") if manifest.provenance else None) or {}
        return cls(net.eval(), entry, fingerprint if spec else None, spec,
                   tuple(key for key in REPAIRS if made.get(key)))
