"""The kinds of model file (``model``, ``component``, ``assembly``) and how each is rebuilt
into an (untrained) ``nn.Module`` from its manifest.

The builders live with what they build (the zoo, surgery, assembly); they are registered
where the package is assembled (``modellego/__init__.py``), so that nothing here imports the
layers above, and registering a kind twice raises, as the other registries do.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from .errors import ModelFileError
from .manifest import Manifest
from .registry import Registry

Builder = Callable[[Mapping[str, Any]], nn.Module]

KIND_REGISTRY: Registry[Builder] = Registry("model kind")


def register_kind(kind: str, build: Builder) -> Builder:
    """Register how a manifest of ``kind`` is rebuilt; a kind can be registered once."""
    return KIND_REGISTRY.register(kind, build)


def build_from_manifest(manifest: Manifest | Mapping[str, Any]) -> nn.Module:
    """An ``nn.Module`` with the structure ``manifest`` describes (weights not loaded); the
    kind's builder reads the manifest's JSON data (or an assembly's part entry)."""
    if isinstance(manifest, Manifest):
        manifest = manifest.to_dict()
    kind = manifest.get("kind", "model")
    if kind not in KIND_REGISTRY:
        raise ModelFileError(f"unknown model kind {kind!r} in manifest; known: "
                             f"{', '.join(sorted(KIND_REGISTRY.names()))}; upgrade modellego")
    return KIND_REGISTRY.get(kind)(manifest)
