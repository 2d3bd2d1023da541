"""The part record: one model or component as an assembly holds it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..manifest import DictReads, Manifest, PartSpec, as_manifest

#: what an assembly's manifest records of each part's manifest
PART_KEYS = ("kind", "architecture", "plan", "head", "dataset", "classes", "class_names",
             "input")
#: the repairs that change a component's weights after the cut, by their configuration key
REPAIRS = ("reconstruct", "compensate", "recalibrate_bn")


@dataclass(frozen=True, eq=False)
class Part(DictReads):
    """One part of an assembly: its network and what the assembly's manifest records of it
    (``entry``, the typed :class:`~modellego.manifest.PartSpec`: ``part.entry.classes``,
    ``part.entry.input.shape``), with what assembling it needs beyond that: its router
    fingerprint (the manifest entry ``fingerprint_spec`` and its tensors) and the repairs
    that changed its weights after the cut.

    ``entry`` may be given as its JSON data (validated into a ``PartSpec``). Reading the
    part as a mapping (``part["classes"]``) is deprecated, as for a manifest."""

    net: nn.Module
    entry: PartSpec
    fingerprint: Mapping[str, torch.Tensor] | None = None
    fingerprint_spec: Mapping[str, Any] | None = None
    repairs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.entry, PartSpec):
            object.__setattr__(self, "entry", PartSpec.parse(self.entry, "a part's entry"))

    def to_dict(self) -> dict[str, Any]:
        """The part's entry as the assembly's manifest records it."""
        return self.entry.to_dict()

    def _dict_read(self, key: object) -> None:
        warnings.warn(f"reading a Part as a dict ({key!r}) is deprecated: use part.entry "
                      "(part.entry.classes, part.entry.input.shape, ...) or part.to_dict()",
                      DeprecationWarning, stacklevel=3)

    def __iter__(self) -> Iterator[str]:
        self._dict_read("iter()")
        return iter(self.to_dict())

    def __len__(self) -> int:
        self._dict_read("len()")
        return len(self.to_dict())

    @property
    def num_outputs(self) -> int:
        """The part network's number of logits (one per class of its manifest)."""
        return len(self.entry.classes)

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
        return cls(net.eval(), PartSpec.parse(entry, str(path) if path else "a part"),
                   fingerprint if spec else None, spec,
                   tuple(key for key in REPAIRS if made.get(key)))
