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
from .registry import Registry

Builder = Callable[[Mapping[str, Any]], nn.Module]

KINDS: Registry[Builder] = Registry("model kind")


def register_kind(kind: str, build: Builder) -> Builder:
    """Register how a manifest of ``kind`` is rebuilt; a kind can be registered once."""
    return KINDS.register(kind, build)


def build_from_manifest(manifest: Mapping[str, Any]) -> nn.Module:
    """An ``nn.Module`` with the structure ``manifest`` describes (weights not loaded)."""
    kind = manifest.get("kind", "model")
    if kind not in KINDS:
        raise ModelFileError(f"unknown model kind {kind!r} in manifest; known: "
                             f"{', '.join(sorted(KINDS.names()))}; upgrade modellego")
    return KINDS.get(kind)(manifest)
