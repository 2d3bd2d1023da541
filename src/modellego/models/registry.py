"""One registry of architectures: ``create_model(name, ...)``, ``list_models(pattern)``.

Every builder takes the same keyword-only arguments (``in_channels``, ``num_classes``,
``input_size``, ``width``) so tools never special-case an architecture.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from ..errors import ModelFileError, ModelLegoError
from .attention import self_attention_layers
from .sources import build_source, split_source

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of one registered architecture."""

    name: str
    description: str
    builder: Builder
    family: str


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, description: str, family: str) -> Callable[[Builder], Builder]:
    """Register ``builder`` under ``name``; a second registration of a name is an error."""

    def wrap(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = ModelInfo(name, description, builder, family)
        return builder

    return wrap


def list_models(pattern: str | None = None) -> list[str]:
    """Registered architecture names, sorted; ``pattern`` is a shell glob such as ``'resnet*'``.

    Args:
        pattern: a shell glob on the names (default: all).

    Returns:
        The names, sorted.
    """
    names = sorted(_REGISTRY)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def model_info(name: str) -> ModelInfo:
    """Metadata of architecture ``name``; raises with the list of known names if unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelLegoError(
            f"unknown architecture {name!r}; known: {', '.join(list_models())} "
            "(see `modellego list-archs`)"
        ) from None


def create_model(
    name: str,
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    input_size: int = 32,
    width: float = 1.0,
) -> nn.Module:
    """Build architecture ``name`` with fresh weights.

    Args:
        name: a zoo architecture (:func:`list_models`).
        in_channels: image channels.
        num_classes: outputs.
        input_size: the images' height and width.
        width: channel (for ``vit``: head) width multiplier.

    Returns:
        The untrained network.

    >>> m = create_model("lenet5", in_channels=1, num_classes=10, input_size=28)
    """
    info = model_info(name)
    for arg, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 1),
                            ("input_size", input_size, 8)):
        if int(value) != value or value < low:
            raise ModelLegoError(f"{arg} must be an integer >= {low}, got {value!r}")
    if not width > 0:
        raise ModelLegoError(f"width must be > 0, got {width!r}")
    return info.builder(in_channels=int(in_channels), num_classes=int(num_classes),
                        input_size=int(input_size), width=float(width))


def scaled(channels: int, width: float, minimum: int = 4) -> int:
    """A channel count scaled by the width multiplier (never below ``minimum``)."""
    return max(minimum, int(round(channels * width)))


def build_architecture(name: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The untrained network of architecture ``name`` (any source, see
    :mod:`modellego.models.sources`: ``modellego:``/bare zoo names, ``torchvision:``,
    ``timm:``, and ``python:`` code granted with :func:`~modellego.models.sources.trusted`).
    Its ``nn.MultiheadAttention`` layers are made
    :class:`~modellego.models.attention.SelfAttentionMHA` (same parameters and results)."""
    source, target = split_source(name)
    if source == "modellego":
        return create_model(target, **dict(kwargs or {}))
    # (its nn.MultiheadAttention layers compute the same, with heads that can be removed)
    return self_attention_layers(build_source(name, kwargs))


def build_model(manifest: Mapping[str, Any]) -> nn.Module:
    """The network of a plain ``"model"`` manifest: its architecture with its arguments."""
    arch = manifest.get("architecture")
    if not isinstance(arch, Mapping) or "name" not in arch:
        raise ModelFileError("manifest has no architecture entry")
    return build_architecture(arch["name"], arch.get("kwargs"))
