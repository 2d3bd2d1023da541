"""Where a file came from, and the one check every verb makes on the file it is given:
small pieces on plain manifests, shared by the file-level verbs and the algorithms that
also take files (assembly, distillation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ._version import __version__
from .errors import ModelLegoError
from .io import file_sha256
from .manifest import Manifest

#: the kinds of file that are one network with its own classes (not an assembly of parts)
SINGLE_KINDS = ("model", "component")


def require_single(manifest: Manifest | Mapping[str, Any], verb: str, *, where: str = "",
                   hint: str = "") -> None:
    """Refuse a file that is not a single model or component: ``verb`` says what was to be
    done with it (``"disassemble"``), ``where`` names the file, ``hint`` what to do instead;
    ``manifest`` may be an assembly's part entry."""
    kind = manifest.kind if isinstance(manifest, Manifest) else manifest.get("kind", "model")
    if kind not in SINGLE_KINDS:
        prefix = f"{where}: " if where else ""
        raise ModelLegoError(f"{prefix}can only {verb} a model or a component file, not a "
                             f"{kind!r}{hint}")


def source_record(manifest: Manifest, path: str | Path | None) -> dict[str, Any]:
    """Where a new file came from: the source file, its SHA-256, kind and classes."""
    return {"file": str(path) if path else None,
            "sha256": file_sha256(path) if path else None,
            "kind": manifest.kind, "classes": list(manifest.classes)}


def provenance(made_by: str, command: str | None, **fields: Any) -> dict[str, Any]:
    """A provenance record: which verb made the file, with which command line, by which
    version of modellego, plus the verb's own ``fields``."""
    return {"made_by": made_by, "command": command, **fields,
            "modellego_version": __version__}
